"""ViTDet: a plain, non-hierarchical ViT backbone for object detection.

Paper: "Exploring Plain Vision Transformer Backbones for Object Detection",
Yanghao Li, Hanzi Mao, Ross Girshick, Kaiming He, ECCV 2022, arXiv 2203.16527.
Official code: facebookresearch/detectron2, detectron2/modeling/backbone/{vit.py,utils.py} and
projects/ViTDet (configs). Parameter names here follow detectron2.

The idea. Detectors were built on hierarchical backbones (ResNet, Swin, MViT) with an FPN. ViTDet
keeps the ViT exactly as MAE pre-trained it: one stride-16 map, no stages. Two small changes make it
a detection backbone:
  1. a *simple feature pyramid*: the strides 4, 8, 16, 32 (and 64) maps are made from the LAST
     stride-16 map alone, by deconvolutions (x4, x2), identity (x1) and max pooling (x0.5);
  2. high resolution (1024x1024 -> a 64x64 map) is affordable because most blocks use
     *non-overlapping window attention without shifting* (14x14 windows), and a few evenly spaced
     blocks (ViT-B: 2, 5, 8, 11) keep *global* attention to propagate information across windows
     (or, alternatively, a residual conv block after them).
The absolute positions keep their pre-training size (14x14 + cls) and are resized bicubically at
every forward; decomposed relative positions (MViTv2) are added, zero-initialized since MAE has none.

What this file reproduces in miniature. The backbone and pyramid are the official ones (the presets
`base`, `large`, `huge` have the paper's numbers and load released weights); the `tiny` preset
(64x64 inputs, patch 8: an 8x8 map, 4x4 windows in blocks 0 and 2, global attention in blocks 1
and 3; a pyramid and head 32 channels wide) trains from scratch on the synthetic "shapes" boxes
(6 kinds) within 2 minutes on 2 CPU cores to a COCO AP that shows the plain ViT detecting well;
`mae_tiny` is the encoder of this project's mae.py `tiny`, so that MAE pre-training can initialize
it, as in the paper. `--bench` measures the paper's efficiency point
on the real ViT-B at 1024x1024: FLOPs, activation memory and time of the backbone with all-global
attention, ViTDet (window + 4 global) and all-window attention.

    python vitdet.py                      # train tiny on synthetic shapes: AP, picture, detections.json
    python vitdet.py --data DIR           # COCO format: DIR/annotations.json beside the images
    python vitdet.py --bench              # ViT-B backbone at 1024: global vs window+4 global vs window
    python vitdet.py --smoke              # a few steps on one tiny batch; exit status says pass/fail
    python mae.py && python vitdet.py --model mae_tiny --weights runs/mae/checkpoint.pt
    python vitdet.py --model base --weights mae_pretrain_vit_base.pth --data DIR   # the paper's setting
    torchrun --nproc_per_node=2 vitdet.py --data DIR

Outputs in --out: checkpoint.pt, metrics.json (ap, ap50, ap75), detections.json (COCO results:
image_id, category_id, bbox [x, y, w, h] in the original image's pixels, score), detections.png
(held-out images: ground truth above, predictions with label and score below) and, for the
synthetic data, val_annotations.json (the held-out ground truth in COCO format). The held-out
figures cover at most --eval_max images (2000 by default, a fixed subsample of a larger set; 0: all).
Under torchrun every rank detects on its share of them and rank 0 computes the AP on the whole.

Weights (--weights PATH, read with torch.load(weights_only=True)):
  * an MAE encoder: the official mae_pretrain_vit_{base,large}.pth ({"model": {cls_token, pos_embed,
    patch_embed.*, blocks.*, norm.*}}) or this project's mae.py checkpoint (the same names plus
    mask_token / decoder_*). Its keys are mapped to `backbone.net.*`; cls_token, the final norm and
    the decoder are dropped (the detector has no cls token and no final norm), exactly as
    detectron2's loader does; rel_pos tables, the pyramid and the head stay at their initialization.
    The list of used and dropped keys is printed. A pos_embed of another grid size is accepted (it
    is resized at every forward anyway).
  * a detector checkpoint written by this script (every key must match), or a released ViTDet
    model: `backbone.net.*` and `backbone.simfp_*` load with every key matched; its Mask R-CNN
    heads (proposal_generator.*, roi_heads.*) have no counterpart here and are reported as dropped.
    Detectron2's model-zoo files (model_final_*.pkl) are Python pickles that weights_only loading
    refuses; convert one once with detectron2's own environment:
        import pickle, torch
        d = pickle.load(open("model_final_61ccd1.pkl", "rb"), encoding="latin1")
        torch.save({k: torch.as_tensor(v) for k, v in d["model"].items()}, "vitdet_b.pth")
    and pass vitdet_b.pth.

Departures from the official implementation, and why:
  * Detector head: the paper uses Mask R-CNN / Cascade Mask R-CNN. A two-stage detector with
    RoIAlign, a mask branch and their losses would double this file and hide the lesson, which is
    the backbone and the pyramid. We use detectron2's FCOS head instead (anchor-free, one stage:
    two towers of conv + GN + ReLU shared across levels (4 x 256 channels as detectron2; 1 x 32 in
    `tiny`, 1 x 64 in `mae_tiny`, whose pyramids are 32 / 64 channels wide, not 256), classification
    with sigmoid focal loss, ltrb box regression normalized by the stride with GIoU loss, centerness with BCE;
    names `head.*` as detectron2's FCOSHead). Differences from detectron2's FCOS: the loss normalizer is the number of
    positives in the batch (not an EMA of it), point centres sit at (i + 0.5) * stride as in the
    FCOS paper, and the score threshold for evaluation is 0.05 (0.2 in the D2 config; a lower
    threshold can only raise AP). No masks, so there is no mask AP.
  * Data: common.py resizes every image to input_size x input_size (aspect ratio not kept) instead
    of large-scale jitter and zero padding to a 1024 square; the training augmentation is a
    horizontal flip only. Detections are mapped back to the original image size.
  * Schedule: warmup + cosine (common.py) instead of the step schedule. The tiny run starts from
    scratch: AdamW lr 1e-3 (paper 1e-4 for a pre-trained ViT, batch 64), batch 8, 3 epochs of
    1800 images (to fit the default run in 2 minutes on 2 CPU cores; the small batch gives twice
    the steps of batch 16 for about 10 % more time per image, and the steps are what the AP follows
    here), gradient clipping at 1.0 (none in the paper) and no layer decay (1.0; it is for
    a pre-trained backbone: 0.7 / 0.8 / 0.9 are the defaults of base / large / huge, mae_tiny 0.7;
    --layer_decay sets it). Drop path 0.1 / 0.4 / 0.5 for base / large / huge as the paper, 0 for
    the tiny models.
  * The 2-minute default run: `tiny`'s pyramid and head are 32 channels wide (64 before, 256 in the
    paper): the 3x3 convs of the pyramid and of the head on the stride-2 level (32 x 32 points, 3/4
    of all) took half of every training step. With 32 channels the head's GroupNorm(32) normalizes
    each channel alone. Tried (3 epochs of 2000 images unless said; AP): 64 channels, batch 16,
    6 epochs 0.80 but 2.5x the time; 32 channels, batch 16 0.45, at lr 2e-3 0.56; batch 8 0.63
    (2000 images, the default until the same run measured 118-129 s on idle cores; 1800 images,
    now the default, 0.58 in 105-118 s, at lr 1.5e-3 / 2e-3 0.57 / 0.57; 1600 images 0.51); batch
    8, lr 2e-3, 1600 images 0.56 (clipping at 10 instead of 1: 0.53); width 64 (2 heads) 0.56 in 3/4
    of the time; patch 16 (a 4 x 4 map, the paper's strides 4 ... 64, every shape on the stride-4
    level) 0.42 after 6 epochs.
  * COCO AP is computed here (pycocotools is not a dependency) as pycocotools' cocoeval.py does
    for boxes with area "all" and 100 detections per image (evaluateImg's greedy matching, of two
    equal IoUs the later ground truth; accumulate's precision tp / (tp + fp + eps), so a perfect AP
    reads 1 - 2e-16); crowd annotations are not treated apart.
  * Not departures: the layer-wise lr decay and the weight-decay exceptions are the configs', per
    preset: base, large (and the tiny presets) give wd 0 to the ViT's nn.LayerNorm parameters, the
    head's GroupNorm and pos_embed; huge decays them all (mask_rcnn_vitdet_h_75ep.py: overrides {},
    weight_decay_norm None); biases, rel_pos tables and the pyramid's channel LayerNorms keep weight
    decay in every preset (detectron2 only exempts torch norm classes). Inference takes the top 1000
    candidates on each pyramid level, then NMS over the levels together, as detectron2's FCOS.
  * No activation checkpointing and no fp16 DDP gradient compression.

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `window_partition` and `window_unpartition` (Sec. 3 "Backbone adaptation":
   non-overlapping windows without shifting; steps 3 and 5 of the reading map in the paper's-idea
   section: zero-pad the LN1 output at the bottom/right to a multiple of w, cut it into w x w
   windows in row-major order, and after the attention put every token back in its own slot and
   crop the padding).
   The tests also check where the model uses them: a block on a padded non-square map against a
   loop over windows, and the global blocks at the paper's indices (2, 5, 8, 11 for ViT-B).
   Grade: `python -m pytest tests/test_vitdet.py -k "window"`
2. Re-implement `get_rel_pos` and `decomposed_rel_pos` (the decomposed relative positions of
   MViTv2, its Sec. 4.1, which ViTDet adds to every block; step 4: E[(i_h, i_w), (j_h, j_w)]
   = q . R^h[i_h - j_h] + q . R^w[i_w - j_w], tables of 2 * size - 1 rows, linearly interpolated
   when the block runs at another size). Grade: `python -m pytest tests/test_vitdet.py -k "rel_pos"`
3. Re-implement `SimpleFeaturePyramid.__init__` and `SimpleFeaturePyramid.forward` (Sec. 3 "Simple
   feature pyramid"; step 8: from the LAST stride-16 map alone, x4 = deconv, LN, GELU,
   deconv; x2 = one deconv; x1 = the map; x0.5 = 2x2 max pool; each then 1x1 conv + LN, 3x3 conv +
   LN, no activation; p6 = max pool kernel 1 stride 2 of p5; stages named simfp_<log2 stride>).
   Grade: `python -m pytest tests/test_vitdet.py -k "pyramid"`
4. Re-implement `fcos_targets` and `fcos_loss` (this file's detector head, see "Departures": FCOS,
   Tian et al. 2019, Sec. 3.1-3.3 and center sampling as detectron2: a point is positive for the
   smallest box it lies in, near its centre, whose size suits the point's level; focal loss on
   the classes, 1 - GIoU on the boxes, BCE on centerness, all divided by the number of positives).
   Grade: `python -m pytest tests/test_vitdet.py -k "fcos"`
5. Explore: window attention pays only at high resolution. At 1024 x 1024 (a 64 x 64 map) ViT-B
   with all-global attention costs 1.38x the FLOPs of window + 4 global blocks, all-window 0.81x
   (664.8 / 483.2 / 392.4 GFLOPs, fvcore on the official backbone). Predict the three at 448 (a
   28 x 28 map: 2 x 2 windows of 14) and at 512 (a 32 x 32 map, zero-padded to 42 x 42), then run
   `python vitdet.py --bench --bench_size 448` and `--bench_size 512` (about 2 min each on a CPU)
   and read the GFLOPs and activation-memory columns. You should see (measured: all global /
   ViTDet / all window) 78.8 / 73.0 / 70.1 GFLOPs and 0.85 / 0.66 / 0.57 GiB at 448: windows
   still save a little; at 512 the order of the FLOPs turns round, 107.5 / 112.7 / 115.4 GFLOPs,
   because the padding adds 72 % more tokens to every linear layer of a window block, more than
   the attention saves on 1024 tokens, while the activation memory still favours windows (1.24 /
   1.08 / 1.00 GiB). Then give ViT-B 2 global blocks (5, 11) instead of 4 in `bench`'s settings
   and predict the FLOPs at 1024 before you look (the official backbone: 437.8 GFLOPs).
   Grade: `python -m pytest tests/test_vitdet.py -k "flops"`
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

# ============================================================ the ordinary building blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (detectron2's norm "LN"), eps 1e-6."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):  # (B, C, H, W): normalize each pixel's C values
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # (B, H, W, C)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvNorm(nn.Conv2d):
    """A conv followed by a norm and NO activation (detectron2's Conv2d(..., norm=...)): the state
    dict has `weight` (and `bias` if any) of the conv and `norm.*` of the norm."""

    def __init__(self, cin, cout, kernel_size, padding=0, bias=False, norm=True):
        super().__init__(cin, cout, kernel_size, padding=padding, bias=bias)
        self.norm = LayerNorm2d(cout) if norm else None

    def forward(self, x):
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class PatchEmbed(nn.Module):
    """16x16 patches by a strided conv; the output stays a map, (B, H, W, C)."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


def msra_fill(conv):
    """Caffe2 MSRA fill (kaiming normal, fan_out, relu) as detectron2's c2_msra_fill."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# ============================================================ the paper's idea: a plain ViT as a detection backbone
#
# Reading map: one image through the backbone (ViT-B at 1024, detectron2's order; `# step N` below)
#   1. patch embedding: (B, 3, 1024, 1024) -> a (B, 64, 64, C) map; no cls token    PatchEmbed
#   2. + the absolute positions of the pre-training size (14 x 14, cls entry dropped), resized
#      bicubically to 64 x 64 at every forward                                       get_abs_pos
#   3. in each block: LN1 first, THEN zero-pad the map bottom/right to a multiple of the window
#      (64 -> 70) and cut it into 5 x 5 non-overlapping 14 x 14 windows, no shift  window_partition
#   4. attention inside each window (the global blocks 2, 5, 8, 11 attend over the whole map):
#      softmax(q k^T / sqrt(d) + E_rel) v, the padded tokens unmasked keys; E_rel the decomposed
#      relative positions of MViTv2, q . R^h[i_h - j_h] + q . R^w[i_w - j_w] with the UNSCALED q,
#      tables of 2 * 14 - 1 rows in a window, 2 * 64 - 1 in a global block  decomposed_rel_pos
#   5. the windows back in place, every token in its own slot, the padding cropped  window_unpartition
#   6. residual, MLP, residual (conv propagation: a residual bottleneck block after 2, 5, 8, 11)
#   7. no final norm: the last stride-16 map (B, C, 64, 64) is the only output of the plain ViT
#   8. the simple feature pyramid, from that last map alone: x4 by two 2x2 deconvs (p2, stride 4),
#      x2 by one (p3, stride 8), x1 the map itself (p4, 16), x0.5 a 2x2 max pool (p5, 32); each
#      then 1x1 conv + LN and 3x3 conv + LN; p6 (64) subsamples p5   SimpleFeaturePyramid


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nW, w, w, C) non-overlapping windows, zero-padding H, W at the
    bottom/right up to a multiple of w (64 -> 70 for w = 14: 5 x 5 = 25 windows). The padded
    tokens are NOT masked in the attention: they are keys whose projection is the bias only."""
    B, H, W, Cc = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)   step 3: zeros at the bottom/right
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, Cc)  # (B, nh, w, nw, w, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, Cc)  # (B*nh*nw, w, w, C), row-major
    return windows, (Hp, Wp)


