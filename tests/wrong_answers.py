"""The graders' measure: a catalogue of plausible student mistakes, each of which must be rejected.

Every entry is `(script, grading command, old snippet, new snippet, what the mistake is)`. The
old snippet occurs exactly once in the script; replacing it with the new one gives code that still
runs and keeps every shape right, but is wrong. The grading command is one of the exercise
commands listed in the script's docstring (`Exercises`). For each entry this program copies the
repository to a temporary folder, applies the mistake there, runs the command and prints

    rejected   the command failed: the tests caught the mistake (what a teacher needs)
    ACCEPTED   the command passed: a plausible wrong answer gets full marks (a missing test)
    stale      the old snippet is not in the script exactly once, the command is not in the
               script's Exercises, it selects no test, or it fails on the unchanged code

and last `wrong answers rejected K/N`; it exits non-zero when any entry is accepted or stale.

With `--blank` it checks the other promise of the course instead: for every re-implement exercise
in EXERCISES, blanking its functions (body replaced by `raise NotImplementedError`) makes its own
grading command fail, keeps the test file collectable, and fails no test that another exercise of
the same script grades with (tests outside every exercise, such as the smoke run, may fail: they
use the whole model, and are not run by this check).

    python tests/wrong_answers.py                 # 8 entries per script, every exercise covered (CI)
    python tests/wrong_answers.py --all           # the whole catalogue
    python tests/wrong_answers.py --only mae      # one script's entries (with --all: every one)
    python tests/wrong_answers.py --blank         # the blanking check
"""
import argparse, ast, os, re, shlex, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (script, grading command, old snippet, new snippet, what the mistake is)
WRONG = []

# (script, functions to blank, grading command): the re-implement exercises
EXERCISES = []

# ============================================================ mae.py: 19 wrong answers, 4 exercises
_M = 'python -m pytest tests/test_mae.py -k "masking"'
_U = 'python -m pytest tests/test_mae.py -k "unshuffle"'
_L = 'python -m pytest tests/test_mae.py -k "patchify or loss"'
_D = 'python -m pytest tests/test_mae.py -k "drop_path"'

WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # --- random_masking
    ("mae", _M,
     "ids_shuffle = torch.argsort(noise, dim=1)",
     "ids_shuffle = torch.argsort(noise, dim=1, descending=True)",
     "keeps the patches with the largest noise"),
    ("mae", _M,
     "len_keep = int(L * (1 - mask_ratio))",
     "len_keep = round(L * (1 - mask_ratio))",
     "rounds the number of kept patches instead of taking the floor (196 at 90%: 20, not 19)"),
    ("mae", _M,
     "mask = torch.gather(mask, 1, ids_restore)",
     "mask = torch.gather(mask, 1, ids_shuffle)",
     "puts the mask back in order with the shuffle instead of its inverse"),
    ("mae", _M,
     "ids_keep = ids_shuffle[:, :len_keep]",
     "ids_keep = ids_shuffle[:, :len_keep].sort(dim=1).values",
     "keeps the right patches but in raster order, so the decoder's un-shuffle misplaces them"),
    ("mae", _M,
     "noise = torch.rand(N, L, device=x.device) if noise is None else noise",
     "noise = torch.rand(1, L, device=x.device).expand(N, L) if noise is None else noise",
     "draws one noise row for the whole batch: every sample gets the same mask"),
    # --- forward_decoder
    ("mae", _U,
     "x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)",
     "x_ = torch.cat([mask_tokens, x[:, 1:, :]], dim=1)",
     "puts the mask tokens before the visible tokens, so ids_restore sends them to the wrong slots"),
    ("mae", _U,
     "x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)",
     "x_ = torch.cat([x, mask_tokens], dim=1)",
     "forgets to take the cls token out before the un-shuffle"),
    ("mae", _U,
     "x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed",
     "x = torch.cat([x[:, :1, :], x_ + self.decoder_pos_embed[:, :-1, :]], dim=1)",
     "adds the position table without its cls row: every patch gets its neighbour's position"),
    ("mae", _U,
     "x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)                 # (N, L, Dd) in shuffled order\n"
     "        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle\n"
     "        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed",
     "x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1) + self.decoder_pos_embed[:, 1:, :]\n"
     "        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle\n"
     "        x = torch.cat([x[:, :1, :] + self.decoder_pos_embed[:, :1, :], x_], dim=1)",
     "adds the positions BEFORE the un-shuffle: a token gets the position of its shuffled slot"),
    ("mae", _U,
     "return x[:, 1:, :]                                                # (N, L, p*p*3): every patch",
     "return x[:, :-1, :]                                               # (N, L, p*p*3): every patch",
     "drops the last patch's prediction instead of the cls slot"),
    # --- patchify, unpatchify, forward_loss
    ("mae", _L,
     'x = torch.einsum("nchpwq->nhwpqc", x)',
     'x = torch.einsum("nchpwq->nhwcpq", x)',
     "flattens a patch in the conv weight's order (channel slowest), not channel fastest"),
    ("mae", _L,
     "x = imgs.reshape(N, c, h, p, w, p)",
     "x = imgs.reshape(N, c, p, h, p, w)",
     "splits each image axis as (pixel, patch) instead of (patch, pixel): same shape, scrambled patches"),
    ("mae", _L,
     "target.var(dim=-1, keepdim=True)",
     "target.var(dim=-1, keepdim=True, unbiased=False)",
     "norm-pix with the biased variance (the official uses torch's default, unbiased)"),
    ("mae", _L,
     "target = (target - mean) / (var + 1.0e-6) ** 0.5",
     "target = (target - mean) / (var ** 0.5 + 1.0e-6)",
     "norm-pix with eps outside the square root (flat patches blow up)"),
    ("mae", _L,
     "return (loss * mask).sum() / mask.sum()",
     "return loss.mean()",
     "loss on every patch instead of the removed ones only"),
    # --- drop_path
    ("mae", _D,
     "return x * keep / (1 - p)",
     "return x * keep",
     "drops without scaling the kept samples by 1 / (1 - p)"),
    ("mae", _D,
     "keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)",
     "keep = torch.empty_like(x).bernoulli_(1 - p)",
     "drops single elements (dropout) instead of a sample's whole branch"),
    ("mae", _D,
     "if p == 0.0 or not training:",
     "if p == 0.0:",
     "still drops in eval mode"),
]

