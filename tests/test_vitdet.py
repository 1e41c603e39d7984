"""Tests of the ViTDet mechanisms: windows, positions, the pyramid, layer decay, FCOS targets, COCO AP."""
import math

import pytest
import torch

import vitdet as V


# ---------------------------------------------------------------- window attention


@pytest.mark.parametrize("size, n_windows", [(64, 25), (50, 16)])
def test_window_partition_round_trip_with_padding(size, n_windows):
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


def _pair(window_size, size):
    torch.manual_seed(0)
    glob = V.Block(32, 4, window_size=0, input_size=(size, size)).eval()
    win = V.Block(32, 4, window_size=window_size, input_size=(size, size)).eval()
    with torch.no_grad():
        glob.attn.rel_pos_h.normal_(); glob.attn.rel_pos_w.normal_()  # non-zero relative positions
    return glob, win


def test_window_block_covering_the_map_equals_global_block():
    glob, win = _pair(14, 14)
    assert glob.attn.rel_pos_h.shape == win.attn.rel_pos_h.shape == (27, 8)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 14, 14, 32)
    torch.testing.assert_close(win(x), glob(x), atol=1e-6, rtol=1e-6)


def test_windows_are_independent_global_attentions():
    # a 28x28 map in 14x14 windows == global attention run on each quadrant alone
    glob, win = _pair(14, 14)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 28, 28, 32)
    out = win.attn(V.window_partition(win.norm1(x), 14)[0])  # (4, 14, 14, 32)
    for k, (i, j) in enumerate([(0, 0), (0, 14), (14, 0), (14, 14)]):
        ref = glob.attn(glob.norm1(x[:, i:i + 14, j:j + 14]))
        torch.testing.assert_close(out[k:k + 1], ref, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_explicit_attention():
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


def test_decomposed_rel_pos_equals_full_table():
    # E[(ih, iw), (jh, jw)] = q . R_h[ih - jh + kh - 1] + q . R_w[iw - jw + kw - 1]
    torch.manual_seed(0)
    qh, qw, c = 3, 4, 5
    rh, rw, q = torch.randn(2 * qh - 1, c), torch.randn(2 * qw - 1, c), torch.randn(2, qh * qw, c)
    bias = V.decomposed_rel_pos(q, rh, rw, (qh, qw), (qh, qw))
    ref = torch.zeros(2, qh * qw, qh * qw)
    for i in range(qh * qw):
        for j in range(qh * qw):
            (ih, iw), (jh, jw) = divmod(i, qw), divmod(j, qw)
            ref[:, i, j] = q[:, i] @ (rh[ih - jh + qh - 1] + rw[iw - jw + qw - 1])
    torch.testing.assert_close(bias, ref, atol=1e-5, rtol=1e-5)
    # a table of another length is linearly interpolated to 2 * size - 1 rows
    assert V.get_rel_pos(5, 5, torch.randn(27, c)).shape == (5, 5, c)


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


def test_pyramid_strides_shapes_and_detectron2_names_at_1024():
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


def test_flops_ratio_of_global_and_window_attention_vit_b_1024():
    V.Attention.explicit = True
    try:
        macs = []
        for glob in (tuple(range(12)), (2, 5, 8, 11)):
            with torch.device("meta"):
                net = V.create_model("base", global_block_indexes=glob).backbone.net
            macs.append(V.backbone_cost(net, 1024, "meta")[0] / 1e9)
    finally:
        V.Attention.explicit = False
    assert abs(macs[0] - 664.8) / 664.8 < 0.01 and abs(macs[1] - 483.2) / 483.2 < 0.01, macs
    assert abs(macs[0] / macs[1] - 1.38) < 0.05 * 1.38


# ---------------------------------------------------------------- optimisation


def test_layer_decay_multipliers_vit_b():
    r = lambda name: V.lr_decay_rate(name, 0.7, 12)
    assert r("backbone.net.patch_embed.proj.weight") == pytest.approx(0.7 ** 13)
    assert r("backbone.net.pos_embed") == pytest.approx(0.7 ** 13)
    assert r("backbone.net.blocks.0.attn.qkv.weight") == pytest.approx(0.7 ** 12)
    assert r("backbone.net.blocks.11.mlp.fc2.bias") == pytest.approx(0.7)
    assert r("backbone.net.blocks.3.residual.conv1.weight") == 1.0
    assert r("backbone.simfp_2.0.weight") == 1.0 and r("head.cls_score.weight") == 1.0


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
    # the regression target (l, t, r, b) / stride decodes back to the box
    ltrb = torch.cat([points[:1] - boxes[1:, :2], boxes[1:, 2:] - points[:1]], 1) / strides[0]
    torch.testing.assert_close(V.apply_deltas(ltrb, points[:1], strides[:1]), boxes[1:])


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


def test_ap_perfect_boxes():
    dets = [(b, [0.9] * len(l), l) for b, l in GT]
    assert _ap(dets, GT) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}


def test_ap_shifted_boxes():
    # shifting a 10x10 box by 1 px gives IoU 90/110 = 0.818: a hit at 0.50 ... 0.80 (7 of 10 thresholds)
    r = _ap([([[1, 0, 11, 10]], [0.9], [0])], [([[0, 0, 10, 10]], [0])], k=1)
    assert r["ap"] == pytest.approx(0.7) and r["ap50"] == 1.0 and r["ap75"] == 1.0
    # IoU 50/150 = 1/3: never a hit
    assert _ap([([[5, 0, 15, 10]], [0.9], [0])], [([[0, 0, 10, 10]], [0])], k=1)["ap50"] == 0.0


def test_ap_no_boxes():
    assert _ap([([], [], []), ([], [], [])], GT) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert _ap([([[0, 0, 1, 1]], [0.5], [0])], [([], [])])["ap"] == -1.0  # no ground truth at all
    # a class without ground truth is left out of the mean, as pycocotools does
    dets = [(b, [0.9] * len(l), l) for b, l in GT] + [([[0, 0, 5, 5]], [0.99], [2])]
    assert _ap(dets, GT + [([], [])], k=3)["ap"] == 1.0


def test_ap_duplicates():
    gt = [([[0, 0, 10, 10]], [0])]
    # a duplicate below the true positive costs nothing: precision 1 is reached at recall 1 first
    assert _ap([([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], gt, k=1)["ap"] == 1.0
    # a wrong box ranked above the right one: precision 1/2 at recall 1
    r = _ap([([[20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], gt, k=1)
    assert r["ap"] == pytest.approx(0.5) and r["ap50"] == pytest.approx(0.5)


# ---------------------------------------------------------------- the whole script


def test_smoke(tmp_path, capsys):
    V.main(["--smoke", "--out", str(tmp_path)])  # raises SystemExit(1) if the loss does not fall
    assert ": ok" in capsys.readouterr().out
