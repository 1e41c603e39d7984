"""MeMViT: Memory-Augmented Multiscale Vision Transformer for Efficient Long-Term Video Recognition.

Chao-Yuan Wu, Yanghao Li, Karttikeya Mangalam, Haoqi Fan, Bo Xiong, Jitendra Malik, Christoph
Feichtenhofer. CVPR 2022, arXiv 2201.08383. Official code: github.com/facebookresearch/MeMViT.

The idea. A video model sees a short clip (16 frames, about 2 s). MeMViT reads a long video as a
stream of consecutive clips, one per training iteration, and lets every clip attend to a *memory*
of the clips before it. The memory is free to build: each attention layer simply keeps the pooled
key/value inputs it computed for the previous clips (stored before the k/v Linear, detached from
the graph) and appends them to the keys and values of the current clip:

    Q = x W_q,   K = [M_{t-gap·2}; M_{t-gap}; x] W_k,   V = [M_{t-gap·2}; M_{t-gap}; x] W_v

Old memory is shrunk by a learnt depthwise 3-D conv ("memory compression", kernel 7x3x3 stride
4x2x2: 8x7x7 tokens -> 2x4x4). The compressor is trained with *pipelined compression*: the raw
memory of clip t-1 is compressed during step t with gradient on, so step t's loss trains the
compressor, while everything older stays stop-gradient (no back-propagation through time). Because
layer l's memory was itself computed while attending to layer l-1's memory, the temporal support
grows with depth: 30x longer than the clip for a few percent more compute.

What this file reproduces in miniature. A tiny MeMViT (the video MViTv2 underneath: pool-first
attention with separate q/k/v Linears, cls token, decomposed space-time relative positions,
residual pooling; plus the memory: caches, compression, samplers `all`/`gapN`, length cap, zeroing
of memory from another video, memory attention in even layers only) is trained on a synthetic
long-range task: a video of K=3 clips whose label is the colour of a brief cue shown only in the
first clip; the other clips hold moving distractor shapes of the same colours. The label is read at
the LAST clip, so a model that sees one clip is at chance (25 %), a model with memory is not.
Training walks each batch slot through the consecutive clips of one video on consecutive
iterations, carrying the memory between iterations, as the official AVA training does.
`--bench` measures the paper's claim, compute, on the official `16` preset (MeMViT-16,
16x224x224): the FLOPs per clip with 0, 1 and 2 memories, the temporal support each covers, and
the time per clip without and with the two memories.

    python memvit.py                      # train tiny with memory, evaluate clip by clip, draw
    python memvit.py --no_memory          # the same model built without memory: chance at the last clip
    python memvit.py --data DIR           # long videos in DIR/<class>/*.mp4, cut into K clips
    python memvit.py --smoke              # seconds; exit status says pass/fail
    python memvit.py --bench              # MeMViT-16: FLOPs/time per clip with vs without memory, support

Departures from the official code (and why):
- Classification head instead of the AVA detection head: the official release trains on AVA with
  ROI-Align boxes and a memory-augmented "box transformer" (`box_blocks.0`); here the cls token goes
  to `head.projection` like the Kinetics MViTv2 models. `--weights` on an official AVA checkpoint
  loads every backbone key (names equal the official ones) and drops `box_blocks.*` (and the
  80-class head when the class count differs), saying so.
- The head returns logits in eval mode too (the official head applies softmax/sigmoid in eval).
- Zeroing memory from another video is done with a new tensor (torch.where) instead of writing
  zeros into the cached tensor in place; the values are the same, and an old graph is never touched.
  Whether stale clips are dropped instead is decided, as officially, by the cached batch (a cache
  of batches of one drops them), so a last, smaller batch of one still zeroes; a batch larger than
  the cached one is an error here as there (the official code asserts).
- `--no_memory` / use_memory=False builds no memory parameters (compressors, rel_pos_mem_*), as the
  official code with MEMVIT.ENABLE and MEMVIT.COMPRESS.ENABLE off (the defaults): a memory-less
  official state dict loads with every key matched. `--weights` of a checkpoint with memory into
  such a model drops the memory's tensors, and a memory-less checkpoint into a model with memory
  keeps the memory's fresh initialisation, each saying so (the official loader is not strict).
- Attention runs through F.scaled_dot_product_attention with the relative-position term passed as
  an additive mask (same maths as the official softmax(q k^T * scale + rel) V). The current clip's
  time term goes through the shared get_rel_pos: with q and k of equal length (every MeMViT
  layer) its index is the official i - j + (kt - 1); for clips of another length than the model
  was built for it interpolates rel_pos_t, where the official code indexes the table as it is
  (rows 0 .. 2kt - 2: off its centre for shorter clips, out of range for longer ones).
- `tiny` preset (CPU): 4 blocks, width 32->128, 8 frames at 32x32, kv stride [1,2,2], sampler `all`
  (so the compressor is trained, see below), no drop path, no head dropout. The `16` and `24`
  presets carry the official AVA configs (gap2/gap3, ATTN_MAX_LEN 3, drop path 0.4, head dropout
  0.5). Quirk kept from the official code: with the gapN samplers the freshly compressed t-1
  memory is never attended, so the compressor receives no gradient (tests check both samplers).
- Training recipe: AdamW + warmup/cosine (the shared loop) instead of the AVA SGD recipe; the loss
  is softmax cross-entropy on every clip (the video's label) instead of AVA's per-box BCE.
- Stream order: the B batch slots walk B videos in lockstep (all slots start a new video at the same
  iteration, every video has K clips); in the official AVA loader each slot walks a concatenation
  of videos of different lengths and switches on its own. The video-id zeroing handles both.
- --data: each video is decoded once, its K clips centre-cropped and kept in memory (uint8), with
  no augmentation (the same crop would have to hold for all K clips of a stream).
- Default K = 3: the last clip is two clips after the cue, inside the direct reach of the first
  memory layer. With K = 4 the cue must travel two hops (block 0 at clip 1/2, then block 2 at
  clip 3); in a 5-epoch CPU run that last hop was not learnt (clips 1-2 at 100 %, clip 3 at chance),
  so the default stays at what a few CPU minutes can show. The support test checks the path exists.

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `MemoryMultiScaleAttention.update_memory` and `MeMViT.sample_memory` (the paper's
   memory caching, K = [M_{t-gap·2}; M_{t-gap}; x] W_k above; reading map steps 0, 3, 5, 6: cache
   this clip's pooled k/v detached, hand back the selected memories oldest first, re-detach clip
   t-1's, keep (ATTN_MAX_LEN - 1) * gap clips; `all` attends every cached clip, `gapN` the clips
   t-N, t-2N, ...).
   Grade: `python -m pytest tests/test_memvit.py -k "cache"`
2. Re-implement `MemoryMultiScaleAttention.compress` and
   `MemoryMultiScaleAttention.compress_previous` (the paper's memory compression and pipelined
   compression, Fig. 2: "we cache the uncompressed memory, which will only be compressed at the
   next iteration"; step 4: f = LayerNorm after a learnt depthwise 7x3x3 / 4x2x2 Conv3d, cls
   bypassing the conv; applied once, to clip t-1's raw memory at step t, with gradient, so step
   t's loss trains f).
   Grade: `python -m pytest tests/test_memvit.py -k "compress"`
3. Re-implement `MemoryMultiScaleAttention.memory_rel_pos` (MViTv2's decomposed relative
   positions extended to the memory keys, step 8: the memory's own tables, temporal index
   i + (Mt - 1 - j) * s_t over the memories' frames oldest first, a 0 column for each memory's cls;
   at the official cost: the space terms once for all memories, the time term once over all Mt).
   Grade: `python -m pytest tests/test_memvit.py -k "memory_positions"`
4. Re-implement `MemoryMultiScaleAttention.mask_memory` (step 2, official rule for a stream that
   moves to another video: that sample's cached memory is ZEROED, not masked; when the cache holds
   batches of one, the stale clips are dropped and the selections renumbered).
   Grade: `python -m pytest tests/test_memvit.py -k "switch"`
5. Explore: the official AVA sampler `gap2` (memories t-2 and t-4) instead of the tiny default
   `all` (t-1 and t-2). Predict the accuracy at each of the K = 3 clips, then run
   `python memvit.py --sampler gap2 --epochs 5` and read `acc_per_clip` in runs/memvit/metrics.json. You
   should see clip 1 fall to chance (its cache holds only t-1, which gap2 skips) while the last
   clip still reads the cue from t-2, even though with gap2 the compressor never gets a gradient
   (the freshly compressed t-1 memory is never attended): its random init still passes the cue
   (measured at 5 epochs, before the memory fixes of this version: acc_per_clip 1.00 / 0.26 / 0.99 with gap2, 1.00 / 1.00 / 1.00
   with `all`; gap2's temporal support is 9 clips against 5).
   Grade: `python -m pytest tests/test_memvit.py -k "gap"`
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

# ============================================================ the ordinary building blocks: video MViTv2

class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)  # (B, 1, 1)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dim_out):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Conv3d stem, kernel (3,7,7) stride (2,4,4): 16x224x224 -> 8x56x56 tokens."""

    def __init__(self, dim_out, kernel=(3, 7, 7), stride=(2, 4, 4), padding=(1, 3, 3)):
        super().__init__()
        self.proj = nn.Conv3d(3, dim_out, kernel, stride, padding)

    def forward(self, x):  # x (B, 3, T, H, W)
        x = self.proj(x)  # (B, C, T', H', W')
        return x.flatten(2).transpose(1, 2), list(x.shape[2:])  # (B, T'H'W', C), [T', H', W']