WRONG += [  # found in the final read
    ("mae", _L,
     "target = (target - mean) / (var + 1.0e-6) ** 0.5",
     "target = (target - mean) / (var ** 0.5 + 1.0e-6)",
     "norm_pix_loss with the 1e-6 outside the square root (official: inside)"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("mae", ["random_masking"], _M),
    ("mae", ["MaskedAutoencoderViT.forward_decoder"], _U),
    ("mae", ["patchify", "unpatchify", "MaskedAutoencoderViT.forward_loss"], _L),
    ("mae", ["drop_path"], _D),
]

# ============================================================ videomae.py: 19 wrong answers, 4 exercises
T = 'python -m pytest tests/test_videomae.py -k "tokens"'
M = 'python -m pytest tests/test_videomae.py -k "masking"'
P = 'python -m pytest tests/test_videomae.py -k "pos_embed"'
U = 'python -m pytest tests/test_videomae.py -k "unshuffle or loss"'

WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # --- exercise 1: spacetime tokens (PatchEmbed.forward, patchify)
    ("videomae", T,
     "        return x.permute(0, 2, 3, 1)                        # step 1:",
     "        return x.reshape(N, x.shape[2], x.shape[3], -1)     # step 1:",
     "patch embed: reshape (N, D, T', S) to (N, T', S, D) instead of permuting: channels scrambled into tokens"),
    ("videomae", T,
     "        return x.permute(0, 2, 3, 1)                        # step 1:",
     "        return x.permute(0, 3, 2, 1)                        # step 1:",
     "patch embed: space-major tokens (N, S, T', D); the encoder then reads T' and S swapped"),
    ("videomae", T,
     "        x = videos.reshape(N, c, t, u, h, p, w, p)                  # (N, c, t, u, h, p, w, q)",
     "        x = videos.reshape(N, c, u, t, h, p, w, p)                  # (N, c, t, u, h, p, w, q)",
     "patchify: the u frames of a token taken T/u apart (t, t + T/u) instead of the tubelet's consecutive frames"),
    ("videomae", T,
     "        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)                       # (N, t, h, w, u, p, q, c)",
     "        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)                       # (N, t, h, w, u, p, q, c)",
     "patchify: values in the conv weight's (c, u, p, q) order instead of (u, p, q, c), channel fastest"),
    # --- exercise 2: random / tube masking
    ("videomae", M,
     "ids_shuffle = torch.argsort(noise, dim=1, stable=True)",
     "ids_shuffle = torch.argsort(noise, dim=1, stable=True, descending=True)",
     "keeps the tokens with the largest noise"),
    ("videomae", M,
     "        len_keep = int(L * (1 - mask_ratio))\n",
     "        len_keep = L - int(L * mask_ratio)\n",
     "len_keep = L - floor(L r): 157 of 1568 kept at 90% instead of floor(L (1 - r)) = 156"),
    ("videomae", M,
     "        noise = torch.rand(N, L, device=x.device) if noise is None else noise   # step 2:",
     "        noise = torch.rand(1, L, device=x.device).expand(N, L) if noise is None else noise   # step 2:",
     "one noise draw shared by the whole batch: every clip gets the same mask"),
    ("videomae", M,
     "        noise = noise[:, None, :].expand(N, t_size, S).reshape(N, L)",
     "        noise = noise[:, :, None].expand(N, S, t_size).reshape(N, L)",
     "tube noise laid out (S, T') before flattening: runs of T' consecutive tokens share a noise, not a tube"),
    ("videomae", M,
     "    mask = torch.gather(mask, 1, ids_restore)                       # (N, L) in token order",
     "    mask = torch.gather(mask, 1, ids_shuffle)                       # (N, L) in token order",
     "the mask put back in token order with ids_shuffle instead of its inverse ids_restore"),
    ("videomae", M,
     "        noise = torch.rand(N, S, device=x.device) if noise is None else noise",
     "        noise = torch.rand(N, S, device=x.device)",
     "tube masking ignores the noise it is given"),
    ("videomae", M,
     "random_masking(x, mask_ratio, noise, mask_type=mask_type or self.mask_type,",
     "random_masking(x, mask_ratio, None, mask_type=mask_type or self.mask_type,",
     "forward_encoder does not hand its noise to random_masking: the caller's noise is ignored"),
    # --- exercise 3: separable positions
    ("videomae", P,
     "    return spatial.repeat(1, T, 1) + torch.repeat_interleave(temporal, S, dim=1)",
     "    return spatial.repeat(1, T, 1) + temporal.repeat(1, S, 1)",
     "temporal table tiled instead of repeated per entry: token (t, s) gets temporal[(t S + s) mod T']"),
    ("videomae", P,
     "    return spatial.repeat(1, T, 1) + torch.repeat_interleave(temporal, S, dim=1)",
     "    return spatial.repeat(1, T, 1)",
     "forgets the temporal table: the time slices are indistinguishable"),
    ("videomae", P,
     "        pos = torch.gather(pos.expand(N, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))",
     "        pos = pos[:, :ids_keep.shape[1]].expand(N, -1, -1)",
     "adds the first len_keep positions to the kept tokens instead of each kept token's own"),
    # --- exercise 4: decoder un-shuffle and the loss
    ("videomae", U,
     "        x = torch.cat([x, self.mask_token.expand(N, L - n_vis, -1)], dim=1)",
     "        x = torch.cat([self.mask_token.expand(N, L - n_vis, -1), x], dim=1)",
     "mask tokens put before the visible tokens: the un-shuffle then sends them to the wrong slots"),
    ("videomae", U,
     "        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))       # (N, L, Dd) token order\n"
     "        x = x + separable_pos_embed(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)\n",
     "        x = x + separable_pos_embed(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)\n"
     "        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))       # (N, L, Dd) token order\n",
     "decoder positions added before the un-shuffle, in shuffled order"),
    ("videomae", U,
     "        return x[:, 1:]                                             # (N, L, u p^2 3)",
     "        return x[:, :-1]                                            # (N, L, u p^2 3)",
     "drops the last token instead of the cls slot: every prediction shifted by one"),
    ("videomae", U,
     "    return (loss * mask).sum() / mask.sum()                         # mean over removed tokens",
     "    return loss.mean()                                              # mean over removed tokens",
     "loss on all tokens, visible ones included"),
    ("videomae", U,
     "    loss = ((pred - target) ** 2).mean(dim=-1)                      # step 7:",
     "    loss = ((pred - target) ** 2).sum(dim=-1)                       # step 7:",
     "per-token squared error summed over the u p^2 3 values instead of averaged"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("videomae", ["PatchEmbed.forward", "MaskedAutoencoderViT.patchify"], T),
    ("videomae", ["random_masking"], M),
    ("videomae", ["separable_pos_embed"], P),
    ("videomae", ["MaskedAutoencoderViT.forward_decoder", "forward_loss"], U),
]

# ============================================================ mvit.py: 28 wrong answers, 3 exercises
# mvit.py's wrong answers and re-implement exercises (merged into tests/wrong_answers.py later).
POOL = 'python -m pytest tests/test_mvit.py -k "attention_pool"'
RELPOS = 'python -m pytest tests/test_mvit.py -k "decomposed"'
ATTN = 'python -m pytest tests/test_mvit.py -k "pooling_attention"'

WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # ---- attention_pool
    ("mvit", POOL,
     "x = x.reshape(B * n, *grid, c).movedim(-1, 1).contiguous()  # (B*n, c, [T,] H, W)",
     "x = x.reshape(B * n, c, *grid)  # (B*n, c, [T,] H, W)",
     "P(.): tokens reshaped straight to (B*n, c, H, W) instead of moving the channel axis"),
    ("mvit", POOL,
     "x = x.flatten(2).transpose(1, 2).reshape(B, n, -1, c)  # (B, n, N', c)",
     "x = x.flatten(2).reshape(B, n, -1, c)  # (B, n, N', c)",
     "P(.): pooled picture flattened back without the transpose (channels read as tokens)"),
    ("mvit", POOL,
     "x = x.flatten(2).transpose(1, 2).reshape(B, n, -1, c)  # (B, n, N', c)",
     "x = x.transpose(-2, -1).flatten(2).transpose(1, 2).reshape(B, n, -1, c)  # (B, n, N', c)",
     "P(.): pooled tokens read column-major (w before h), not in the keys' row-major order"),
    ("mvit", POOL,
     "x = torch.cat([cls_tok, x], dim=2)  # (B, n, 1 + N', c)",
     "x = torch.cat([x, cls_tok], dim=2)  # (B, n, 1 + N', c)",
     "P(.): the cls token put back last instead of first"),
    ("mvit", POOL,
     "        x = torch.cat([cls_tok, x], dim=2)  # (B, n, 1 + N', c)\n"
     "    return (norm(x) if norm is not None else x), grid",
     "        x = torch.cat([cls_tok, norm(x) if norm is not None else x], dim=2)  # (B, n, 1 + N', c)\n"
     "        return x, grid\n"
     "    return (norm(x) if norm is not None else x), grid",
     "P(.): LayerNorm on the pooled grid tokens only, the cls token left unnormalized"),
    ("mvit", POOL,
     "    x = pool(x)  # (B*n, c, [T',] H', W')\n    grid = tuple(x.shape[2:])",
     "    x = pool(x)  # (B*n, c, [T',] H', W')\n    grid = tuple(x.shape[-1:1:-1])",
     "P(.): the new grid returned as (W', H') (reversed): wrong on non-square grids"),
    ("mvit", POOL,
     "    if has_cls:\n        cls_tok, x = x[:, :, :1], x[:, :, 1:]\n    B, n, N, c = x.shape",
     "    if has_cls:\n        cls_tok, x = x[:, :, :1], x[:, :, 1:]\n    x = norm(x) if norm is not None else x\n"
     "    norm = None\n    B, n, N, c = x.shape",
     "P(.): LayerNorm before the pooling conv instead of after (and not on the cls token)"),
    # ---- get_rel_pos, decomposed_rel_pos
    ("mvit", RELPOS,
     "rq, rk = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)",
     "rq, rk = max(q_size / k_size, 1.0), max(k_size / q_size, 1.0)",
     "rel-pos index: the two scale factors swapped (the coarser grid's units)"),
    ("mvit", RELPOS,
     "idx = (dist + (k_size - 1) * rk).long()",
     "idx = (dist + (k_size - 1)).long()",
     "rel-pos index: the offset k_len - 1 not scaled by rk (negative indices wrap around the table)"),
    ("mvit", RELPOS,
     "idx = (dist + (k_size - 1) * rk).long()",
     "idx = (dist + (k_size - 1) * rk).round().long()",
     "rel-pos index: rounded instead of floored (differs when the grid ratio is not whole)"),
    ("mvit", RELPOS,
     "rq, rk = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)",
     "rq, rk = k_size / q_size, q_size / k_size",
     "rel-pos index: the ratios not clamped at 1 (the finer grid is shrunk instead)"),
    ("mvit", RELPOS,
     "idx = (dist + (k_size - 1) * rk).long()",
     "idx = (dist + (q_size - 1) * rq).long()",
     "rel-pos index: shifted by the query side q_size - 1 instead of the key side (k_size - 1) * rk"),
    ("mvit", RELPOS,
     'rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()',
     'rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="nearest")[0].t()',
     "rel-pos table of another length resized by nearest rows instead of linearly (SlowFast, detectron2)"),
    ("mvit", RELPOS,
     "dist = torch.arange(q_size, device=device)[:, None] * rq - torch.arange(k_size, device=device)[None, :] * rk",
     "dist = torch.arange(k_size, device=device)[None, :] * rk - torch.arange(q_size, device=device)[:, None] * rq",
     "rel-pos index: j - i instead of i - j (the table read mirrored)"),
    ("mvit", RELPOS,
     'rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, Rw)',
     'rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, Rh)',
     "E_rel: the h table used for the w axis too (same shape on square grids)"),
    ("mvit", RELPOS,
     "bias = rel_h[..., None, :, None] + rel_w[..., None, None, :]  # (B, n, qt, qh, qw, 1, kh, kw)",
     "bias = rel_h[..., None, None, :] + rel_w[..., None, :, None]  # (B, n, qt, qh, qw, 1, kh, kw)",
     "E_rel: broadcast over (kw, kh): the key order no longer matches the row-major pooled keys"),
    ("mvit", RELPOS,
     "r_q = q.reshape(B, n, qt, qh, qw, c)  # (B, n, qt, qh, qw, c)",
     "r_q = q.reshape(B, n, qt, qw, qh, c).transpose(3, 4)  # (B, n, qt, qh, qw, c)",
     "E_rel: the queries laid on the grid column-major (w before h)"),
    ("mvit", RELPOS,
     "bias = bias + rel_t[..., None, None]  # (B, n, qt, qh, qw, kt, kh, kw)",
     "bias = bias + rel_t.mean(-1, keepdim=True)[..., None, None]  # (B, n, qt, qh, qw, kt, kh, kw)",
     "E_rel: the temporal term averaged over the key frames instead of one per key frame"),
    # ---- MultiScaleAttention.forward
    ("mvit", ATTN,
     "qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, n, N, c)",
     "qkv = self.qkv(x).reshape(B, N, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)  # (3, B, n, N, c)",
     "pooling attention: qkv split as [head][q,k,v] instead of the checkpoints' [q,k,v][head]"),
    ("mvit", ATTN,
     "v, _ = attention_pool(v, self.pool_v, self.norm_v, grid, self.has_cls)  # V = P_V(X W_V)",
     "v, _ = attention_pool(v, self.pool_k, self.norm_k, grid, self.has_cls)  # V = P_V(X W_V)",
     "pooling attention: v pooled with the k pool and norm (P_V = P_K)"),
    ("mvit", ATTN,
     "bias = decomposed_rel_pos(q[:, :, s:], qg, kg,",
     "bias = decomposed_rel_pos(q[:, :, s:] * self.scale, qg, kg,",
     "pooling attention: E_rel from the scaled q (the paper's formula, not the code the weights need)"),
    ("mvit", ATTN,
     "bias = F.pad(bias, (s, 0, s, 0)).to(q.dtype)  # (B, n, Nq, Nk)",
     "bias = F.pad(bias, (0, s, 0, s)).to(q.dtype)  # (B, n, Nq, Nk)",
     "pooling attention: the zero cls row and column of E_rel padded at the end, not in front"),
    ("mvit", ATTN,
     "out = torch.cat([out[:, :, :s], out[:, :, s:] + q[:, :, s:]], dim=2)  # (B, n, Nq, c)",
     "out = out + q  # (B, n, Nq, c)",
     "residual pooling: + Q on the cls row too"),
    ("mvit", ATTN,
     "out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)",
     "out = F.scaled_dot_product_attention(q, v, k, attn_mask=bias)",
     "pooling attention: keys and values swapped (same shapes)"),
    ("mvit", ATTN,
     "attn = (attn + bias if bias is not None else attn).softmax(-1)",
     "attn = (attn + bias if bias is not None else attn).softmax(-2)",
     "pooling attention (explicit path): softmax over the queries instead of the keys"),
    ("mvit", ATTN,
     "attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, n, Nq, Nk)",
     "attn = q @ k.transpose(-2, -1)  # (B, n, Nq, Nk)",
     "pooling attention (explicit path): the 1/sqrt(d) scale forgotten"),
    ("mvit", ATTN,
     "        return self.proj(out), q_grid\n",
     "        return self.proj(out), k_grid\n",
     "pooling attention: the kv grid returned as the block's output grid (wrong when s_Q != s_KV)"),
    ("mvit", ATTN,
     "out = out.transpose(1, 2).reshape(B, -1, self.dim_out)  # step 6: (B, Nq, n*c)",
     "out = out.reshape(B, -1, self.dim_out)  # step 6: (B, Nq, n*c)",
     "pooling attention: heads merged by a reshape without the transpose (tokens and heads mixed)"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("mvit", ["attention_pool"], POOL),
    ("mvit", ["get_rel_pos", "decomposed_rel_pos"], RELPOS),
    ("mvit", ["MultiScaleAttention.forward"], ATTN),
]

# ============================================================ memvit.py: 26 wrong answers, 4 exercises
WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # -- the memory cache (update_memory, sample_memory)
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "        self.cached_k.append(k.detach())                                    # step 3: stop-grad",
     "        self.cached_k.append(k)                                    # step 3: stop-grad",
     "caches the keys with their graph (back-propagation through time into the previous clip)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "        mem_k = [self.cached_k[:-1][i][:B] for i in selections]              # step 5\n"
     "        mem_v = [self.cached_v[:-1][i][:B] for i in selections]",
     "        mem_k = [self.cached_k[:-1][i][:B] for i in reversed(selections)]              # step 5\n"
     "        mem_v = [self.cached_v[:-1][i][:B] for i in reversed(selections)]",
     "hands back the memories newest first (the relative positions expect the oldest first)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "            self.cached_k[-2] = self.cached_k[-2].detach()\n"
     "            self.cached_v[-2] = self.cached_v[-2].detach()",
     "            pass",
     "forgets to re-detach clip t-1's compressed memory: the next step back-propagates into it"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "        if len(self.cached_k) == self.keep_max_len:",
     "        if len(self.cached_k) > self.keep_max_len:",
     "caps the cache one clip too late (keeps keep_max_len clips, so `all` attends 3 memories)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "            self.cached_k, self.cached_v = self.cached_k[1:], self.cached_v[1:]\n"
     "            self.cached_ids = self.cached_ids[1:]",
     "            self.cached_k, self.cached_v = self.cached_k[:-1], self.cached_v[:-1]\n"
     "            self.cached_ids = self.cached_ids[:-1]",
     "drops the newest cached clip instead of the oldest when the cache is full"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "            return list(range(L))\n",
     "            return list(range(L))[-1:]\n",
     "`all` attends only the last cached clip (t-1) instead of every cached one"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "        return list(range(L))[-gap * (L // gap):: gap] if L >= gap else []",
     "        return list(range(L))[:: gap] if L >= gap else []",
     "gapN steps by N from the oldest cached clip instead of back from t (t-N, t-2N, ...)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "cache"',
     "        return list(range(L))[-gap * (L // gap):: gap] if L >= gap else []",
     "        return list(range(L))[-gap * (L // gap):: gap] if L > gap else []",
     "off by one: gapN attends nothing until N + 1 clips are cached (misses clip t-N)"),
    # -- memory compression (compress, compress_previous)
    ("memvit", 'python -m pytest tests/test_memvit.py -k "compress"',
     "        return thw_c\n\n    def update_memory",
     "        self.cached_k[-2], self.cached_v[-2] = self.cached_k[-2].detach(), self.cached_v[-2].detach()\n"
     "        return thw_c\n\n    def update_memory",
     "detaches the compressed memory at once: step t's loss no longer trains the compressor"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "compress"',
     "        self.cached_v[-2], _ = self.compress(self.cached_v[-2], self.compress_v,\n"
     "                                             self.norm_compress_v, thw)",
     "        self.cached_v[-2], _ = self.compress(self.cached_v[-2], self.compress_k,\n"
     "                                             self.norm_compress_k, thw)",
     "compresses the values with the keys' compressor (compress_k, norm_compress_k)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "compress"',
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw, norm)  # (B, 1, 1 + T'H'W', dim)\n"
     "        return out[:, 0], thw_c  # (B, 1 + T'H'W', dim)",
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw)  # (B, 1, 1 + T'H'W', dim)\n"
     "        return out[:, 0], thw_c  # (B, 1 + T'H'W', dim)",
     "forgets the LayerNorm after the compression conv"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "compress"',
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw, norm)  # (B, 1, 1 + T'H'W', dim)\n"
     "        return out[:, 0], thw_c  # (B, 1 + T'H'W', dim)",
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw)  # (B, 1, 1 + T'H'W', dim)\n"
     "        return torch.cat([mem[:, :1], norm(out[:, 0, 1:])], dim=1), thw_c",
     "the cls token skips the LayerNorm as well as the conv"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "compress"',
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw, norm)  # (B, 1, 1 + T'H'W', dim)\n"
     "        return out[:, 0], thw_c  # (B, 1 + T'H'W', dim)",
     "        B, N, D = mem.shape\n"
     "        grid = mem[:, 1:].reshape(B, D, *thw)  # (B, D, T, H, W)\n"
     "        y = pool(grid)\n"
     "        out = torch.cat([mem[:, :1], y.flatten(2).transpose(1, 2)], dim=1)\n"
     "        return norm(out), list(y.shape[2:])",
     "reshapes the (N, D) tokens straight into (D, T, H, W) without the transpose"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "compress"',
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw, norm)  # (B, 1, 1 + T'H'W', dim)",
     "        out, thw_c = pool_tokens(mem[:, None], pool, thw[::-1], norm)  # (B, 1, 1 + T'H'W', dim)",
     "lays the tokens out as a W x H x T grid (time and width swapped for the conv)"),
    # -- relative positions of memory tokens (memory_rel_pos)
    ("memvit", 'python -m pytest tests/test_memvit.py -k "memory_positions"',
     "        idx_t = torch.arange(qt)[:, None] + (Mt - 1 - torch.arange(Mt)[None, :]) * s  # (qt, Mt)",
     "        idx_t = torch.arange(qt)[:, None] + (Mt - 1 - torch.arange(Mt)[None, :])  # (qt, Mt)",
     "temporal offset counted in compressed frames, forgetting the compression stride s_t"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "memory_positions"',
     "        idx_t = torch.arange(qt)[:, None] + (Mt - 1 - torch.arange(Mt)[None, :]) * s  # (qt, Mt)",
     "        idx_t = torch.arange(qt)[:, None] + torch.arange(Mt)[None, :] * s  # (qt, Mt)",
     "memory frames numbered newest first: the oldest memory is placed nearest to the clip"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "memory_positions"',
     "            E = (rel_t[..., m * mt:(m + 1) * mt, None, None] + rel_h[..., None, :, None]",
     "            E = (rel_t[..., -mt:, None, None] + rel_h[..., None, :, None]",
     "every memory gets the temporal offsets of the newest one (same distance for t-1 and t-2)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "memory_positions"',
     "        Rh_mem = get_rel_pos(qh, mh, self.rel_pos_mem_h)  # (qh, mh, d)",
     "        Rh_mem = get_rel_pos(qh, mh, self.rel_pos_h)  # (qh, mh, d)",
     "memory keys use the current clip's height table instead of rel_pos_mem_h"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "memory_positions"',
     "            E = (rel_t[..., m * mt:(m + 1) * mt, None, None] + rel_h[..., None, :, None]\n"
     "                 + rel_w[..., None, None, :])  # (B, n, qt, qh, qw, mt, mh, mw)",
     "            E = (rel_t[..., m * mt:(m + 1) * mt, None, None]\n"
     "                 + torch.einsum(\"bnthwd,hkd->bnthwk\", r_q, Rh_mem)[..., None, :, None]\n"
     "                 + torch.einsum(\"bnthwd,wkd->bnthwk\", r_q, Rw_mem)[..., None, None, :])",
     "recomputes the space terms for every memory: the same values, but the official code computes "
     "them once (MeMViT-16 with two memories: +2.42% FLOPs instead of +2.32%)"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "memory_positions"',
     "            blocks += [E.new_zeros(B, n, qt * qh * qw, 1), E]  # cls of memory m, its tokens",
     "            blocks += [E, E.new_zeros(B, n, qt * qh * qw, 1)]  # cls of memory m, its tokens",
     "puts each memory's cls column after its tokens (the keys hold the cls first)"),
    # -- switching video (mask_memory)
    ("memvit", 'python -m pytest tests/test_memvit.py -k "switch"',
     "        same = [cid[:B] == ids for cid in self.cached_ids]  # each (B,) bool",
     "        same = [cid[:B] != ids for cid in self.cached_ids]  # each (B,) bool",
     "inverted test: zeroes the memory of the streams that stay in their video"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "switch"',
     "            self.cached_v[i] = torch.where(keep, self.cached_v[i], 0.0)\n",
     "",
     "zeroes the cached keys but not the values"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "switch"',
     "            keep[:B] = s\n",
     "            keep[:B] = bool(s.all())\n",
     "zeroes every stream's memory as soon as one stream moves to another video"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "switch"',
     "        if self.cached_k and self.cached_k[0].shape[0] == 1:  # the cached batch, not B\n",
     "        if self.cached_k:  # the cached batch, not B\n",
     "drops the whole cached clip (every stream's) instead of zeroing the switching stream"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "switch"',
     "        if self.cached_k and self.cached_k[0].shape[0] == 1:  # the cached batch, not B\n",
     "        if B == 1:  # the cached batch, not B\n",
     "decides from the current batch: a batch of one after a larger one (the last, smaller batch) "
     "drops the clips of the other streams too, where the official code zeroes that stream's"),
    ("memvit", 'python -m pytest tests/test_memvit.py -k "switch"',
     "        same = [cid[:B] == ids for cid in self.cached_ids]  # each (B,) bool",
     "        same = [self.cached_ids[-1][:B] == ids for cid in self.cached_ids]  # each (B,) bool",
     "compares the ids of the newest cached clip only (an older clip of the old video is read)"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("memvit", ["MemoryMultiScaleAttention.update_memory", "MeMViT.sample_memory"], 'python -m pytest tests/test_memvit.py -k "cache"'),
    ("memvit", ["MemoryMultiScaleAttention.compress", "MemoryMultiScaleAttention.compress_previous"],
     'python -m pytest tests/test_memvit.py -k "compress"'),
    ("memvit", ["MemoryMultiScaleAttention.memory_rel_pos"], 'python -m pytest tests/test_memvit.py -k "memory_positions"'),
    ("memvit", ["MemoryMultiScaleAttention.mask_memory"], 'python -m pytest tests/test_memvit.py -k "switch"'),
]

