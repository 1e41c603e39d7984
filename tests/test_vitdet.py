"""Tests of the ViTDet mechanisms: windows, positions, the pyramid, layer decay, FCOS targets, COCO AP.

The exercises of vitdet.py are graded by `-k "window"`, `-k "rel_pos"`, `-k "pyramid"`, `-k "fcos"`
(and `-k "flops"` for the explore one). A test of one exercise that needs another exercise's function
monkeypatches it with the slow reference written here, so that blanking one exercise fails its own
tests only."""
import functools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import vitdet as V

# ================================================================ slow, obvious references


def ref_window_partition(x, w):
    """Loops: zero-pad bottom/right, then windows in the order (image, window row, window column)."""
    B, H, W, C = x.shape
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    padded = x.new_zeros(B, Hp, Wp, C)
    padded[:, :H, :W] = x
    wins = [padded[b, i:i + w, j:j + w] for b in range(B) for i in range(0, Hp, w) for j in range(0, Wp, w)]
    return torch.stack(wins), (Hp, Wp)


def ref_window_unpartition(windows, w, pad_hw, hw):
    (Hp, Wp), (H, W) = pad_hw, hw
    B = windows.shape[0] // ((Hp // w) * (Wp // w))
    out = windows.new_zeros(B, Hp, Wp, windows.shape[-1])
    k = 0
    for b in range(B):
        for i in range(0, Hp, w):
            for j in range(0, Wp, w):
                out[b, i:i + w, j:j + w] = windows[k]
                k += 1
    return out[:, :H, :W]


def ref_resize_table(t, n):
    """Linear interpolation of a (L, C) table to n rows, align_corners=False, by hand."""
    L = t.shape[0]
    if L == n:
        return t
    rows = []
    for i in range(n):
        src = max((i + 0.5) * L / n - 0.5, 0.0)
        i0 = min(int(src), L - 1)
        i1 = min(i0 + 1, L - 1)
        a = src - i0
        rows.append((1 - a) * t[i0] + a * t[i1])
    return torch.stack(rows)


def ref_rel_index(i, j, q, k):
    """The table row of query position i and key position j on one axis (detectron2 get_rel_pos)."""
    return int(i * max(k / q, 1.0) - j * max(q / k, 1.0) + (k - 1) * max(q / k, 1.0))


def ref_rel_pos_bias(q, q_size, k_size, rel_pos_h, rel_pos_w):
    """E[(ih, iw), (jh, jw)] = q_(ih, iw) . R_h[ih - jh] + q_(ih, iw) . R_w[iw - jw], entry by entry."""
    (qh, qw), (kh, kw) = q_size, k_size
    rh = ref_resize_table(rel_pos_h, 2 * max(qh, kh) - 1)
    rw = ref_resize_table(rel_pos_w, 2 * max(qw, kw) - 1)
    IH, IW = ref_rel_rows(q_size, k_size)
    return torch.einsum("bnc,nmc->bnm", q, rh[IH] + rw[IW])  # (B, Nq, Nk)


@functools.lru_cache(maxsize=None)
def ref_rel_rows(q_size, k_size):
    """The dense (Nq, Nk) tables of the row of R_h and of R_w for every (query, key) pair."""
    (qh, qw), (kh, kw) = q_size, k_size
    IH = [[ref_rel_index(ih, jh, qh, kh) for jh in range(kh) for jw in range(kw)] for ih in range(qh) for iw in range(qw)]
    IW = [[ref_rel_index(iw, jw, qw, kw) for jh in range(kh) for jw in range(kw)] for ih in range(qh) for iw in range(qw)]
    return torch.tensor(IH), torch.tensor(IW)


def ref_attention(attn, x):
    """Dense multi-head attention of one (B, h, w, C) map or window, head by head, with E_rel."""
    B, H, W, C = x.shape
    nh = attn.num_heads
    d = C // nh
    t = x.reshape(B, H * W, C)
    qkv = t @ attn.qkv.weight.t() + attn.qkv.bias  # (B, N, 3C): [q heads | k heads | v heads]
    heads = []
    for h in range(nh):
        q, k, v = (qkv[..., part * C + h * d: part * C + (h + 1) * d] for part in range(3))  # (B, N, d)
        logits = (q @ k.transpose(1, 2)) / math.sqrt(d)
        if attn.use_rel_pos:
            logits = logits + ref_rel_pos_bias(q, (H, W), (H, W), attn.rel_pos_h, attn.rel_pos_w)  # unscaled q
        heads.append(logits.softmax(-1) @ v)
    out = torch.cat(heads, -1) @ attn.proj.weight.t() + attn.proj.bias
    return out.reshape(B, H, W, C)


def ref_block(blk, x):
    """A ViTDet block by loops over the windows: LN1, zero padding, attention per window, crop."""
    B, H, W, C = x.shape
    y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    w = blk.window_size
    if w == 0:
        att = ref_attention(blk.attn, y)
    else:
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        padded = y.new_zeros(B, Hp, Wp, C)
        padded[:, :H, :W] = y  # padded AFTER the norm: exact zeros
        att = y.new_zeros(B, H, W, C)
        for i in range(0, Hp, w):
            for j in range(0, Wp, w):
                o = ref_attention(blk.attn, padded[:, i:i + w, j:j + w])
                slot = att[:, i:i + w, j:j + w]
                att[:, i:i + w, j:j + w] = o[:, :slot.shape[1], :slot.shape[2]]
    x = x + att
    return x + blk.mlp(F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-6))


def perturb_(module, scale=0.5):
    """Non-trivial parameters: every LayerNorm / GroupNorm weight and bias, every bias and every
    rel-pos table moved off its initialization (zeros and ones hide many mistakes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "rel_pos" in name or "norm" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture
def ref_windows(monkeypatch):
    """The model's window functions replaced by the loop references (isolates other exercises)."""
    monkeypatch.setattr(V, "window_partition", ref_window_partition)
    monkeypatch.setattr(V, "window_unpartition", ref_window_unpartition)


@pytest.fixture
def ref_rel_pos(monkeypatch):
    monkeypatch.setattr(V, "decomposed_rel_pos", ref_rel_pos_bias)


@pytest.fixture
def shape_only_rel_pos(monkeypatch):
    """For meta-device (shape only) runs at 1024: a bias of the right shape, no values."""
    monkeypatch.setattr(V, "decomposed_rel_pos",
                        lambda q, qs, ks, rh, rw: q.new_zeros(q.shape[0], qs[0] * qs[1], ks[0] * ks[1]))


