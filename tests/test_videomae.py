"""Tests for videomae.py (MAE-ST): each checks a property of the paper's mechanism or of mae_st."""
import pytest
import torch

import common as C
import videomae as V


def small(**kw):
    torch.manual_seed(0)
    return V.create_model("tiny", **kw)


def test_tokens_are_time_major_conv_output():
    """Token t*H'W' + i*W' + j is the Conv3d output at (t, i, j): the layout the pos tables assume."""
    m = small()
    x = torch.randn(2, 3, 8, 32, 32)
    tokens = m.patch_embed(x)                                   # (N, T', S, D)
    conv = m.patch_embed.proj(x)                                # (N, D, T', H', W')
    T, H, W = m.input_size
    flat = tokens.reshape(2, T * H * W, -1)
    for t, i, j in [(0, 0, 0), (1, 2, 3), (3, 3, 0), (2, 0, 1)]:
        assert torch.equal(flat[:, t * H * W + i * W + j], conv[:, :, t, i, j])


def test_patchify_layout_and_round_trip():
    m = small()
    v = torch.randn(2, 3, 4, 32, 32)                            # the 4 target frames
    x = m.patchify(v)                                           # (N, L, p*p*3), u = 1
    assert x.shape == (2, 4 * 16, 8 * 8 * 3)
    assert torch.equal(m.unpatchify(x), v)
    # token (t=1, row 2, col 3), values in (p, q, c) order: the channel varies fastest
    ref = v[1, :, 1, 16:24, 24:32].permute(1, 2, 0).reshape(-1)
    assert torch.equal(x[1, 1 * 16 + 2 * 4 + 3], ref)


def test_random_masking_keeps_156_of_1568():
    torch.manual_seed(0)
    x = torch.randn(3, 1568, 4)
    kept, mask, ids_restore, ids_keep = V.random_masking(x, 0.9)
    assert kept.shape == (3, 156, 4) and ids_keep.shape == (3, 156)
    assert torch.equal(mask.sum(1), torch.full((3,), 1568.0 - 156))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)     # the kept indices are the unmasked ones
    # [kept, removed] in shuffled order, gathered with ids_restore, is the original sequence
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    removed = torch.gather(x, 1, ids_shuffle[:, 156:, None].expand(-1, -1, 4))
    back = torch.gather(torch.cat([kept, removed], 1), 1, ids_restore[:, :, None].expand(-1, -1, 4))
    assert torch.equal(back, x)
    # masking is different for each sample
    assert not torch.equal(mask[0], mask[1])


def test_tube_mask_is_the_same_in_every_time_slice():
    torch.manual_seed(0)
    T, S = 8, 196
    x = torch.randn(4, T * S, 2)
    kept, mask, _, _ = V.random_masking(x, 0.9, "tube", T)
    m = mask.reshape(4, T, S)                                   # (N, T', S)
    assert torch.equal(m, m[:, :1].expand(-1, T, -1))           # one spatial mask, repeated over time
    assert kept.shape[1] == T * int(S * 0.1) == 152
    assert torch.equal(mask.sum(1), torch.full((4,), T * S - 152.0))
    # while random masking is not a tube
    _, mask_r, _, _ = V.random_masking(x, 0.9, "random", T)
    mr = mask_r.reshape(4, T, S)
    assert not torch.equal(mr, mr[:, :1].expand(-1, T, -1))


def test_separable_pos_table_is_spatial_plus_temporal():
    spatial, temporal = torch.randn(1, 6, 5), torch.randn(1, 3, 5)
    table = V.separable_pos_embed(spatial, temporal)
    assert table.shape == (1, 18, 5)
    for t in range(3):
        for s in range(6):
            assert torch.equal(table[0, t * 6 + s], spatial[0, s] + temporal[0, t])


def test_positions_gathered_after_masking_equal_added_before():
    """mae_st adds the pos table after masking, at the kept indices; the encoder input must equal
    'add to every token, then mask' (checked through the first block's input)."""
    m = small()
    x = torch.randn(2, 3, 8, 32, 32)
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0].clone()))
    torch.manual_seed(5)
    m.forward_encoder(x, 0.75)
    tokens = m.patch_embed(x).reshape(2, 64, -1) + V.separable_pos_embed(m.pos_embed_spatial, m.pos_embed_temporal)
    torch.manual_seed(5)
    ref, _, _, _ = V.random_masking(tokens, 0.75)
    assert torch.allclose(seen["x"][:, 1:], ref, atol=1e-6)
    assert torch.allclose(seen["x"][:, 0], (m.cls_token + m.pos_embed_class)[0].expand(2, -1))