# ============================================================ vitdet.py: 15 wrong answers, 4 exercises
WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # ---- 1. window attention
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "window"',
     "    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, Cc)",
     "    windows = x.reshape(-1, window_size, window_size, Cc)",
     "window_partition reshapes without the permute: each 'window' is w rows of w-wide strips"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "window"',
     "    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)",
     "    x = windows.view(B, Wp // window_size, Hp // window_size, window_size, window_size, -1)",
     "window_unpartition swaps the numbers of window rows and columns (right on square maps only)"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "window"',
     "    return x[:, :H, :W, :].contiguous()",
     "    return x[:, Hp - H:, Wp - W:, :].contiguous()",
     "window_unpartition crops the top/left instead of the bottom/right padding"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "window"',
     "        x = self.norm1(x)  # step 3: LN first, THEN pad: the padded tokens are exact zeros\n"
     "        if self.window_size > 0:\n"
     "            H, W = x.shape[1], x.shape[2]\n"
     "            x, pad_hw = window_partition(x, self.window_size)  # (B*nW, w, w, C)\n",
     "        if self.window_size > 0:\n"
     "            H, W = x.shape[1], x.shape[2]\n"
     "            x, pad_hw = window_partition(x, self.window_size)  # (B*nW, w, w, C)\n"
     "        x = self.norm1(x)  # pads first: the padded tokens become LN1's bias\n",
     "pads before LN1 (detectron2 pads after it: padded keys are zeros, not the LN bias)"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "window"',
     "window_block_indexes = [i for i in range(depth) if i not in global_block_indexes]",
     "window_block_indexes = [i for i in range(depth) if i + 1 not in global_block_indexes]",
     "global attention in blocks 1, 4, 7, 10 instead of 2, 5, 8, 11 (off by one)"),
    # ---- 2. decomposed relative positions
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "rel_pos"',
     "    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)",
     "    rel = (k_coords - q_coords) + (k_size - 1) * max(q_size / k_size, 1.0)",
     "R[j - i] instead of R[i - j]: the table read mirrored"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "rel_pos"',
     "    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]",
     "    bias = rel_h[:, :, :, None, :] + rel_w[:, :, :, :, None]",
     "the key axis laid out (k_w, k_h) instead of (k_h, k_w): same shape in square windows"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "rel_pos"',
     "            q_ = q.reshape(B * nh, H * W, -1)  # (B*nh, N, d), the unscaled q",
     "            q_ = (q * self.scale).reshape(B * nh, H * W, -1)  # (B*nh, N, d)",
     "E_rel computed with the scaled q (the official code uses the unscaled q)"),
    # ---- 3. the simple feature pyramid
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "pyramid"',
     "outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))",
     "outs.append(F.max_pool2d(outs[-1], kernel_size=2, stride=2))",
     "p6 by a 2x2 max pool instead of detectron2's kernel-1 stride-2 subsampling (same shape)"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "pyramid"',
     "layers += [ConvNorm(cin, out_channels, 1), ConvNorm(out_channels, out_channels, 3, padding=1)]",
     "layers += [ConvNorm(cin, out_channels, 1), ConvNorm(out_channels, out_channels, 3, padding=1), nn.ReLU()]",
     "a ReLU after each level's 3x3 conv + LN (the pyramid has no activation there)"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "pyramid"',
     "x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)",
     "x = F.layer_norm(x.permute(0, 3, 2, 1), x.shape[1:2], self.weight, self.bias, self.eps)",
     "the channel LayerNorm permutes to (B, W, H, C): every square level comes back transposed"),
    # ---- 4. the 'python -m pytest tests/test_vitdet.py -k "fcos"' head: target assignment and loss
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "fcos"',
     "    quality = ok.float() * (1e8 - area[:, None])",
     "    quality = ok.float() * area[:, None]",
     "a point inside several boxes takes the largest one instead of the smallest"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "fcos"',
     "    horiz, vert = ltrb[:, 0::2], ltrb[:, 1::2]  # (l, r), (t, b)",
     "    horiz, vert = ltrb[:, :2], ltrb[:, 2:]  # (l, t), (r, b)",
     "centerness pairs l with t and r with b instead of l with r and t with b"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "fcos"',
     "    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)",
     "    alpha_t = (1 - alpha) * targets + alpha * (1 - targets)",
     "focal loss with alpha on the negatives (0.75 for objects, 0.25 for background)"),
    ("vitdet", 'python -m pytest tests/test_vitdet.py -k "fcos"',
     "torch.stack([xs.flatten(), ys.flatten()], 1).float().add(0.5).mul(s)",
     "torch.stack([xs.flatten(), ys.flatten()], 1).float().mul(s)",
     "points at the top-left corner of each cell instead of its centre"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("vitdet", ["window_partition", "window_unpartition"], 'python -m pytest tests/test_vitdet.py -k "window"'),
    ("vitdet", ["get_rel_pos", "decomposed_rel_pos"], 'python -m pytest tests/test_vitdet.py -k "rel_pos"'),
    ("vitdet", ["SimpleFeaturePyramid.__init__", "SimpleFeaturePyramid.forward"], 'python -m pytest tests/test_vitdet.py -k "pyramid"'),
    ("vitdet", ["fcos_targets", "fcos_loss"], 'python -m pytest tests/test_vitdet.py -k "fcos"'),
]