def window_unpartition(windows, window_size, pad_hw, hw):
    """Inverse of window_partition: (B * nW, w, w, C) -> (B, H, W, C), the padding cropped off."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // ((Hp // window_size) * (Wp // window_size))
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)  # (B, nh, nw, w, w, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)  # (B, Hp, Wp, C)
    return x[:, :H, :W, :].contiguous()  # (B, H, W, C)   step 5: the padding cropped off


def get_abs_pos(abs_pos, has_cls_token, hw):
    """The absolute positions stay at their pre-training size, e.g. (1, 1 + 14*14, C) for 224 / 16.
    Drop the cls entry and resize the 14x14 grid bicubically to the runtime map (h, w); returns
    (1, h, w, C). Identity when the sizes agree."""
    h, w = hw
    if has_cls_token:
        abs_pos = abs_pos[:, 1:]  # (1, S*S, C)
    size = int(math.sqrt(abs_pos.shape[1]))
    assert size * size == abs_pos.shape[1], "pos_embed is not a square grid"
    grid = abs_pos.reshape(1, size, size, -1)  # (1, S, S, C)
    if (size, size) == (h, w):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)  # (1, C, h, w)
    return grid.permute(0, 2, 3, 1)  # (1, h, w, C)


def get_rel_pos(q_size, k_size, rel_pos):
    """Step 4, one axis: the table rows for every (query i, key j) pair, (q_size, k_size, C):
        R[i, j] = rel_pos[i * rq - j * rk + (k_size - 1) * rk],  rq = max(k_size / q_size, 1), rk = max(q_size / k_size, 1)
    (detectron2's get_rel_pos; in ViTDet q_size = k_size, so R[i, j] = rel_pos[i - j + k_size - 1]).
    The table needs 2 * max(q_size, k_size) - 1 rows; one of another length is linearly interpolated
    (a global block trained at 1024 used at another size, or a checkpoint of another size)."""
    n = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != n:
        rel_pos = F.interpolate(rel_pos.t()[None], size=n, mode="linear")[0].t()  # (n, C)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)  # (q, k) in [0, n)
    return rel_pos[rel.long()]  # (q, k, C)


def decomposed_rel_pos(q, q_size, k_size, rel_pos_h, rel_pos_w):
    """MViTv2's decomposed relative position term, the bias added to the attention logits:
        E[(i_h, i_w), (j_h, j_w)] = q_(i_h, i_w) . R^h[i_h - j_h] + q_(i_h, i_w) . R^w[i_w - j_w]
    q: (B, N, C) with N = q_h * q_w, NOT multiplied by the 1/sqrt(d) scale (as in the official
    code); q_size, k_size: the grids (h, w). Returns the bias (B, q_h * q_w, k_h * k_w)."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, C)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, C)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, dim)  # (B, q_h, q_w, C)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # (B, q_h, q_w, k_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # (B, q_h, q_w, k_w)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B, q_h, q_w, k_h, k_w)
    return bias.reshape(B, q_h * q_w, k_h * k_w)  # (B, Nq, Nk)


class Attention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) map (a whole image or one window), with the
    decomposed relative positions: softmax((q / sqrt(d)) k^T + E_rel) v.
    Through F.scaled_dot_product_attention; `explicit = True` writes the matmuls out as detectron2's
    Attention does, so that --bench counts the activation memory the official code has (the N x N
    attention matrices saved for backward: what the windows save) and its FLOPs as fvcore does."""

    explicit = False

    def __init__(self, dim, num_heads, qkv_bias=True, use_rel_pos=True, input_size=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:  # zero init: the MAE encoder has no relative positions (rel_pos_zero_init)
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x):
        B, H, W, D = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, nh, D // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, d)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, d)
        bias = None
        if self.use_rel_pos:
            q_ = q.reshape(B * nh, H * W, -1)  # (B*nh, N, d), the unscaled q
            bias = decomposed_rel_pos(q_, (H, W), (H, W), self.rel_pos_h, self.rel_pos_w)  # (B*nh, N, N)  step 4: E_rel
            bias = bias.view(B, nh, H * W, H * W)  # (B, nh, N, N)
        if self.explicit:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)  q k^T / sqrt(d)
            if bias is not None:
                attn += bias  # + E_rel (unscaled q, as the official code); in place: one N x N buffer less
            x = attn.softmax(dim=-1) @ v  # (B, nh, N, d)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, N, d)
        x = x.transpose(1, 2).reshape(B, H, W, D)  # (B, H, W, C)
        return self.proj(x)


class ResBottleneckBlock(nn.Module):
    """The conv propagation alternative: 1x1 (C -> C/2) + LN + GELU, 3x3 + LN + GELU, 1x1 (-> C) + LN,
    plus the residual. The last norm is zero-initialized so the block starts as the identity."""

    def __init__(self, dim):
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = LayerNorm2d(mid)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(mid)
        self.act2 = nn.GELU()
        self.conv3 = nn.Conv2d(mid, dim, 1, bias=False)
        self.norm3 = LayerNorm2d(dim)
        for conv in (self.conv1, self.conv2, self.conv3):
            msra_fill(conv)
        nn.init.zeros_(self.norm3.weight)
        nn.init.zeros_(self.norm3.bias)

    def forward(self, x):  # (B, C, H, W)
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        return x + self.norm3(self.conv3(out))


class Block(nn.Module):
    """A ViT block on a (B, H, W, C) map. window_size > 0: attention inside non-overlapping windows
    (no shift); window_size == 0: global attention over the whole map (a propagation block)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, use_rel_pos=True,
                 window_size=0, use_residual_block=False, input_size=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        # the rel-pos tables are sized for the window (2*14-1 = 27 rows) or the full map (2*64-1 = 127)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.use_residual_block = use_residual_block
        if use_residual_block:
            self.residual = ResBottleneckBlock(dim)

    def forward(self, x):  # (B, H, W, C)
        shortcut = x
        x = self.norm1(x)  # step 3: LN first, THEN pad: the padded tokens are exact zeros
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)  # (B*nW, w, w, C)
        x = self.attn(x)  # step 4: in each window, or over the whole map in a global block
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))  # (B, H, W, C)   step 5
        x = shortcut + self.drop_path(x)  # step 6
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_residual_block:
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        return x


