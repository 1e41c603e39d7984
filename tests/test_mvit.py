"""Tests of mvit.py: each checks a property of MViTv2's mechanism or a number of the official models.
The paper-sized models are built on the meta device (shapes only, no memory, no arithmetic)."""
import math

import pytest
import torch

import mvit


def meta_model(name, **kw):
    with torch.device("meta"):
        return mvit.create_model(name, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ sizes of the official models


def test_param_counts_equal_the_official_models():
    # counted on facebookresearch/mvit's MViT built from configs/MVITv2_{T,S,B}.yaml, test/MVITv2_L_test.yaml
    official = {"T": (24_173_320, 242), "S": (34_870_216, 380), "B": (51_472_744, 564), "L": (217_992_952, 1116)}
    for name, (params, keys) in official.items():
        m = meta_model(name)
        assert (n_params(m), len(m.state_dict())) == (params, keys), name


def test_official_key_names_and_rel_pos_rows():
    sd = meta_model("T").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embed.proj.weight"] == (96, 3, 7, 7)
    assert shapes["blocks.0.attn.pool_q.weight"] == (96, 1, 3, 3)  # one depthwise kernel shared by the heads
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * 96, 96)
    assert shapes["blocks.1.attn.qkv.weight"] == (3 * 192, 96)  # the width doubles inside the attention
    assert shapes["blocks.1.proj.weight"] == (192, 96)  # shortcut projection, transition blocks only
    assert "blocks.2.proj.weight" not in shapes
    assert shapes["head.projection.weight"] == (1000, 768)
    assert not any(k.startswith(("cls_token", "pos_embed")) for k in shapes)
    # q pooling (and kv pooling) exists in every block, even with stride 1
    assert all(f"blocks.{i}.attn.pool_{a}.weight" in shapes for i in range(10) for a in "qkv")
    rows = {"T": [111, 55, 55, 55, 27, 27, 27, 27, 27, 13],
            "S": [111] + [55] * 3 + [27] * 11 + [13],
            "B": [111] * 2 + [55] * 4 + [27] * 16 + [13] * 2}
    for name, want in rows.items():
        m = meta_model(name)
        assert [b.attn.rel_pos_h.shape[0] for b in m.blocks] == want, name
        assert [b.attn.rel_pos_w.shape[0] for b in m.blocks] == want, name


def test_flops_of_T_at_224():
    # fvcore on the official code: 4.70 G multiply-adds (the paper's "4.7 GFLOPs")
    g = mvit.gflops(meta_model("T"), torch.empty(1, 3, 224, 224, device="meta"))
    assert abs(g - 4.70) < 0.05


# ------------------------------------------------------------------ multiscale geometry


def test_token_shapes_and_q_kv_grids_of_T_at_224():
    m = meta_model("T")
    outs, q_grid, kv_grid = [], [], []
    for b in m.blocks:
        b.register_forward_hook(lambda mod, inp, out: outs.append(tuple(out[0].shape[1:])))
        b.attn.pool_q.register_forward_hook(lambda mod, inp, out: q_grid.append(tuple(out.shape[-2:])))
        b.attn.pool_k.register_forward_hook(lambda mod, inp, out: kv_grid.append(tuple(out.shape[-2:])))
    m(torch.empty(1, 3, 224, 224, device="meta"))
    assert outs == [(3136, 96)] + [(784, 192)] * 2 + [(196, 384)] * 5 + [(49, 768)] * 2
    assert [b.attn.num_heads for b in m.blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 8, 8]
    assert [g[0] for g in q_grid] == [56, 28, 28, 14, 14, 14, 14, 14, 7, 7]
    # adaptive kv stride 4 -> 2 -> 1, reduced at the transition block itself
    assert [g[0] for g in kv_grid] == [14, 28, 14, 28, 14, 14, 14, 14, 14, 7]
    assert all(g[0] == g[1] for g in q_grid + kv_grid)