def test_target_frames_one_per_token_at_official_indices():
    assert V.target_frame_indices(16, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 15]   # 15, not 14 (mae_st)
    assert V.target_frame_indices(8, 4).tolist() == [0, 2, 4, 7]
    with torch.device("meta"):
        m = V.create_model("large")
    assert m.t_pred_patch_size == 1 and m.decoder_pred.out_features == 16 * 16 * 3  # 768: one frame per token
    # the target really is those frames: changing any other frame leaves it unchanged
    t = small()
    v = torch.randn(1, 3, 8, 32, 32)
    w = v.clone()
    w[:, :, [1, 3, 5, 6]] += 1.0
    assert torch.equal(V.prediction_target(t, v), V.prediction_target(t, w))
    w[:, :, 7] += 1.0
    assert not torch.equal(V.prediction_target(t, v), V.prediction_target(t, w))


def test_loss_only_on_removed_tokens():
    m = small()
    v = torch.randn(2, 3, 8, 32, 32)
    torch.manual_seed(1)
    latent, mask, ids_restore = m.forward_encoder(v, 0.9)
    pred = m.forward_decoder(latent, ids_restore).detach().requires_grad_(True)
    loss = V.forward_loss(m, v, pred, mask)
    loss.backward()
    vis = mask == 0
    assert torch.all(pred.grad[vis] == 0) and pred.grad[~vis].abs().sum() > 0
    changed = pred.detach().clone()
    changed[vis] += 100.0
    assert torch.equal(V.forward_loss(m, v, changed, mask), loss.detach())
    # and it is the mean over removed tokens of the per-token mean squared error
    target = V.prediction_target(m, v)
    per_token = ((pred.detach() - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_token[~vis].mean())


def test_norm_pix_target_is_standardised_per_patch():
    m = small(norm_pix_loss=True)
    v = torch.randn(2, 3, 8, 32, 32) * 3 + 1
    target = V.prediction_target(m, v)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 64), atol=1e-3)     # unbiased variance, as mae_st