class ViT(nn.Module):
    """The plain backbone: patch embedding, + resized absolute positions, blocks; NO cls token and NO
    final norm; one stride-16 output map (B, C, H/16, W/16)."""

    def __init__(self, img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, use_rel_pos=True, window_size=14,
                 window_block_indexes=(), residual_block_indexes=(), pretrain_img_size=224,
                 pretrain_use_cls_token=True):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        n = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))  # pre-training size, (1, 1 + 14*14, C)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        grid = (img_size // patch_size, img_size // patch_size)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], use_rel_pos,
                  window_size if i in window_block_indexes else 0, i in residual_block_indexes, grid)
            for i in range(depth))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W)
        x = self.patch_embed(x)  # (B, H/16, W/16, C)                                 step 1
        x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))  # step 2
        for blk in self.blocks:
            x = blk(x)  # steps 3-6
        return x.permute(0, 3, 1, 2)  # (B, C, H/16, W/16), no final norm               step 7


class SimpleFeaturePyramid(nn.Module):
    """Strides 4, 8, 16, 32 from the single stride-16 map (scale factors 4, 2, 1, 0.5), plus p6 by a
    stride-2 max pool of p5 (detectron2's LastLevelMaxPool). Each level: [upsample/downsample], a
    1x1 conv + LN, a 3x3 conv + LN, no activation after them. Modules are named simfp_<log2 stride>."""

    def __init__(self, net, out_channels=256, scale_factors=(4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.net = net
        dim = net.embed_dim
        self.strides = []
        self.stages = []
        for scale in scale_factors:
            if scale == 4.0:  # step 8, stride 4: two 2x2 deconvs with LN + GELU between
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                cin = dim // 4
            elif scale == 2.0:  # stride 8: one deconv
                layers, cin = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:  # stride 16: the map itself
                layers, cin = [], dim
            elif scale == 0.5:  # stride 32: 2x2 max pool
                layers, cin = [nn.MaxPool2d(2, 2)], dim
            else:
                raise ValueError(f"scale factor {scale} is not supported")
            layers += [ConvNorm(cin, out_channels, 1), ConvNorm(out_channels, out_channels, 3, padding=1)]
            stride = int(net.patch_size / scale)
            stage = nn.Sequential(*layers)
            self.add_module(f"simfp_{int(math.log2(stride))}", stage)
            self.stages.append(stage)
            self.strides.append(stride)
        self.strides.append(self.strides[-1] * 2)  # p6
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]

    def forward(self, x):  # (B, 3, H, W) -> dict p2..p6 of (B, 256, H/s, W/s)
        feat = self.net(x)  # (B, C, H/16, W/16): the LAST map only (step 7)
        outs = [stage(feat) for stage in self.stages]  # step 8: p2, p3, p4, p5 from the same map
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))  # p6 = LastLevelMaxPool(p5)
        return dict(zip(self.names, outs))