def pool_tokens(x, pool, thw, norm=None):
    """Apply a 3-D pooling conv to tokens laid out as a T x H x W grid; the cls token (index 0)
    bypasses the pooling and is put back in front; then LayerNorm over the channels.
    x (B, n, 1 + T*H*W, c) -> (B, n, 1 + T'*H'*W', c), [T', H', W']."""
    B, n, _, c = x.shape
    cls, x = x[:, :, :1], x[:, :, 1:]  # (B, n, 1, c), (B, n, THW, c)
    x = x.reshape(B * n, *thw, c).permute(0, 4, 1, 2, 3).contiguous()  # (B*n, c, T, H, W)
    x = pool(x)  # (B*n, c, T', H', W')
    thw = list(x.shape[2:])
    x = x.reshape(B, n, c, -1).transpose(2, 3)  # (B, n, T'H'W', c)
    x = torch.cat([cls, x], dim=2)  # (B, n, 1 + T'H'W', c)
    return (norm(x) if norm is not None else x), thw


def get_rel_pos(q_size, k_size, rel_pos):
    """Relative-position embeddings for one axis, (q_size, k_size, C): the table row of every
    (query i, key j) pair, the distance measured in the finer grid's units (MViTv2):
        R[i, j] = rel_pos[i * max(k/q, 1) - j * max(q/k, 1) + (k - 1) * max(q/k, 1)].
    The table has 2 * max(q, k) - 1 rows; one of another length is linearly interpolated along
    its rows first (the official get_rel_pos)."""
    n = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != n:
        rel_pos = F.interpolate(rel_pos.t()[None], size=n, mode="linear")[0].t()  # (n, C)
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    dist = (torch.arange(q_size, device=rel_pos.device)[:, None] * q_ratio
            - torch.arange(k_size, device=rel_pos.device)[None, :] * k_ratio)  # (q, k)
    return rel_pos[(dist + (k_size - 1) * k_ratio).long()]  # (q_size, k_size, C)


def decomposed_rel_pos(q, q_size, k_size, rel_pos_h, rel_pos_w, rel_pos_t=None):
    """MViTv2's decomposed relative positions, the bias added to the attention logits: for query
    (t, y, x) and key (t', y', x'),
        E = q . R_t[t, t'] + q . R_h[y, y'] + q . R_w[x, x']       (one einsum per axis).
    q (B, n, qt*qh*qw, C): the grid's queries, cls left out, NOT scaled by 1/sqrt(d) (official);
    q_size, k_size: (t, h, w). Returns (B, n, qt*qh*qw, kt*kh*kw)."""
    (qt, qh, qw), (kt, kh, kw) = q_size, k_size
    B, n, _, c = q.shape
    r_q = q.reshape(B, n, qt, qh, qw, c)  # (B, n, qt, qh, qw, C)
    rel_t = 0.0  # no time axis: no time term
    if rel_pos_t is not None:
        Rt = get_rel_pos(qt, kt, rel_pos_t)  # (qt, kt, C)
        rel_t = torch.einsum("bnthwc,tkc->bnthwk", r_q, Rt)[..., None, None]  # (.., kt, 1, 1)
    rel_h = torch.einsum("bnthwc,hkc->bnthwk", r_q, get_rel_pos(qh, kh, rel_pos_h))  # (.., kh)
    rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, get_rel_pos(qw, kw, rel_pos_w))  # (.., kw)
    E = rel_t + rel_h[..., None, :, None] + rel_w[..., None, None, :]  # (B, n, qt, qh, qw, kt|1, kh, kw)
    return E.expand(B, n, qt, qh, qw, kt, kh, kw).reshape(B, n, qt * qh * qw, kt * kh * kw)


# ============================================================ the paper's idea: memory attention
#
# Per attention layer, the state carried between forward calls (one call = one clip per stream):
#   cached_k, cached_v : list of (B, 1 + N, dim) pooled k/v inputs of earlier clips, oldest first,
#                        stored BEFORE the k/v Linear and detached; all but the newest compressed
#   cached_ids         : list of (B,) video ids, to tell which memory belongs to which video
#
# Per call (official order, attention.py), with the function that does each step:
#   0. which cached clips to attend: `all`, or every gap-th one (MeMViT.sample_memory)
#   1. pool q, k, v from the block input (pool-first); q = W_q q                       (forward)
#   2. zero every cached sample whose video id differs from the stream's current id; a cache of
#      batch one drops the stale clips instead (decided by the CACHED batch)      (mask_memory)
#   3. append the current pooled k, v, detached          (stop-gradient: no BPTT)  (update_memory)
#   4. compress cache[-2] (clip t-1, still raw) NOW, with gradient   (pipelined compression:
#      compress_previous, which applies f = compress)
#   5. K_in = [cache[i] for i in selections] + [k];  V_in likewise                 (update_memory)
#   6. detach cache[-2] again; drop the oldest entry once the cache holds keep_max_len (idem)
#   7. k = W_k K_in, v = W_v V_in  (today's weights project yesterday's memory)          (forward)
#   8. attention with relative positions (the current clip's: decomposed_rel_pos; the memory's own
#      tables: memory_rel_pos, its space terms computed once for all memories), residual pooling,
#      proj                                                                            (forward)