# ============================================================ tome.py: 19 wrong answers, 3 exercises
# Wrong answers for tome.py (merged into tests/wrong_answers.py by the coordinator).
M = 'python -m pytest tests/test_tome.py -k "matching"'
W = 'python -m pytest tests/test_tome.py -k "wavg"'
A = 'python -m pytest tests/test_tome.py -k "attention"'
X = 'python -m pytest tests/test_tome.py -k "matching_in_the_model"'

WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # --- bipartite_soft_matching
    ("tome", M,
     "metric = metric / metric.norm(dim=-1, keepdim=True)",
     "metric = metric",
     "matches on the dot product, not the cosine (forgets to normalise the keys)"),
    ("tome", M,
     "edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]",
     "edge_idx = node_max.argsort(dim=-1)[..., None]",
     "sorts the edges ascending: merges the r LEAST similar pairs"),
    ("tome", M,
     "scores[:, 0, :] = -math.inf",
     "scores[:, :, 0] = -math.inf",
     "protects B[0] (the column) instead of the class token A[0] (the row)"),
    ("tome", M,
     "unm_idx = unm_idx.sort(dim=1).values",
     "unm_idx = unm_idx",
     "leaves the unmerged A tokens in edge order: the class token leaves slot 0"),
    ("tome", M,
     "dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)",
     "dst_idx = node_idx[..., None][:, :r]",
     "takes the partners of the first r A tokens, not of the r merged ones"),
    ("tome", M,
     "src, reduce=mode)",
     "src, reduce=mode, include_self=False)",
     "scatter_reduce without the destination: a B token is replaced by its sources"),
    ("tome", M,
     "return torch.cat([unm, dst], dim=1)",
     "return torch.cat([dst, unm], dim=1)",
     "puts the B tokens first: the class token is no longer token 0"),
    ("tome", M,
     "    r = min(r, (T - protected) // 2)\n",
     "    r = min(r, T // 2)\n",
     "caps r at half of ALL tokens: with an even count the class token gets merged"),
    ("tome", X,
     "merge = bipartite_soft_matching(metric, r, class_token)",
     "merge = bipartite_soft_matching(x, r, class_token)",
     "matches on the tokens X instead of the keys K"),
    # --- merge_wavg
    ("tome", W,
     'x = merge(x * size, mode="sum")',
     'x = merge(x, mode="sum")',
     "forgets to weight the tokens by their sizes before summing"),
    ("tome", W,
     'size = merge(size, mode="sum")',
     'size = merge(size, mode="amax")',
     "a merged token's size is the largest size, not the sum"),
    ("tome", W,
     "return x / size, size",
     "return x, size",
     "returns the size-weighted sum, not the average"),
    # --- Attention.forward (proportional attention and the metric)
    ("tome", A,
     "size.log().to(q.dtype).reshape(B, 1, 1, N)",
     "size.log().to(q.dtype).reshape(B, 1, N, 1)",
     "adds log s on the query axis (a shift per row that softmax ignores)"),
    ("tome", A,
     "size.log().to(q.dtype).reshape(B, 1, 1, N)",
     "size.to(q.dtype).reshape(B, 1, 1, N)",
     "adds s instead of log s to the logits"),
    ("tome", A,
     "x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)",
     "x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias / math.sqrt(q.shape[-1]))",
     "scales log s by 1/sqrt(d) with the logits: (q k^T + log s) / sqrt(d)"),
    ("tome", A,
     "return self.proj(x), k.mean(1)",
     "return self.proj(x), q.mean(1)",
     "returns the queries as the matching metric"),
    ("tome", A,
     "return self.proj(x), k.mean(1)",
     "return self.proj(x), k.transpose(1, 2).reshape(B, N, D)",
     "concatenates the heads' keys instead of averaging them"),
    ("tome", A,
     "x = x.transpose(1, 2).reshape(B, N, D)",
     "x = x.reshape(B, N, D)",
     "merges the heads without moving the head axis back (tokens and heads mixed)"),
]
EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("tome", ["bipartite_soft_matching"], M),
    ("tome", ["merge_wavg"], W),
    ("tome", ["Attention.forward"], A),
]