def test_large_has_official_names_and_shapes():
    with torch.device("meta"):
        m = V.create_model("large")
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expect = {
        "cls_token": (1, 1, 1024), "decoder_cls_token": (1, 1, 512), "mask_token": (1, 1, 512),
        "pos_embed_spatial": (1, 196, 1024), "pos_embed_temporal": (1, 8, 1024), "pos_embed_class": (1, 1, 1024),
        "patch_embed.proj.weight": (1024, 3, 2, 16, 16), "patch_embed.proj.bias": (1024,),
        "blocks.23.attn.q.weight": (1024, 1024), "blocks.23.attn.k.bias": (1024,), "blocks.0.attn.v.weight": (1024, 1024),
        "blocks.0.attn.proj.weight": (1024, 1024), "blocks.0.mlp.fc1.weight": (4096, 1024),
        "blocks.0.mlp.fc2.weight": (1024, 4096), "blocks.0.norm1.weight": (1024,), "blocks.0.norm2.bias": (1024,),
        "norm.weight": (1024,), "decoder_embed.weight": (512, 1024),
        "decoder_pos_embed_spatial": (1, 196, 512), "decoder_pos_embed_temporal": (1, 8, 512),
        "decoder_pos_embed_class": (1, 1, 512), "decoder_blocks.3.attn.q.weight": (512, 512),
        "decoder_norm.weight": (512,), "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    assert "blocks.24.norm1.weight" not in sd and "decoder_blocks.4.norm1.weight" not in sd   # 24 + 4 blocks
    # cls + 3 pos tables, patch embed, 24 blocks of 16, norm, decoder_embed, mask + cls + 3 pos, 4 blocks, norm, pred
    assert len(sd) == 4 + 2 + 16 * 24 + 2 + 2 + 5 + 16 * 4 + 2 + 2 == 467
    assert m.patch_embed.num_patches == 1568
    assert m.blocks[0].attn.num_heads == 16 and m.decoder_blocks[0].attn.num_heads == 16


def test_official_init():
    m = small()
    assert torch.all(m.decoder_cls_token == 0)                  # never initialised in mae_st
    assert torch.all(m.blocks[0].attn.q.bias == 0) and torch.all(m.norm.weight == 1)
    w = m.blocks[0].mlp.fc1.weight                              # xavier_uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (w.shape[0] + w.shape[1])) ** 0.5
    pe = m.patch_embed.proj.weight                              # xavier on the (D, 3*2*8*8) view
    assert pe.abs().max() <= (6 / (pe.shape[0] + pe[0].numel())) ** 0.5
    assert 0.01 < m.pos_embed_spatial.std() < 0.03


def test_pyslowfast_checkpoint_loads_after_renaming(tmp_path):
    """The released files store the decoder as pred_head.* with dec_pos_embed_*; they load strictly."""
    src = small()
    sd, depth = src.state_dict(), len(src.decoder_blocks)
    ported = {}
    for k, v in sd.items():
        if k == "decoder_cls_token":
            continue                                            # PySlowFast has none
        if k.startswith("decoder_blocks."):
            k = "pred_head.transforms.0." + k[len("decoder_blocks."):]
        elif k.startswith("decoder_norm."):
            k = f"pred_head.transforms.0.{depth}." + k[len("decoder_norm."):]
        elif k.startswith("decoder_pred."):
            k = "pred_head.projections.0." + k[len("decoder_pred."):]
        elif k.startswith("decoder_pos_embed_"):
            k = "dec_pos_embed_" + k[len("decoder_pos_embed_"):]
        ported[k] = v
    path = tmp_path / "k400.pyth"
    torch.save({"model_state": ported}, path)
    torch.manual_seed(1)
    dst = V.create_model("tiny", decoder_embed_dim=128)         # 128 / 64 = 2 heads after the load
    with pytest.raises(SystemExit, match="k400.pyth"):          # wrong decoder width: one-line error
        V.load_weights(dst, str(path), C.init_run(C.make_parser("t", "").parse_args(["--out", str(tmp_path)])))
    dst = V.create_model("tiny")
    run = C.init_run(C.make_parser("t", "").parse_args(["--out", str(tmp_path)]))
    V.load_weights(dst, str(path), run)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, torch.zeros_like(v) if k == "decoder_cls_token" else sd[k]), k
    assert dst.decoder_blocks[0].attn.num_heads == 1            # 64-d decoder / 64 per head


def test_flops_match_the_analytic_formula_and_the_paper_ratio():
    """Counted on the meta device (free): one block is 24*N*D^2 + 4*N^2*D FLOPs (attention included),
    and ViT-L at 90% gives the paper's 7.7x (627.5 vs 81.0 GFLOPs, Table 1) within 5%."""
    N, D = 157, 1024
    with torch.device("meta"):
        blk = V.Block(D, 16)
        x = torch.empty(1, N, D)
        assert C.count_flops(lambda: blk(x)) == 24 * N * D * D + 4 * N * N * D
        m = V.create_model("large")
        v = torch.empty(1, 3, 16, 224, 224)
        dense = C.count_flops(lambda: V.forward_with_mask_tokens(m, v, 0.9))
        sparse = C.count_flops(lambda: m(v, 0.9))
    assert abs(dense / sparse / 7.7 - 1) < 0.05
    assert abs(dense / 2e9 / 627.5 - 1) < 0.05 and abs(sparse / 2e9 / 81.0 - 1) < 0.05


def test_mask_token_encoder_at_mask_zero_equals_sparse_encoder():
    """With nothing removed, 'encoder w/ [M]' and the sparse encoder compute the same function
    (attention is permutation-equivariant; the sparse one only works in shuffled order)."""
    m = small()
    v = torch.randn(2, 3, 8, 32, 32)
    torch.manual_seed(2)
    latent, mask, ids_restore = m.forward_encoder(v, 0.0)
    a = m.forward_decoder(latent, ids_restore)
    captured = {}
    orig = m.forward_decoder
    m.forward_decoder = lambda x, ids: captured.setdefault("p", orig(x, ids))
    V.forward_with_mask_tokens(m, v, 0.0)
    assert torch.allclose(a, captured["p"], atol=1e-5)


def test_smoke_and_bad_weights(tmp_path):
    V.main(["--smoke", "--out", str(tmp_path)])                 # returns (raises SystemExit(1) on failure)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt"):
        V.main(["--weights", str(bad), "--out", str(tmp_path), "--epochs", "0"])