# ============================================================ the full model and its presets


class FCOSHead(nn.Module):
    """detectron2's FCOSHead (a RetinaNet head with one point per location and a centerness branch):
    two towers of [3x3 conv, GroupNorm(32), ReLU], shared across levels, then 3x3 predictors."""

    def __init__(self, in_channels, num_classes, conv_dims=(256,) * 4, prior_prob=0.01):
        super().__init__()
        cls_subnet, bbox_subnet = [], []
        for cin, cout in zip((in_channels,) + tuple(conv_dims), conv_dims):
            cls_subnet += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(32, cout), nn.ReLU()]
            bbox_subnet += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(32, cout), nn.ReLU()]
        self.cls_subnet = nn.Sequential(*cls_subnet)
        self.bbox_subnet = nn.Sequential(*bbox_subnet)
        self.cls_score = nn.Conv2d(conv_dims[-1], num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(conv_dims[-1], 4, 3, padding=1)
        self.ctrness = nn.Conv2d(conv_dims[-1], 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats):
        """feats: list of (B, C, h, w). Returns logits (B, R, K), deltas (B, R, 4), ctr (B, R) with
        the R points of all levels concatenated, row-major inside each level."""
        logits, deltas, ctr = [], [], []
        for f in feats:
            t = self.bbox_subnet(f)
            logits.append(self.cls_score(self.cls_subnet(f)).flatten(2).transpose(1, 2))  # (B, h*w, K)
            deltas.append(self.bbox_pred(t).flatten(2).transpose(1, 2))  # (B, h*w, 4)
            ctr.append(self.ctrness(t).flatten(1))  # (B, h*w)
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(ctr, 1)


class ViTDet(nn.Module):
    """backbone = SimpleFeaturePyramid(net=ViT), head = FCOSHead; forward(images) -> dense predictions."""

    def __init__(self, num_classes=80, img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 drop_path_rate=0.1, window_size=14, global_block_indexes=(2, 5, 8, 11), propagation="global",
                 use_rel_pos=True, pretrain_img_size=224, out_channels=256, head_convs=(256,) * 4,
                 layer_decay=0.7, weight_decay_norm=0.0, no_decay_pos_embed=True):
        super().__init__()
        # propagation "global": the blocks in global_block_indexes attend globally, the rest in windows
        # (the paper's default). "conv": every block is windowed and a residual conv block follows the
        # blocks in global_block_indexes (the paper's alternative, detectron2's residual_block_indexes).
        if propagation not in ("global", "conv"):
            raise ValueError(f"propagation must be 'global' or 'conv', not {propagation!r}")
        if propagation == "global":
            window_block_indexes = [i for i in range(depth) if i not in global_block_indexes]
            residual_block_indexes = []
        else:
            window_block_indexes, residual_block_indexes = list(range(depth)), list(global_block_indexes)
        net = ViT(img_size, patch_size, embed_dim, depth, num_heads, 4.0, True, drop_path_rate, use_rel_pos,
                  window_size, window_block_indexes, residual_block_indexes, pretrain_img_size)
        self.backbone = SimpleFeaturePyramid(net, out_channels)
        self.head = FCOSHead(out_channels, num_classes, tuple(head_convs))
        self.num_classes = num_classes
        self.depth = depth
        # the recipe's optimizer settings, per preset as the configs: layer-wise lr decay; weight decay
        # of the torch norm layers (0.0, or None: the ordinary weight decay) and of pos_embed (exempt or not)
        self.layer_decay = layer_decay
        self.weight_decay_norm, self.no_decay_pos_embed = weight_decay_norm, no_decay_pos_embed

    def forward(self, images):  # (B, 3, S, S)
        feats = list(self.backbone(images).values())  # p2..p6, each (B, 256, S/s, S/s)
        logits, deltas, ctr = self.head(feats)
        points, strides = [], []  # one point per location, at the centre of its stride x stride cell
        for f, s in zip(feats, self.backbone.strides):
            h, w = f.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h, device=f.device), torch.arange(w, device=f.device), indexing="ij")
            points.append(torch.stack([xs.flatten(), ys.flatten()], 1).float().add(0.5).mul(s))  # (h*w, 2) as (x, y)
            strides.append(torch.full((h * w,), float(s), device=f.device))
        return dict(logits=logits, deltas=deltas, ctr=ctr, points=torch.cat(points), strides=torch.cat(strides))


PRESETS = {
    # CPU-sized: 64x64 inputs, an 8x8 map, 4x4 windows in blocks 0 and 2, global blocks 1 and 3 (the
    # last of each half, as B's 2, 5, 8, 11 are the last of each quarter); pos_embed of a 32x32
    # "pre-training" (4x4 + cls) resized to 8x8 at every forward, as 14x14 -> 64x64 at 1024. A pyramid and
    # head 32 channels wide (not 64): their 3x3 convs on the 32x32 stride-2 level were half the training time
    "tiny": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, drop_path_rate=0.0,
                 window_size=4, global_block_indexes=(1, 3), pretrain_img_size=32, out_channels=32,
                 head_convs=(32,), layer_decay=1.0),
    # the encoder of this project's mae.py `tiny` (32x32, patch 4, D 192, 4 blocks, 3 heads), so that its
    # checkpoint initializes the backbone as the paper does with MAE: an 8x8 map at 32x32 inputs, 4x4
    # windows in blocks 0 and 2, global blocks 1 and 3 (as `tiny`)
    "mae_tiny": dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3, drop_path_rate=0.0,
                     window_size=4, global_block_indexes=(1, 3), pretrain_img_size=32, out_channels=64,
                     head_convs=(64,), layer_decay=0.7),
    # the paper's sizes (detectron2 projects/ViTDet configs): 1024 input, window 14, MAE 224 pos_embed
    "base": dict(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1,
                 window_size=14, global_block_indexes=(2, 5, 8, 11), layer_decay=0.7),
    "large": dict(img_size=1024, patch_size=16, embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4,
                  window_size=14, global_block_indexes=(5, 11, 17, 23), layer_decay=0.8),
    # huge: mask_rcnn_vitdet_h_75ep.py sets optimizer.params.overrides = {} and weight_decay_norm = None,
    # so its norms and pos_embed keep the weight decay 0.1 that B and L exempt them from
    "huge": dict(img_size=1024, patch_size=16, embed_dim=1280, depth=32, num_heads=16, drop_path_rate=0.5,
                 window_size=14, global_block_indexes=(7, 15, 23, 31), layer_decay=0.9,
                 weight_decay_norm=None, no_decay_pos_embed=False),
}