WRONG += [  # found in the final read
    ("tome", 'python -m pytest tests/test_tome.py -k "wavg"',
     '''    x = merge(x * size, mode="sum")  # step 6: (B, T - r, D)  sum of s_i x_i over each group
    size = merge(size, mode="sum")  # (B, T - r, 1)  s' = sum of s_i
    return x / size, size''',
     '''    x = merge(x, mode="mean")  # an unweighted mean of each group
    size = merge(size, mode="sum")  # (B, T - r, 1)  s' = sum of s_i
    return x, size''',
     "merges by a plain mean, ignoring the sizes of the tokens merged"),
]

# ============================================================ revvit.py: 19 wrong answers, 4 exercises
# Wrong answers for revvit.py (merged into tests/wrong_answers.py by the coordinator).
FWD = 'python -m pytest tests/test_revvit.py -k "block_forward"'
INV = 'python -m pytest tests/test_revvit.py -k "inverse"'
BWD = 'python -m pytest tests/test_revvit.py -k "backward_pass"'
FUN = 'python -m pytest tests/test_revvit.py -k "revbackprop"'
SEED = 'python -m pytest tests/test_revvit.py -k "seed_replay"'

WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # --- ReversibleBlock.forward
    ("revvit", FWD,
     "Y1 = X1 + self.dropped(self.F(X2), self.seed)",
     "Y1 = X1 + self.dropped(self.F(X1), self.seed)",
     "F reads its own stream X1 instead of X2 (minREV revmvit's bug)"),
    ("revvit", FWD,
     "Y2 = X2 + self.dropped(self.G(Y1), self.seed)",
     "Y2 = X2 + self.dropped(self.G(X1), self.seed)",
     "G reads the old X1 instead of the updated Y1"),
    ("revvit", FWD,
     "Y2 = X2 + self.dropped(self.G(Y1), self.seed)",
     "Y2 = X2 + self.dropped(self.G(Y1), new_seed())",
     "draws a second seed for G: F and G no longer drop a sample together"),
    ("revvit", FWD,
     "        self.seed = new_seed()\n",
     "        self.seed = self.seed or new_seed()\n",
     "draws the seed once and reuses it: the same samples are dropped at every step"),
    ("revvit", FWD,
     "        return Y1, Y2\n",
     "        return Y2, Y1\n",
     "returns the two streams swapped"),
    # --- ReversibleBlock.inverse
    ("revvit", INV,
     "X1 = Y1 - self.dropped(self.F(X2), self.seed)",
     "X1 = Y1 - self.dropped(self.F(Y2), self.seed)",
     "computes F on the output Y2 instead of the rebuilt X2"),
    ("revvit", INV,
     "X2 = Y2 - self.dropped(self.G(Y1), self.seed)",
     "X2 = Y2 + self.dropped(self.G(Y1), self.seed)",
     "adds G(Y1) back instead of subtracting it"),
    ("revvit", INV,
     "X2 = Y2 - self.dropped(self.G(Y1), self.seed)",
     "X2 = Y2 - self.G(Y1)",
     "forgets the drop-path mask in the inverse"),
    # --- ReversibleBlock.backward_pass
    ("revvit", BWD,
     "dX1 = dY1 + dY1_via_G",
     "dX1 = dY1",
     "forgets the gradient that reaches Y1 through G"),
    ("revvit", BWD,
     "dX2 = dY2 + dX2_via_F",
     "dX2 = dX2_via_F",
     "forgets X2's identity path (the residual) in dX2"),
    ("revvit", BWD,
     "dX2_via_F, *dF = grads_of(f, [X2, *self.F.parameters()], dX1)",
     "dX2_via_F, *dF = grads_of(f, [X2, *self.F.parameters()], dY1)",
     "backpropagates dY1 through F instead of dX1"),
    ("revvit", BWD,
     "X2 = Y2 - g  # X2 = Y2 - G(Y1)",
     "X2 = Y2 + g  # X2 = Y2 - G(Y1)",
     "rebuilds X2 with the wrong sign"),
    ("revvit", BWD,
     "g = self.dropped(self.G(Y1), seed)  # G(Y1)",
     "g = self.G(Y1)  # G(Y1)",
     "recomputes G without its drop-path mask"),
    ("revvit", SEED,
     "seed = self.seed if self.replay_seeds else new_seed()",
     "seed = new_seed()",
     "does not replay the forward's seed: fresh drop-path masks in the recomputation"),
    # --- RevBackProp
    ("revvit", FUN,
     "for blk in reversed(ctx.blocks):",
     "for blk in ctx.blocks:",
     "walks the blocks first to last in the backward"),
    ("revvit", FUN,
     "param_grads = grads + param_grads",
     "param_grads = param_grads + grads",
     "collects the blocks' parameter gradients in reverse block order"),
    ("revvit", FUN,
     "return torch.cat([dY1, dY2], dim=-1), None, *param_grads",
     "return torch.cat([dY2, dY1], dim=-1), None, *param_grads",
     "returns the two streams' input gradients swapped"),
    ("revvit", FUN,
     "Y1, Y2 = Y.detach().chunk(2, dim=-1)",
     "Y2, Y1 = Y.detach().chunk(2, dim=-1)",
     "splits the saved output into the streams the wrong way round"),
    ("revvit", FUN,
     "ctx.amp = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))",
     "ctx.amp = (dev, torch.get_autocast_dtype(dev), False)",
     "recomputes outside autocast (fp32) while the forward ran in bf16"),
]
EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("revvit", ["ReversibleBlock.forward"], FWD),
    ("revvit", ["ReversibleBlock.inverse"], INV),
    ("revvit", ["ReversibleBlock.backward_pass"], BWD),
    ("revvit", ["RevBackProp.forward", "RevBackProp.backward"], FUN),
]