class StubPyramid(nn.Module):
    """Stands in for SimpleFeaturePyramid where a test needs the detector but not the pyramid:
    levels of the right strides and sizes, made from the image by pooling and a 1x1 conv."""

    def __init__(self, net, out_channels=256, scale_factors=(4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.net = net
        self.strides = [int(net.patch_size / s) for s in scale_factors]
        self.strides.append(self.strides[-1] * 2)
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]
        self.mix = nn.Conv2d(3, out_channels, 1)

    def forward(self, x):
        return {n: self.mix(F.avg_pool2d(x, s)) for n, s in zip(self.names, self.strides)}


@pytest.fixture
def stub_pyramid(monkeypatch):
    monkeypatch.setattr(V, "SimpleFeaturePyramid", StubPyramid)


# ---------------------------------------------------------------- window attention


@pytest.mark.parametrize("size, n_windows", [(64, 25), (50, 16), (28, 4)])
def test_window_partition_round_trip_with_padding(size, n_windows):
    # 64 -> 70: 5 x 5 windows; 28 is a multiple of 14: no padding at all, 2 x 2 windows
    x = torch.randn(2, size, size, 8)
    windows, pad_hw = V.window_partition(x, 14)
    assert windows.shape == (2 * n_windows, 14, 14, 8)
    assert pad_hw == (math.ceil(size / 14) * 14,) * 2
    # the bottom-right window holds the padding: exact zeros beyond the map
    last = windows[n_windows - 1]
    keep = size - (pad_hw[0] - 14)
    assert torch.equal(last[keep:], torch.zeros_like(last[keep:]))
    assert torch.equal(last[:keep, :keep], x[0, -keep:, -keep:])
    assert torch.equal(V.window_unpartition(windows, 14, pad_hw, (size, size)), x)


def test_window_partition_order_and_unpartition_equal_loops():
    # a non-square map (10 x 7 -> 12 x 8 with w = 4: 3 x 2 windows per image), two images
    x = torch.randn(2, 10, 7, 5)
    windows, pad_hw = V.window_partition(x, 4)
    ref, ref_pad = ref_window_partition(x, 4)
    assert pad_hw == ref_pad == (12, 8)
    assert torch.equal(windows, ref)  # window k = (image, row, column) in row-major order
    # unpartition alone, on windows whose padding slots hold garbage: every token to its slot
    wins = torch.randn(2 * 3 * 2, 4, 4, 5)
    torch.testing.assert_close(V.window_unpartition(wins, 4, (12, 8), (10, 7)),
                               ref_window_unpartition(wins, 4, (12, 8), (10, 7)), rtol=0, atol=0)
    # the padding is at the bottom/right: token (i, j) of the map sits in window (i // 4, j // 4)
    for i, j in [(0, 0), (3, 6), (9, 0), (9, 6), (5, 4)]:
        k = (i // 4) * 2 + j // 4
        assert torch.equal(windows[k, i % 4, j % 4], x[0, i, j])
        assert torch.equal(windows[6 + k, i % 4, j % 4], x[1, i, j])


def test_window_block_forward_equals_loop_reference(ref_rel_pos):
    # the block as the model runs it: LN1, pad, windows, attention with E_rel, back in place, MLP;
    # a non-square map with padding and non-trivial LN biases (padding before LN1 would show)
    torch.manual_seed(0)
    blk = perturb_(V.Block(16, 2, window_size=4, input_size=(10, 7))).eval()
    assert blk.attn.rel_pos_h.shape == (7, 8)  # the window's table, 2 * 4 - 1 rows
    x = torch.randn(2, 10, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref_block(blk, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, glob", [("base", (2, 5, 8, 11)), ("large", (5, 11, 17, 23)),
                                        ("huge", (7, 15, 23, 31)), ("tiny", (1, 3)), ("mae_tiny", (1, 3))])
def test_window_and_global_blocks_at_the_paper_indices(stub_pyramid, name, glob):
    with torch.device("meta"):
        model = V.create_model(name)
        conv = V.create_model(name, propagation="conv")
    w = V.PRESETS[name]["window_size"]
    assert [b.window_size for b in model.backbone.net.blocks] == [0 if i in glob else w for i in range(model.depth)]
    assert not any(b.use_residual_block for b in model.backbone.net.blocks)
    # the conv alternative: every block windowed, a residual conv block after the same indices
    assert [b.window_size for b in conv.backbone.net.blocks] == [w] * model.depth
    assert [i for i, b in enumerate(conv.backbone.net.blocks) if b.use_residual_block] == list(glob)


def test_window_blocks_see_their_window_global_blocks_see_everything(stub_pyramid, ref_rel_pos):
    # the tiny model (8 x 8 map, 4 x 4 windows in blocks 0 and 2): change token (1, 2) of the
    # input map and see which output tokens of each block move
    torch.manual_seed(0)
    net = perturb_(V.create_model("tiny", num_classes=3).backbone.net).eval()
    x = torch.randn(1, 8, 8, 128)
    x2 = x.clone()
    x2[0, 1, 2] += torch.randn(128)  # (a constant shift would vanish in LN1)
    with torch.no_grad():
        for i, blk in enumerate(net.blocks):
            moved = (blk(x2) - blk(x)).abs().amax(-1)[0] > 1e-6  # (8, 8)
            if i in (1, 3):
                assert moved.all(), i  # global: every token
            else:
                want = torch.zeros(8, 8, dtype=torch.bool)
                want[:4, :4] = True  # only the top-left window
                assert torch.equal(moved, want), i


def _pair(window_size, size):
    torch.manual_seed(0)
    glob = V.Block(32, 4, window_size=0, input_size=(size, size)).eval()
    win = V.Block(32, 4, window_size=window_size, input_size=(size, size)).eval()
    with torch.no_grad():
        glob.attn.rel_pos_h.normal_(); glob.attn.rel_pos_w.normal_()  # non-zero relative positions
    return glob, win


def test_window_block_covering_the_map_equals_global_block(ref_rel_pos):
    glob, win = _pair(14, 14)
    assert glob.attn.rel_pos_h.shape == win.attn.rel_pos_h.shape == (27, 8)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 14, 14, 32)
    torch.testing.assert_close(win(x), glob(x), atol=1e-6, rtol=1e-6)


def test_windows_are_independent_global_attentions(ref_rel_pos):
    # a 28x28 map in 14x14 windows == global attention run on each quadrant alone
    glob, win = _pair(14, 14)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 28, 28, 32)
    out = win.attn(V.window_partition(win.norm1(x), 14)[0])  # (4, 14, 14, 32)
    for k, (i, j) in enumerate([(0, 0), (0, 14), (14, 0), (14, 14)]):
        ref = glob.attn(glob.norm1(x[:, i:i + 14, j:j + 14]))
        torch.testing.assert_close(out[k:k + 1], ref, atol=1e-5, rtol=1e-5)


def test_rel_pos_sdpa_equals_explicit_attention():
    attn = V.Attention(32, 4, input_size=(6, 7))
    with torch.no_grad():
        attn.rel_pos_h.normal_(); attn.rel_pos_w.normal_()
    x = torch.randn(2, 6, 7, 32)
    fused = attn(x)
    V.Attention.explicit = True
    try:
        explicit = attn(x)
    finally:
        V.Attention.explicit = False
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qh, qw", [(3, 4), (4, 4)])
def test_decomposed_rel_pos_equals_full_table(qh, qw):
    # E[(ih, iw), (jh, jw)] = q . R_h[ih - jh + kh - 1] + q . R_w[iw - jw + kw - 1]
    torch.manual_seed(0)
    c = 5
    rh, rw, q = torch.randn(2 * qh - 1, c), torch.randn(2 * qw - 1, c), torch.randn(2, qh * qw, c)
    bias = V.decomposed_rel_pos(q, (qh, qw), (qh, qw), rh, rw)
    ref = torch.zeros(2, qh * qw, qh * qw)
    for i in range(qh * qw):
        for j in range(qh * qw):
            (ih, iw), (jh, jw) = divmod(i, qw), divmod(j, qw)
            ref[:, i, j] = q[:, i] @ (rh[ih - jh + qh - 1] + rw[iw - jw + qw - 1])
    torch.testing.assert_close(bias, ref, atol=1e-5, rtol=1e-5)
    # a table of another length is linearly interpolated to 2 * size - 1 rows
    assert V.get_rel_pos(5, 5, torch.randn(27, c)).shape == (5, 5, c)