def create_model(name="tiny", **overrides):
    if name not in PRESETS:
        C.die(f"unknown model '{name}' (choose from {', '.join(PRESETS)})")
    return ViTDet(**{**PRESETS[name], **overrides})


# ============================================================ the loss: FCOS, as detectron2's


def box_iou(a, b):
    """IoU of every box in a (N, 4) with every box in b (M, 4), xyxy -> (N, M)."""
    (ax0, ay0, ax1, ay1) = a.t().contiguous()[:, :, None]  # 4 x (N, 1)
    (bx0, by0, bx1, by1) = b.t().contiguous()[:, None, :]  # 4 x (1, M)
    area_a = (ax1 - ax0).clamp(min=0) * (ay1 - ay0).clamp(min=0)  # (N, 1)
    area_b = (bx1 - bx0).clamp(min=0) * (by1 - by0).clamp(min=0)  # (1, M)
    # the overlap's width and height, one (N, M) map each, in place (4x faster on a CPU than (N, M, 2) maps)
    w = torch.min(ax1, bx1).sub_(torch.max(ax0, bx0)).clamp_(min=0)  # (N, M)
    h = torch.min(ay1, by1).sub_(torch.max(ay0, by0)).clamp_(min=0)  # (N, M)
    inter = w.mul_(h)  # (N, M)
    return inter / (area_a + area_b - inter).clamp_(min=1e-9)


def giou_loss(p, t):
    """1 - GIoU of matching rows of p and t (N, 4): IoU - (hull - union) / hull."""
    inter = (torch.min(p[:, 2:], t[:, 2:]) - torch.max(p[:, :2], t[:, :2])).clamp(min=0).prod(-1)
    union = (p[:, 2:] - p[:, :2]).prod(-1) + (t[:, 2:] - t[:, :2]).prod(-1) - inter
    hull = (torch.max(p[:, 2:], t[:, 2:]) - torch.min(p[:, :2], t[:, :2])).prod(-1)
    iou = inter / union.clamp(min=1e-7)
    return 1 - (iou - (hull - union) / hull.clamp(min=1e-7))


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), summed (RetinaNet / FCOS classification)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).sum()


def apply_deltas(deltas, points, strides):
    """(l, t, r, b) distances in units of the stride -> xyxy boxes; relu keeps boxes valid."""
    d = F.relu(deltas) * strides[..., None]  # (..., 4)
    return torch.cat([points - d[..., :2], points + d[..., 2:]], -1)


@torch.no_grad()
def fcos_targets(points, strides, boxes, labels, num_classes, radius=1.5):
    """detectron2's FCOS matching for one image. A point is positive for a box when it is inside the
    box, within radius * stride of its centre (center sampling), and its largest distance to the
    box sides lies in (4 s, 8 s) (no lower bound on the first level, no upper bound on the last).
    Among several boxes, the smallest wins. Returns labels (R,) (num_classes = background), boxes (R, 4)."""
    R = len(points)
    if len(boxes) == 0:
        return torch.full((R,), num_classes, dtype=torch.long, device=points.device), points.new_zeros(R, 4)
    lower = torch.where(strides == strides.min(), torch.zeros_like(strides), 4 * strides)  # (R,)
    upper = torch.where(strides == strides.max(), torch.full_like(strides, float("inf")), 8 * strides)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
    near = (points[None] - centres[:, None]).abs().amax(-1) < radius * strides[None]  # (M, R)
    ltrb = torch.cat([points[None] - boxes[:, None, :2], boxes[:, None, 2:] - points[None]], -1)  # (M, R, 4)
    far = ltrb.amax(-1)  # (M, R)
    ok = near & (ltrb.amin(-1) > 0) & (far > lower[None]) & (far < upper[None])  # (M, R)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)  # (M,)
    quality = ok.float() * (1e8 - area[:, None])  # (M, R): prefer the smallest box
    best, idx = quality.max(0)  # (R,)
    lab = labels[idx].clone()
    lab[best < 1e-5] = num_classes
    return lab, boxes[idx]


def fcos_loss(out, targets, num_classes):
    """Focal loss on the classes + GIoU loss on the boxes + BCE on centerness, each summed over the
    batch and divided by the number of positive points."""
    points, strides = out["points"], out["strides"]
    labs, tboxes = zip(*[fcos_targets(points, strides, t["boxes"], t["labels"], num_classes) for t in targets])
    labs, tboxes = torch.stack(labs), torch.stack(tboxes)  # (B, R), (B, R, 4)
    pos = labs != num_classes  # (B, R)
    norm = max(pos.sum().item(), 1.0)
    onehot = F.one_hot(labs, num_classes + 1)[..., :num_classes].float()  # (B, R, K), all 0 for background
    loss_cls = sigmoid_focal_loss(out["logits"].float(), onehot) / norm
    pts, st = points[None].expand_as(tboxes[..., :2])[pos], strides[None].expand_as(labs)[pos]  # (P, 2), (P,)
    tb = tboxes[pos]  # (P, 4)
    loss_box = giou_loss(apply_deltas(out["deltas"][pos].float(), pts, st), tb).sum() / norm
    ltrb = torch.cat([pts - tb[:, :2], tb[:, 2:] - pts], 1)  # (P, 4)
    horiz, vert = ltrb[:, 0::2], ltrb[:, 1::2]  # (l, r), (t, b)
    ctr_t = ((horiz.amin(1) / horiz.amax(1)) * (vert.amin(1) / vert.amax(1))).sqrt()  # centerness target
    loss_ctr = F.binary_cross_entropy_with_logits(out["ctr"][pos].float(), ctr_t, reduction="sum") / norm
    return loss_cls + loss_box + loss_ctr


# ============================================================ data glue: inference, COCO AP, pictures


def nms(boxes, scores, thresh, max_keep=None, block=64):
    """Greedy non-maximum suppression; returns the kept indices, highest score first (the first
    max_keep of them: greedy, so the same as cutting the full result). Not an N x N IoU matrix: the
    rows are computed `block` boxes at a time, when the greedy loop reaches them (one box_iou call
    per block instead of one per kept box; the same values), so a few thousand candidates stay cheap."""
    order = scores.argsort(descending=True)
    b = boxes[order]
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for start in range(0, n, block):
        over = (box_iou(b[start:start + block], b[start:]) > thresh).cpu().numpy()  # (block, N - start): IoU > t
        for i in range(start, min(start + block, n)):
            if suppressed[i]:
                continue
            keep.append(i)
            if len(keep) == max_keep:
                break
            suppressed[i + 1:] |= over[i - start, i + 1 - start:]  # the lower-scored boxes that overlap box i
        if len(keep) == max_keep:
            break
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


@torch.no_grad()
def detect(out, size, score_thresh=0.05, nms_thresh=0.6, topk=1000, max_det=100):
    """Dense predictions -> per image (boxes xyxy in input pixels, scores, labels), as detectron2's
    FCOS inference: the score is sqrt(sigmoid(cls) * sigmoid(ctr)); on EACH level the (point, class)
    candidates over score_thresh, its top 1000 (dense_detector's _decode_per_level_predictions);
    the levels together, class-wise NMS, the best max_det."""
    K = out["logits"].shape[-1]
    _, counts = torch.unique_consecutive(out["strides"], return_counts=True)  # points per level, in order
    starts = [0] + counts.cumsum(0).tolist()[:-1]
    results = []
    for b in range(out["logits"].shape[0]):
        scores = (out["logits"][b].float().sigmoid() * out["ctr"][b].float().sigmoid()[:, None]).sqrt()  # (R, K)
        cand = []
        for start, n in zip(starts, counts.tolist()):  # one level: rows start ... start + n - 1
            s = scores[start:start + n].flatten()  # (n*K,)
            c = (s > score_thresh).nonzero().squeeze(1)
            cand.append(start * K + c[s[c].topk(min(topk, len(c))).indices])  # its top-k, as flat (R*K,) indices
        cand = torch.cat(cand)
        r, k = cand // K, cand % K
        s = scores.flatten()[cand]
        boxes = apply_deltas(out["deltas"][b][r].float(), out["points"][r], out["strides"][r]).clamp(0, size)
        keep = nms(boxes + k[:, None].float() * (size + 1), s, nms_thresh, max_det)  # class-wise: shift per class
        results.append((boxes[keep].cpu(), s[keep].cpu(), k[keep].cpu()))
    return results