def test_video_patch_embedding_and_temporal_table():
    m = meta_model("S", video=True, num_frames=16, num_classes=400)  # SlowFast's K400 MViTv2-S 16x4
    tokens, grid = m.patch_embed(torch.empty(1, 3, 16, 224, 224, device="meta"))
    assert grid == (8, 56, 56) and tuple(tokens.shape) == (1, 8 * 56 * 56, 96)
    assert tuple(m.blocks[0].attn.rel_pos_t.shape) == (15, 96)
    assert tuple(m.cls_token.shape) == (1, 1, 96)
    assert tuple(m.blocks[0].attn.pool_k.weight.shape) == (96, 1, 3, 3, 3)
    assert len(m.state_dict()) == 397 and round(n_params(m) / 1e6, 2) == 34.54
    assert tuple(m(torch.empty(2, 3, 16, 224, 224, device="meta")).shape) == (2, 400)


# ------------------------------------------------------------------ decomposed relative positions


def test_rel_pos_index_examples_and_range():
    # T block 0: q grid 56, kv grid 14 -> idx = i - 4j + 52, table of 111 rows (the last 3 unused)
    idx = mvit.rel_pos_index(56, 14)
    i, j = torch.arange(56)[:, None], torch.arange(14)[None, :]
    assert torch.equal(idx, i - 4 * j + 52) and idx.min() == 0 and idx.max() == 107
    for q_len, k_len in [(56, 14), (14, 28), (28, 14), (7, 7), (8, 3), (3, 8)]:
        idx = mvit.rel_pos_index(q_len, k_len)
        assert idx.min() >= 0 and idx.max() <= 2 * max(q_len, k_len) - 2
    # equal grids: the plain relative distance i - j shifted by L - 1
    assert torch.equal(mvit.rel_pos_index(5, 5), torch.arange(5)[:, None] - torch.arange(5)[None, :] + 4)


def pairwise_rel_pos(q, q_grid, k_grid, tables):
    """The slow reference: for every (query, key) pair, the position embedding R_{p(i),p(j)} summed
    over the axes from the tables, then E[i, j] = q_i . R_{p(i),p(j)}. Python loops, no broadcasting."""
    def idx(a, b, q_len, k_len):  # distance in the finer grid's units, shifted to start at 0
        rq, rk = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
        return math.floor(a * rq - b * rk + (k_len - 1) * rk)

    qpos = [(t, h, w) for t in range(q_grid[0]) for h in range(q_grid[1]) for w in range(q_grid[2])]
    kpos = [(t, h, w) for t in range(k_grid[0]) for h in range(k_grid[1]) for w in range(k_grid[2])]
    E = torch.zeros(q.shape[0], q.shape[1], len(qpos), len(kpos))
    for a, pa in enumerate(qpos):
        for b, pb in enumerate(kpos):
            R = sum(table[idx(pa[ax], pb[ax], q_grid[ax], k_grid[ax])] for ax, table in tables.items())
            E[:, :, a, b] = q[:, :, a] @ R
    return E


@pytest.mark.parametrize("q_grid,k_grid,temporal", [
    ((1, 8, 8), (1, 2, 2), False),  # kv pooled by 4, as in the first stage
    ((1, 4, 4), (1, 8, 8), False),  # q pooled, kv not: a transition block
    ((1, 6, 5), (1, 3, 5), False),  # non-square
    ((4, 4, 4), (4, 2, 2), True),  # video with a temporal table
    ((2, 3, 3), (4, 3, 3), True),  # unequal temporal grids
])
def test_decomposed_rel_pos_equals_pairwise_table(q_grid, k_grid, temporal):
    torch.manual_seed(0)
    c = 5
    rows = lambda ax: 2 * max(q_grid[ax], k_grid[ax]) - 1
    tables = {1: torch.randn(rows(1), c), 2: torch.randn(rows(2), c)}
    if temporal:
        tables[0] = torch.randn(rows(0), c)
    q = torch.randn(2, 3, math.prod(q_grid), c)
    fast = mvit.decomposed_rel_pos(q, q_grid, k_grid, tables[1], tables[2], tables.get(0))
    assert torch.allclose(fast, pairwise_rel_pos(q, q_grid, k_grid, tables), atol=1e-5)