def test_rel_pos_table_rows_and_interpolation():
    torch.manual_seed(0)
    table = torch.randn(7, 3)
    # q = k: R[i, j] = table[i - j + k - 1]
    R = V.get_rel_pos(4, 4, table)
    assert all(torch.equal(R[i, j], table[i - j + 3]) for i in range(4) for j in range(4))
    # q != k (the official rule, coordinates scaled to the finer axis): 4 queries, 2 keys -> i - 2j + 2;
    # 2 queries, 4 keys -> 2i - j + 3
    R = V.get_rel_pos(4, 2, table)
    assert all(torch.equal(R[i, j], table[i - 2 * j + 2]) for i in range(4) for j in range(2))
    R = V.get_rel_pos(2, 4, table)
    assert all(torch.equal(R[i, j], table[2 * i - j + 3]) for i in range(2) for j in range(4))
    # a table of another length: linearly interpolated to 2 * size - 1 rows (27 -> 9 for 5 x 5)
    big = torch.randn(27, 3)
    R = V.get_rel_pos(5, 5, big)
    ref = ref_resize_table(big, 9)
    for i in range(5):
        for j in range(5):
            torch.testing.assert_close(R[i, j], ref[i - j + 4], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("explicit", [False, True])
def test_rel_pos_in_the_attention_equals_dense_reference(explicit):
    # the model's Attention on a non-square (6 x 7) map, tables and biases perturbed, both paths
    torch.manual_seed(0)
    attn = perturb_(V.Attention(32, 4, input_size=(6, 7)))
    assert attn.rel_pos_h.shape == (11, 8) and attn.rel_pos_w.shape == (13, 8)
    x = torch.randn(2, 6, 7, 32)
    V.Attention.explicit = explicit
    try:
        with torch.no_grad():
            out = attn(x)
    finally:
        V.Attention.explicit = False
    torch.testing.assert_close(out, ref_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_rel_pos_of_square_local_blocks_equal_dense_reference(ref_windows):
    # square 4 x 4 windows: R_h and R_w have the same shape there, so a swap of the two axes
    # (or of the key layout (k_h, k_w)) still runs; only the values can tell
    torch.manual_seed(1)
    blk = perturb_(V.Block(16, 2, window_size=4, input_size=(8, 8))).eval()
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref_block(blk, x), atol=1e-5, rtol=1e-5)


def test_rel_pos_global_block_at_another_size_interpolates_its_tables():
    # a global block built for a 4 x 4 map (7-row tables) run on a 6 x 5 map: 11 and 9 rows
    torch.manual_seed(2)
    blk = perturb_(V.Block(16, 2, window_size=0, input_size=(4, 4))).eval()
    x = torch.randn(2, 6, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref_block(blk, x), atol=1e-5, rtol=1e-5)


def test_rel_pos_tables_sized_for_the_local_or_the_whole_map(stub_pyramid):
    # ViT-B at 1024: 27 rows (2 * 14 - 1) in the window blocks, 127 (2 * 64 - 1) in the global ones
    with torch.device("meta"):
        model = V.create_model("base")
    for i, blk in enumerate(model.backbone.net.blocks):
        rows = 127 if i in (2, 5, 8, 11) else 27
        assert blk.attn.rel_pos_h.shape == blk.attn.rel_pos_w.shape == (rows, 64), i
    # zero-initialized (the MAE encoder has none)
    model = V.create_model("tiny", num_classes=3)
    assert all(torch.count_nonzero(b.attn.rel_pos_h) == 0 for b in model.backbone.net.blocks)


# ---------------------------------------------------------------- absolute positions


def test_abs_pos_resize_is_identity_at_pretraining_size_and_drops_cls():
    pos = torch.randn(1, 1 + 14 * 14, 16)
    out = V.get_abs_pos(pos, True, (14, 14))
    assert torch.equal(out, pos[:, 1:].reshape(1, 14, 14, 16))
    big = V.get_abs_pos(pos, True, (64, 64))
    assert big.shape == (1, 64, 64, 16)
    pos2 = pos.clone()
    pos2[:, 0] += 100  # the cls entry plays no part
    assert torch.equal(V.get_abs_pos(pos2, True, (64, 64)), big)


# ---------------------------------------------------------------- pyramid and names (ViT-B at 1024)


def test_pyramid_strides_shapes_and_detectron2_names_at_1024(ref_windows, shape_only_rel_pos):
    with torch.device("meta"):
        model = V.create_model("base")
        feats = model.backbone(torch.empty(1, 3, 1024, 1024))
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    assert model.backbone.strides == [4, 8, 16, 32, 64]
    assert [tuple(f.shape) for f in feats.values()] == [(1, 256, s, s) for s in (256, 128, 64, 32, 16)]
    sd = model.state_dict()
    assert sd["backbone.net.pos_embed"].shape == (1, 197, 768)  # kept at the 224 pre-training size
    assert sd["backbone.net.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # window 14
    assert sd["backbone.net.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global at 64 x 64
    assert sd["backbone.simfp_2.0.weight"].shape == (768, 384, 2, 2)
    assert sd["backbone.simfp_2.4.weight"].shape == (256, 192, 1, 1)
    for k in ["backbone.simfp_2.1.weight", "backbone.simfp_2.4.norm.bias", "backbone.simfp_2.5.norm.weight",
              "backbone.simfp_3.2.norm.weight", "backbone.simfp_4.1.norm.weight", "backbone.simfp_5.2.weight",
              "head.cls_subnet.1.weight", "head.ctrness.bias"]:
        assert k in sd, k
    assert not any(k.startswith("backbone.net.norm") or "cls_token" in k for k in sd)  # no final norm, no cls


def _backbone_macs(glob, size):
    """GMACs of ViT-B's backbone with global attention in the blocks `glob`, windows elsewhere."""
    V.Attention.explicit = True
    try:
        with torch.device("meta"):
            net = V.create_model("base", global_block_indexes=glob).backbone.net
        return V.backbone_cost(net, size, "meta")[0] / 1e9
    finally:
        V.Attention.explicit = False


def test_flops_ratio_of_global_and_local_attention_vit_b_1024(stub_pyramid):
    # fvcore on the official backbone: all global 664.8, ViTDet 483.2, 2 global 437.8, all window 392.4
    macs = [_backbone_macs(g, 1024) for g in (tuple(range(12)), (2, 5, 8, 11), (5, 11), ())]
    for got, paper in zip(macs, (664.8, 483.2, 437.8, 392.4)):
        assert abs(got - paper) / paper < 0.01, macs
    assert abs(macs[0] / macs[1] - 1.38) < 0.05 * 1.38


def test_flops_local_attention_pays_only_at_high_resolution(stub_pyramid):
    # the explore exercise: at 448 (a 28 x 28 map, 2 x 2 windows, no padding) windows still save a
    # little; at 512 the 32 x 32 map is padded to 42 x 42 (1.72x the tokens in every linear layer
    # of a window block) and all-global attention becomes the cheapest
    at448 = [_backbone_macs(g, 448) for g in (tuple(range(12)), ())]
    at512 = [_backbone_macs(g, 512) for g in (tuple(range(12)), (2, 5, 8, 11), ())]
    assert at448[0] > at448[1], at448
    assert at512[0] < at512[1] < at512[2], at512
    assert abs(at512[0] - 107.5) < 0.5 and abs(at512[2] - 115.4) < 0.5, at512  # measured by --bench


def ref_channel_ln(x, w, b):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map, eps 1e-6, by hand."""
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w[:, None, None] + b[:, None, None]


def ref_deconv2x2(x, w, b):
    """ConvTranspose2d(kernel 2, stride 2): out[o, 2i + a, 2j + c] = sum_k x[k, i, j] w[k, o, a, c] + b[o]."""
    B, _, H, W = x.shape
    out = torch.einsum("bkij,koac->boiajc", x, w).reshape(B, w.shape[1], 2 * H, 2 * W)
    return out + b[:, None, None]


def ref_conv_ln(x, sd, prefix):
    """detectron2's Conv2d(..., norm=LN) without bias: a 1x1 (by einsum) or 3x3 conv, then the LN."""
    w = sd[prefix + ".weight"]
    y = torch.einsum("bkhw,ok->bohw", x, w[:, :, 0, 0]) if w.shape[-1] == 1 else F.conv2d(x, w, padding=1)
    return ref_channel_ln(y, sd[prefix + ".norm.weight"], sd[prefix + ".norm.bias"])


def ref_pyramid(sd, feat, patch=16):
    """The simple feature pyramid from the last map (B, D, h, w) by hand, from the named weights;
    stage and level names are log2 of the stride: simfp_2 / p2 is stride 4 for patch 16."""
    n = int(math.log2(patch)) - 2  # the x4 stage: stride patch / 4
    s4, s2, s1, s05 = (f"simfp_{n + i}" for i in range(4))
    up4 = ref_deconv2x2(feat, sd[s4 + ".0.weight"], sd[s4 + ".0.bias"])  # x2
    up4 = F.gelu(ref_channel_ln(up4, sd[s4 + ".1.weight"], sd[s4 + ".1.bias"]))
    up4 = ref_deconv2x2(up4, sd[s4 + ".3.weight"], sd[s4 + ".3.bias"])  # x4
    up4 = ref_conv_ln(ref_conv_ln(up4, sd, s4 + ".4"), sd, s4 + ".5")
    up2 = ref_deconv2x2(feat, sd[s2 + ".0.weight"], sd[s2 + ".0.bias"])
    up2 = ref_conv_ln(ref_conv_ln(up2, sd, s2 + ".1"), sd, s2 + ".2")
    same = ref_conv_ln(ref_conv_ln(feat, sd, s1 + ".0"), sd, s1 + ".1")  # the map itself
    B, D, h, w = feat.shape
    pooled = feat.reshape(B, D, h // 2, 2, w // 2, 2).amax((3, 5))  # 2x2 max pool, stride 2
    down2 = ref_conv_ln(ref_conv_ln(pooled, sd, s05 + ".1"), sd, s05 + ".2")
    down4 = down2[:, :, ::2, ::2]  # max pool with kernel 1, stride 2: every other pixel
    return {f"p{n + i}": f for i, f in enumerate([up4, up2, same, down2, down4])}


@pytest.mark.parametrize("name, size", [("tiny", 64), ("mae_tiny", 32)])
def test_pyramid_every_level_equals_reference(ref_windows, ref_rel_pos, name, size):
    # the model's own backbone forward; each level against the hand-made pyramid of the net's LAST map
    torch.manual_seed(0)
    model = V.create_model(name, num_classes=3).eval()
    perturb_(model.backbone)  # LN weights / biases of the pyramid, deconv biases, rel-pos tables
    x = torch.randn(2, 3, size, size)
    p = V.PRESETS[name]["patch_size"]
    with torch.no_grad():
        feats = model.backbone(x)
        ref = ref_pyramid(model.backbone.state_dict(), model.backbone.net(x), p)
    strides = [p // 4, p // 2, p, 2 * p, 4 * p]  # tiny (patch 8): 2, 4, 8, 16, 32
    assert model.backbone.strides == strides
    assert list(feats) == list(ref) == ["p%d" % math.log2(s) for s in strides]
    for (level, f), s in zip(feats.items(), strides):
        assert f.shape == (2, V.PRESETS[name]["out_channels"], size // s, size // s), level  # tiny 32, mae_tiny 64
        torch.testing.assert_close(f, ref[level], atol=1e-4, rtol=1e-4, msg=level)


def test_pyramid_levels_come_from_the_last_map_only(ref_windows, ref_rel_pos):
    # the net replaced by a fixed map: every level is made from that map alone, nothing else
    torch.manual_seed(0)
    pyr = perturb_(V.create_model("tiny", num_classes=3).backbone).eval()
    feat = torch.randn(1, 128, 8, 8)
    pyr.net.forward = lambda x: feat  # the pyramid sees nothing of the net but its output
    with torch.no_grad():
        feats = pyr(torch.zeros(1, 3, 64, 64))
        ref = ref_pyramid(pyr.state_dict(), feat, 8)
    for level in ref:
        torch.testing.assert_close(feats[level], ref[level], atol=1e-4, rtol=1e-4, msg=level)


# ---------------------------------------------------------------- optimisation


def test_layer_decay_multipliers_vit_b():
    r = lambda name: V.lr_decay_rate(name, 0.7, 12)
    assert r("backbone.net.patch_embed.proj.weight") == pytest.approx(0.7 ** 13)
    assert r("backbone.net.pos_embed") == pytest.approx(0.7 ** 13)
    assert r("backbone.net.blocks.0.attn.qkv.weight") == pytest.approx(0.7 ** 12)
    assert r("backbone.net.blocks.11.mlp.fc2.bias") == pytest.approx(0.7)
    assert r("backbone.net.blocks.3.residual.conv1.weight") == 1.0
    assert r("backbone.simfp_2.0.weight") == 1.0 and r("head.cls_score.weight") == 1.0


@pytest.mark.parametrize("name, exempt", [("base", True), ("large", True), ("huge", False), ("tiny", True)])
def test_weight_decay_exceptions_per_preset(stub_pyramid, name, exempt):
    # ViTDet-B / L: weight_decay_norm 0.0 (optim.py) and overrides {"pos_embed": wd 0}; ViTDet-H
    # (mask_rcnn_vitdet_h_75ep.py): overrides {} and weight_decay_norm None: everything decays
    with torch.device("meta"):
        model = V.create_model(name)
    wd = {id(p): g["weight_decay"] for g in V.optimizer_groups(model, 0.1, 0.9) for p in g["params"]}
    named = dict(model.named_parameters())
    for k in ["backbone.net.pos_embed", "backbone.net.blocks.0.norm1.weight", "backbone.net.blocks.3.norm2.bias"]:
        assert wd[id(named[k])] == (0.0 if exempt else 0.1), k
    assert wd[id(named["backbone.net.blocks.0.attn.qkv.weight"])] == 0.1


def test_weight_decay_exceptions():
    model = V.create_model("tiny", num_classes=3)
    wd = {id(p): g["weight_decay"] for g in V.optimizer_groups(model, 0.1, 0.7) for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ["backbone.net.pos_embed", "backbone.net.blocks.0.norm1.weight", "backbone.net.blocks.0.norm2.bias",
                 "head.cls_subnet.1.weight"]:
        assert wd[id(named[name])] == 0.0, name
    for name in ["backbone.net.blocks.0.attn.qkv.bias", "backbone.net.blocks.1.attn.rel_pos_h",
                 "backbone.simfp_3.1.norm.weight", "backbone.net.patch_embed.proj.weight"]:
        assert wd[id(named[name])] == 0.1, name


# ---------------------------------------------------------------- FCOS targets and weights


def test_fcos_targets_pick_the_smallest_box_and_respect_scale_ranges():
    points = torch.tensor([[10.0, 10.0], [10.0, 10.0], [30.0, 30.0]])
    strides = torch.tensor([2.0, 8.0, 2.0])  # first level (no lower bound) and last level (no upper)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [8.0, 8.0, 12.0, 12.0]])
    labels, matched = V.fcos_targets(points, strides, boxes, torch.tensor([1, 2]), num_classes=3)
    assert labels.tolist() == [2, 3, 3]  # the small box on the fine level; (10, 10) at stride 8: 10 < 4*8
    assert torch.equal(matched[0], boxes[1])
    # the last level has no upper bound: a 1200-pixel box (distance 600 > 8 * 64) still has a point
    labels, _ = V.fcos_targets(torch.tensor([[600.0, 600.0], [598.0, 598.0]]), torch.tensor([64.0, 4.0]),
                               torch.tensor([[0.0, 0.0, 1200.0, 1200.0]]), torch.tensor([1]), num_classes=3)
    assert labels.tolist() == [1, 3]  # and the first level's bound 8 * 4 holds
    # the regression target (l, t, r, b) / stride decodes back to the box
    ltrb = torch.cat([points[:1] - boxes[1:, :2], boxes[1:, 2:] - points[:1]], 1) / strides[0]
    torch.testing.assert_close(V.apply_deltas(ltrb, points[:1], strides[:1]), boxes[1:])


def ref_points(size, strides):
    """One point per cell of each level, at the cell's centre ((j + 0.5) s, (i + 0.5) s), row-major,
    levels in order: (R, 2) as (x, y) and the (R,) strides."""
    pts, st = [], []
    for s in strides:
        for i in range(size // s):
            for j in range(size // s):
                pts.append(((j + 0.5) * s, (i + 0.5) * s))
                st.append(float(s))
    return torch.tensor(pts), torch.tensor(st)


def ref_fcos_targets(points, strides, boxes, labels, num_classes, radius=1.5):
    """Point by point, box by box: inside, near the centre, max(l, t, r, b) in the level's range
    ((0, 8s) on the first level, (4s, inf) on the last, (4s, 8s) between); the smallest box wins.
    Returns the labels and the index of the matched box (-1: background), and the candidate counts."""
    first, last = strides.min().item(), strides.max().item()
    labs, idx, counts = [], [], []
    for (x, y), s in zip(points.tolist(), strides.tolist()):
        lower = 0.0 if s == first else 4 * s
        upper = math.inf if s == last else 8 * s
        best, best_area, n = -1, math.inf, 0
        for m, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            l, t, r, b = x - x0, y - y0, x1 - x, y1 - y
            if min(l, t, r, b) <= 0:
                continue  # outside the box
            if max(abs(x - (x0 + x1) / 2), abs(y - (y0 + y1) / 2)) >= radius * s:
                continue  # center sampling
            if not lower < max(l, t, r, b) < upper:
                continue  # another level's object
            n += 1
            area = (x1 - x0) * (y1 - y0)
            if area < best_area:
                best, best_area = m, area
        labs.append(num_classes if best < 0 else int(labels[best]))
        idx.append(best)
        counts.append(n)
    return torch.tensor(labs), torch.tensor(idx), torch.tensor(counts)


def _boxes_for_every_level(seed, n_per_size=1):
    """Boxes of sizes 12 ... 450 around a 128 x 128 image (the large ones reach beyond it, so that
    the stride-32 and stride-64 levels get objects), random centres and aspect ratios."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for size in [12, 20, 30, 45, 60, 90, 120, 170, 240, 330, 450] * n_per_size:
        c = 20 + 88 * torch.rand(2, generator=g)
        wh = size * (0.7 + 0.6 * torch.rand(2, generator=g))
        boxes.append(torch.cat([c - wh / 2, c + wh / 2]))
    boxes = torch.stack(boxes)
    return boxes, torch.randint(0, 3, (len(boxes),), generator=g)


def test_fcos_targets_equal_loop_reference_on_every_level():
    points, strides = ref_points(128, [4, 8, 16, 32, 64])  # 32^2 + 16^2 + 8^2 + 4^2 + 2^2 = 1364 points
    boxes, labels = _boxes_for_every_level(0)
    labs, matched = V.fcos_targets(points, strides, boxes, labels, num_classes=3)
    ref_labs, ref_idx, counts = ref_fcos_targets(points, strides, boxes, labels, 3)
    for s in (4, 8, 16, 32, 64):
        assert (ref_labs[strides == s] != 3).any(), s  # the test reaches every level
    assert (counts >= 2).sum() > 10  # and many points where several boxes compete
    assert torch.equal(labs, ref_labs)
    pos = ref_idx >= 0
    assert torch.equal(matched[pos], boxes[ref_idx[pos]])
    # no boxes: all background
    labs, _ = V.fcos_targets(points, strides, boxes[:0], labels[:0], num_classes=3)
    assert (labs == 3).all()


def test_fcos_points_at_cell_centres_match_the_head_outputs(stub_pyramid):
    # the model's forward: point r sits at the centre of its cell, and the head's prediction in
    # row r is the one computed at that cell of that level
    torch.manual_seed(0)
    model = perturb_(V.create_model("tiny", num_classes=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = list(model.backbone(x).values())
        head = model.head
        maps = [(head.cls_score(head.cls_subnet(f)), head.bbox_pred(head.bbox_subnet(f)),
                 head.ctrness(head.bbox_subnet(f))) for f in feats]
    strides = model.backbone.strides
    points, st = ref_points(64, strides)
    assert torch.equal(out["points"], points) and torch.equal(out["strides"], st)
    assert out["logits"].shape == (2, len(points), 3) and out["deltas"].shape == (2, len(points), 4)
    for r, ((px, py), s) in enumerate(zip(points.tolist(), st.tolist())):
        lvl = strides.index(int(s))
        i, j = int(py / s - 0.5), int(px / s - 0.5)
        cls, box, ctr = maps[lvl]
        torch.testing.assert_close(out["logits"][:, r], cls[:, :, i, j], rtol=0, atol=0)
        torch.testing.assert_close(out["deltas"][:, r], box[:, :, i, j], rtol=0, atol=0)
        torch.testing.assert_close(out["ctr"][:, r], ctr[:, 0, i, j], rtol=0, atol=0)


def _bce(z, y):
    """-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))], stable."""
    return max(z, 0.0) - z * y + math.log1p(math.exp(-abs(z)))


def ref_fcos_loss(out, targets, num_classes):
    """Term by term over images, points and classes: focal loss (alpha 0.25, gamma 2) on every
    (point, class), 1 - GIoU and the centerness BCE on the positive points; each summed over the
    batch and divided by the number of positive points of the batch."""
    points, strides = out["points"], out["strides"]
    cls = box = ctr = 0.0
    n_pos = 0
    for b, t in enumerate(targets):
        labs, idx, _ = ref_fcos_targets(points, strides, t["boxes"], t["labels"], num_classes)
        logits, deltas, ctrs = out["logits"][b].tolist(), out["deltas"][b].tolist(), out["ctr"][b].tolist()
        for r, ((x, y), s) in enumerate(zip(points.tolist(), strides.tolist())):
            for k in range(num_classes):
                z, yk = logits[r][k], float(labs[r] == k)
                p = 1 / (1 + math.exp(-z))
                p_t = p if yk else 1 - p
                alpha_t = 0.25 if yk else 0.75
                cls += alpha_t * (1 - p_t) ** 2 * _bce(z, yk)
            if idx[r] < 0:
                continue
            n_pos += 1
            x0, y0, x1, y1 = t["boxes"][idx[r]].tolist()
            l, tt, rr, bb = (max(d, 0.0) * s for d in deltas[r])  # predicted distances, in strides
            p0, q0, p1, q1 = x - l, y - tt, x + rr, y + bb  # the predicted box
            inter = max(min(p1, x1) - max(p0, x0), 0) * max(min(q1, y1) - max(q0, y0), 0)
            union = (p1 - p0) * (q1 - q0) + (x1 - x0) * (y1 - y0) - inter
            hull = (max(p1, x1) - min(p0, x0)) * (max(q1, y1) - min(q0, y0))
            box += 1 - (inter / union - (hull - union) / hull)
            L, T, R, B = x - x0, y - y0, x1 - x, y1 - y
            centerness = math.sqrt(min(L, R) / max(L, R) * min(T, B) / max(T, B))
            ctr += _bce(ctrs[r], centerness)
    n = max(n_pos, 1)
    return cls / n + box / n + ctr / n


def test_fcos_loss_equals_term_by_term_reference():
    torch.manual_seed(0)
    points, strides = ref_points(128, [4, 8, 16, 32, 64])
    R = len(points)
    out = dict(points=points, strides=strides, logits=2 * torch.randn(3, R, 3) - 1, deltas=torch.randn(3, R, 4) + 1,
               ctr=torch.randn(3, R))
    b0, l0 = _boxes_for_every_level(1)
    b1, l1 = _boxes_for_every_level(2)
    targets = [dict(boxes=b0, labels=l0), dict(boxes=b1[:5], labels=l1[:5]),
               dict(boxes=b1[:0], labels=l1[:0])]  # the third image has no object
    loss = V.fcos_loss(out, targets, 3)
    ref = ref_fcos_loss(out, targets, 3)
    assert loss.item() == pytest.approx(ref, rel=1e-4)


def test_fcos_focal_and_giou_known_values():
    # focal loss at p = 0.5: alpha_t (1 - p_t)^2 log 2 = 0.25 * 0.25 * log 2 (object), 0.75 * 0.25 * log 2
    zero = torch.zeros(1)
    assert V.sigmoid_focal_loss(zero, torch.ones(1)).item() == pytest.approx(0.0625 * math.log(2))
    assert V.sigmoid_focal_loss(zero, torch.zeros(1)).item() == pytest.approx(0.1875 * math.log(2))
    # a confident right answer costs (nearly) nothing, a confident wrong one ~ alpha_t * |z|
    assert V.sigmoid_focal_loss(torch.tensor([6.0]), torch.ones(1)).item() < 1e-6
    assert V.sigmoid_focal_loss(torch.tensor([6.0]), torch.zeros(1)).item() == pytest.approx(0.75 * 6, rel=0.01)
    # GIoU: two 2x2 squares overlapping in a 1x1 corner: IoU 1/7, hull 3x3 = 9: 1 - (1/7 - 2/9)
    loss = V.giou_loss(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    assert loss.item() == pytest.approx(1 - (1 / 7 - 2 / 9))
    # disjoint boxes: IoU 0, the hull term still ranks them: 1 - (0 - (12 - 2) / 12)
    loss = V.giou_loss(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[3.0, 2.0, 4.0, 3.0]]))
    assert loss.item() == pytest.approx(1 + 10 / 12)


def test_mae_encoder_initializes_the_backbone(tmp_path, capsys):
    model = V.create_model("tiny", num_classes=3)
    net = model.backbone.net
    mae = {k: torch.randn_like(v) for k, v in net.state_dict().items() if ".rel_pos_" not in k}
    mae["pos_embed"] = torch.randn(1, 1 + 8 * 8, 128)  # another pre-training grid
    mae.update({"cls_token": torch.randn(1, 1, 128), "norm.weight": torch.ones(128), "norm.bias": torch.zeros(128),
                "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(64, 128)})
    torch.save({"model": mae}, tmp_path / "mae.pth")
    V.load_weights(model, str(tmp_path / "mae.pth"), type("R", (), {"is_main": True})())
    assert torch.equal(net.blocks[1].attn.qkv.weight, mae["blocks.1.attn.qkv.weight"])
    assert torch.equal(net.pos_embed, mae["pos_embed"])
    assert torch.count_nonzero(net.blocks[0].attn.rel_pos_h) == 0  # zero init, absent from MAE
    assert "dropped 5" in capsys.readouterr().out
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match="bad.pth"):
        V.load_weights(model, str(tmp_path / "bad.pth"), type("R", (), {"is_main": True})())


# ---------------------------------------------------------------- COCO AP


def _ap(dets, gts, k=2):
    dets = [(torch.tensor(b, dtype=torch.float).reshape(-1, 4), torch.tensor(s, dtype=torch.float), torch.tensor(l, dtype=torch.long))
            for b, s, l in dets]
    gts = [(torch.tensor(b, dtype=torch.float).reshape(-1, 4), torch.tensor(l, dtype=torch.long)) for b, l in gts]
    return V.coco_ap(dets, gts, k)


GT = [([[0, 0, 10, 10], [20, 20, 40, 30]], [0, 1]), ([[5, 5, 25, 25]], [0])]
ONE = pytest.approx(1.0, abs=1e-12)  # pycocotools' precision is tp / (tp + fp + eps): a perfect AP is 1 - 2e-16


def test_ap_perfect_boxes():
    dets = [(b, [0.9] * len(l), l) for b, l in GT]
    assert _ap(dets, GT) == {"ap": ONE, "ap50": ONE, "ap75": ONE}


def test_ap_shifted_boxes():
    # shifting a 10x10 box by 1 px gives IoU 90/110 = 0.818: a hit at 0.50 ... 0.80 (7 of 10 thresholds)
    r = _ap([([[1, 0, 11, 10]], [0.9], [0])], [([[0, 0, 10, 10]], [0])], k=1)
    assert r["ap"] == pytest.approx(0.7) and r["ap50"] == ONE and r["ap75"] == ONE
    # IoU 50/150 = 1/3: never a hit
    assert _ap([([[5, 0, 15, 10]], [0.9], [0])], [([[0, 0, 10, 10]], [0])], k=1)["ap50"] == 0.0


def test_ap_no_boxes():
    assert _ap([([], [], []), ([], [], [])], GT) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert _ap([([[0, 0, 1, 1]], [0.5], [0])], [([], [])])["ap"] == -1.0  # no ground truth at all
    # a class without ground truth is left out of the mean, as pycocotools does
    dets = [(b, [0.9] * len(l), l) for b, l in GT] + [([[0, 0, 5, 5]], [0.99], [2])]
    assert _ap(dets, GT + [([], [])], k=3)["ap"] == ONE


def test_ap_duplicates():
    gt = [([[0, 0, 10, 10]], [0])]
    # a duplicate below the true positive costs nothing: precision 1 is reached at recall 1 first
    assert _ap([([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], gt, k=1)["ap"] == ONE
    # a wrong box ranked above the right one: precision 1/2 at recall 1
    r = _ap([([[20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], gt, k=1)
    assert r["ap"] == pytest.approx(0.5) and r["ap50"] == pytest.approx(0.5)


def test_ap_greedy_by_score_not_best_assignment():
    # the higher-scored det takes the gt (IoU 100/120 = 0.83) although the next one fits it exactly:
    # at t <= 0.80 (7 thresholds) TP then FP (AP 1); at 0.85 ... 0.95 FP then TP (AP 0.5)
    gt = [([[0, 0, 10, 10]], [0])]
    r = _ap([([[0, 0, 10, 12], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], gt, k=1)
    assert r["ap"] == pytest.approx((7 + 3 * 0.5) / 10) and r["ap50"] == ONE and r["ap75"] == ONE


def test_ap_best_unmatched_gt_each_gt_matched_once():
    # det 1 overlaps A (IoU 70/130 = 0.54) and B (80/120 = 0.67): it takes B, the better one; det 2
    # is B exactly, but B is taken and A is too far (1/3): a false positive. Recall stops at 1/2:
    # t <= 0.65: TP, FP: precision 1 up to recall 0.5: 51 of the 101 recall points;
    # t >= 0.70: det 1 misses, det 2 takes B: FP, TP: precision 1/2 up to recall 0.5
    gt = [([[0, 0, 10, 10], [5, 0, 15, 10]], [0, 0])]
    r = _ap([([[3, 0, 13, 10], [5, 0, 15, 10]], [0.9, 0.8], [0, 0])], gt, k=1)
    assert r["ap50"] == pytest.approx(51 / 101) and r["ap75"] == pytest.approx(25.5 / 101)
    assert r["ap"] == pytest.approx((4 * 51 + 6 * 25.5) / 1010)


def test_ap_equal_ious_take_the_last_ground_truth_as_pycocotools():
    # det 1 lies between A and B with the same IoU 80/120 = 0.67 to both; pycocotools' evaluateImg
    # (`if ious[dind, gind] < iou: continue`) keeps the LAST of equal IoUs: det 1 takes B, and det 2,
    # which is B exactly, finds B taken and A too far (60/140): TP, FP at t <= 0.65 (precision 1 up
    # to recall 1/2: 51 of 101 points); at t >= 0.70 det 1 misses, det 2 takes B: FP, TP.
    # (Taking the first, A, would let det 2 take B: AP 1 at t <= 0.65.)
    gt = [([[0, 0, 10, 10], [4, 0, 14, 10]], [0, 0])]
    dets = [([[2, 0, 12, 10], [4, 0, 14, 10]], [0.9, 0.8], [0, 0])]
    r = _ap(dets, gt, k=1)
    assert r["ap50"] == pytest.approx(51 / 101) and r["ap75"] == pytest.approx(25.5 / 101)
    assert r["ap"] == pytest.approx((4 * 51 + 6 * 25.5) / 1010)
    d = [(torch.tensor(b, dtype=torch.float), torch.tensor(sc), torch.tensor(l)) for b, sc, l in dets]
    g = [(torch.tensor(b, dtype=torch.float), torch.tensor(l)) for b, l in gt]
    assert ref_coco_ap(d, g, 1)["ap"] == pytest.approx(r["ap"], abs=1e-12)  # the loop reference agrees


def test_ap_iou_threshold_is_inclusive():
    # IoU exactly 100/200 = 0.5: a hit at t = 0.5 only
    r = _ap([([[0, 0, 10, 10]], [0.9], [0])], [([[0, 0, 10, 20]], [0])], k=1)
    assert r == {"ap": pytest.approx(0.1), "ap50": ONE, "ap75": 0.0}


def test_ap_sorted_by_score_over_all_images_101_point_interpolation():
    # image 1: A at 0.9 and B at 0.7, both exact; image 2 (no gt): a false positive at 0.8.
    # Over the images: TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; made monotone:
    # 1 for r <= 0.5 (51 points), 2/3 for r > 0.5 (50 points)
    gt = [([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]), ([], [])]
    dets = [([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.7], [0, 0]), ([[50, 50, 60, 60]], [0.8], [0])]
    assert _ap(dets, gt, k=1)["ap"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # the same false positive below both: AP 1
    dets[1] = ([[50, 50, 60, 60]], [0.6], [0])
    assert _ap(dets, gt, k=1)["ap"] == ONE


def test_ap_at_most_100_detections_per_image():
    gt = [([[0, 0, 10, 10]], [0])]
    fps = [[50 + i % 10, 50, 60 + i % 10, 60] for i in range(100)]
    # the true positive ranked 101st is cut: AP 0; ranked 100th: precision 1/100 at recall 1
    dets = [(fps + [[0, 0, 10, 10]], [0.9 - i * 1e-3 for i in range(101)], [0] * 101)]
    assert _ap(dets, gt, k=1)["ap"] == 0.0
    dets = [(fps[:99] + [[0, 0, 10, 10]], [0.9 - i * 1e-3 for i in range(100)], [0] * 100)]
    assert _ap(dets, gt, k=1)["ap"] == pytest.approx(0.01)


def test_ap_classes_are_matched_apart():
    # a box of class 1 exactly on a class-0 gt is a false positive of class 1, ranked above the
    # class-1 hit: class 1 AP 1/2 (FP, TP), class 0 AP 0 (nothing found): mean 1/4
    gt = [([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    r = _ap([([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 1])], gt, k=2)
    assert r["ap"] == pytest.approx(0.25)


def _py_iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ref_coco_ap(dets, gts, num_classes):
    """pycocotools' evaluateImg + accumulate for boxes, area "all", maxDets 100, by loops: per class
    and threshold, each image's detections by score (stable), each matched to the unmatched gt of
    best IoU >= t; then all images' detections by score, monotone precision at 101 recall points."""
    per_class = []
    for c in range(num_classes):
        npos = sum(int((gl == c).sum()) for _, gl in gts)
        if npos == 0:
            continue
        ap_t = []
        for t in np.linspace(0.5, 0.95, 10):
            rows = []
            for (db, ds, dl), (gb, gl) in zip(dets, gts):
                d = [(sc, b) for b, sc, l in zip(db.tolist(), ds.tolist(), dl.tolist()) if l == c]
                d = sorted(d, key=lambda e: -e[0])[:100]
                g = [b for b, l in zip(gb.tolist(), gl.tolist()) if l == c]
                taken = [False] * len(g)
                for sc, b in d:
                    best, m = min(t, 1 - 1e-10), -1
                    for gi, gbox in enumerate(g):
                        if taken[gi] or _py_iou(b, gbox) < best:
                            continue
                        best, m = _py_iou(b, gbox), gi
                    if m >= 0:
                        taken[m] = True
                    rows.append((sc, m >= 0))
            rows.sort(key=lambda e: -e[0])
            tp = fp = 0
            prec, rec = [], []
            for _, hit in rows:
                tp, fp = tp + hit, fp + (not hit)
                prec.append(tp / (tp + fp))
                rec.append(tp / npos)
            for i in range(len(prec) - 1, 0, -1):
                prec[i - 1] = max(prec[i - 1], prec[i])
            q = []
            for r in np.linspace(0, 1, 101):
                i = next((i for i, x in enumerate(rec) if x >= r), None)
                q.append(prec[i] if i is not None else 0.0)
            ap_t.append(sum(q) / len(q))
        per_class.append(ap_t)
    ap = np.array(per_class)
    return dict(ap=ap.mean(), ap50=ap[:, 0].mean(), ap75=ap[:, 5].mean())


def test_ap_equals_loop_reference_on_random_detections():
    g = torch.Generator().manual_seed(0)
    dets, gts = [], []
    for _ in range(8):
        n = int(torch.randint(0, 6, (1,), generator=g))
        xy = 80 * torch.rand(n, 2, generator=g)
        gb = torch.cat([xy, xy + 5 + 20 * torch.rand(n, 2, generator=g)], 1)
        gl = torch.randint(0, 3, (n,), generator=g)
        # each gt found with a jitter (IoU from ~0.4 to ~1), sometimes twice, sometimes with the
        # wrong class; plus false positives anywhere
        keep = torch.rand(n, generator=g) < 0.8
        db = torch.cat([gb[keep] + 3 * torch.randn(int(keep.sum()), 4, generator=g),
                        gb[:2] + 2 * torch.randn(min(n, 2), 4, generator=g)])
        dl = torch.cat([gl[keep], torch.where(torch.rand(min(n, 2), generator=g) < 0.5, gl[:2], (gl[:2] + 1) % 3)])
        m = int(torch.randint(0, 4, (1,), generator=g))
        fxy = 80 * torch.rand(m, 2, generator=g)
        db = torch.cat([db, torch.cat([fxy, fxy + 5 + 20 * torch.rand(m, 2, generator=g)], 1)])
        dl = torch.cat([dl, torch.randint(0, 3, (m,), generator=g)])
        db = torch.cat([db[:, :2], torch.maximum(db[:, 2:], db[:, :2] + 1)], 1)  # valid boxes
        dets.append((db, torch.rand(len(db), generator=g), dl))
        gts.append((gb, gl))
    got, ref = V.coco_ap(dets, gts, 3), ref_coco_ap(dets, gts, 3)
    assert 0.1 < ref["ap"] < 0.9  # neither trivial case
    for k in ("ap", "ap50", "ap75"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_nms_equals_greedy_loop_and_max_keep_cuts_it():
    # greedy NMS by score: a box is kept unless a kept box of higher score overlaps it by IoU > t
    g = torch.Generator().manual_seed(0)
    xy = 30 * torch.rand(200, 2, generator=g)
    boxes, scores = torch.cat([xy, xy + 1 + 8 * torch.rand(200, 2, generator=g)], 1), torch.rand(200, generator=g)
    order = sorted(range(200), key=lambda i: -scores[i].item())
    kept = []
    for i in order:
        if all(_py_iou(boxes[i].tolist(), boxes[j].tolist()) <= 0.5 for j in kept):
            kept.append(i)
    assert 10 < len(kept) < 190
    assert V.nms(boxes, scores, 0.5).tolist() == kept
    assert V.nms(boxes, scores, 0.5, max_keep=10).tolist() == kept[:10]


def test_detect_takes_the_top_k_on_each_level():
    # detectron2's FCOS inference: score threshold and top-k per level, then the levels together.
    # Level stride 8 (4 points) scores above level stride 16 (2 points); with top-2 per level both
    # stride-16 candidates survive (over the levels together they would not). Boxes far apart: no NMS.
    points = torch.tensor([[4.0, 4], [20, 4], [36, 4], [52, 4], [8, 40], [40, 40]])
    strides = torch.tensor([8.0] * 4 + [16.0] * 2)
    logits = torch.tensor([[3.0], [2.5], [2.0], [1.5], [0.5], [0.0]])[None]  # (1, 6, 1)
    out = dict(points=points, strides=strides, logits=logits, deltas=torch.full((1, 6, 4), 0.2),
               ctr=torch.full((1, 6), 20.0))
    boxes, scores, labels = V.detect(out, 64, score_thresh=0.05, nms_thresh=0.6, topk=2)[0]
    want = torch.tensor([0, 1, 4, 5])  # the top 2 of each level
    torch.testing.assert_close(scores, logits[0, want, 0].sigmoid().sqrt())  # sqrt(cls * ctr), ctr ~ 1
    torch.testing.assert_close(boxes, torch.cat([points[want] - 0.2 * strides[want, None],
                                                 points[want] + 0.2 * strides[want, None]], 1))
    assert labels.tolist() == [0] * 4
    # the score threshold too is per candidate: a level with nothing above it adds nothing
    boxes, scores, _ = V.detect(out, 64, score_thresh=0.8, topk=2)[0]  # level 16's best: sqrt(sigmoid(0.5)) = 0.79
    torch.testing.assert_close(scores, logits[0, :2, 0].sigmoid().sqrt())


@pytest.mark.parametrize("n, world", [(13, 2), (7, 3), (2, 4), (9, 1)])
def test_sharded_evaluation_gathers_every_image_once_in_order(n, world):
    # what each rank's sharded evaluation loader (C.make_loader, train=False) holds under torchrun:
    # DistributedSampler without shuffle, padded to a multiple of the world size; gathered, every
    # held-out image once, in the dataset's order (so that AP and the picture see the whole set)
    ds = list(range(n))
    parts = [[ds[i] for i in torch.utils.data.DistributedSampler(ds, world, r, shuffle=False)] for r in range(world)]
    assert V.in_dataset_order(parts, n) == ds


def test_torchrun_two_processes_give_the_one_process_detections(tmp_path):
    # the evaluation policy: each rank detects on its shard of the 7 held-out images (4 + 3, the
    # sampler pads one), rank 0 gathers them for the AP; the same checkpoint evaluated in one process
    # gives the same detections.json and AP
    root = os.path.dirname(os.path.abspath(V.__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(root, "vitdet.py"), "--n_train", "16", "--n_val", "7", "--epochs", "1",
                          "--batch_size", "2", "--score_thresh", "0.0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "detections.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    args = SimpleNamespace(data=None, input_size=64, model="tiny", score_thresh=0.0, nms_thresh=0.6, batch_size=2,
                           num_workers=0, eval_max=2000)
    _, val_ds, classes = V.make_data(args, 16, 7)
    model = V.create_model("tiny", num_classes=len(classes))
    model.load_state_dict(C.load_checkpoint(tmp_path / "checkpoint.pt")["model"])
    run = SimpleNamespace(device=torch.device("cpu"), distributed=False, amp_dtype=None, world_size=1, rank=0, is_main=True)
    dets, gts, metas = V.evaluate(model, C.make_loader(val_ds, args, run, False, C.collate_detection), args, run)
    assert len(dets) == 7 and [int(i) for i, _ in metas] == list(range(7))
    single = [(int(i), round(sc, 4)) for (_, scores, _), (i, _) in zip(dets, metas) for sc in scores.tolist()]
    assert [(r["image_id"], r["score"]) for r in rows] == single and len(single) > 7
    assert metrics["ap"] == pytest.approx(V.coco_ap(dets, gts, len(classes))["ap"], abs=1e-6)


# ---------------------------------------------------------------- the whole script


def test_smoke(tmp_path, capsys):
    V.main(["--smoke", "--out", str(tmp_path)])  # raises SystemExit(1) if the loss does not fall
    assert ": ok" in capsys.readouterr().out
