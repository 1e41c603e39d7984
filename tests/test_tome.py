"""Tests for tome.py: each checks a property of Token Merging itself (Bolya et al. 2022)."""
import math

import pytest
import torch
import torch.nn.functional as F

import common as C
import tome


def small_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    return tome.VisionTransformer(**{**cfg, **kw}).eval()


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_vit(model, x):
    """A plain ViT written out with an explicit softmax: what r = 0 must compute."""
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)
    t = torch.cat([model.cls_token.expand(len(x), -1, -1), t], 1) + model.pos_embed
    for blk in model.blocks:
        h = blk.norm1(t)
        B, N, D = h.shape
        H = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).softmax(-1)  # (B, H, N, N)
        t = t + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    feat = model.fc_norm(t[:, 1:].mean(1)) if model.global_pool else model.norm(t)[:, 0]
    return model.head(feat)


@pytest.mark.parametrize("global_pool", [False, True])
def test_r0_is_exactly_the_plain_vit(global_pool):
    model, x = small_vit(global_pool=global_pool), images()
    with torch.no_grad():
        out0 = model(x, r=0)
        assert torch.allclose(out0, reference_vit(model, x), atol=1e-5)
        assert torch.equal(out0, model(x, r=[0] * 4))  # an all-zero schedule is the same model
        assert (out0 - model(x, r=4)).abs().max() > 1e-5  # and merging does change it


@pytest.mark.parametrize("r", [3, 9, 40, (6, -1)])
def test_each_layer_removes_min_r_and_cls_stays_first(r):
    model, x = small_vit(), images()
    schedule = tome.parse_r(4, r)
    lengths = []
    hooks = [b.register_forward_hook(lambda m, i, o: lengths.append((o[0].shape[1], o[2])))
             for b in model.blocks]
    with torch.no_grad():
        model.forward_tokens(x, r, trace_source=True)
    for h in hooks:
        h.remove()
    T = 65
    for r_l, (n, source) in zip(schedule, lengths):
        assert n == T - min(r_l, (T - 1) // 2)  # the cap: at most half of the non-cls tokens
        T = n
        assert torch.equal(source[:, 0, 0], torch.ones(3))  # token 0 is the class token ...
        assert source[:, 0, 1:].sum() == 0  # ... and nothing was merged into it
    assert [n for n, _ in lengths] == tome.token_counts(65, schedule)[1:]


def test_class_token_never_merged_even_if_identical():
    torch.manual_seed(0)
    metric = torch.randn(2, 9, 8)
    metric[:, 0] = metric[:, 1]  # the cls key equals a B token: the best possible edge
    merge = tome.bipartite_soft_matching(metric, 4, class_token=True)
    ids = torch.arange(9.0).reshape(1, 9, 1).expand(2, 9, 1)
    out = merge(ids, mode="amax")  # (2, 5, 1): which original index survives where
    assert out.shape == (2, 5, 1) and torch.equal(out[:, 0, 0], torch.zeros(2))


def test_merge_wavg_preserves_weighted_sum_and_total_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 17, 1), generator=g).double()
    merge = tome.bipartite_soft_matching(torch.randn(2, 17, 4, generator=g), 5)
    x2, size2 = tome.merge_wavg(merge, x, size)
    assert x2.shape == (2, 12, 6) and size2.shape == (2, 12, 1)
    assert torch.allclose((size2 * x2).sum(1), (size * x).sum(1))  # sum_k s'_k x'_k = sum_j s_j x_j
    assert torch.equal(size2.sum(1), size.sum(1))  # total size is conserved exactly


def test_single_merge_of_unit_sizes_is_the_plain_mean():
    torch.manual_seed(0)
    metric = torch.randn(1, 7, 4)
    metric[0, 4] = metric[0, 3] * 2.0  # A token 4 points exactly like B token 3: cosine 1
    x = torch.randn(1, 7, 3)
    merge = tome.bipartite_soft_matching(metric, 1, class_token=True)
    x2, size2 = tome.merge_wavg(merge, x)
    # output = unmerged A (0, 2, 6 in order), then B (1, 3, 5) with token 4 merged into 3
    assert torch.allclose(x2[0], torch.stack([x[0, 0], x[0, 2], x[0, 6], x[0, 1],
                                             (x[0, 3] + x[0, 4]) / 2, x[0, 5]]))
    assert size2[0, :, 0].tolist() == [1, 1, 1, 1, 2, 1]