class MemoryMultiScaleAttention(nn.Module):
    """Pool-first multiscale attention (separate q/k/v Linears after the pooling) with MeMViT's
    memory. memory=False builds the same layer without the memory's parameters (compressors and
    rel_pos_mem_* tables), as the official code does without MEMVIT.ENABLE."""

    def __init__(self, dim, dim_out, num_heads, input_size, kernel_q, kernel_kv, stride_q,
                 stride_kv, attn_max_len=3, keep_max_len=3, compress_kernel=(7, 3, 3),
                 compress_stride=(4, 2, 2), memory=True):
        super().__init__()
        self.num_heads = num_heads
        self.dim_out = dim_out
        head_dim = dim_out // num_heads
        self.scale = head_dim ** -0.5
        self.attn_max_len, self.keep_max_len = attn_max_len, keep_max_len
        self.compress_stride = compress_stride
        # pool-first: heads are split from the block INPUT, so the shared depthwise conv has
        # dim // num_heads channels (e.g. 48 in MeMViT-16's block 1: 96 input channels, 2 heads)
        dim_conv = dim // num_heads
        self.q = nn.Linear(dim, dim_out)
        self.k = nn.Linear(dim, dim_out)
        self.v = nn.Linear(dim, dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

        def pool(kernel, stride):
            return nn.Conv3d(dim_conv, dim_conv, kernel, stride, [k // 2 for k in kernel],
                             groups=dim_conv, bias=False)

        self.pool_q, self.norm_q = pool(kernel_q, stride_q), nn.LayerNorm(dim_conv, eps=1e-6)
        self.pool_k, self.norm_k = pool(kernel_kv, stride_kv), nn.LayerNorm(dim_conv, eps=1e-6)
        self.pool_v, self.norm_v = pool(kernel_kv, stride_kv), nn.LayerNorm(dim_conv, eps=1e-6)

        # memory compression f: depthwise Conv3d over the full `dim` channels of the cached
        # (pre-projection) memory + LayerNorm; kernel 7x3x3 stride 4x2x2 in the official configs
        def compress():
            return nn.Conv3d(dim, dim, compress_kernel, compress_stride,
                             [k // 2 for k in compress_kernel], groups=dim, bias=False)

        if memory:
            self.compress_k, self.norm_compress_k = compress(), nn.LayerNorm(dim, eps=1e-6)
            self.compress_v, self.norm_compress_v = compress(), nn.LayerNorm(dim, eps=1e-6)

        # decomposed relative positions; the memory gets its own tables (official layout)
        T, S = input_size[0], input_size[1]
        q_size, kv_size = S // stride_q[1], S // stride_kv[1]
        rows = 2 * max(q_size, kv_size) - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(rows, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(rows, head_dim))
        self.rel_pos_t = nn.Parameter(torch.zeros(2 * T - 1, head_dim))
        tables = [self.rel_pos_h, self.rel_pos_w, self.rel_pos_t]
        if memory:
            mem_rows = 2 * max(q_size, kv_size // compress_stride[1]) - 1
            mem_t_rows = 2 * T + (attn_max_len - 2) * T - 1  # 23 for T = 8, ATTN_MAX_LEN = 3
            self.rel_pos_mem_h = nn.Parameter(torch.zeros(mem_rows, head_dim))
            self.rel_pos_mem_w = nn.Parameter(torch.zeros(mem_rows, head_dim))
            self.rel_pos_mem_t = nn.Parameter(torch.zeros(mem_t_rows, head_dim))
            tables += [self.rel_pos_mem_h, self.rel_pos_mem_w, self.rel_pos_mem_t]
        for p in tables:
            nn.init.trunc_normal_(p, std=0.02)
        self.clear_memory()

    def clear_memory(self):
        self.cached_k, self.cached_v, self.cached_ids = [], [], []

    def mask_memory(self, ids, selections):
        """Step 2: memory from another video must not be read. Official rule: the sample's cached
        memory is ZEROED (not masked with -inf: after W_k it becomes the k bias); when the CACHE
        holds batches of one (its oldest entry decides, as in the official code, not the current
        batch), the stale entries are dropped instead and the selections renumbered. ids (B,) may
        be shorter than the cached batch (the last, smaller batch): its first B samples are checked."""
        B = ids.shape[0]
        if any(len(cid) < B for cid in self.cached_ids):  # the official code asserts the same
            raise ValueError(f"a batch of {B} streams after a cached batch of fewer: "
                             "call clear_memory() first")
        same = [cid[:B] == ids for cid in self.cached_ids]  # each (B,) bool
        if self.cached_k and self.cached_k[0].shape[0] == 1:  # the cached batch, not B
            kept = [i for i, s in enumerate(same) if bool(s.all())]
            renumber = {old: new for new, old in enumerate(kept)}
            self.cached_k = [self.cached_k[i] for i in kept]
            self.cached_v = [self.cached_v[i] for i in kept]
            self.cached_ids = [self.cached_ids[i] for i in kept]
            return [renumber[s] for s in selections if s in renumber]
        for i, s in enumerate(same):
            if bool(s.all()):
                continue
            keep = torch.ones(self.cached_k[i].shape[0], dtype=torch.bool, device=s.device)
            keep[:B] = s
            keep = keep.to(self.cached_k[i].device)[:, None, None]  # (B_cache, 1, 1)
            self.cached_k[i] = torch.where(keep, self.cached_k[i], 0.0)
            self.cached_v[i] = torch.where(keep, self.cached_v[i], 0.0)
        return selections

    def compress(self, mem, pool, norm, thw):
        """f(M): (B, 1 + T*H*W, dim) raw memory -> (B, 1 + T'*H'*W', dim); cls bypasses the conv."""
        out, thw_c = pool_tokens(mem[:, None], pool, thw, norm)  # (B, 1, 1 + T'H'W', dim)
        return out[:, 0], thw_c  # (B, 1 + T'H'W', dim)

    def compress_previous(self, thw):
        """Step 4, pipelined compression: cache[-2] is clip t-1's memory, cached raw (grid thw) at
        the previous step; compress it NOW, once, with gradient on, so that this step's loss
        trains f while the input M_{t-1} itself stays stop-gradient:
            cache[-2] <- f(M_{t-1}) = LN(DepthwiseConv3d(M_{t-1}))   (cls bypasses the conv).
        Returns the compressed grid [T', H', W'] (None while there is no t-1 entry)."""
        if len(self.cached_k) < 2:
            return None
        self.cached_k[-2], thw_c = self.compress(self.cached_k[-2], self.compress_k,
                                                 self.norm_compress_k, thw)
        self.cached_v[-2], _ = self.compress(self.cached_v[-2], self.compress_v,
                                             self.norm_compress_v, thw)
        return thw_c

    def update_memory(self, k, v, thw, ids, selections):
        """Steps 2-6, the cache. k, v (B, 1 + N, dim): this clip's pooled k/v BEFORE the Linear, on
        grid thw; ids (B,) video ids; selections: which cached clips (indices into the cache as it
        was before this call, oldest first) to attend. Returns (mem_k, mem_v, mem_thw): the selected
        memories, lists of (B, 1 + N_m, dim) oldest first, and their (compressed) grid."""
        B = k.shape[0]
        selections = self.mask_memory(ids, selections)                      # step 2
        self.cached_k.append(k.detach())                                    # step 3: stop-grad
        self.cached_v.append(v.detach())
        self.cached_ids.append(ids)
        mem_thw = self.compress_previous(thw)                               # step 4: f(M_{t-1})
        mem_k = [self.cached_k[:-1][i][:B] for i in selections]              # step 5
        mem_v = [self.cached_v[:-1][i][:B] for i in selections]
        if len(self.cached_k) > 1:                                           # step 6
            self.cached_k[-2] = self.cached_k[-2].detach()
            self.cached_v[-2] = self.cached_v[-2].detach()
        if len(self.cached_k) == self.keep_max_len:
            self.cached_k, self.cached_v = self.cached_k[1:], self.cached_v[1:]
            self.cached_ids = self.cached_ids[1:]
        return mem_k, mem_v, mem_thw

    def forward(self, x, thw, selections=None, ids=None):
        """x (B, 1 + T*H*W, dim) normalised block input; thw [T, H, W]; selections: indices of
        cached clips to attend (None: memory off, nothing cached); ids (B,) video ids."""
        B, N, dim = x.shape
        n = self.num_heads
        x = x.reshape(B, N, n, dim // n).transpose(1, 2)  # (B, n, N, dim/n)
        q, q_thw = pool_tokens(x, self.pool_q, thw, self.norm_q)  # (B, n, Nq, dim/n)  step 1
        k, k_thw = pool_tokens(x, self.pool_k, thw, self.norm_k)  # (B, n, Nk, dim/n)
        v, _ = pool_tokens(x, self.pool_v, thw, self.norm_v)  # (B, n, Nk, dim/n)
        Nq, Nk = q.shape[2], k.shape[2]
        q = self.q(q.transpose(1, 2).reshape(B, Nq, dim))  # (B, Nq, dim_out)
        q = q.reshape(B, Nq, n, -1).transpose(1, 2)  # (B, n, Nq, hd)
        k = k.transpose(1, 2).reshape(B, Nk, dim)  # (B, Nk, dim)  pre-projection: what is cached
        v = v.transpose(1, 2).reshape(B, Nk, dim)  # (B, Nk, dim)

        mem_k, mem_v, mem_thw = [], [], None
        if selections is not None:  # steps 2-6
            ids = torch.zeros(B, dtype=torch.long, device=x.device) if ids is None else ids
            mem_k, mem_v, mem_thw = self.update_memory(k, v, k_thw, ids, selections)
        # step 7: K = [M_1; ...; M_m; X] W_k, V = [M_1; ...; M_m; X] W_v
        K = self.k(torch.cat(mem_k + [k], dim=1))  # (B, Nmem + Nk, dim_out)
        V = self.v(torch.cat(mem_v + [v], dim=1))  # (B, Nmem + Nk, dim_out)
        K = K.reshape(B, K.shape[1], n, -1).transpose(1, 2)  # (B, n, Nmem + Nk, hd)
        V = V.reshape(B, V.shape[1], n, -1).transpose(1, 2)  # (B, n, Nmem + Nk, hd)

        # step 8: attention logits (q k^T) * scale + E_rel, with E_rel added using the UNSCALED q
        bias = self.rel_pos_bias(q, q_thw, k_thw, mem_thw, len(mem_k))  # (B, n, Nq, Nmem + Nk)
        out = F.scaled_dot_product_attention(q, K, V, attn_mask=bias.to(q.dtype),
                                             scale=self.scale)  # (B, n, Nq, hd)
        # residual pooling (MViTv2): + pooled q on the space-time tokens, nothing on cls
        out = torch.cat([out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]], dim=2)  # (B, n, Nq, hd)
        out = out.transpose(1, 2).reshape(B, Nq, self.dim_out)  # (B, Nq, dim_out)
        return self.proj(out), q_thw

    def rel_pos_bias(self, q, q_thw, k_thw, mem_thw, num_mem):
        """Additive logits term, (B, n, Nq, Nk_total), key columns laid out as
        [cls_1, M_1 tokens, ..., cls_m, M_m tokens, cls, current tokens]; cls rows/columns get 0.
        Current keys:  MViTv2's decomposed_rel_pos (t-index i - j + (kt - 1) as qt = kt).
        Memory keys:   own tables rel_pos_mem_* (memory_rel_pos)."""
        B, n, Nq, d = q.shape
        cur = decomposed_rel_pos(q[:, :, 1:], q_thw, k_thw, self.rel_pos_h, self.rel_pos_w,
                                 self.rel_pos_t)  # (B, n, Nq-1, kt*kh*kw)
        blocks = []
        if num_mem > 0:
            r_q = q[:, :, 1:].reshape(B, n, *q_thw, d)  # (B, n, qt, qh, qw, d)
            blocks.append(self.memory_rel_pos(r_q, mem_thw, num_mem))
        blocks += [cur.new_zeros(B, n, Nq - 1, 1), cur]  # cls of the current clip, its tokens
        E = torch.cat(blocks, dim=-1)  # (B, n, Nq-1, Nk_total)
        return torch.cat([E.new_zeros(B, n, 1, E.shape[-1]), E], dim=2)  # (B, n, Nq, Nk_total)

    def memory_rel_pos(self, r_q, mem_thw, num_mem):
        """The memory columns of E_rel, (B, n, qt*qh*qw, num_mem * (1 + mt*mh*mw)), laid out as
        [cls_1, M_1 tokens, ..., cls_m, M_m tokens] (cls columns 0), from the memory's own tables.
        r_q (B, n, qt, qh, qw, d) unscaled queries; mem_thw [mt, mh, mw], every memory's grid.
        Time: the m memories' frames, oldest first, form one list of Mt = m * mt frames; frame j
        of it lies (Mt - 1 - j) compressed strides s_t before query frame i, so its t-index is
            i + (Mt - 1 - j) * s_t            (rel_pos_mem_t, 2T + (ATTN_MAX_LEN - 2)T - 1 rows);
        space: the MViTv2 index of the query grid against the compressed memory grid. Every
        memory has the same grid, so the space terms are computed ONCE and shared by all m
        memories, and the time term once over all Mt frames (the official cost)."""
        B, n, qt, qh, qw, d = r_q.shape
        mt, mh, mw = mem_thw
        Mt, s = num_mem * mt, self.compress_stride[0]
        idx_t = torch.arange(qt)[:, None] + (Mt - 1 - torch.arange(Mt)[None, :]) * s  # (qt, Mt)
        Rt_mem = self.rel_pos_mem_t[idx_t.to(r_q.device)]  # (qt, Mt, d)
        Rh_mem = get_rel_pos(qh, mh, self.rel_pos_mem_h)  # (qh, mh, d)
        Rw_mem = get_rel_pos(qw, mw, self.rel_pos_mem_w)  # (qw, mw, d)
        rel_t = torch.einsum("bnthwd,tkd->bnthwk", r_q, Rt_mem)  # (B, n, qt, qh, qw, Mt)
        rel_h = torch.einsum("bnthwd,hkd->bnthwk", r_q, Rh_mem)  # (B, n, qt, qh, qw, mh)
        rel_w = torch.einsum("bnthwd,wkd->bnthwk", r_q, Rw_mem)  # (B, n, qt, qh, qw, mw)
        blocks = []
        for m in range(num_mem):  # memory m: its mt frames of rel_t, the shared space terms
            E = (rel_t[..., m * mt:(m + 1) * mt, None, None] + rel_h[..., None, :, None]
                 + rel_w[..., None, None, :])  # (B, n, qt, qh, qw, mt, mh, mw)
            E = E.reshape(B, n, qt * qh * qw, mt * mh * mw)  # (B, n, Nq-1, mt*mh*mw)
            blocks += [E.new_zeros(B, n, qt * qh * qw, 1), E]  # cls of memory m, its tokens
        return torch.cat(blocks, dim=-1)  # (B, n, Nq-1, num_mem * (1 + mt*mh*mw))


class MultiScaleBlock(nn.Module):
    """Pre-norm MViTv2 block. The shortcut is projected from LN1(x) when the width changes
    (DIM_MUL_IN_ATT) and max-pooled (kernel s+1, stride s) when q is pooled."""

    def __init__(self, dim, dim_out, num_heads, input_size, kernel, stride_q, stride_kv,
                 drop_path=0.0, mlp_ratio=4.0, **memory_kw):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MemoryMultiScaleAttention(dim, dim_out, num_heads, input_size, kernel, kernel,
                                              stride_q, stride_kv, **memory_kw)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        kernel_skip = [s + 1 if s > 1 else s for s in stride_q]
        self.pool_skip = (nn.MaxPool3d(kernel_skip, stride_q, [k // 2 for k in kernel_skip])
                          if max(stride_q) > 1 else None)

    def forward(self, x, thw, selections=None, ids=None):
        x_norm = self.norm1(x)  # (B, N, dim)
        x_attn, thw_new = self.attn(x_norm, thw, selections, ids)  # (B, N', dim_out)
        if self.dim != self.dim_out:
            x = self.proj(x_norm)  # (B, N, dim_out)
        if self.pool_skip is not None:
            x = pool_tokens(x[:, None], self.pool_skip, thw)[0][:, 0]  # (B, N', dim_out)
        x = x + self.drop_path(x_attn)
        return x + self.drop_path(self.mlp(self.norm2(x))), thw_new


# ============================================================ the full model and its presets

PRESETS = {
    # CPU-sized: 8x32x32 clips -> 4x8x8 tokens; 4 blocks, width 32 -> 64 -> 128
    "tiny": dict(num_frames=8, input_size=32, embed_dim=32, num_heads=1, depth=4,
                 stage_starts=(1, 3), kv_stride_adaptive=(1, 2, 2), drop_path=0.0,
                 head_dropout=0.0, sampler="all", attn_max_len=3, num_classes=4),
    # configs/AVA/MeMViT_16_K400.yaml: MViTv2-S layout, 16x4 input
    "16": dict(num_frames=16, input_size=224, embed_dim=96, num_heads=1, depth=16,
               stage_starts=(1, 3, 14), kv_stride_adaptive=(1, 8, 8), drop_path=0.4,
               head_dropout=0.5, sampler="gap2", attn_max_len=3, num_classes=400),
    # configs/AVA/MeMViT_24_K600.yaml: MViTv2-B layout, 32x3 input
    "24": dict(num_frames=32, input_size=224, embed_dim=96, num_heads=1, depth=24,
               stage_starts=(2, 5, 21), kv_stride_adaptive=(1, 8, 8), drop_path=0.4,
               head_dropout=0.5, sampler="gap3", attn_max_len=3, num_classes=400),
}


class MeMViT(nn.Module):
    def __init__(self, num_frames=16, input_size=224, embed_dim=96, num_heads=1, depth=16,
                 stage_starts=(1, 3, 14), kv_stride_adaptive=(1, 8, 8), drop_path=0.4,
                 head_dropout=0.5, num_classes=400, sampler="gap2", attn_max_len=3,
                 exclude_layers=None, compress_kernel=(7, 3, 3), compress_stride=(4, 2, 2),
                 use_memory=True):
        super().__init__()
        assert sampler == "all" or (sampler.startswith("gap") and sampler[3:].isdigit()), sampler
        # use_memory: built with the memory's parameters (official MEMVIT.ENABLE); a model built with
        # them may switch its memory off and on again (model.use_memory), one built without may not
        self.sampler, self.use_memory, self.has_memory = sampler, use_memory, use_memory
        # official: no memory attention in odd layers (they still cache and compress)
        self.exclude_layers = (set(range(1, depth, 2)) if exclude_layers is None
                               else set(exclude_layers))
        gap = int(sampler[3:]) if sampler.startswith("gap") else 1
        keep_max_len = (attn_max_len - 1) * gap + 1  # = attn_max_len for `all`
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = [num_frames // 2, input_size // 4, input_size // 4]  # tokens after the stem
        dpr = torch.linspace(0, drop_path, depth).tolist()
        kv_stride = list(kv_stride_adaptive)
        dim, heads = embed_dim, num_heads
        self.blocks = nn.ModuleList()
        for i in range(depth):
            # a new stage doubles width and heads inside the attention and pools q by 2 in space;
            # the adaptive kv stride is divided by the q stride at that very block
            stride_q = [1, 2, 2] if i in stage_starts else [1, 1, 1]
            kv_stride = [max(s // q, 1) for s, q in zip(kv_stride, stride_q)]
            heads = heads * 2 if i in stage_starts else heads
            dim_out = dim * 2 if i in stage_starts else dim
            self.blocks.append(MultiScaleBlock(
                dim, dim_out, heads, grid, (3, 3, 3), stride_q, kv_stride, drop_path=dpr[i],
                attn_max_len=attn_max_len, keep_max_len=keep_max_len,
                compress_kernel=compress_kernel, compress_stride=compress_stride,
                memory=use_memory))
            grid = [g // s for g, s in zip(grid, stride_q)]
            dim = dim_out
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Module()  # official names: head.dropout, head.projection
        self.head.dropout = nn.Dropout(head_dropout)
        self.head.projection = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def clear_memory(self):
        for blk in self.blocks:
            blk.attn.clear_memory()

    def sample_memory(self):
        """Which cached clips to attend, read from block 0's cache length L (before this step's
        append). `all`: every cached clip. `gapN`: the last N*floor(L/N) indices stepping by N,
        i.e. clips t-N, t-2N, ... (gap2 over steps: [], [], [0], [1], [0,2], [0,2], ...)."""
        L = len(self.blocks[0].attn.cached_k)  # step 0
        if self.sampler == "all":
            return list(range(L))
        gap = int(self.sampler[3:])
        return list(range(L))[-gap * (L // gap):: gap] if L >= gap else []

    def forward(self, x, video_ids=None):
        """x (B, 3, T, H, W) one clip per stream; video_ids (B,) which video each stream is in.
        With memory on, every call is the next clip of each stream and updates the caches."""
        x, thw = self.patch_embed(x)  # (B, T'H'W', C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        if video_ids is not None:
            video_ids = torch.as_tensor(video_ids, device=x.device).long()
        if self.use_memory and not self.has_memory:
            raise RuntimeError("this model was built with use_memory=False: it has no memory tables")
        selections = self.sample_memory() if self.use_memory else None  # step 0
        for i, blk in enumerate(self.blocks):
            sel = None if selections is None else ([] if i in self.exclude_layers else selections)
            x, thw = blk(x, thw, sel, video_ids)
        x = self.norm(x)[:, 0]  # (B, C) cls token
        return self.head.projection(self.head.dropout(x))  # (B, num_classes) logits


def create_model(name="tiny", **overrides):
    if name not in PRESETS:
        C.die(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    return MeMViT(**{**PRESETS[name], **overrides})


def temporal_support(model):
    """How many clips (the current one included) can influence the output at one step: layer l's
    memory holds inputs that were computed while attending to the memories of the layers below,
    so each memory-attending layer adds its farthest memory offset, gap * (ATTN_MAX_LEN - 1)."""
    attn = model.blocks[0].attn
    gap = int(model.sampler[3:]) if model.sampler.startswith("gap") else 1
    reach = gap * (attn.attn_max_len - 1)
    return 1 + reach * sum(i not in model.exclude_layers for i in range(len(model.blocks)))


# ============================================================ the loss: cross-entropy on every clip


def loss_fn(model, batch):
    """One iteration = the next clip of every stream. A batch that starts the epoch clears the
    memory (official clear_memory); a stream moving to another video is handled inside the model by
    the video ids (memory of the old video zeroed)."""
    clips, labels, video_ids, clip_idx, epoch_start = batch
    if bool(epoch_start.any()):
        memvit_of(model).clear_memory()
    logits = model(clips.permute(0, 2, 1, 3, 4), video_ids)  # (B, T, 3, S, S) -> (B, 3, T, S, S)
    return F.cross_entropy(logits, labels)


def memvit_of(net):
    """The MeMViT inside a DDP / torch.compile wrapper."""
    while not isinstance(net, MeMViT):
        net = getattr(net, "module", None) or getattr(net, "_orig_mod")
    return net


# ============================================================ data glue: long videos as streams of K clips

CUE_COLORS = ("red", "green", "blue", "yellow")


def cue_videos(n, num_clips=3, frames=8, size=32, seed=0, num_classes=4):
    """The synthetic long-range task: n videos of num_clips x frames frames. The label is the
    colour of a thick border that flashes in the first half of clip 0 only; every clip shows two
    shapes of the same colours moving slowly over a textured background (distractors). Returns
    dict(videos uint8 (n, K, T, 3, S, S), labels (n,))."""
    rng, s, total = np.random.default_rng(seed), size, num_clips * frames
    names = CUE_COLORS[:num_classes]
    videos, labels = [], []
    for _ in range(n):
        bg, label = C.background(rng, s), int(rng.integers(num_classes))
        movers = []
        for _ in range(2):
            r = rng.uniform(0.12, 0.18) * s
            a, b = rng.uniform(r, s - r, 2), rng.uniform(r, s - r, 2)  # start and end points
            movers.append((C.CLASSES[rng.integers(len(C.CLASSES))],
                           C.COLORS[names[rng.integers(num_classes)]], a, b, r))
        border, colour = max(2, s // 10), np.array(C.COLORS[names[label]]) / 255
        video = []
        for t in range(total):
            f = bg.copy()
            for kind, col, a, b, r in movers:
                cx, cy = a + (b - a) * t / (total - 1)
                C.paint(f, kind, col, cx, cy, r, 2)
            if t < frames // 2:  # the cue: clip 0, first half
                f[:border], f[-border:], f[:, :border], f[:, -border:] = colour, colour, colour, colour
            video.append(torch.from_numpy((f * 255).round().astype(np.uint8)).permute(2, 0, 1))
        videos.append(torch.stack(video).reshape(num_clips, frames, 3, s, s))  # (K, T, 3, S, S)
        labels.append(label)
    return dict(videos=torch.stack(videos), labels=torch.tensor(labels))


def read_clips(path, num_clips, frames, rate, size, draw):
    """The K consecutive clips of one video as uint8 (K*T, 3, H, W), short side `size`, or the video's
    frame count (an int) when it is shorter than K clips. Clip k holds frames start + k*span + t*rate
    (span = frames * rate), start = floor(u * (len - K*span)), u = draw(). Decoded in one pass: with
    the header's frame count, C.VideoReader seeks once to the first clip and then reads each clip just
    ahead of the previous one (never from the video's start again), converting only the kept frames;
    without a count, or where the header's count was wrong, the whole video is decoded and counted."""
    span, u = frames * rate, None
    with C.VideoReader(path, short_side=size) as r:
        n = r.num_frames  # the header's count (None when it has none)
        if n and n >= num_clips * span:
            u = draw()
            start = int(u * (n - num_clips * span))
            clips = [r.read(s, s + span, keep=set(range(s, s + span, rate)))  # clip k: (T, 3, H, W)
                     for s in range(start, start + num_clips * span, span)]  # in order: no seek back
            if all(len(c) == frames for c in clips):
                return torch.cat(clips)  # (K*T, 3, H, W)
        v = r.read(0)  # the whole video: (L, 3, H, W)
    if not len(v):
        raise C.DataError(f"{path}: the video has no frames")
    if len(v) < num_clips * span:
        return len(v)
    u = draw() if u is None else u
    start = int(u * (len(v) - num_clips * span))
    idx = start + torch.arange(num_clips)[:, None] * span + torch.arange(frames) * rate  # (K, T)
    return v[idx.flatten()]  # (K*T, 3, H, W)


def read_long_videos(items, num_clips, frames, rate, size, train, seed):
    """K consecutive non-overlapping clips of `frames` frames at stride `rate` from each video
    (official Kinetics MeMViT sampling: one random start fraction u per video, then clip k starts at
    floor(u * (len - K*span)) + k*span; u = 0.5 for evaluation), each video decoded in one pass
    (read_clips). Videos shorter than K clips and unreadable ones are skipped with a count; none
    readable ends the run. Returns (list of uint8 (K, T, 3, S, S), labels)."""
    rng, span = np.random.default_rng(seed), frames * rate
    draw = (lambda: rng.uniform()) if train else (lambda: 0.5)
    videos, labels, short, bad = [], [], [], []
    for path, label in items:
        try:
            v = read_clips(path, num_clips, frames, rate, size, draw)  # (K*T, 3, H, W) or its length
        except C.DataError as e:
            bad.append(e)
            continue
        if isinstance(v, int):
            short.append(f"{path} ({v} frames)")
            continue
        clips = C.resize_center_crop(v, size)  # (K*T, 3, S, S)
        videos.append(clips.reshape(num_clips, frames, 3, size, size))  # (K, T, 3, S, S)
        labels.append(label)
    if items and len(bad) == len(items):
        C.die(f"none of the {len(items)} videos could be read (the last: {bad[-1]})")
    if short:
        print(f"warning: skipped {len(short)} video(s) shorter than {num_clips} clips of {frames} "
              f"frames at stride {rate} = {num_clips * span} frames (first: {short[0]})", flush=True)
    if bad:
        print(f"warning: skipped {len(bad)} unreadable video(s) (first: {bad[0]})", flush=True)
    return videos, torch.tensor(labels, dtype=torch.long)


class StreamDataset(torch.utils.data.Dataset):
    """Item (video v, clip k, epoch_start) -> (clip (T, 3, S, S) normalised, label, v, k, epoch_start)."""

    def __init__(self, videos, labels):
        self.videos, self.labels = videos, labels

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, item):
        v, k, epoch_start = item
        return (C.normalize(self.videos[v][k]), self.labels[v], torch.tensor(v), torch.tensor(k),
                torch.tensor(epoch_start))


class StreamBatchSampler(torch.utils.data.Sampler):
    """MeMViT's data order: batch slot b walks the consecutive clips of one video on consecutive
    iterations. Per epoch the videos are shuffled (torch's RNG, which the shared loop re-seeds at
    every epoch, so --resume replays it), split across processes and cut into groups of
    `batch_size`; each group yields K batches: clip 0 of every slot, clip 1, ..., clip K-1."""

    def __init__(self, num_videos, num_clips, batch_size, train, rank=0, world_size=1):
        self.n, self.K, self.B, self.train = num_videos, num_clips, batch_size, train
        self.rank, self.world = rank, world_size

    def groups(self):
        order = torch.randperm(self.n) if self.train else torch.arange(self.n)
        mine = order[self.rank::self.world].tolist()
        full = len(mine) // self.B * self.B or len(mine)  # fewer videos than a batch: one smaller group
        return [mine[i:i + self.B] for i in range(0, full if self.train else len(mine), self.B)]

    def __len__(self):
        n = len(range(self.rank, self.n, self.world))
        return ((n // self.B or min(n, 1)) if self.train else math.ceil(n / self.B)) * self.K

    def __iter__(self):
        for g, group in enumerate(self.groups()):
            for k in range(self.K):
                yield [(v, k, g == 0 and k == 0) for v in group]


def stream_data(args, num_frames):
    """(train_ds, val_ds, classes): the synthetic cue task, or --data DIR/<class>/*.mp4."""
    if args.data is None:
        n_train, n_val = (64, 32) if args.smoke else (args.num_videos, 256)
        tr = cue_videos(n_train, args.num_clips, num_frames, args.input_size, seed=1)
        va = cue_videos(n_val, args.num_clips, num_frames, args.input_size, seed=2)
        return (StreamDataset(tr["videos"], tr["labels"]), StreamDataset(va["videos"], va["labels"]),
                list(CUE_COLORS))
    train, val, classes = C.scan_folder(args.data, C.VIDEO_EXTS)
    if not classes:
        C.die(f"{args.data}: MeMViT needs labelled videos in class folders (DIR/<class>/*.mp4)")
    rate = args.sampling_rate or 4
    tr = read_long_videos(train, args.num_clips, num_frames, rate, args.input_size, True, args.seed)
    va = read_long_videos(val or train, args.num_clips, num_frames, rate, args.input_size, False, 0)
    for name, (vids, _) in (("training", tr), ("evaluation", va)):
        if not vids:
            C.die(f"{args.data}: no {name} video is long enough for {args.num_clips} clips of "
                  f"{num_frames} frames at stride {rate} ({args.num_clips * num_frames * rate} frames)")
    return StreamDataset(*tr), StreamDataset(*va), classes


def stream_loader(ds, args, run, train, batch_size=None):
    sampler = StreamBatchSampler(len(ds), args.num_clips, batch_size or args.batch_size, train,
                                 run.rank, run.world_size)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.num_workers or 0,
                                       pin_memory=run.device.type == "cuda")


# ============================================================ train, evaluate, bench, smoke


@torch.no_grad()
def evaluate(model, loader, num_clips, run):
    """Walk every held-out video clip by clip (memory carried); accuracy at each clip index. The
    paper's figure is the LAST clip: only memory can tell the cue shown in clip 0. Under torchrun
    every process walks its share of the videos and the counts are summed."""
    model.eval()
    correct, total = torch.zeros(num_clips), torch.zeros(num_clips)
    preds = {}
    for batch in loader:
        clips, labels, vids, clip_idx, epoch_start = C.to_device(batch, run.device)
        if bool(epoch_start.any()):
            model.clear_memory()
        with C.autocast(run):
            pred = model(clips.permute(0, 2, 1, 3, 4), vids).argmax(1)  # (B,)
        k = int(clip_idx[0])
        correct[k] += (pred == labels).sum().item()
        total[k] += len(labels)
        for v, p in zip(vids.tolist(), pred.tolist()):
            preds[(v, k)] = p
    model.clear_memory()
    if run.distributed:
        both = torch.stack([correct, total]).to(run.device)
        torch.distributed.all_reduce(both)
        correct, total = both.cpu()
    return (correct / total.clamp(min=1)).tolist(), preds


def save_picture(path, ds, preds, classes, num_clips, rows=4):
    """One row per held-out video: a frame of every clip (frame 0, where clip 0 shows the cue)
    with the prediction made at that clip, memory carried along the row."""
    images, texts = [], []
    for v in sorted({v for v, _ in preds})[:rows]:  # under torchrun: this process's videos
        label = int(ds.labels[v])
        images.append(torch.stack([ds.videos[v][k][0].float() / 255 for k in range(num_clips)]))
        texts.append([f"clip {k}: {classes[preds[(v, k)]][:7]}\n"
                      f"{'right' if preds[(v, k)] == label else 'wrong'} ({classes[label][:7]})"
                      for k in range(num_clips)])
    return C.save_grid(path, images, texts)


SAMPLING_RATE = {"16": 4, "24": 3}  # the presets' frame strides (16x4, 32x3): for the support in seconds
FPS = 30  # AVA / Kinetics frame rate


def bench(args, run):
    """The paper's claim is compute: FLOPs (what the paper counts; C.count_flops, one FLOP = one
    multiply or add) of one clip of MeMViT-16 (16x224x224, the paper's model: gap2, ATTN_MAX_LEN
    3, memory attention in the 8 even layers) with 0, 1 and 2 memories attended, and the temporal
    support each covers; then the time per clip without and with the two memories (C.time_ab,
    interleaved). The paper's size runs on a CPU (one clip is a few seconds on one core), so there
    is no smaller fallback."""
    name = args.model if args.model != "tiny" else "16"
    model = create_model(name).to(run.device).eval()
    cfg = PRESETS[name]
    x = torch.randn(1, 3, cfg["num_frames"], cfg["input_size"], cfg["input_size"], device=run.device)
    ids = torch.zeros(1, dtype=torch.long, device=run.device)
    gap = int(model.sampler[3:]) if model.sampler.startswith("gap") else 1
    layers = sum(i not in model.exclude_layers for i in range(len(model.blocks)))

    def step():
        with torch.no_grad(), C.autocast(run):
            model(x, ids)

    model.use_memory = False
    flops = {0: C.count_flops(step)}  # the same model, memory off: the baseline
    model.use_memory = True
    model.clear_memory()
    for n_mem in (1, 2):  # walk the stream until n_mem cached clips are selected, then count
        while len(model.sample_memory()) < n_mem:
            step()
        flops[n_mem] = C.count_flops(step)

    def with_memory(use):
        def fn():  # the cache is full (2 memories) and stays full; memory off leaves it untouched
            model.use_memory = use
            step()
        return fn

    times = C.time_ab({0: with_memory(False), 2: with_memory(True)}, run, rounds=args.bench_reps)
    assert len(model.sample_memory()) == 2
    span = cfg["num_frames"] * SAMPLING_RATE.get(name, 1)  # 16x4: 64 frames, ~2.1 s at 30 fps
    C.log(run, f"\nMeMViT-{name} classification backbone, one {cfg['num_frames']}x{cfg['input_size']}x"
               f"{cfg['input_size']} clip, sampler {model.sampler}, device {run.device}")
    C.log(run, f"{'memories':>8} {'GFLOPs':>8} {'GMACs':>7} {'FLOPs':>8} {'ms/clip':>8} {'time':>7} "
               f"{'support':>14}")
    for n_mem, f in flops.items():
        support = 1 + gap * n_mem * layers  # each memory layer reaches gap * n_mem clips further
        ms, rel = ((f"{times[n_mem] * 1e3:8.0f}", f"{times[n_mem] / times[0]:6.3f}x") if n_mem in times
                   else ("       -", "      -"))
        C.log(run, f"{n_mem:>8} {f / 1e9:8.2f} {f / 2e9:7.2f} {(f / flops[0] - 1) * 100:+7.2f}% {ms} "
                   f"{rel} {support:4d} clips {support * span / FPS:4.0f}s")
    C.log(run, "(GMACs = the paper's 'GFLOPs'; the official code under the same counter: +1.24% for "
               "one memory, +2.32% for two; fvcore on the official code: 57.40 -> 58.08 -> 58.70 GMACs; "
               f"support: each of the {layers} memory layers reaches gap x memories clips further)")
    support = 1 + gap * 2 * layers
    C.log(run, f"bench: memory costs {(flops[2] / flops[0] - 1) * 100:+.2f}% FLOPs and "
               f"{(times[2] / times[0] - 1) * 100:+.1f}% time per clip for {support}x the temporal "
               f"support ({support} clips = {support * span} frames vs {span}); official code: "
               f"+2.32% FLOPs (MeMViT-16, 2 memories); paper: 30x support for +4.5%")


MEMORY_PARAMS = ("compress_k.", "compress_v.", "norm_compress_k.", "norm_compress_v.", "rel_pos_mem_")


def is_memory_key(name):
    """blocks.<i>.attn.<memory parameter>: the keys that only a model with memory has."""
    return ".attn." in name and name.split(".attn.")[-1].startswith(MEMORY_PARAMS)


def load_weights(model, path, run):
    """Our checkpoint or an official MeMViT .pyth (weights under `model_state`). The AVA box
    transformer (`box_blocks.*`) is not built here and is dropped; a head of another class count
    is dropped too (fine-tuning: C.load_state's new_head); a model without memory drops the
    memory's tensors (compressors, rel_pos_mem_*), and a model with memory loading weights that
    have none (a memory-less official model) keeps its own, freshly initialised ones, saying so;
    every other key must match."""
    state = C.unwrap_state(C.load_checkpoint(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        C.die(f"{path}: not a state dict of tensors")
    dropped = [k for k in state if k.startswith("box_blocks.") or
               (is_memory_key(k) and not memvit_of(model).has_memory)]
    state = {k: v for k, v in state.items() if k not in dropped}
    allow = ()
    if memvit_of(model).has_memory and not any(is_memory_key(k) for k in state):
        allow = tuple(k for k in model.state_dict() if is_memory_key(k))
        C.log(run, f"{path}: no memory tensors: the {len(allow)} of this model's memory "
                   "(compressors, rel_pos_mem_*) start from their initialisation")
    C.load_state(model, state, path, allow_missing=allow, new_head="head.", run=run)
    kinds = sorted({"box_blocks" if k.startswith("box_blocks.") else "memory" for k in dropped})
    C.log(run, f"loaded {len(state)} tensors from {path}" +
          (f"; dropped {len(dropped)} ({', '.join(kinds)})" if dropped else ""))


def prepare(args, run):
    """Checks the memory flags, then (model, train_ds, val_ds, classes): the data (--data or the
    synthetic cue task) and the model for it, with --weights loaded."""
    if args.sampler and not (args.sampler == "all" or (args.sampler.startswith("gap")
                                                       and args.sampler[3:].isdigit())):
        C.die(f"--sampler {args.sampler!r}: use all or gapN (e.g. gap2)")
    if args.num_clips < 1:
        C.die("--num_clips must be at least 1")
    num_frames = args.num_frames or PRESETS[args.model]["num_frames"]
    train_ds, val_ds, classes = stream_data(args, num_frames)
    if not args.smoke:
        C.check_enough(train_ds, val_ds, args)  # too few: one line, before any work
    overrides = dict(input_size=args.input_size, num_frames=num_frames, num_classes=len(classes),
                     use_memory=not args.no_memory)
    if args.sampler:
        overrides["sampler"] = args.sampler
    model = create_model(args.model, **overrides)
    if args.weights:
        load_weights(model, args.weights, run)
    return model, train_ds, val_ds, classes


def smoke(args, run):
    """A few steps on one tiny batch of 4 streams, walking their K clips again and again."""
    model, ds, _, _ = prepare(args, run)
    batches = list(stream_loader(ds, args, run, train=True, batch_size=4))[: args.num_clips]
    state = dict(i=0)

    def walk(net, _):
        batch = C.to_device(batches[state["i"] % len(batches)], run.device)
        state["i"] += 1
        return loss_fn(net, batch)

    C.smoke(model, walk, None, run, steps=40, lr=2e-3)


def train(args, run):
    """Train on the streams (memory carried between iterations), then evaluate clip by clip on
    held-out streams, draw the picture and write the metrics."""
    model, train_ds, val_ds, classes = prepare(args, run)
    C.check_resume(model, args)  # a --resume of another model ends here, at once
    C.log(run, f"MeMViT-{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
               f"params, memory {'OFF' if args.no_memory else 'on'} (sampler {model.sampler}, "
               f"support {temporal_support(model) if model.use_memory else 1} clips); "
               f"{len(train_ds)} training videos x {args.num_clips} clips")
    model, history = C.fit(model, loss_fn, stream_loader(train_ds, args, run, train=True), args,
                           run, find_unused=True)
    per_clip, preds = evaluate(model, stream_loader(val_ds, args, run, train=False), args.num_clips,
                               run)
    if run.is_main:
        save_picture(os.path.join(args.out, "memvit_streams.png"), val_ds, preds, classes,
                     args.num_clips)
    C.write_metrics(args, run, history, acc=per_clip[-1], acc_per_clip=per_clip,
                    chance=1 / len(classes), memory=not args.no_memory, sampler=model.sampler,
                    temporal_support_clips=temporal_support(model) if model.use_memory else 1)


# ============================================================ command line


def main(argv=None):
    p = C.make_parser("memvit", __doc__, presets=PRESETS, epochs=4, batch_size=16, lr=5e-4,
                      weight_decay=0.05, warmup_epochs=1, input_size=32, clip_grad=1.0)
    p.add_argument("--no_memory", action="store_true", help="the same model without its memory")
    p.add_argument("--num_clips", type=int, default=3, help="K clips per long video")
    p.add_argument("--num_frames", type=int, default=None, help="frames per clip (preset's)")
    p.add_argument("--sampling_rate", type=int, default=None, help="frame stride (--data: 4)")
    p.add_argument("--sampler", default=None, help="memory sampler: all or gapN (preset's)")
    p.add_argument("--num_videos", type=int, default=512, help="synthetic training videos")
    p.add_argument("--bench_reps", type=int, default=3, help="--bench: timing rounds")
    args = p.parse_args(argv)
    run = C.init_run(args)
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    return train(args, run)


if __name__ == "__main__":
    main()