def test_rel_pos_full_table_for_large_unequal_grids():
    # 56 vs 14 and 14 vs 28 (T blocks 0 and 3): the full (Nq, Nk, c) table by indexing every pair
    torch.manual_seed(0)
    c = 3
    for qs, ks in [(56, 14), (14, 28)]:
        Rh, Rw = torch.randn(2 * max(qs, ks) - 1, c), torch.randn(2 * max(qs, ks) - 1, c)
        q = torch.randn(1, 1, qs * qs, c)
        ih, iw = mvit.rel_pos_index(qs, ks), mvit.rel_pos_index(qs, ks)
        qh, qw = torch.arange(qs).repeat_interleave(qs), torch.arange(qs).repeat(qs)  # query (h, w), row-major
        kh, kw = torch.arange(ks).repeat_interleave(ks), torch.arange(ks).repeat(ks)
        full = Rh[ih[qh[:, None], kh[None, :]]] + Rw[iw[qw[:, None], kw[None, :]]]  # (Nq, Nk, c)
        want = torch.einsum("qc,qkc->qk", q[0, 0], full)
        got = mvit.decomposed_rel_pos(q, (1, qs, qs), (1, ks, ks), Rh, Rw)[0, 0]
        assert torch.allclose(got, want, atol=1e-5)


def test_rel_pos_tables_interpolate_to_other_resolutions():
    t = torch.randn(27, 4)
    assert mvit.get_rel_pos(t, 27) is t
    assert tuple(mvit.get_rel_pos(t, 55).shape) == (55, 4)
    assert torch.allclose(mvit.get_rel_pos(torch.ones(13, 2), 27), torch.ones(27, 2))
    m = mvit.create_model("tiny", num_classes=3).eval()  # tables built for 32 px
    for shape in [(1, 3, 64, 64), (1, 3, 32, 48)]:
        assert torch.isfinite(m(torch.randn(shape))).all()


# ------------------------------------------------------------------ attention and block


def attention(**kw):
    torch.manual_seed(0)
    cfg = dict(dim=16, dim_out=32, num_heads=2, input_grid=(6, 6), kernel=(3, 3), stride_q=(2, 2),
               stride_kv=(2, 2), has_cls=True)
    cfg.update(kw)
    return mvit.MultiScaleAttention(**cfg).eval()


def test_sdpa_equals_explicit_attention():
    for kw in [dict(), dict(has_cls=False, stride_q=(1, 1))]:
        attn = attention(**kw)
        x = torch.randn(2, 36 + attn.has_cls, 16)
        a, grid = attn(x, (6, 6))
        attn.use_sdpa = False
        b, _ = attn(x, (6, 6))
        assert torch.allclose(a, b, atol=1e-5) and grid == ((3, 3) if kw == {} else (6, 6))


def test_rel_pos_is_added_to_the_logits_unscaled():
    # the official code: logits = (q * d^-0.5) @ k^T + E_rel(q), with E_rel from the *unscaled* q.
    # With k = 0 (norm_k zeroed) the logits are E_rel alone, so out = softmax(E_rel) @ v + q.
    attn = attention(has_cls=False, stride_q=(1, 1))
    with torch.no_grad():
        attn.norm_k.weight.zero_(), attn.norm_k.bias.zero_()
        attn.rel_pos_h.mul_(20), attn.rel_pos_w.mul_(20)
    seen = {}
    attn.norm_q.register_forward_hook(lambda m, i, o: seen.update(q=o))
    attn.norm_v.register_forward_hook(lambda m, i, o: seen.update(v=o))
    x = torch.randn(2, 36, 16)
    out, _ = attn(x, (6, 6))
    q, v = seen["q"], seen["v"]  # (B, n, 36, c), (B, n, 9, c)
    E = mvit.decomposed_rel_pos(q, (1, 6, 6), (1, 3, 3), attn.rel_pos_h, attn.rel_pos_w)
    want = attn.proj((E.softmax(-1) @ v + q).transpose(1, 2).reshape(2, 36, 32))
    assert torch.allclose(out, want, atol=1e-5)