# ============================================================ flip.py: 19 wrong answers, 4 exercises
WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # ---- exercise 1: random_masking
    ("flip", 'python -m pytest tests/test_flip.py -k "masking"',
     "ids_shuffle = noise.argsort(dim=1)  # (B, L)",
     "ids_shuffle = noise.argsort(dim=1, descending=True)  # (B, L)",
     "keeps the patches with the largest noise, not the smallest"),
    ("flip", 'python -m pytest tests/test_flip.py -k "masking"',
     "    len_keep = int(L * (1 - mask_ratio))\n    noise",
     "    len_keep = round(L * (1 - mask_ratio))\n    noise",
     "rounds the number of kept patches instead of the official floor"),
    ("flip", 'python -m pytest tests/test_flip.py -k "masking"',
     "mask = mask.gather(1, ids_restore)  # (B, L) back in the patch order",
     "mask = mask.gather(1, ids_shuffle)  # (B, L) back in the patch order",
     "un-shuffles the mask with the shuffle itself instead of its inverse"),
    ("flip", 'python -m pytest tests/test_flip.py -k "masking"',
     "noise = torch.rand(B, L, device=x.device) if noise is None else noise",
     "noise = torch.rand(1, L, device=x.device).expand(B, L) if noise is None else noise",
     "one noise row for the whole batch: every image loses the same patches"),
    ("flip", 'python -m pytest tests/test_flip.py -k "masking"',
     "noise = torch.rand(B, L, device=x.device) if noise is None else noise",
     "noise = torch.rand(B, L, device=x.device)",
     "ignores the noise it is given: a mask cannot be reproduced from the official noise"),
    # ---- exercise 2: VisionTower.forward
    ("flip", 'python -m pytest tests/test_flip.py -k "vision_tower"',
     "        x = x + self.pos_embed[:, 1:]  # step 2: positions first, so a kept patch knows where it was\n"
     "        mask = None\n"
     "        if mask_ratio > 0:\n"
     "            x, mask, _ = random_masking(x, mask_ratio, noise)",
     "        mask = None\n"
     "        if mask_ratio > 0:\n"
     "            x, mask, _ = random_masking(x, mask_ratio, noise)\n"
     "        x = x + self.pos_embed[:, 1:1 + x.shape[1]]",
     "adds the positions after masking: the k-th kept token gets patch k's position"),
    ("flip", 'python -m pytest tests/test_flip.py -k "vision_tower"',
     "x = x + self.pos_embed[:, 1:]",
     "x = x + self.pos_embed[:, :-1]",
     "off by one in the position table: patch j gets row j (the cls slot goes to patch 0)"),
    ("flip", 'python -m pytest tests/test_flip.py -k "vision_tower"',
     "x = x.flatten(2).transpose(1, 2)",
     "x = x.transpose(2, 3).flatten(2).transpose(1, 2)",
     "patches taken column by column: each meets the position of its mirror image"),
    ("flip", 'python -m pytest tests/test_flip.py -k "vision_tower"',
     "return x.mean(dim=1), mask",
     "return x[:, 1:].mean(dim=1), mask",
     "pools the patch tokens only, leaving the cls token out of the official mean"),
    ("flip", 'python -m pytest tests/test_flip.py -k "vision_tower"',
     "            x, mask, _ = random_masking(x, mask_ratio, noise)  # step 3",
     "            x, mask, _ = random_masking(x, mask_ratio)  # step 3",
     "does not hand its noise to random_masking: the caller's noise is ignored"),
    # ---- exercise 3: flip_loss, FLIP.clipped_logit_scale
    ("flip", 'python -m pytest tests/test_flip.py -k "infonce"',
     "return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))",
     "return F.cross_entropy(logits, target)",
     "one direction only (image to text): not the symmetric loss"),
    ("flip", 'python -m pytest tests/test_flip.py -k "infonce"',
     "logits = logit_scale.exp() * z_img @ z_txt.t()",
     "logits = logit_scale * z_img @ z_txt.t()",
     "multiplies by the log scale: temperature 1/2.66 instead of 0.07"),
    ("flip", 'python -m pytest tests/test_flip.py -k "infonce"',
     "z_img, z_txt = gather_global(z_img), gather_global(z_txt)  # (N, E) each",
     "",
     "contrasts only the local batch: no gather of the other ranks' pairs"),
    ("flip", 'python -m pytest tests/test_flip.py -k "infonce"',
     "return self.logit_scale.clamp(0, math.log(100))",
     "return self.logit_scale.clamp(0, 100)",
     "clips the log scale at 100 instead of ln 100: the temperature can fall below 0.01"),
    # ---- exercise 4: TextTower.forward
    ("flip", 'python -m pytest tests/test_flip.py -k "text_tower"',
     "return self.norm(x)[:, 0]",
     "return self.norm(x)[torch.arange(len(x)), (tokens > 0).sum(1) - 1]",
     "pools CLIP's end-of-text token (the last non-pad one) instead of the first token"),
    ("flip", 'python -m pytest tests/test_flip.py -k "text_tower"',
     "return self.norm(x)[:, 0]",
     "return self.norm(x).mean(dim=1)",
     "averages all text tokens, pads included (txt_avg_token=True is not the official choice)"),
    ("flip", 'python -m pytest tests/test_flip.py -k "text_tower"',
     "self.pos_embed[:, : tokens.shape[1]]",
     "self.pos_embed[:, -tokens.shape[1]:]",
     "takes the LAST T positions of the table: wrong as soon as a text is shorter than the context"),
    ("flip", 'python -m pytest tests/test_flip.py -k "text_tower"',
     "bias=(tokens == 0).float())  # (B, T)",
     "bias=None)  # (B, T)",
     "text masking without the pad bias: words are dropped while pads are kept"),
    ("flip", 'python -m pytest tests/test_flip.py -k "text_tower"',
     "            x = x[mask == 0].reshape(len(x), -1, x.shape[-1])  # (B, T_keep, W), in caption order",
     "            x = random_masking(x, mask_ratio, noise, bias=(tokens == 0).float())[0]",
     "keeps the text tokens in the shuffled (noise) order: the pooled first token is a random word"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("flip", ["random_masking"], 'python -m pytest tests/test_flip.py -k "masking"'),
    ("flip", ["VisionTower.forward"], 'python -m pytest tests/test_flip.py -k "vision_tower"'),
    ("flip", ["flip_loss", "FLIP.clipped_logit_scale"], 'python -m pytest tests/test_flip.py -k "infonce"'),
    ("flip", ["TextTower.forward"], 'python -m pytest tests/test_flip.py -k "text_tower"'),
]

# ============================================================ diffmae.py: 36 wrong answers, 4 exercises
_F = 'python -m pytest tests/test_diffmae.py -k "forward_process"'
_S = 'python -m pytest tests/test_diffmae.py -k "sampler"'
_C = 'python -m pytest tests/test_diffmae.py -k "conditioning"'
_L = 'python -m pytest tests/test_diffmae.py -k "loss"'