def coco_ap(detections, ground_truth, num_classes):
    """COCO box AP as pycocotools computes it (area "all", up to 100 detections per image):
    for each class and IoU threshold t in 0.50:0.05:0.95, detections sorted by score are matched
    greedily to the unmatched ground truth box of highest IoU >= t in the same image (of two equal
    IoUs the later ground truth, as evaluateImg's `if ious[dind, gind] < iou: continue`); precision is
    made monotone and read at 101 recall points r = 0, 0.01, ..., 1 (0 where r is never reached).
    AP = mean over thresholds and over the classes that have ground truth; AP50 / AP75 at t = 0.5
    / 0.75. detections: per image (boxes (D, 4) xyxy, scores (D,), labels (D,));
    ground_truth: per image (boxes (G, 4), labels (G,)). Returns dict(ap, ap50, ap75), -1 each
    when there is no ground truth at all (as pycocotools)."""
    thresholds = np.linspace(0.5, 0.95, 10)  # as pycocotools: iouThrs
    rec_points = np.linspace(0, 1, 101)  # recThrs
    thr = np.minimum(thresholds, 1 - 1e-10)
    T = len(thresholds)
    per_class = []  # AP at each threshold, (T,), for every class with ground truth
    for c in range(num_classes):
        npos = sum(int((gl == c).sum()) for _, gl in ground_truth)
        if npos == 0:
            continue  # pycocotools: -1, left out of the mean
        hits_all, scores_all = [], []
        for (db, ds, dl), (gb, gl) in zip(detections, ground_truth):
            db, ds, gb = db[dl == c].double(), ds[dl == c].double(), gb[gl == c].double()
            order = ds.argsort(descending=True, stable=True)[:100]  # maxDets = 100
            db, ds = db[order], ds[order]
            iou = box_iou(db, gb).numpy() if len(db) and len(gb) else np.zeros((len(db), len(gb)))
            taken = np.zeros((T, len(gb)), dtype=bool)  # gt already matched, per threshold
            hits = np.zeros((T, len(db)), dtype=bool)
            for d in range(len(db) if len(gb) else 0):  # highest score first
                cand = np.where(taken, -1.0, iou[d][None, :])  # (T, G): unmatched gts only
                j = len(gb) - 1 - cand[:, ::-1].argmax(1)  # (T,) the best remaining gt, the LAST of equal IoUs
                ok = cand[np.arange(T), j] >= thr  # (T,)
                hits[ok, d] = True
                taken[np.arange(T)[ok], j[ok]] = True
            hits_all.append(hits)
            scores_all.append(ds.numpy())
        order = np.argsort(-np.concatenate(scores_all), kind="mergesort")
        tp = np.concatenate(hits_all, 1)[:, order].astype(np.float64)  # (T, D) over all images
        tps, fps = tp.cumsum(1), (1 - tp).cumsum(1)
        recall = tps / npos
        precision = tps / (tps + fps + np.spacing(1))  # as pycocotools' accumulate
        ap_t = np.zeros(T)
        for t in range(T):
            prec = np.maximum.accumulate(precision[t][::-1])[::-1]  # best precision at >= this recall
            idx = np.searchsorted(recall[t], rec_points, side="left")
            q = np.where(idx < len(prec), prec[np.minimum(idx, len(prec) - 1)] if len(prec) else 0.0, 0.0)
            ap_t[t] = q.mean()
        per_class.append(ap_t)
    if not per_class:
        return dict(ap=-1.0, ap50=-1.0, ap75=-1.0)
    ap = np.stack(per_class)  # (classes, T)
    return dict(ap=float(ap.mean()), ap50=float(ap[:, 0].mean()), ap75=float(ap[:, 5].mean()))


def make_data(args, n_train, n_val):
    """(train_ds, val_ds, classes): the synthetic shapes with a box on every shape, or a COCO folder;
    images resized to input_size x input_size (common.py)."""
    patch = PRESETS[args.model]["patch_size"]
    if args.input_size < 2 * patch:
        C.die(f"--input_size {args.input_size} is too small for patch size {patch}")
    train_ds, val_ds, classes = C.detection_data(args, n_train, n_val)
    if not classes:
        C.die(f"{args.data}: annotations.json has no categories")
    return train_ds, val_ds, classes


def coco_category_ids(args, classes):
    """The COCO category id of each contiguous label (load_coco sorts the categories by id)."""
    if args.data is None:
        return list(range(1, len(classes) + 1))
    with open(os.path.join(os.path.expanduser(args.data), "annotations.json")) as f:
        return sorted(c["id"] for c in json.load(f)["categories"])


def draw_boxes(img, boxes, labels, classes, scores=None, scale=3, colour=(255, 255, 0)):
    """An image (3, S, S) in [0, 1] enlarged `scale` times with boxes and 'label score' drawn."""
    from PIL import Image, ImageDraw
    S = img.shape[-1]
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")  # (S, S, 3)
    im = Image.fromarray(arr).resize((S * scale, S * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for i, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = classes[lab] + (f" {scores[i]:.2f}" if scores is not None else "")
        ty = y0 - 11 if y0 >= 11 else y1 + 1
        draw.rectangle([x0, ty, x0 + 6 * len(text) + 2, ty + 10], fill=(0, 0, 0))
        draw.text((x0 + 1, ty), text, fill=colour)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255  # (3, S*scale, S*scale)


# ============================================================ train, evaluate, bench, smoke


def lr_decay_rate(name, decay, num_layers):
    """The paper's layer-wise lr decay (detectron2 get_vit_lr_decay_rate): multiplier
    decay^(L + 1 - id) with id = 0 for patch_embed / pos_embed, i + 1 for blocks.i, and L + 1 (so 1)
    for everything else: the pyramid, the head and the conv propagation blocks."""
    layer_id = num_layers + 1
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name.split(".blocks.")[1].split(".")[0]) + 1
    return decay ** (num_layers + 1 - layer_id)


def optimizer_groups(model, weight_decay, layer_decay):
    """AdamW groups with the configs' exceptions (detectron2 get_default_optimizer_params): the
    parameters of torch norm layers (the ViT's nn.LayerNorm, the head's GroupNorm) get
    model.weight_decay_norm (0.0; None: the ordinary weight decay, as ViTDet-H) and pos_embed 0 when
    model.no_decay_pos_embed (B, L; not H); everything else, biases, rel_pos tables and the pyramid's
    channel LayerNorm included, keeps the weight decay (detectron2 only knows torch norm classes)."""
    norms = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
             for pn, _ in m.named_parameters(recurse=False)}
    norm_wd = weight_decay if model.weight_decay_norm is None else model.weight_decay_norm
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = norm_wd if name in norms else weight_decay
        if model.no_decay_pos_embed and name.endswith("pos_embed"):
            wd = 0.0  # the B / L configs' overrides = {"pos_embed": {"weight_decay": 0.0}}
        scale = lr_decay_rate(name, layer_decay, model.depth)
        groups.setdefault((wd, scale), dict(params=[], weight_decay=wd, lr_scale=scale))["params"].append(p)
    return list(groups.values())