def test_residual_pooling_changes_the_output_but_not_the_cls_row():
    attn = attention()
    x = torch.randn(2, 37, 16)
    with_res, _ = attn(x, (6, 6))
    attn.residual_pooling = False
    without, _ = attn(x, (6, 6))
    assert not torch.allclose(with_res[:, 1:], without[:, 1:], atol=1e-3)  # Z = Attn + Q on the grid tokens
    assert torch.allclose(with_res[:, 0], without[:, 0], atol=1e-6)  # the cls row gets no residual q
    # ... and no relative position: zeroing the tables changes the grid rows only
    with torch.no_grad():
        attn.rel_pos_h.mul_(50), attn.rel_pos_w.mul_(50)
    big, _ = attn(x, (6, 6))
    with torch.no_grad():
        attn.rel_pos_h.zero_(), attn.rel_pos_w.zero_()
    zero, _ = attn(x, (6, 6))
    assert not torch.allclose(big[:, 1:], zero[:, 1:], atol=1e-3)
    # the cls query still attends to grid keys, so its row stays only because no E_rel is added to it
    assert torch.allclose(big[:, 0], zero[:, 0], atol=1e-6)


def test_transition_shortcut_projects_the_normalized_input():
    # LN1(x) does not change when x is scaled, so a transition block (shortcut = pool(proj(LN1(x))))
    # is scale invariant, while an ordinary block (shortcut = x) is not
    torch.manual_seed(0)
    kw = dict(num_heads=2, input_grid=(4, 4), kernel=(3, 3), stride_kv=(1, 1))
    transition = mvit.MultiScaleBlock(16, 32, stride_q=(2, 2), **kw).eval()
    ordinary = mvit.MultiScaleBlock(16, 16, stride_q=(1, 1), **kw).eval()
    x = torch.randn(2, 16, 16)
    y, grid = transition(x, (4, 4))
    assert grid == (2, 2) and tuple(y.shape) == (2, 4, 32)
    assert torch.allclose(transition(3 * x, (4, 4))[0], y, atol=1e-4)
    assert not torch.allclose(ordinary(3 * x, (4, 4))[0], ordinary(x, (4, 4))[0], atol=1e-2)


def test_cls_token_bypasses_pooling_and_is_normalized():
    norm = torch.nn.LayerNorm(4)
    pool = torch.nn.Conv2d(4, 4, 3, 2, 1, groups=4, bias=False)
    x = torch.randn(2, 3, 1 + 36, 4)
    y, grid = mvit.attention_pool(x, pool, norm, (6, 6), has_cls=True)
    assert grid == (3, 3) and tuple(y.shape) == (2, 3, 1 + 9, 4)
    assert torch.allclose(y[:, :, 0], norm(x[:, :, 0]))


# ------------------------------------------------------------------ the command line


def test_smoke_and_a_wrong_weights_file(tmp_path):
    mvit.main(["--smoke", "--out", str(tmp_path / "smoke")])  # raises SystemExit(1) if the loss does not fall
    bad = tmp_path / "other.pt"  # a video model's weights offered to an image model
    torch.save({"model_state": mvit.create_model("tiny", num_classes=6, video=True).state_dict()}, bad)
    with pytest.raises(SystemExit, match="other.pt: does not fit this model: unexpected cls_token"):
        mvit.load_weights(mvit.create_model("tiny", num_classes=6), str(bad), run=None)