WRONG += [
    # (script, grading command, old snippet, new snippet, what the mistake is)
    # --- the forward process: make_schedule, q_sample, q_sample_masked (and forward's draws)
    ("diffmae", _F,
     "    betas = betas ** rho  # step 2",
     "    betas = betas * rho  # step 2",
     "scales the betas by rho instead of raising them to the power rho"),
    ("diffmae", _F,
     "torch.cumprod(1 - betas, 0)])  # (T+1,) step 2",
     "torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - betas[:-1]]), 0)])  # (T+1,) step 2",
     "off by one in abar: abar_t = prod_{s<t} (1 - beta_s), one step too clean"),
    ("diffmae", _F,
     "        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)",
     "        betas = torch.linspace(1e-4, 0.02, T + 1, dtype=torch.float64)[1:]",
     "builds the linear betas on T + 1 points and drops the first (beta_1 is not 1e-4)"),
    ("diffmae", _F,
     "        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # step 3",
     "        return ab.sqrt() * x0 + (1 - ab) * noise  # step 3",
     "scales the noise by the variance 1 - abar_t instead of its square root"),
    ("diffmae", _F,
     "        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # step 3",
     "        return ab * x0 + (1 - ab).sqrt() * noise  # step 3",
     "scales x0 by abar_t instead of sqrt(abar_t)"),
    ("diffmae", _F,
     "        ab = self.abar[t].view(-1, *([1] * (x0.dim() - 1)))  # (N, 1, ...)",
     "        ab = self.abar[t - 1].view(-1, *([1] * (x0.dim() - 1)))  # (N, 1, ...)",
     "indexes abar 0-based, so x_t gets the noise level of t - 1"),
    ("diffmae", _F,
     "self.q_sample(x0, t, noise), x0)  # (N, L, P) step 3",
     "x0, self.q_sample(x0, t, noise))  # (N, L, P) step 3",
     "diffuses the visible patches and leaves the masked ones clean (mask read the wrong way)"),
    ("diffmae", _F,
     "            t = torch.randint(1, self.T + 1, (N,), device=imgs.device)  # t ~ U{1..T} per sample",
     "            t = torch.randint(1, self.T + 1, (1,), device=imgs.device).expand(N)  # t ~ U{1..T} per sample",
     "draws one noise level for the whole batch instead of one per sample"),
    ("diffmae", _F,
     "            t = torch.randint(1, self.T + 1, (N,), device=imgs.device)  # t ~ U{1..T} per sample",
     "            t = torch.randint(0, self.T, (N,), device=imgs.device)  # t ~ U{1..T} per sample",
     "draws t from 0..T-1: t = 0 (no noise) is trained, t = T (pure noise, the sampler's start) never"),
    ("diffmae", _F,
     "            noise = torch.randn_like(x0)  # (N, L, P)",
     "            noise = torch.rand_like(x0)  # (N, L, P)",
     "uniform noise in [0, 1) instead of Gaussian noise"),
    ("diffmae", _F,
     "out = self.forward_decoder(take(x_t, ids_masked), t, latent, feats, ids_masked, ids_restore)",
     "out = self.forward_decoder(take(x0, ids_masked), t, latent, feats, ids_masked, ids_restore)",
     "feeds the decoder the clean masked patches instead of the noisy ones (the answer leaks)"),
    # --- the sampler: posterior_step, x0_from_output, sample_timesteps, the sample loop
    ("diffmae", _S,
     "        alpha = ab_t / ab_s",
     "        alpha = 1 - self.betas[t - 1]",
     "uses the one-step alpha_t = 1 - beta_t even when the sampler skips steps"),
    ("diffmae", _S,
     "        var = (1 - alpha) * (1 - ab_s) / (1 - ab_t)  # beta_tilde",
     "        var = 1 - alpha  # beta_tilde",
     "uses beta instead of the posterior variance beta_tilde (and so adds noise at the last step)"),
    ("diffmae", _S,
     "        return mean + var.sqrt() * noise  # step 7",
     "        return mean + var * noise  # step 7",
     "scales the noise by the variance instead of the standard deviation"),
    ("diffmae", _S,
     "(ab_s.sqrt() * (1 - alpha) / (1 - ab_t)) * x0_hat + (alpha.sqrt() * (1 - ab_s) / (1 - ab_t)) * x_t",
     "(ab_s.sqrt() * (1 - alpha) / (1 - ab_t)) * x_t + (alpha.sqrt() * (1 - ab_s) / (1 - ab_t)) * x0_hat",
     "swaps the posterior mean's two coefficients (x0_hat's goes to x_t)"),
    ("diffmae", _S,
     "(alpha.sqrt() * (1 - ab_s) / (1 - ab_t)) * x_t",
     "(alpha * (1 - ab_s) / (1 - ab_t)) * x_t",
     "forgets the square root of alpha in x_t's coefficient"),
    ("diffmae", _S,
     "        return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()",
     "        return (x_t - (1 - ab) * out) / ab.sqrt()",
     "recovers x0 from eps with 1 - abar_t instead of its square root"),
    ("diffmae", _S,
     "            s = ts[k + 1] if k + 1 < len(ts) else 0",
     "            s = t - 1",
     "steps to t - 1 instead of the next sampled timestep: 50 steps only reach t = 950"),
    ("diffmae", _S,
     "    ts = torch.linspace(T, 1, max(1, min(steps, T))).round().long()",
     "    ts = torch.arange(T, 0, -max(1, T // steps))[:steps]",
     "strides by T // steps: the chain ends at t = 16 (T = 100, 7 steps), not at t = 1"),
    ("diffmae", _S,
     "            x_m = self.posterior_step(x_m, x0_hat, tt[0], torch.tensor(s, device=imgs.device), z)",
     "            x_m = self.posterior_step(x0_hat, x_m, tt[0], torch.tensor(s, device=imgs.device), z)",
     "hands posterior_step x0_hat and x_t in the wrong order"),
    ("diffmae", _S,
     "            x0_hat = torch.maximum(torch.minimum(x0_hat, self.pix_hi), self.pix_lo)  # valid pixels",
     "            x0_hat = x0_hat.clamp(-1, 1)  # valid pixels",
     "clamps x0 to [-1, 1] (a [-1, 1]-scaled image's range) instead of the normalized pixel range"),
    # --- the decoder's conditioning: timestep_embedding, forward_decoder
    ("diffmae", _C,
     "        pos = take(self.decoder_pos_embed[:, 1:].expand(N, -1, -1), ids_masked)  # (N, Lm, Dd) step 5",
     "        pos = self.decoder_pos_embed[:, 1:1 + Lm].expand(N, -1, -1)  # (N, Lm, Dd) step 5",
     "gives the noisy tokens the positions of the first Lm patches, not of their own patches"),
    ("diffmae", _C,
     "        pos = take(self.decoder_pos_embed[:, 1:].expand(N, -1, -1), ids_masked)  # (N, Lm, Dd) step 5",
     "        pos = take(self.decoder_pos_embed[:, :-1].expand(N, -1, -1), ids_masked)  # (N, Lm, Dd) step 5",
     "forgets the table's cls row: every noisy token gets the previous patch's position"),
    ("diffmae", _C,
     "temb = self.decoder_t_embed(timestep_embedding(t, y.shape[-1]))  # (N, Dd)",
     "temb = self.decoder_t_embed(timestep_embedding(t / self.T, y.shape[-1]))  # (N, Dd)",
     "embeds t / T instead of the integer timestep (the sinusoids barely move)"),
    ("diffmae", _C,
     "    return torch.cat([args.cos(), args.sin()], dim=1)  # (N, dim)",
     "    return torch.cat([args.sin(), args.cos()], dim=1)  # (N, dim)",
     "puts the sines first in the timestep embedding"),
    ("diffmae", _C,
     "    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (half,)",
     "    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / dim)  # (half,)",
     "divides the frequency exponent by dim instead of dim / 2"),
    ("diffmae", _C,
     "            for blk, i in zip(self.decoder_blocks, self.pairing):",
     "            for blk, i in zip(self.decoder_blocks, reversed(self.pairing)):",
     "pairs the decoder with the encoder bottom-up (block 0 reads the shallowest features)"),
    ("diffmae", _C,
     "                y = blk(y, feats[i])",
     "                y = blk(y, latent)",
     "every decoder block reads the encoder's last output instead of its paired block"),
    ("diffmae", _C,
     "            seq = torch.cat([x[:, 1:], y], dim=1)  # (N, L, Dd) in shuffled order",
     "            seq = torch.cat([y, x[:, 1:]], dim=1)  # (N, L, Dd) in shuffled order",
     "joint: puts the noisy tokens before the visible ones, so ids_restore sends them to the wrong slots"),
    ("diffmae", _C,
     "            y = take(seq[:, 1:], ids_masked)  # (N, Lm, Dd)",
     "            y = seq[:, -Lm:]  # (N, Lm, Dd)",
     "joint: reads the predictions at the last Lm slots in patch order, not at the masked patches"),
    # --- the loss: forward_loss (and the target forward hands it)
    ("diffmae", _L,
     "    return (per_patch * mask).sum() / mask.sum()  # step 6",
     "    return (per_patch * mask).mean()  # step 6",
     "divides by every patch, visible ones included, instead of the masked ones"),
    ("diffmae", _L,
     "    return (per_patch * mask).sum() / mask.sum()  # step 6",
     "    return per_patch.mean()  # step 6",
     "puts the loss on all patches, visible ones included"),
    ("diffmae", _L,
     "    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)",
     "    per_patch = ((pred - target) ** 2).sum(dim=-1)  # (N, L)",
     "sums the squared error over a patch's pixels instead of averaging it"),
    ("diffmae", _L,
     "    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)",
     "    per_patch = (pred - target).abs().mean(dim=-1)  # (N, L)",
     "an L1 loss instead of the L2 loss"),
    ("diffmae", _L,
     "    return (per_patch * mask).sum() / mask.sum()  # step 6",
     "    return (per_patch * (1 - mask)).sum() / (1 - mask).sum()  # step 6",
     "puts the loss on the visible patches (mask read the wrong way)"),
    ("diffmae", _L,
     '        target = noise if (self.pred == "eps" and self.decoder != "mae") else x0',
     "        target = x0",
     "an eps-predicting model still regresses x0"),
]