def test_sources_partition_the_patches_and_sum_to_the_sizes():
    model, x = small_vit(), images()
    with torch.no_grad():
        _, size, source = model.forward_tokens(x, (8, -1), trace_source=True)
    assert source.shape == (3, len(size[0]), 65)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source.sum(1), torch.ones(3, 65))  # every original token lives in one token
    assert torch.equal(source.sum(-1, keepdim=True), size)  # a token's size = patches it holds


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    torch.manual_seed(0)
    attn = tome.Attention(16, 4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    sizes = torch.tensor([1, 3, 2, 1, 4])
    out, _ = attn(x, sizes.double().view(1, 5, 1).expand(2, 5, 1))
    out_dup, _ = attn(x.repeat_interleave(sizes, dim=1))  # token j copied s_j times, no sizes
    first = torch.cumsum(sizes, 0) - sizes  # index of each token's first copy
    assert torch.allclose(out, out_dup[:, first], atol=1e-10)
    ones = torch.ones(2, 5, 1, dtype=torch.float64)
    assert torch.allclose(attn(x, ones)[0], attn(x)[0], atol=1e-12)  # all sizes 1 = plain


def test_metric_is_the_keys_averaged_over_heads():
    torch.manual_seed(0)
    attn = tome.Attention(16, 4)
    x = torch.randn(2, 5, 16)
    k = attn.qkv(x)[..., 16:32].reshape(2, 5, 4, 4)  # (B, N, heads, d)
    assert torch.allclose(attn(x)[1], k.mean(2), atol=1e-6)


def test_r_schedules_match_the_official_parse_r():
    assert tome.parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]  # decreasing
    assert tome.parse_r(12, (16, 1)) == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]  # increasing
    assert tome.parse_r(12, 16) == [16] * 12
    assert tome.parse_r(12, (16, 0)) == [16] * 12
    assert tome.parse_r(4, [8, 2]) == [8, 2, 0, 0]
    # the per-layer cap makes the last layers merge less (fact sheet: final token counts)
    assert tome.token_counts(197, tome.parse_r(12, 16))[-1] == 11  # ViT-B/16 r=16
    assert tome.token_counts(197, tome.parse_r(24, 8))[-1] == 7  # ViT-L/16 r=8
    assert tome.token_counts(197, tome.parse_r(12, 13))[-1] == 41  # ViT-S/16 r=13


def test_gradients_flow_through_merged_tokens():
    torch.manual_seed(0)
    x = torch.randn(1, 7, 3, requires_grad=True)
    size = torch.tensor([1.0, 1, 1, 3, 2, 1, 1]).view(1, 7, 1)
    metric = torch.randn(1, 7, 4)
    metric[0, 4] = metric[0, 3]  # A token 4 (size 2) merges into B token 3 (size 3)
    merged, size2 = tome.merge_wavg(tome.bipartite_soft_matching(metric, 1), x, size)
    merged[0, 4].sum().backward()  # the merged token (B token 3 sits at output index 3 + 1)
    assert size2[0, 4, 0] == 5
    assert torch.allclose(x.grad[0, 3], torch.full((3,), 3 / 5))  # d x' / d x_j = s_j / s'
    assert torch.allclose(x.grad[0, 4], torch.full((3,), 2 / 5))
    model = small_vit().train()
    F.cross_entropy(model(images(4), r=6), torch.arange(4)).backward()
    for name, p in model.named_parameters():  # every weight, before and after merges, learns
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_size_weighted_global_pool_is_invariant_to_merging():
    model, x = small_vit(global_pool=True), images()
    for blk in model.blocks:  # make every residual branch zero: tokens only get merged
        for lin in (blk.attn.proj, blk.mlp.fc2):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    with torch.no_grad():  # MAE pool sum_k s_k x_k / T0 equals the plain mean of the patches
        assert torch.allclose(model(x, r=8), model(x, r=0), atol=1e-5)


def test_timm_names_and_one_line_error_for_bad_checkpoints(tmp_path):
    model = tome.create_model("tiny", global_pool=True)
    keys = set(model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.5.attn.qkv.weight",
            "blocks.0.mlp.fc2.bias", "fc_norm.weight", "head.weight"} <= keys
    assert not any(k.startswith("norm.") for k in keys)  # MAE fine-tuned: fc_norm, no norm
    assert "norm.weight" in tome.create_model("tiny", global_pool=False).state_dict()  # DeiT: norm
    state = model.state_dict()
    state.pop("blocks.2.norm1.bias")
    state["decoder_embed.weight"] = torch.zeros(1)
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": state}, path)
    args = C.make_parser("tome", "").parse_args([])
    args.drop_path, args.r, args.inflect, args.no_prop_attn = 0.0, 0, 0.0, False
    with pytest.raises(SystemExit) as e:
        tome.model_from_weights(args, "tiny", 32, path)
    msg = str(e.value)
    assert "\n" not in msg and "blocks.2.norm1.bias" in msg and "decoder_embed.weight" in msg
    state.pop("decoder_embed.weight")
    state["blocks.2.norm1.bias"] = model.state_dict()["blocks.2.norm1.bias"]
    torch.save({"model": state}, path)
    loaded = tome.model_from_weights(args, "tiny", 32, path)
    assert loaded.global_pool and torch.equal(loaded.head.weight, model.head.weight)


def test_smoke_command(tmp_path):
    tome.main(["--smoke", "--out", str(tmp_path)])  # exits non-zero only if the loss does not fall


def test_flops_match_the_paper_and_the_counter():
    # GFLOPs (multiply-adds) of DeiT-S in the paper (via paperswithcode): 4.6, r=8 3.4, r=13 2.7, r=16 2.3
    deit_s = tome.create_model("small")
    gmacs = [tome.analytic_flops(deit_s, tome.parse_r(12, r)) / 2e9 for r in (0, 8, 13, 16)]
    assert [round(g, 1) for g in gmacs] == [4.6, 3.4, 2.7, 2.3]
    model = small_vit()  # torch's counter (+ attention where SDPA is not counted) agrees with the formula
    for r in (0, 5):
        counted = tome.counted_flops(model, images(1), r)
        analytic = tome.analytic_flops(model, tome.parse_r(4, r))
        assert abs(counted / analytic - 1) < 0.02