def load_weights(model, path, run):
    """An MAE encoder (official or mae.py) -> backbone.net; or a detector checkpoint (ours strictly,
    a converted detectron2 ViTDet: backbone strictly, its R-CNN heads dropped)."""
    if str(path).endswith(".pkl"):
        C.die(f"{path}: a detectron2 pickle, which weights_only loading cannot read; convert it to a .pth "
              f"state dict first (see the docstring of vitdet.py)")
    state = C.unwrap_state(C.load_checkpoint(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        C.die(f"{path}: not a state dict of tensors")
    if any(k.startswith("backbone.") for k in state):  # a detector
        if any(k.startswith("head.") for k in state):  # written by this script: every key
            C.load_state(model, state, path)
            C.log(run, f"weights: {path}: all {len(state)} tensors loaded")
            return
        heads = [k for k in state if not k.startswith("backbone.")]
        sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        C.load_state(model.backbone, sub, path)
        C.log(run, f"weights: {path}: {len(sub)} backbone tensors loaded (backbone.net.* and backbone.simfp_*); "
                   f"{len(heads)} other tensors dropped (its R-CNN heads: this file has an FCOS head)")
        return
    if "patch_embed.proj.weight" not in state:
        C.die(f"{path}: neither a ViTDet detector nor an MAE / ViT encoder (no patch_embed.proj.weight)")
    net = model.backbone.net
    own = net.state_dict()
    if state["patch_embed.proj.weight"].shape != own["patch_embed.proj.weight"].shape:
        C.die(f"{path}: an encoder with patch_embed {tuple(state['patch_embed.proj.weight'].shape)}, this model has "
              f"{tuple(own['patch_embed.proj.weight'].shape)} (mae.py's tiny encoder fits --model mae_tiny)")
    dropped = [k for k in state if k not in own]  # cls_token, norm.*, mask_token, decoder_*
    used = {k: v for k, v in state.items() if k in own}
    if "pos_embed" in used and used["pos_embed"].shape != own["pos_embed"].shape:
        n = used["pos_embed"].shape[1] - int(net.pretrain_use_cls_token)
        if used["pos_embed"].ndim != 3 or used["pos_embed"].shape[2] != own["pos_embed"].shape[2] or math.isqrt(n) ** 2 != n:
            C.die(f"{path}: pos_embed {tuple(used['pos_embed'].shape)} does not fit embed_dim {net.embed_dim}")
        net.pos_embed = nn.Parameter(torch.zeros_like(used["pos_embed"]))  # another pre-training grid: resized every forward
    left = [k for k in own if k not in used]
    not_rel = [k for k in left if ".rel_pos_" not in k and ".residual." not in k]
    if not_rel:
        C.die(f"{path}: an encoder without {', '.join(not_rel[:4])}{' ...' if len(not_rel) > 4 else ''} "
              f"for this model ({len(used)} keys fit)")
    C.load_state(net, used, path, allow_missing=[k for k in left])
    C.log(run, f"weights: {path}: {len(used)} encoder tensors -> backbone.net.*; dropped {len(dropped)} "
               f"({', '.join(sorted({k.split('.')[0] for k in dropped})) or 'none'}); left at init: {len(left)} "
               f"rel_pos / residual tensors, the pyramid and the head")


def loss_fn(model, batch):
    """The function C.fit trains: the FCOS loss of a batch (images, targets); the class count is the
    width of the model's classification output."""
    images, targets = batch
    out = model(images)
    return fcos_loss(out, targets, out["logits"].shape[-1])


def in_dataset_order(parts, n):
    """The per-rank lists of a sharded evaluation (C.make_loader(..., train=False) under torchrun:
    a DistributedSampler without shuffle, rank r holding items r, r + w, r + 2w, ... of the set padded
    to a multiple of w by repeating its first items) -> one list in the dataset's order, each item once."""
    w = len(parts)
    return [parts[i % w][i // w] for i in range(n)]


@torch.no_grad()
def evaluate(model, loader, args, run):
    """Detections on the held-out set (input pixels) and the ground truth, in the input frame:
    (dets, gts, metas), one entry per image in the order of loader.dataset. Every rank calls it
    and detects on its shard (the sharded loader); under torchrun the shards are gathered, so that
    rank 0 computes the AP on the whole set."""
    model.eval()
    dets, gts, metas = [], [], []
    for images, targets in loader:
        with C.autocast(run):
            out = model(images.to(run.device))
        dets += detect(out, images.shape[-1], args.score_thresh, args.nms_thresh)
        gts += [(t["boxes"], t["labels"]) for t in targets]
        metas += [(t["image_id"], t["orig_size"]) for t in targets]
    if run.distributed:
        parts = [None] * run.world_size
        torch.distributed.all_gather_object(parts, list(zip(dets, gts, metas)))
        dets, gts, metas = map(list, zip(*in_dataset_order(parts, len(loader.dataset))))
    return dets, gts, metas


def write_detections(path, dets, metas, size, cat_ids):
    """COCO results json: image_id, category_id, bbox [x, y, w, h] in the ORIGINAL image pixels, score."""
    rows = []
    for (boxes, scores, labels), (image_id, (H, W)) in zip(dets, metas):
        b = boxes * torch.tensor([W / size, H / size, W / size, H / size])
        for (x0, y0, x1, y1), s, l in zip(b.tolist(), scores.tolist(), labels.tolist()):
            rows.append(dict(image_id=int(image_id), category_id=int(cat_ids[l]),
                             bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], score=round(s, 4)))
    with open(path, "w") as f:
        f.write(json.dumps(rows))  # json.dump's streaming encoder is pure Python: 10x slower, same text
    return len(rows)


def write_synthetic_annotations(path, gts, metas, classes):
    """The synthetic held-out set (the evaluated images, their boxes in the original pixels) as a
    COCO annotations file, so detections.json can be checked by any COCO tool (pycocotools:
    COCO(path).loadRes('detections.json'))."""
    images, anns = [], []
    for i, ((boxes, labels), (image_id, (H, W))) in enumerate(zip(gts, metas)):
        images.append(dict(id=int(image_id), width=int(W), height=int(H), file_name=f"synthetic_{i}.png"))
        for (x0, y0, x1, y1), l in zip(boxes.tolist(), labels.tolist()):
            anns.append(dict(id=len(anns) + 1, image_id=int(image_id), category_id=l + 1, iscrowd=0,
                             bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0)))
    with open(path, "w") as f:
        f.write(json.dumps(dict(images=images, annotations=anns,
                                categories=[dict(id=i + 1, name=c) for i, c in enumerate(classes)])))


def save_picture(path, val_ds, dets, classes, n=8, min_score=0.4):
    """Row 1: held-out images with their ground-truth boxes; row 2: the predicted boxes with label and
    score. For legibility the picture keeps scores >= min_score after a class-agnostic NMS (the same
    place predicted as two classes shows the better one); AP uses every detection."""
    S = val_ds[0][0].shape[-1]
    scale = max(1, math.ceil(192 / S))
    gt_row, pred_row = [], []
    for i in range(min(n, len(val_ds))):
        img, t = val_ds[i]
        img = C.denormalize(img)
        boxes, scores, labels = dets[i]
        keep = nms(boxes, scores, 0.5)
        keep = keep[scores[keep] >= min_score].flip(0)  # lowest score first: the best label is drawn on top
        gt_row.append(draw_boxes(img, t["boxes"], t["labels"], classes, None, scale, (0, 255, 0)))
        pred_row.append(draw_boxes(img, boxes[keep], labels[keep], classes, scores[keep].tolist(), scale))
    texts = [["ground truth"] * len(gt_row), [f"predicted (score >= {min_score})"] * len(pred_row)]
    return C.save_grid(path, [torch.stack(gt_row), torch.stack(pred_row)], texts, scale=1)


# ---- --bench: the paper's efficiency point on the backbone at 1024 x 1024 ----------------------

def backbone_cost(net, size, device):
    """(multiply-adds, saved bytes) of one training forward of the plain ViT at size x size, batch 1."""
    x = torch.randn(1, 3, size, size, device=device)
    params = list(net.parameters())
    box = {}

    def forward():  # net(x), block by block: each block's saved tensors are released before the next
        def embed():
            y = net.patch_embed(x)  # (1, H, W, C)
            return y + get_abs_pos(net.pos_embed, net.pretrain_use_cls_token, (y.shape[1], y.shape[2]))
        total, h = C.saved_bytes(embed, params)
        for blk in net.blocks:
            nbytes, h = C.saved_bytes(lambda: blk(h.detach()), params)
            total += nbytes
        box["bytes"] = total

    flops = C.count_flops(forward)  # 2 per multiply-add
    return flops / 2, box["bytes"]


def bench(args, run):
    """The paper's efficiency point at the paper's size, the plain ViT-B backbone at 1024 x 1024,
    batch 1: all-global attention vs ViTDet (window 14 + 4 global blocks) vs all-window. FLOPs with
    the attention matmuls written out as detectron2 does, reported as multiply-adds (fvcore's
    'FLOPs', the paper's unit); activation memory = bytes saved for backward; both counted on the
    meta device (shapes only, no compute), so they need no smaller fallback on a CPU. Time = one
    forward without grad on the real device, the three interleaved by C.time_ab (on a CPU one round
    without warm-up: ViT-B at 1024 is ~500 GFLOPs a forward)."""
    name, size = args.bench_model, args.bench_size
    preset = PRESETS[name]
    settings = [("all global", tuple(range(preset["depth"]))),
                ("ViTDet: window + 4 global", preset["global_block_indexes"]),
                ("all window", ())]
    Attention.explicit = True
    rows, nets = [], {}
    x = torch.randn(1, 3, size, size, device=run.device)
    try:
        for label, glob in settings:
            with torch.device("meta"):
                net = create_model(name, global_block_indexes=glob, drop_path_rate=0.0).backbone.net
            macs, nbytes = backbone_cost(net, size, "meta")
            rows.append([label, macs / 1e9, nbytes / 2 ** 30])
            torch.manual_seed(0)
            nets[label] = create_model(name, global_block_indexes=glob, drop_path_rate=0.0).backbone.net.to(run.device).eval()
        cpu = run.device.type == "cpu"

        def forward(net):
            def fn():
                with torch.no_grad(), C.autocast(run):
                    return net(x)
            return fn
        seconds = C.time_ab({label: forward(net) for label, net in nets.items()}, run,
                            rounds=1 if cpu else 10, warmup=0 if cpu else 3)
    finally:
        Attention.explicit = False
    for row in rows:
        row.append(seconds[row[0]])
        C.log(run, f"  measured {row[0]}: {row[1]:.1f} GFLOPs, {row[2]:.2f} GiB, {row[3]:.2f} s")
    base = rows[1]
    C.log(run, f"\nViT-{name[0].upper()} backbone at {size}x{size}, batch 1, {run.device} (ratios to ViTDet)")
    C.log(run, f"{'attention':27s} {'GFLOPs':>8s} {'ratio':>6s} {'act. GiB':>9s} {'ratio':>6s} {'time s':>8s} {'ratio':>6s}")
    for label, g, m, s in rows:
        C.log(run, f"{label:27s} {g:8.1f} {g / base[1]:6.2f} {m:9.2f} {m / base[2]:6.2f} {s:8.2f} {s / base[3]:6.2f}")
    C.log(run, "paper, ViT-B at 1024 (fvcore): 664.8 / 483.2 / 392.4 GFLOPs, i.e. 1.38 : 1 : 0.81")
    C.log(run, f"bench: all-global / ViTDet: FLOPs {rows[0][1] / base[1]:.2f}x (paper 1.38x), activation memory "
               f"{rows[0][2] / base[2]:.2f}x, time {rows[0][3] / base[3]:.2f}x; all-window / ViTDet: FLOPs "
               f"{rows[2][1] / base[1]:.2f}x (paper 0.81x)")
    return rows


def train(args, run):
    """Train on the detection data, then detect on the held-out images: AP, detections.json, picture."""
    train_ds, val_ds, classes = make_data(args, args.n_train, args.n_val)
    model = create_model(args.model, num_classes=len(classes), propagation=args.propagation)
    if args.weights:
        load_weights(model, args.weights, run)
    layer_decay = model.layer_decay if args.layer_decay is None else args.layer_decay
    groups = optimizer_groups(model, args.weight_decay, layer_decay)
    loader = C.make_loader(train_ds, args, run, True, C.collate_detection)
    model, history = C.fit(model, loss_fn, loader, args, run, groups=groups)
    val_loader = C.make_loader(val_ds, args, run, False, C.collate_detection)  # every rank its shard
    dets, gts, metas = evaluate(model, val_loader, args, run)
    if not run.is_main:
        return None
    ap = coco_ap(dets, gts, len(classes))  # rank 0, on the whole held-out set
    n = write_detections(os.path.join(args.out, "detections.json"), dets, metas, args.input_size,
                         coco_category_ids(args, classes))
    if args.data is None:
        write_synthetic_annotations(os.path.join(args.out, "val_annotations.json"), gts, metas, classes)
    pic = save_picture(os.path.join(args.out, "detections.png"), val_loader.dataset, dets, classes)
    C.log(run, f"{n} detections on {len(dets)} held-out images -> {os.path.join(args.out, 'detections.json')}; "
               f"picture {pic}")
    return C.write_metrics(args, run, history, ap=ap["ap"], ap50=ap["ap50"], ap75=ap["ap75"], layer_decay=layer_decay)


def smoke(args, run):
    """A few steps on one tiny batch of 4 images: the loss is finite and falls (C.smoke)."""
    train_ds, _, classes = make_data(args, 8, 4)
    model = create_model(args.model, num_classes=len(classes), propagation=args.propagation)
    if args.weights:
        load_weights(model, args.weights, run)
    batch = C.collate_detection([train_ds[i] for i in range(min(4, len(train_ds)))])
    C.smoke(model, loss_fn, batch, run, steps=25, lr=1e-3)


# ============================================================ command line


def main(argv=None):
    p = C.make_parser("vitdet", __doc__, presets=PRESETS, epochs=3, batch_size=8, lr=1e-3, weight_decay=0.1,
                      warmup_epochs=0.5, input_size=None, clip_grad=1.0)
    p.add_argument("--layer_decay", type=float, default=None,
                   help="layer-wise lr decay (default: the preset's: tiny 1.0, mae_tiny 0.7, base 0.7, large 0.8, huge 0.9)")
    p.add_argument("--propagation", default="global", choices=["global", "conv"],
                   help="cross-window propagation: global-attention blocks (default) or residual conv blocks")
    p.add_argument("--score_thresh", type=float, default=0.05, help="detection score threshold for evaluation")
    p.add_argument("--nms_thresh", type=float, default=0.6)
    p.add_argument("--n_train", type=int, default=1800, help="synthetic training images")
    p.add_argument("--n_val", type=int, default=300, help="synthetic held-out images")
    p.add_argument("--bench_model", default="base", choices=["base", "large", "huge"])
    p.add_argument("--bench_size", type=int, default=1024)
    args = p.parse_args(argv)
    args.input_size = args.input_size or PRESETS[args.model]["img_size"]  # tiny 64, mae_tiny 32, paper 1024
    run = C.init_run(args, patch_size=PRESETS[args.model]["patch_size"])
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    return train(args, run)


if __name__ == "__main__":
    main()