EXERCISES += [
    # (script, functions blanked for the exercise, grading command): re-implement ones only
    ("diffmae", ["make_schedule", "DiffMAE.q_sample", "DiffMAE.q_sample_masked"], _F),
    ("diffmae", ["DiffMAE.posterior_step", "DiffMAE.x0_from_output", "sample_timesteps"], _S),
    ("diffmae", ["timestep_embedding", "DiffMAE.forward_decoder"], _C),
    ("diffmae", ["forward_loss"], _L),
]


# ------------------------------------------------------------------ the machinery


def _copy_repo(dst):
    """The scripts, tests and pytest.ini: what a grading command reads (no runs/, no .git)."""
    for p in ROOT.iterdir():
        if p.suffix == ".py" or p.name == "pytest.ini":
            shutil.copy2(p, dst / p.name)
    shutil.copytree(ROOT / "tests", dst / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "parity"))


def _argv(command, extra=()):
    argv = shlex.split(command)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv + list(extra)


def _env(jobs):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTEST_ADDOPTS"] = "-x -q -p no:cacheprovider"
    if jobs > 1:  # one thread per job: two jobs on two cores, not four threads fighting
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(command, cwd, jobs, timeout, extra=()):
    try:
        r = subprocess.run(_argv(command, extra), cwd=cwd, env=_env(jobs), capture_output=True,
                           text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return "timeout", ""


def _script_text(script):
    return (ROOT / f"{script}.py").read_text()


def _stale_reason(script, command, old):
    text = _script_text(script)
    n = text.count(old)
    if n != 1:
        return f"old snippet found {n} times in {script}.py"
    doc = ast.get_docstring(ast.parse(text)) or ""
    if command not in doc:
        return f"command not in {script}.py's docstring: {command}"
    return None


def _clean_check(commands, jobs, timeout):
    """Each distinct grading command must collect and select at least one test (that the tests
    pass on the unchanged code is the test suite's job: run it first, as .ci/run does)."""
    bad = {}
    with tempfile.TemporaryDirectory() as tmp:
        _copy_repo(Path(tmp))
        with ThreadPoolExecutor(jobs) as pool:
            for cmd, sel in zip(sorted(commands), pool.map(lambda c: _selected(c, tmp, jobs, timeout),
                                                           sorted(commands))):
                if not sel:
                    bad[cmd] = "selects no test (or does not collect)"
    return bad


def core(entries, per_script=8):
    """The default run's share of the catalogue: for each script, its exercises' entries taken in
    turn (the first of each exercise, then the second, ...) up to `per_script`."""
    picked = []
    for script in dict.fromkeys(e[0] for e in entries):
        queues = {}
        for e in entries:
            if e[0] == script:
                queues.setdefault(e[1], []).append(e)
        mine = []
        while len(mine) < per_script and any(queues.values()):
            for q in queues.values():
                if q and len(mine) < per_script:
                    mine.append(q.pop(0))
        picked += sorted(mine, key=entries.index)
    return picked


def check_wrong(entries, jobs, timeout):
    bad_cmds = _clean_check({e[1] for e in entries}, jobs, timeout)

    def one(entry):
        script, command, old, new, what = entry
        why = _stale_reason(script, command, old) or bad_cmds.get(command)
        if why:
            return "stale", entry, why
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _copy_repo(tmp)
            path = tmp / f"{script}.py"
            path.write_text(path.read_text().replace(old, new, 1))
            rc, out = _run(command, tmp, jobs, timeout)
        if rc == "timeout":
            return "rejected", entry, "timed out"
        if rc == 5:
            return "stale", entry, "the mistake makes the command select no test"
        return ("ACCEPTED" if rc == 0 else "rejected"), entry, ""

    t0, counts = time.time(), {"rejected": 0, "ACCEPTED": 0, "stale": 0}
    with ThreadPoolExecutor(jobs) as pool:
        for verdict, (script, command, old, new, what), why in pool.map(one, entries):
            counts[verdict] += 1
            print(f"{verdict:9s} {script:9s} {what}" + (f"  [{why}]" if why else ""), flush=True)
    n = len(entries)
    print(f"({time.time() - t0:.0f} s)")
    print(f"wrong answers rejected {counts['rejected']}/{n}")
    return counts["rejected"] == n


# ---- blanking: a re-implement exercise's functions replaced by `raise NotImplementedError`

def blank(text, names):
    """The source with each named function's (or Class.method's) body replaced by a raise."""
    tree, lines = ast.parse(text), text.split("\n")
    spans = []
    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and prefix + node.name in names:
                first = node.body[0]
                keep_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str)
                start = node.body[1].lineno if keep_doc and len(node.body) > 1 else (
                    first.end_lineno + 1 if keep_doc else first.lineno)
                indent = " " * first.col_offset
                spans.append((start, node.end_lineno, indent, prefix + node.name))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
    visit(tree.body, "")
    missing = set(names) - {s[3] for s in spans}
    if missing:
        raise KeyError(", ".join(sorted(missing)))
    for start, end, indent, name in sorted(spans, reverse=True):
        lines[start - 1:end] = [f'{indent}raise NotImplementedError("exercise: {name}")']
    return "\n".join(lines)


def _failing_tests(command, cwd, jobs, timeout):
    env = _env(jobs)
    env["PYTEST_ADDOPTS"] = "-p no:cacheprovider -rfE"
    try:
        r = subprocess.run(_argv(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, set()
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M))
    return r.returncode, {f.split(" ")[0] for f in failed}


def _selected(command, cwd, jobs, timeout):
    env = _env(jobs)
    env["PYTEST_ADDOPTS"] = "-p no:cacheprovider"  # with pytest.ini's -q: one node id a line
    r = subprocess.run(_argv(command, ["--collect-only"]), cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return {line.strip() for line in r.stdout.splitlines() if "::" in line}


def _k_expr(command):
    argv = shlex.split(command)
    return argv[argv.index("-k") + 1]


def check_blank(exercises, jobs, timeout):
    """Blanking one exercise must fail its own command and no test that another exercise grades
    with (tests outside every exercise, the smoke run say, may fail: they use the whole model)."""
    with tempfile.TemporaryDirectory() as tmp:
        _copy_repo(Path(tmp))
        with ThreadPoolExecutor(jobs) as pool:
            selected = dict(zip(range(len(exercises)),
                                pool.map(lambda ex: _selected(ex[2], tmp, jobs, timeout), exercises)))

    def one(i):
        script, names, command = exercises[i]
        own = selected[i]
        others = set().union(*[selected[j] for j, e in enumerate(exercises) if e[0] == script and j != i])
        if not own:
            return "stale", exercises[i], "the command selects no test"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _copy_repo(tmp)
            path = tmp / f"{script}.py"
            try:
                path.write_text(blank(path.read_text(), names))
            except KeyError as e:
                return "stale", exercises[i], f"no function {e} in {script}.py"
            # one run over every exercise test of the script (not its smoke or DDP runs): the
            # failures inside `own` grade the blank, the ones inside `others` must not exist
            exprs = [_k_expr(e[2]) for e in exercises if e[0] == script]
            rc, failed = _failing_tests(f"python -m pytest tests/test_{script}.py -k " +
                                        shlex.quote(" or ".join(f"({x})" for x in exprs)), tmp, jobs, timeout)
            if rc is None:
                return "BAD", exercises[i], "the test file timed out"
            if rc not in (0, 1):
                return "BAD", exercises[i], f"the test file did not run (exit {rc}): collection broke"
            if not failed & own:
                return "BAD", exercises[i], "the blanked functions pass their own grading command"
            broken = sorted((failed & others) - own)
            if broken:
                return "BAD", exercises[i], "breaks other exercises' tests: " + ", ".join(broken)
        return "ok", exercises[i], f"{len(failed & own)} of its {len(own)} tests fail, none of the other exercises'"

    good, t0 = 0, time.time()
    with ThreadPoolExecutor(jobs) as pool:
        for verdict, (script, names, command), why in pool.map(one, range(len(exercises))):
            good += verdict == "ok"
            print(f"{verdict:6s} {script:9s} {', '.join(names)}  [{why}]", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    print(f"blanked exercises isolated {good}/{len(exercises)}")
    return good == len(exercises)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="one script's entries (e.g. mae)")
    p.add_argument("--all", action="store_true", help="every entry, not the default 8 per script")
    p.add_argument("--blank", action="store_true", help="check that blanked exercises fail only their own tests")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args(argv)
    if a.blank:
        exs = [e for e in EXERCISES if a.only in (None, e[0])]
        ok = check_blank(exs, a.jobs, a.timeout)
    else:
        entries = [e for e in (WRONG if a.all else core(WRONG)) if a.only in (None, e[0])]
        if not entries:
            sys.exit(f"error: no wrong answers for {a.only!r}")
        ok = check_wrong(entries, a.jobs, a.timeout)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
