"""MViTv2: Improved Multiscale Vision Transformers for Classification and Detection.
Yanghao Li, Chao-Yuan Wu, Haoqi Fan, Karttikeya Mangalam, Bo Xiong, Jitendra Malik, Christoph
Feichtenhofer. CVPR 2022, arXiv:2112.01526. Official code: facebookresearch/mvit (images) and
facebookresearch/SlowFast (video).

The idea. A plain ViT keeps one grid of tokens at one width from the first block to the last. MViT
builds a pyramid instead, like a ConvNet: the grid shrinks (56 -> 28 -> 14 -> 7 at 224 px) while the
width and the number of heads double at each stage. It does so with *pooling attention*: queries,
keys and values are each pooled by a small depthwise convolution before attention. Pooling the
queries (stride 2 in the first block of a stage) shrinks the output grid; pooling the keys and values
(an "adaptive" stride, 4 in the first stage, then 2, then 1) makes attention over the large early
grids cheap. MViTv2 adds two things to MViTv1:
  * decomposed relative positions: the logit of query i and key j gets Q_i . (R^h[h(i)-h(j)] +
    R^w[w(i)-w(j)] (+ R^t[t(i)-t(j)] for video)), a table per axis instead of one per pair, with the
    distance measured in the finer of the q and k grids when pooling made them differ;
  * a residual pooling connection: the pooled query is added to the attention output, Z = Attn + Q.
MViTv2-T reaches 82.3% ImageNet-1K top-1 at 4.7 GFLOPs and 24M parameters (official README).

What this file reproduces in miniature. The whole model for images and video with parameter names
equal to the official checkpoints (`MViTv2_{T,S,B,L}_in1k.pyth` load with every key matched), trained
from scratch on the synthetic shapes (classify the main shape) or, with --video, on moving shapes
(classify the direction of motion, which needs time). `--bench` measures the paper's efficiency
point: FLOPs and step time with and without key/value pooling, MViTv2 against a ViT of similar size,
and the parameter counts and GFLOPs of T/S/B/L at 224 against the paper's numbers.

Commands:
    python mvit.py                   # tiny MViTv2 on synthetic shapes: train, evaluate, picture
    python mvit.py --video           # tiny video MViTv2 on moving shapes (label = motion direction)
    python mvit.py --data DIR        # DIR/<class>/*.jpg (images) or DIR/<class>/*.mp4 (videos)
    python mvit.py --smoke           # seconds: the loss is finite and falls
    python mvit.py --bench           # kv pooling and ViT FLOP/time ratios, T/S/B/L size table
    python mvit.py --no_rel_pos      # design switches (Exercises 4-5): also --no_residual_pooling,
                                     # --kv_stride H W (T H W with --video)
    python mvit.py --model T --input_size 224 --weights MViTv2_T_in1k.pyth --data DIR --epochs 0
                                     # evaluate the official weights (any class count: see below)

Departures from the official code, and why:
  * The classification head returns logits in eval mode too. The official TransformerBasicHead
    applies softmax when not training; `create_model(..., eval_softmax=True)` restores that.
  * One class serves images (2-D convs, as facebookresearch/mvit) and video (3-D convs, cls token and
    a temporal table rel_pos_t, as SlowFast's MViTv2). The image repo has no rel-pos interpolation;
    here the tables are linearly resized when the grid differs from the one they were built for, as
    SlowFast/Detectron2 do, so the image models also run at other resolutions (and non-square ones,
    with h and w tables sized separately).
  * Each is initialised as its official code: images as the image repo (Linear trunc_normal 0.02 with
    bias 0, LayerNorm 1/0, convolutions PyTorch's default), video as SlowFast (Linear and conv
    weights trunc_normal 0.02, Linear/LayerNorm biases 0.02). The video presets S/B/L take the K400
    configs' drop path (0.2/0.3/0.75) and head dropout 0.5 (VIDEO_PRESETS); the image presets
    T/S/B/L the IN-1K configs' (0.1/0.1/0.3/0.5, no dropout).
  * The attention softmax goes through F.scaled_dot_product_attention with the rel-pos term as an
    additive mask (same numbers, one kernel); `use_sdpa = False` on an attention module switches to
    the explicit (q*scale) @ k^T matmuls of the official code (the tests check that both agree).
  * `tiny` (the CPU default) is 4 blocks in 3 stages, width 48->96->192, on 32 px inputs, with the
    adaptive kv stride started at 2 instead of 4 (at 32 px the first grid is 8x8: stride 4 would
    leave 2x2 keys). The paper's sizes T/S/B/L are exact (24,173,320 / 34,870,216 / 51,472,744 /
    217,992,952 parameters with 1000 classes, as the official models).
  * Training recipe in miniature: AdamW, warmup + cosine, grad clip 1.0 and label smoothing 0.1 as
    the official configs; no mixup/cutmix/RandAugment/random erasing (the synthetic data uses flips
    only; a folder gets random resized crops + flips), shorter schedules and a larger lr.
  * When --weights has a head for another number of classes (1000 for ImageNet), the head is
    re-initialised for the data's classes and everything else must match exactly.
  * Videos: --num_frames 8 --sampling_rate 1 by default (the K400 models use 16 x 4).

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `attention_pool` (Sec. 3, the pooling operator P(.) of Q = P_Q(X W_Q),
   K = P_K(X W_K), V = P_V(X W_V); reading map step 2): take the cls token out, lay the tokens on
   their ([T,] H, W) grid, pool with the strided depthwise conv, flatten back in row-major order,
   cls back in front, LayerNorm over the head dim (cls included). The blocks' max-pooled shortcut
   goes through it too.
   Grade: `python -m pytest tests/test_mvit.py -k "attention_pool"`
2. Re-implement `get_rel_pos` and `decomposed_rel_pos` (Sec. 4.1, decomposed relative position:
   E_rel[i, j] = Q_i . (R^h[h(i) - h(j)] + R^w[w(i) - w(j)] (+ R^t[t(i) - t(j)])); step 3): the
   table rows for every (query, key) pair with the distance in the finer grid's units when q and k
   are pooled differently (T's block 0, 56 vs 14: row i - 4j + 52), one einsum per axis, broadcast
   over the keys in the order the pooled keys come in.
   Grade: `python -m pytest tests/test_mvit.py -k "decomposed"`
3. Re-implement `MultiScaleAttention.forward` (Sec. 3 pooling attention with Sec. 4.1's E_rel and
   residual pooling Z = Attn(Q, K, V) + Q; steps 1-6): the heads cut from qkv in the checkpoints'
   layout, P(.) with s_Q for q and s_KV for k and v, E_rel from the unscaled q added to the grid
   rows and columns of the logits only, both attention paths (`use_sdpa`), + Q on the grid rows
   only, the heads merged back.
   Grade: `python -m pytest tests/test_mvit.py -k "pooling_attention"`
4. Explore: kv pooling. Predict MViTv2-T's multiply-adds at 224 px when its adaptive kv stride
   starts at 1 (no kv pooling), 2 or 8 instead of 4: which blocks pay, and why does the saving
   shrink beyond 4? Read the `bench:` line of `python mvit.py --bench`, or call `mvit.gflops` on
   `create_model("T", kv_stride=(s, s))`. Measured: 7.39 / 5.95 / 4.68 / 4.16 G for s = 1 / 2 / 4
   / 8 (official code: 7.42 vs 4.70, 1.58x); the weights stay the same but for the rel-pos tables.
   On the tiny model, `python mvit.py --kv_stride 1 1` goes from 9.71 to 10.07 M multiply-adds
   (printed at the start): on 8x8 tokens the MLPs cost more than attention.
   Grade: `python -m pytest tests/test_mvit.py -k "kv_pooling"`
5. Explore: MViTv1's attention. Switch off MViTv2's two additions, `python mvit.py --no_rel_pos`
   and `python mvit.py --no_residual_pooling` (each with its own --out; there is no absolute
   position embedding either), and predict the held-out accuracy `acc` against the default run.
   Without E_rel and without pooling, attention cannot tell where a key is (the test shows it);
   the convolutions still see neighbourhoods. Measured (15 epochs, seed 0, one run each): default
   0.884, --no_rel_pos 0.978, --no_residual_pooling 0.876. The main shape is found wherever it
   is, so positions buy nothing on this task, and in a short run the rel-pos tables even cost
   accuracy; the paper's gains from both are on ImageNet, COCO and Kinetics.
   Grade: `python -m pytest tests/test_mvit.py -k "mvitv1"`
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C


# ============================================================ the ordinary building blocks


class Mlp(nn.Module):
    """fc1 (D -> 4D) -> GELU -> fc2 (4D -> D_out)."""

    def __init__(self, dim, hidden, dim_out):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for a random subset of samples while training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = (torch.rand(x.shape[0], *[1] * (x.ndim - 1), device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class PatchEmbed(nn.Module):
    """Overlapping patches: Conv2d 7x7 stride 4 (images) or Conv3d 3x7x7 stride 2x4x4 (video)."""

    def __init__(self, dim, kernel, stride, padding):
        super().__init__()
        conv = nn.Conv3d if len(kernel) == 3 else nn.Conv2d
        self.proj = conv(3, dim, kernel, stride, padding)

    def forward(self, x):
        x = self.proj(x)  # (B, D, [T,] H, W)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])  # (B, N, D), grid ([T,] H, W)


class Head(nn.Module):
    """Linear classifier on the pooled feature; returns logits (softmax in eval only if asked)."""

    def __init__(self, dim, num_classes, dropout=0.0, eval_softmax=False):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(dim, num_classes)
        self.eval_softmax = eval_softmax

    def forward(self, x):
        x = self.projection(self.dropout(x))
        return x.softmax(-1) if self.eval_softmax and not self.training else x


# ============================================================ the paper's idea: pooling attention
# Pooling attention (MViTv1, paper Sec. 3) with MViTv2's decomposed relative positions and residual
# pooling (Sec. 4.1).
#
#   Q = P_Q(X W_Q),  K = P_K(X W_K),  V = P_V(X W_V)          P = depthwise conv (stride s) + LayerNorm
#   Attn(Q, K, V) = Softmax(Q K^T / sqrt(d) + E_rel) V          (the code adds E_rel unscaled, see below)
#   E_rel[i, j] = Q_i . R_{p(i), p(j)},   R_{p(i),p(j)} = R^h_{h(i),h(j)} + R^w_{w(i),w(j)} (+ R^t_{t(i),t(j)})
#   Z = Attn(Q, K, V) + Q                                       residual pooling connection
#
# The paper writes Softmax((Q K^T + E_rel) / sqrt(d)); the official code scales only Q K^T and adds
# E_rel computed from the unscaled Q. We follow the code, which the released weights were trained with.
#
# Reading map: one MultiScaleAttention.forward, in the order the code runs (`# step N` below).
#   1. qkv = X W_qkv, split into q, k, v of n heads each: (B, n, N, c), N = [1 +] T*H*W tokens
#   2. P(.) on each (attention_pool): take the cls token out, lay the tokens on their ([T,] H, W) grid,
#      depthwise conv with stride s_Q (for q) or s_KV (for k and v; one kernel shared by the heads),
#      flatten row-major again, put cls back in front, LayerNorm over c. Nq = [1 +] prod(grid / s_Q),
#      Nk = [1 +] prod(grid / s_KV): the sizes that reach attention
#   3. E_rel for the grid rows and grid columns (decomposed_rel_pos): per axis, the distance between
#      query and key position measured in the finer of the two grids, looked up in that axis' table
#      (get_rel_pos), dotted with the unscaled q; the axes' terms broadcast over the key grid in the
#      same (t, h, w) row-major order as the pooled keys; the cls row and column get 0
#   4. logits = (q * c^-1/2) k^T + E_rel, softmax over the keys, times v
#   5. residual pooling: Z = Attn + Q on the grid rows (the cls row gets no q)
#   6. heads merged back to (B, Nq, n*c), output projection
# Around it, MultiScaleBlock pools the shortcut with the same attention_pool (max pool, no LayerNorm).


def attention_pool(x, pool, norm, grid, has_cls):
    """Step 2, P(.) of the paper: pool a (B, n, N, c) token tensor on its ([T,] H, W) grid with `pool`
    (one depthwise conv shared by all n heads, or the block's max pool), keeping the cls token out of
    the pooling, then LayerNorm over c (cls included). Returns (tokens (B, n, N', c), new grid)."""
    if pool is None:
        return x, grid
    if has_cls:
        cls_tok, x = x[:, :, :1], x[:, :, 1:]
    B, n, N, c = x.shape
    x = x.reshape(B * n, *grid, c).movedim(-1, 1).contiguous()  # (B*n, c, [T,] H, W)
    x = pool(x)  # (B*n, c, [T',] H', W')
    grid = tuple(x.shape[2:])
    x = x.flatten(2).transpose(1, 2).reshape(B, n, -1, c)  # (B, n, N', c)
    if has_cls:
        x = torch.cat([cls_tok, x], dim=2)  # (B, n, 1 + N', c)
    return (norm(x) if norm is not None else x), grid


def get_rel_pos(q_size, k_size, rel_pos):
    """Step 3, one axis: the table rows for every (query i, key j) pair, (q_size, k_size, c):
        R[i, j] = rel_pos[i * rq - j * rk + (k_size - 1) * rk]  (floor),
        rq = max(k_size / q_size, 1),  rk = max(q_size / k_size, 1),
    i.e. the distance h(i) - h(j) measured in the finer grid's units, shifted to start at 0.
    The table needs 2 * max(q_size, k_size) - 1 rows; one built for another resolution is first
    linearly resized along its rows (SlowFast and detectron2 do; the image repo has no resizing)."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()  # (L, c) -> (length, c)
    device = rel_pos.device
    rq, rk = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    dist = torch.arange(q_size, device=device)[:, None] * rq - torch.arange(k_size, device=device)[None, :] * rk
    idx = (dist + (k_size - 1) * rk).long()  # (q_size, k_size), values in [0, 2*max - 2]
    return rel_pos[idx]  # (q_size, k_size, c)


def decomposed_rel_pos(q, q_size, k_size, rel_pos_h, rel_pos_w, rel_pos_t=None):
    """Step 3: E_rel for all (query, key) pairs of the grid tokens: (B, n, Nq, Nk), added to the logits.
    q: (B, n, Nq, c), the pooled, unscaled queries without the cls token; q_size, k_size are the
    grids (T, H, W), T = 1 for images. E_rel[i, j] = q_i . R^h[h(i), h(j)] + q_i . R^w[w(i), w(j)]
    (+ q_i . R^t[t(i), t(j)]): one einsum per axis, then broadcast over the other key axes; never a
    table per pair."""
    (qt, qh, qw), (kt, kh, kw) = q_size, k_size
    B, n, _, c = q.shape
    Rh = get_rel_pos(qh, kh, rel_pos_h)  # (qh, kh, c)
    Rw = get_rel_pos(qw, kw, rel_pos_w)  # (qw, kw, c)
    r_q = q.reshape(B, n, qt, qh, qw, c)  # (B, n, qt, qh, qw, c)
    rel_h = torch.einsum("bnthwc,hkc->bnthwk", r_q, Rh)  # (B, n, qt, qh, qw, kh)
    rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, Rw)  # (B, n, qt, qh, qw, kw)
    bias = rel_h[..., None, :, None] + rel_w[..., None, None, :]  # (B, n, qt, qh, qw, 1, kh, kw)
    if rel_pos_t is not None:
        Rt = get_rel_pos(qt, kt, rel_pos_t)  # (qt, kt, c)
        rel_t = torch.einsum("bnthwc,tkc->bnthwk", r_q, Rt)  # (B, n, qt, qh, qw, kt)
        bias = bias + rel_t[..., None, None]  # (B, n, qt, qh, qw, kt, kh, kw)
    bias = bias.expand(B, n, qt, qh, qw, kt, kh, kw)
    return bias.reshape(B, n, qt * qh * qw, kt * kh * kw)  # (B, n, Nq, Nk)


class MultiScaleAttention(nn.Module):
    """Pooling attention: qkv projection (dim -> 3*dim_out), pool q with stride_q and k, v with
    stride_kv (depthwise conv shared across heads + LayerNorm over the head dim), attention with the
    decomposed rel-pos bias, residual pooling, output projection. Names equal the official ones."""

    def __init__(self, dim, dim_out, num_heads, input_grid, kernel, stride_q, stride_kv, qkv_bias=True,
                 has_cls=False, rel_pos=True, rel_pos_t=False, residual_pooling=True):
        super().__init__()
        self.num_heads, self.dim_out, self.has_cls = num_heads, dim_out, has_cls
        self.residual_pooling, self.use_sdpa = residual_pooling, True
        c = dim_out // num_heads  # head dim
        self.scale = c ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        conv = nn.Conv3d if len(kernel) == 3 else nn.Conv2d

        def pool(stride):  # a 1x1 kernel with stride 1 would be the identity: the official code skips it
            if math.prod(kernel) == 1 and math.prod(stride) == 1:
                return None
            return conv(c, c, kernel, stride, [k // 2 for k in kernel], groups=c, bias=False)

        self.pool_q, self.pool_k, self.pool_v = pool(stride_q), pool(stride_kv), pool(stride_kv)
        self.norm_q = nn.LayerNorm(c, eps=1e-6) if self.pool_q is not None else None
        self.norm_k = nn.LayerNorm(c, eps=1e-6) if self.pool_k is not None else None
        self.norm_v = nn.LayerNorm(c, eps=1e-6) if self.pool_v is not None else None
        self.rel_pos = rel_pos
        if rel_pos:  # one table per axis and block, shared by the heads: 2 * max(q side, kv side) - 1 rows
            H, W = input_grid[-2:]
            rows = lambda size, sq, skv: 2 * max(size // sq, size // skv) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(rows(H, stride_q[-2], stride_kv[-2]), c))
            self.rel_pos_w = nn.Parameter(torch.zeros(rows(W, stride_q[-1], stride_kv[-1]), c))
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
            if rel_pos_t:
                self.rel_pos_t = nn.Parameter(torch.zeros(2 * input_grid[0] - 1, c))
                nn.init.trunc_normal_(self.rel_pos_t, std=0.02)

    def forward(self, x, grid):
        """x: (B, N, dim) normalized tokens on `grid`; returns ((B, N', dim_out), q grid)."""
        B, N, _ = x.shape
        # step 1: one Linear for q, k, v; its 3*dim_out outputs are [q | k | v], each [head 0 | head 1 | ...]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, n, N, c)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, n, N, c) each
        # step 2: P(.) on each; q with stride s_Q (its grid is the block's output grid), k and v with s_KV
        q, q_grid = attention_pool(q, self.pool_q, self.norm_q, grid, self.has_cls)  # Q = P_Q(X W_Q)
        k, k_grid = attention_pool(k, self.pool_k, self.norm_k, grid, self.has_cls)  # K = P_K(X W_K)
        v, _ = attention_pool(v, self.pool_v, self.norm_v, grid, self.has_cls)  # V = P_V(X W_V)
        s = 1 if self.has_cls else 0
        bias = None
        if self.rel_pos:  # step 3: E_rel from the unscaled q; the cls row and column get none
            qg, kg = (q_grid, k_grid) if len(grid) == 3 else ((1, *q_grid), (1, *k_grid))
            bias = decomposed_rel_pos(q[:, :, s:], qg, kg, self.rel_pos_h, self.rel_pos_w,
                                      getattr(self, "rel_pos_t", None))  # (B, n, Nq - s, Nk - s)
            bias = F.pad(bias, (s, 0, s, 0)).to(q.dtype)  # (B, n, Nq, Nk)
        if self.use_sdpa:  # step 4
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # Softmax(QK^T/sqrt(d) + E_rel) V
        else:  # the same with explicit matmuls, as the official code
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, n, Nq, Nk)
            attn = (attn + bias if bias is not None else attn).softmax(-1)
            out = attn @ v  # (B, n, Nq, c)
        if self.residual_pooling:  # step 5: Z = Attn(Q, K, V) + Q, not on the cls row
            out = torch.cat([out[:, :, :s], out[:, :, s:] + q[:, :, s:]], dim=2)  # (B, n, Nq, c)
        out = out.transpose(1, 2).reshape(B, -1, self.dim_out)  # step 6: (B, Nq, n*c)
        return self.proj(out), q_grid


class MultiScaleBlock(nn.Module):
    """Pre-norm block around pooling attention. At a stage transition the shortcut is max-pooled
    (kernel s+1, stride s) to the new grid and projected to the new width from the *normalized*
    input LN1(x) (or from LN2(x) after the MLP when dim_mul_in_att is False, MViTv2-L)."""

    def __init__(self, dim, dim_out, num_heads, input_grid, kernel, stride_q, stride_kv, drop_path=0.0,
                 mlp_ratio=4.0, qkv_bias=True, has_cls=False, rel_pos=True, rel_pos_t=False,
                 residual_pooling=True, dim_mul_in_att=True):
        super().__init__()
        self.dim, self.dim_out, self.has_cls, self.dim_mul_in_att = dim, dim_out, has_cls, dim_mul_in_att
        att_dim = dim_out if dim_mul_in_att else dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, att_dim, num_heads, input_grid, kernel, stride_q, stride_kv,
                                        qkv_bias, has_cls, rel_pos, rel_pos_t, residual_pooling)
        self.drop_path = DropPath(drop_path)  # used twice: two independent masks
        self.norm2 = nn.LayerNorm(att_dim, eps=1e-6)
        self.mlp = Mlp(att_dim, int(att_dim * mlp_ratio), dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        if math.prod(stride_q) > 1:
            skip = [s + 1 if s > 1 else s for s in stride_q]  # 3x3 stride 2 (1x3x3 stride 1x2x2 for video)
            pool = nn.MaxPool3d if len(stride_q) == 3 else nn.MaxPool2d
            self.pool_skip = pool(skip, stride_q, [k // 2 for k in skip])
        else:
            self.pool_skip = None

    def forward(self, x, grid):
        """x: (B, N, dim) on `grid`; returns ((B, N', dim_out), new grid)."""
        x_norm = self.norm1(x)
        x_block, new_grid = self.attn(x_norm, grid)  # (B, N', att_dim)
        if self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)  # shortcut projection of the normalized input: (B, N, dim_out)
        x_res = attention_pool(x[:, None], self.pool_skip, None, grid, self.has_cls)[0][:, 0]  # (B, N', D)
        x = x_res + self.drop_path(x_block)
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)  # (B, N', dim_out)
        if not self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)  # MViTv2-L: the width doubles in the MLP of the block before a stage
        return x + self.drop_path(x_mlp), new_grid


# ============================================================ the full model and its presets


def init_weights(m):
    """The image repo's init (mvit_model.py MViT._init_weights): Linear trunc_normal(0.02) with zero
    bias, LayerNorm weight 1 / bias 0; convolutions keep PyTorch's default init."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_weights_video(m):
    """SlowFast's init for its video MViTv2 (video_model_builder.py MViT._init_weights): Linear AND
    convolution weights trunc_normal(0.02) (conv biases keep PyTorch's default), Linear and
    LayerNorm biases 0.02, LayerNorm weight 1."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.constant_(m.bias, 0.02)


class MViT(nn.Module):
    """MViTv2. `depths` blocks per stage; the first block of every later stage halves the grid
    (q stride 2), doubles the heads and (inside its attention) the width. kv_stride is the adaptive
    kv stride of the first block, divided by the q stride at every transition block, that block
    included. Images: (B, 3, H, W); video (video=True): (B, 3, T, H, W). Returns logits (B, classes)."""

    def __init__(self, depths=(1, 2, 5, 2), embed_dim=96, num_heads=1, num_classes=1000, input_size=224,
                 video=False, num_frames=16, patch_kernel=None, patch_stride=None, patch_padding=None,
                 pool_kernel=None, kv_stride=None, cls_embed=None, use_abs_pos=False, rel_pos=True,
                 residual_pooling=True, dim_mul_in_att=True, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1,
                 head_dropout=0.0, eval_softmax=False):
        super().__init__()
        d = 3 if video else 2  # the image models are 2-D all the way (their checkpoints hold 2-D convs)
        patch_kernel = patch_kernel or ((3, 7, 7) if video else (7, 7))
        patch_stride = patch_stride or ((2, 4, 4) if video else (4, 4))
        patch_padding = patch_padding or ((1, 3, 3) if video else (3, 3))
        pool_kernel = pool_kernel or (3,) * d
        kv = list(kv_stride or ((1, 8, 8) if video else (4, 4)))
        self.cls_embed = video if cls_embed is None else cls_embed  # K400 models use cls, IN-1K ones do not
        size = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)
        grid = [s // p for s, p in zip(((num_frames,) if video else ()) + size, patch_stride)]  # ([T,] H, W)

        self.patch_embed = PatchEmbed(embed_dim, patch_kernel, patch_stride, patch_padding)
        if self.cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if use_abs_pos:  # off in MViTv2 (rel-pos replaces it); on for the ViT baseline of --bench
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid) + int(self.cls_embed), embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

        depth = sum(depths)
        starts = {sum(depths[:i]) for i in range(1, len(depths))}  # first block of stages 2, 3, 4
        self.blocks = nn.ModuleList()
        dim, heads = embed_dim, num_heads
        for i in range(depth):
            stride_q = ((1,) * (d - 2) + (2, 2)) if i in starts else (1,) * d
            if i in starts:
                heads *= 2
                kv = [max(s // q, 1) for s, q in zip(kv, stride_q)]  # adaptive kv stride, reduced *at* the transition
            grows = (i in starts) if dim_mul_in_att else (i + 1 in starts)
            dim_out = 2 * dim if grows else dim
            self.blocks.append(MultiScaleBlock(
                dim, dim_out, heads, grid, pool_kernel, stride_q, tuple(kv),
                drop_path=drop_path_rate * i / max(depth - 1, 1), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                has_cls=self.cls_embed, rel_pos=rel_pos, rel_pos_t=rel_pos and video,
                residual_pooling=residual_pooling, dim_mul_in_att=dim_mul_in_att))
            grid = [g // s for g, s in zip(grid, stride_q)]
            dim = dim_out
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = Head(dim, num_classes, head_dropout, eval_softmax)
        self.apply(init_weights_video if video else init_weights)  # SlowFast's for video, the image repo's for images

    def forward_features(self, x):
        """(B, 3, [T,] H, W) -> pooled feature (B, D): final LayerNorm, then cls token or token mean."""
        x, grid = self.patch_embed(x)  # (B, N, D)
        if self.cls_embed:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed
        for blk in self.blocks:
            x, grid = blk(x, grid)
        x = self.norm(x)
        return x[:, 0] if self.cls_embed else x.mean(1)  # (B, D)

    def forward(self, x):
        return self.head(self.forward_features(x))


PRESETS = {
    # CPU-sized: 32 px images (8x8 tokens), 3 stages 48 -> 96 -> 192, 4 blocks, adaptive kv stride 2.
    "tiny": dict(depths=(1, 2, 1), embed_dim=48, num_heads=1, drop_path_rate=0.0, input_size=32),
    # The paper's sizes (official configs/MVITv2_{T,S,B}.yaml, configs/test/MVITv2_L_test.yaml).
    "T": dict(depths=(1, 2, 5, 2), drop_path_rate=0.1),  # 24.17M params, 4.7 GFLOPs, 82.3% IN-1K
    "S": dict(depths=(1, 2, 11, 2), drop_path_rate=0.1),  # 34.87M, 7.0G, 83.6%
    "B": dict(depths=(2, 3, 16, 3), drop_path_rate=0.3),  # 51.47M, 10.2G, 84.4%
    "L": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, drop_path_rate=0.5,
              dim_mul_in_att=False),  # 217.99M, 42.1G, 85.3%
}


# The video models (SlowFast configs/Kinetics/MVITv2_S_16x4.yaml, MVITv2_B_32x3.yaml,
# MVITv2_L_40x3_test.yaml) regularize more than the IN-1K ones: drop path 0.2 / 0.3 / 0.75 and
# dropout 0.5 before the head (MODEL.DROPOUT_RATE); video L doubles the width inside the attention.
VIDEO_PRESETS = {"S": dict(drop_path_rate=0.2, head_dropout=0.5), "B": dict(drop_path_rate=0.3, head_dropout=0.5),
                 "L": dict(drop_path_rate=0.75, head_dropout=0.5, dim_mul_in_att=True)}


def create_model(name="tiny", **overrides):
    """A preset with overrides, e.g. create_model("S", video=True, num_frames=16, num_classes=400)
    is SlowFast's K400 MViTv2-S 16x4 (with VIDEO_PRESETS' drop path and head dropout). tiny starts
    its adaptive kv stride at 2 (1x2x2 for video)."""
    if name not in PRESETS:
        C.die(f"--model {name}: unknown preset (choose from {', '.join(PRESETS)})")
    cfg = dict(PRESETS[name])
    if name == "tiny":
        cfg["kv_stride"] = (1, 2, 2) if overrides.get("video") else (2, 2)
    if overrides.get("video"):
        cfg.update(VIDEO_PRESETS.get(name, {}))
    cfg.update(overrides)
    return MViT(**cfg)


# ============================================================ the loss


def model_input(x):
    """A loader batch as the model takes it: clips (B, T, 3, H, W) -> (B, 3, T, H, W)."""
    return x.transpose(1, 2) if x.ndim == 5 else x


def make_loss_fn(args):
    """loss_fn(model, batch) for C.fit: cross-entropy with --smoothing label smoothing (0.1 as the
    official configs; the official recipe also mixes up / cuts and pastes)."""
    smoothing = args.smoothing

    def loss_fn(model, batch):
        x, y = batch  # (B, 3, [T,] H, W) or clips (B, T, 3, H, W), (B,)
        return F.cross_entropy(model(model_input(x)), y, label_smoothing=smoothing)
    return loss_fn


# ============================================================ data glue


def holds_videos(root):
    """True when DIR holds more video files than image files (decides images vs. video for --data)."""
    if not os.path.isdir(os.path.expanduser(root)):
        C.die(f"{root}: no such folder")
    n_img = n_vid = 0
    for _, _, files in os.walk(os.path.expanduser(root)):
        for f in files:
            ext = os.path.splitext(f)[1].lower()
            n_img, n_vid = n_img + (ext in C.IMAGE_EXTS), n_vid + (ext in C.VIDEO_EXTS)
    return n_vid > n_img


def make_data(args, n_train=None, n_val=None):
    """(train_ds, val_ds, classes): images, or clips when --video (or a folder of videos); n_train /
    n_val size the synthetic sets (common.py's defaults when None)."""
    sizes = {k: v for k, v in (("n_train", n_train), ("n_val", n_val)) if v}
    if args.video:
        train, val, classes = C.video_data(args, args.num_frames, args.sampling_rate, **sizes)
    else:
        train, val, classes = C.image_data(args, **sizes)
    if not classes:
        C.die(f"{args.data}: supervised training needs labels: put the files in DIR/<class>/ folders "
              "(at least two classes)")
    return train, val, classes


# ============================================================ train, evaluate, bench, smoke


def evaluate(model, loader, run):
    """Held-out top-1 accuracy (counts summed over the ranks under torchrun) and the first 16
    (input, prediction, label) for the picture."""
    model.eval()
    return C.top1(lambda x: model(model_input(x)), loader, run)


def save_picture(path, shown, classes, video):
    """Images: two rows of 8 with predicted / true class. Video: one row of frames per clip."""
    name = lambda k: classes[k] if 0 <= k < len(classes) else str(int(k))
    if video:
        shown = shown[:4]
        rows = [C.denormalize(x) for x, _, _ in shown]  # (T, 3, H, W) each
        texts = [[f"t=0\npred {name(p)}", f"t=1\ntrue {name(y)}"] + [f"t={t}" for t in range(2, len(x))]
                 for x, p, y in shown]
    else:
        rows = [torch.stack([C.denormalize(x) for x, _, _ in shown[r:r + 8]]) for r in (0, 8) if shown[r:r + 8]]
        texts = [[f"{name(p)}" + ("" if p == y else f"\nX true: {name(y)}") for _, p, y in shown[r:r + 8]]
                 for r in (0, 8)]
    return C.save_grid(path, rows, texts)


def load_weights(model, path, run):
    """Our checkpoint.pt or an official .pyth (weights under model_state). 5-D convs with a time axis
    of 1 are squeezed as the official loader does; a head for another class count is left out and
    the fresh one kept (C.load_state's new_head)."""
    state = dict(C.unwrap_state(C.load_checkpoint(path)))
    own = model.state_dict()
    for k, v in list(state.items()):
        if k in own and isinstance(v, torch.Tensor) and v.ndim == 5 and own[k].ndim == 4 and v.shape[2] == 1:
            state[k] = v.squeeze(2)  # (C_out, C_in, 1, kh, kw) -> (C_out, C_in, kh, kw)
    C.load_state(model, state, path, new_head="head.", run=run)
    C.log(run, f"loaded {len(state)} tensors from {path}")


def design_overrides(args):
    """The design choices the Explore exercises switch: kv stride, rel-pos, residual pooling."""
    out = {}
    if args.kv_stride is not None:
        d = 3 if args.video else 2
        if len(args.kv_stride) != d:
            C.die(f"--kv_stride: give {d} numbers ({'T H W' if args.video else 'H W'}), got {args.kv_stride}")
        out["kv_stride"] = tuple(args.kv_stride)
    if args.no_rel_pos:
        out["rel_pos"] = False
    if args.no_residual_pooling:
        out["residual_pooling"] = False
    return out


def train(args, run):
    train_ds, val_ds, classes = make_data(args)
    C.check_enough(train_ds, val_ds, args, classes, need_classes=True)  # too few: one line, before any work
    C.log(run, f"{'videos' if args.video else 'images'}: {len(train_ds)} train / {len(val_ds)} val, "
               f"{len(classes)} classes, input {args.input_size} px"
          + (f", {args.num_frames} frames x {args.sampling_rate}" if args.video else ""))
    extra = {} if args.drop_path is None else dict(drop_path_rate=args.drop_path)
    extra.update(design_overrides(args))
    model = create_model(args.model, num_classes=len(classes), input_size=args.input_size, video=args.video,
                         num_frames=args.num_frames, **extra)
    if args.weights:
        load_weights(model, args.weights, run)
    C.check_resume(model, args)  # a --resume of another model ends here, before the evaluation at init
    model.to(run.device)
    with torch.device("meta"):  # the same model as shapes only, to count its FLOPs (draws no random numbers)
        shape = (1, 3) + ((args.num_frames,) if args.video else ()) + (args.input_size,) * 2
        g = gflops(create_model(args.model, num_classes=len(classes), input_size=args.input_size,
                                video=args.video, num_frames=args.num_frames, **extra), torch.empty(shape))
    C.log(run, f"MViTv2-{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"{g * 1e3:.2f} M multiply-adds per {'clip' if args.video else 'image'}")
    val_loader = C.make_loader(val_ds, args, run, train=False)
    acc_init, _ = evaluate(model, val_loader, run)
    loader = C.make_loader(train_ds, args, run, train=True)
    model, history = C.fit(model, make_loss_fn(args), loader, args, run)
    acc, shown = evaluate(model, val_loader, run)
    if run.is_main:
        pic = save_picture(os.path.join(args.out, "predictions.png"), shown, classes, args.video)
        C.log(run, f"picture: {pic}")
    C.write_metrics(args, run, history, acc=acc, acc_init=acc_init, chance=1 / len(classes),
                    video=bool(args.video), params=sum(p.numel() for p in model.parameters()), gflops=g)


def smoke(args, run):
    train_ds, _, classes = make_data(args, n_train=16, n_val=4)
    model = create_model(args.model, num_classes=len(classes), input_size=args.input_size, video=args.video,
                         num_frames=args.num_frames, drop_path_rate=0.0)
    n = min(8, len(train_ds))
    batch = tuple(torch.stack(t) for t in zip(*[train_ds[i] for i in range(n)]))
    args.smoothing = 0.0  # the smoke test wants a loss that can fall towards 0
    C.smoke(model, make_loss_fn(args), batch, run, steps=25, lr=1e-3)


def gflops(model, x):
    """Multiply-adds in G (the paper's "FLOPs", as fvcore counts them: one per multiply-add) of one
    forward pass. torch's FLOP counter counts the fused attention's two matmuls (q k^T and attn v),
    the same as the explicit path (use_sdpa = False) gives."""
    with torch.no_grad():
        return C.count_flops(lambda: model(x)) / 2 / 1e9


VIT_S16 = dict(depths=(12,), embed_dim=384, num_heads=6, patch_kernel=(16, 16), patch_stride=(16, 16),
               patch_padding=(0, 0), pool_kernel=(1, 1), kv_stride=(1, 1), cls_embed=True, use_abs_pos=True,
               rel_pos=False, residual_pooling=False)  # a ViT is an MViT with one stage and no pooling


def bench(args, run):
    """The paper's efficiency point at 224 px: pooling kv vs. not, MViTv2-T vs. ViT-S/16 (similar
    size), and the size/FLOP table of T/S/B/L against the paper's numbers."""
    S = 224
    meta = torch.empty(1, 3, S, S, device="meta")

    def on_meta(name, **kw):
        with torch.device("meta"):
            return create_model(name, **kw)

    C.log(run, f"MViTv2 at {S}x{S}, GFLOPs = multiply-adds (as the paper), attention's matmuls included")
    C.log(run, f"{'model':8s} {'params':>9s} {'paper':>7s} {'GFLOPs':>7s} {'paper':>6s}")
    paper = {"T": (24.2, 4.7), "S": (34.9, 7.0), "B": (51.5, 10.2), "L": (218.0, 42.1)}
    worst = 0.0
    for name, (p_ref, g_ref) in paper.items():
        m = on_meta(name)
        p, g = sum(t.numel() for t in m.parameters()) / 1e6, gflops(m, meta)
        if name != "L":  # README: L 42.1; the official L code counts 43.7 here, as T counts 4.68
            worst = max(worst, abs(g / g_ref - 1), abs(p / p_ref - 1))
        C.log(run, f"{name:8s} {p:8.2f}M {p_ref:6.1f}M {g:7.2f} {g_ref:6.1f}")

    # step time on this machine: forward + backward of one 224 px image, batch `bs`
    bs = 1 if run.device.type == "cpu" else 32
    x, y = torch.randn(bs, 3, S, S, device=run.device), torch.zeros(bs, dtype=torch.long, device=run.device)

    def train_step(model):
        model.to(run.device).train()

        def step():
            with C.autocast(run):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    rows = [("MViTv2-T (kv pooled, adaptive stride 4)", "T", {}),
            ("MViTv2-T without kv pooling (stride 1)", "T", dict(kv_stride=(1, 1))),
            ("ViT-S/16 (cls + abs pos, no pooling)", "T", VIT_S16)]
    models, steps = {}, {}
    for label, name, kw in rows:
        torch.manual_seed(0)
        models[label] = create_model(name, **kw)
        steps[label] = train_step(models[label])
    times = C.time_ab(steps, run, rounds=3 if run.device.type == "cpu" else 10)  # interleaved rounds
    C.log(run, f"\n{'at 224 px, batch ' + str(bs) + ', train step on ' + str(run.device):44s} {'params':>8s} "
               f"{'GFLOPs':>7s} {'step s':>7s}")
    res = []
    for label, name, kw in rows:
        g = gflops(on_meta(name, **kw), meta)
        p = sum(t.numel() for t in models[label].parameters()) / 1e6
        res.append((p, g, times[label]))
        C.log(run, f"{label:44s} {p:7.2f}M {g:7.2f} {times[label]:7.3f}")
    del models, steps
    gb = gflops(on_meta("B"), meta)
    gvb = gflops(on_meta("T", **dict(VIT_S16, embed_dim=768, num_heads=12)), meta)
    C.log(run, f"{'MViTv2-B vs ViT-B/16 (FLOPs only)':44s} {'':8s} {gb:7.2f} vs {gvb:.2f} = {gb / gvb:.2f}x")
    if run.device.type == "cpu":
        C.log(run, "(CPU timings on a machine shared with other jobs: read the ratios, not the seconds)")
    (p0, g0, t0), (p1, g1, t1), (p2, g2, t2) = res
    C.log(run, f"bench: kv pooling cuts MViTv2-T@224 FLOPs {g1 / g0:.2f}x and step time {t1 / t0:.2f}x "
               f"(paper code: 7.42/4.70 = 1.58x); MViTv2-T vs ViT-S/16: {g0 / g2:.2f}x FLOPs, {t0 / t2:.2f}x time "
               f"at {p0 / p2:.2f}x params; T/S/B params and GFLOPs within {100 * worst:.1f}% of the paper")


# ============================================================ command line


def settle(args):
    """The defaults that depend on other flags: --video when --data holds videos, the epochs."""
    if args.data is not None and not args.video and not args.bench:
        args.video = holds_videos(args.data)
    if args.epochs is None:
        args.epochs = 10 if args.video else 15
    return args


def main(argv=None):
    p = C.make_parser("mvit", __doc__, presets=PRESETS, epochs=None, batch_size=64, lr=2e-3, warmup_epochs=1, weight_decay=0.05,
                      clip_grad=1.0, input_size=32)
    p.add_argument("--video", action="store_true", help="video classification (default when --data holds videos)")
    p.add_argument("--num_frames", type=int, default=8, help="frames per clip (video)")
    p.add_argument("--sampling_rate", type=int, default=1, help="frame stride within a clip (video)")
    p.add_argument("--drop_path", type=float, default=None, help="drop path rate (default: the preset's)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--kv_stride", type=int, nargs="+", default=None,
                   help="adaptive kv stride of the first block, per axis (POOL_KV_STRIDE_ADAPTIVE; "
                        "default: the preset's, 2 2 for tiny images, 4 4 for T/S/B/L)")
    p.add_argument("--no_rel_pos", action="store_true", help="no decomposed relative positions (MViTv1-like)")
    p.add_argument("--no_residual_pooling", action="store_true", help="no residual pooling connection")
    args = settle(p.parse_args(argv))
    run = C.init_run(args)
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    return train(args, run)


if __name__ == "__main__":
    main()
