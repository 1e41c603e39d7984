"""Tests of mvit.py: each checks a property of MViTv2's mechanism or a number of the official models.
The paper-sized models are built on the meta device (shapes only, no memory, no arithmetic).

The course (mvit.py's Exercises) grades three re-implementations, each by its own tests:
    -k "attention_pool"     attention_pool                     pooling P(.) with the cls token kept apart
    -k "decomposed"         get_rel_pos, decomposed_rel_pos    the decomposed relative positions
    -k "pooling_attention"  MultiScaleAttention.forward        heads, E_rel in the logits, residual pooling
A test of one exercise that needs another exercise's function runs with the slow reference of that
function below (monkeypatched), so that blanking one exercise fails only its own tests."""
import argparse
import itertools
import math

import pytest
import torch

import mvit


def meta_model(name, **kw):
    with torch.device("meta"):
        return mvit.create_model(name, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ slow, obvious references


def cells(grid):
    """The grid positions in token order: row-major (t, h, w), the last axis fastest."""
    return list(itertools.product(*[range(g) for g in grid]))


def ref_pool(x, pool, norm, grid, has_cls):
    """P(.) by hand: grid token number i (after the cls token) is the cell cells(grid)[i]; every
    token is written into its cell of a (B, n, c, [T,] H, W) picture one by one, the picture is pooled
    with the module, read back cell by cell, the cls token is put in front, then the LayerNorm."""
    if pool is None:
        return x, tuple(grid)
    s = int(has_cls)
    B, n, N, c = x.shape
    assert N == s + math.prod(grid)
    pic = x.new_zeros(B, n, c, *grid)
    for i, cell in enumerate(cells(grid)):
        pic[(slice(None),) * 3 + cell] = x[:, :, s + i]
    out = pool(pic.reshape(B * n, c, *grid))
    new_grid = tuple(out.shape[2:])
    out = out.reshape(B, n, c, *new_grid)
    tokens = torch.stack([out[(slice(None),) * 3 + cell] for cell in cells(new_grid)], dim=2)  # (B, n, N', c)
    if has_cls:
        tokens = torch.cat([x[:, :, :1], tokens], dim=2)
    return (norm(tokens) if norm is not None else tokens), new_grid


def ref_index(q_len, k_len):
    """idx[i][j] = floor(i*rq - j*rk + (k_len - 1)*rk), rq = max(k/q, 1), rk = max(q/k, 1): the
    distance in the finer grid's units shifted to start at 0, one pair at a time."""
    rq, rk = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    return torch.tensor([[math.floor(i * rq - j * rk + (k_len - 1) * rk) for j in range(k_len)]
                         for i in range(q_len)])


def ref_resize(table, length):
    """A (L, c) table linearly resized to (length, c) along its rows, row by row by hand: new row r
    sits at r * L / length - 1/2 + 1/2 in the old rows' coordinates (align_corners=False) and mixes the
    two rows around it."""
    L = table.shape[0]
    if L == length:
        return table
    rows = []
    for r in range(length):
        x = min(max((r + 0.5) * L / length - 0.5, 0.0), L - 1)
        lo = math.floor(x)
        hi, a = min(lo + 1, L - 1), x - lo
        rows.append((1 - a) * table[lo] + a * table[hi])
    return torch.stack(rows)


def ref_rel_pos(q, q_grid, k_grid, tables):
    """E[i, j] = q_i . R_{p(i),p(j)} with the full (Nq, Nk, c) table R built by indexing every (query,
    key) pair: R = sum over the axes of table_axis[idx(pos_i[axis], pos_j[axis])]. tables: {axis: table}
    with axis 0 = t, 1 = h, 2 = w (tables of another length resized linearly, as the model does)."""
    qpos, kpos = torch.tensor(cells(q_grid)), torch.tensor(cells(k_grid))  # (Nq, 3), (Nk, 3)
    R = 0
    for ax, table in tables.items():
        table = ref_resize(table, 2 * max(q_grid[ax], k_grid[ax]) - 1)
        idx = ref_index(q_grid[ax], k_grid[ax]).to(table.device)
        R = R + table[idx[qpos[:, ax][:, None], kpos[:, ax][None, :]]]  # (Nq, Nk, c)
    return torch.einsum("bnqc,qkc->bnqk", q, R)


def student_rel_pos(q, q_grid, k_grid, tables):
    """mvit.decomposed_rel_pos behind ref_rel_pos's signature."""
    return mvit.decomposed_rel_pos(q, q_grid, k_grid, tables[1], tables[2], tables.get(0))


def ref_forward(attn, x, grid, pool=ref_pool, rel_pos=ref_rel_pos):
    """MultiScaleAttention.forward written out: the heads cut out of the qkv output by slicing
    ([q | k | v], each [head 0 | head 1 | ...]), dense logits (q * c^-1/2) k^T + E_rel on the grid
    part only (E_rel from the unscaled q), softmax over the keys, + q on the grid rows, the heads
    concatenated, proj. `pool` and `rel_pos` are the P(.) and E_rel to use."""
    B, N, _ = x.shape
    n, D, s = attn.num_heads, attn.dim_out, int(attn.has_cls)
    c = D // n
    y = attn.qkv(x)  # (B, N, 3D)
    q, k, v = (torch.stack([y[..., p * D + h * c:p * D + (h + 1) * c] for h in range(n)], dim=1)
               for p in range(3))  # (B, n, N, c) each
    q, q_grid = pool(q, attn.pool_q, attn.norm_q, grid, attn.has_cls)
    k, k_grid = pool(k, attn.pool_k, attn.norm_k, grid, attn.has_cls)
    v, _ = pool(v, attn.pool_v, attn.norm_v, grid, attn.has_cls)
    logits = (q * c ** -0.5) @ k.transpose(-2, -1)  # (B, n, Nq, Nk)
    if attn.rel_pos:
        g3 = lambda g: tuple(g) if len(g) == 3 else (1, *g)
        tables = {1: attn.rel_pos_h, 2: attn.rel_pos_w}
        if hasattr(attn, "rel_pos_t"):
            tables[0] = attn.rel_pos_t
        E = rel_pos(q[:, :, s:], g3(q_grid), g3(k_grid), tables)  # (B, n, Nq - s, Nk - s)
        logits = torch.cat([logits[:, :, :s], torch.cat([logits[:, :, s:, :s], logits[:, :, s:, s:] + E], -1)], 2)
    z = logits.softmax(-1) @ v  # (B, n, Nq, c)
    if attn.residual_pooling:
        z = torch.cat([z[:, :, :s], z[:, :, s:] + q[:, :, s:]], dim=2)
    return attn.proj(torch.cat([z[:, h] for h in range(n)], dim=-1)), tuple(q_grid)  # (B, Nq, D)


def use_ref_forward(monkeypatch, pool=ref_pool, rel_pos=ref_rel_pos):
    """Run every MultiScaleAttention through ref_forward (for the tests of the other exercises)."""
    monkeypatch.setattr(mvit.MultiScaleAttention, "forward",
                        lambda self, x, grid: ref_forward(self, x, grid, pool, rel_pos))


def use_ref_pool_and_rel_pos(monkeypatch):
    """The model's own forward with the reference P(.) and E_rel (for the pooling_attention tests)."""
    monkeypatch.setattr(mvit, "attention_pool", ref_pool)
    monkeypatch.setattr(mvit, "decomposed_rel_pos", lambda q, qg, kg, h, w, t=None: ref_rel_pos(
        q, qg, kg, {1: h, 2: w} if t is None else {0: t, 1: h, 2: w}))


def perturb(model, seed=0):
    """Non-trivial parameters: LayerNorm weights and biases, qkv/proj biases, cls token, rel-pos
    tables (x 20, so that E_rel moves the softmax) all random; float64 so that equality is tight."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)
    model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(20 * p + 0.5 * rnd(p))
            elif name.endswith("bias") or "cls_token" in name:
                p.copy_(0.3 * rnd(p))
            elif p.ndim == 1:  # LayerNorm weights
                p.copy_(1 + 0.3 * rnd(p))
    return model


def tiny(video=False, **kw):
    torch.manual_seed(0)
    kw = dict(dict(num_classes=5, video=video, num_frames=4), **kw)
    return perturb(mvit.create_model("tiny", **kw)).eval()


def tiny_input(video=False, size=32, seed=1):
    torch.manual_seed(seed)
    return torch.randn((2, 3, 4, size, size) if video else (2, 3, size, size), dtype=torch.float64)


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


def test_kv_pooling_flops_of_T_at_224():
    # fvcore on the official code: 4.70 G multiply-adds (the paper's "4.7 GFLOPs") with the adaptive kv
    # stride 4, 7.42 G with kv stride 1 (no kv pooling); the weights are the same but for the rel-pos
    # tables, which grow to span the finer kv grid (111 rows in the first block either way)
    x = torch.empty(1, 3, 224, 224, device="meta")
    pooled, full = meta_model("T"), meta_model("T", kv_stride=(1, 1))
    g_pooled, g_full = mvit.gflops(pooled, x), mvit.gflops(full, x)
    assert abs(g_pooled - 4.70) < 0.05 and abs(g_full - 7.42) < 0.05
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters() if "rel_pos" not in n)
    assert weights(pooled) == weights(full) and n_params(full) > n_params(pooled)


def test_video_presets_take_the_k400_configs_regularization():
    # SlowFast configs/Kinetics/MVITv2_S_16x4.yaml: DROPPATH_RATE 0.2, MODEL.DROPOUT_RATE 0.5 (B_32x3:
    # 0.3, 0.5); the IN-1K image configs keep 0.1 (S) / 0.3 (B) and no dropout before the head
    for name, (video_dp, image_dp) in {"S": (0.2, 0.1), "B": (0.3, 0.3), "L": (0.75, 0.5)}.items():
        video, image = meta_model(name, video=True, num_classes=400), meta_model(name)
        assert math.isclose(video.blocks[-1].drop_path.p, video_dp), name
        assert math.isclose(image.blocks[-1].drop_path.p, image_dp), name
        assert isinstance(video.head.dropout, torch.nn.Dropout) and video.head.dropout.p == 0.5, name
        assert isinstance(image.head.dropout, torch.nn.Identity), name
    assert meta_model("L", video=True).blocks[2].attn.qkv.weight.shape[0] == 3 * 288  # width doubles in attention
    assert meta_model("S", video=True, drop_path_rate=0.0).blocks[-1].drop_path.p == 0.0  # an override wins


def test_video_models_initialise_as_slowfast_image_models_as_the_image_repo():
    # SlowFast's MViT._init_weights: Linear and Conv2d/Conv3d weights trunc_normal(0.02), Linear and
    # LayerNorm biases 0.02; facebookresearch/mvit's: Linear weights trunc_normal(0.02), biases 0,
    # convolutions left at PyTorch's default (kaiming uniform: std 1/sqrt(3 * fan_in), 0.19 for the
    # 3x3 depthwise pool convs)
    torch.manual_seed(0)
    video, image = mvit.create_model("tiny", video=True, num_frames=8), mvit.create_model("tiny")
    convs = lambda m: [c for c in m.modules() if isinstance(c, (torch.nn.Conv2d, torch.nn.Conv3d))]
    for conv in convs(video):
        assert abs(conv.weight.std().item() - 0.02) < 0.004 and conv.weight.abs().max() <= 2.0
    assert all(conv.weight.std().item() > 0.1 for conv in convs(image) if conv.groups > 1)  # pool convs
    for m, bias in ((video, 0.02), (image, 0.0)):
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.LayerNorm)) and mod.bias is not None:
                assert torch.all(mod.bias == bias), mod
            if isinstance(mod, torch.nn.LayerNorm):
                assert torch.all(mod.weight == 1)
            if isinstance(mod, torch.nn.Linear):
                assert abs(mod.weight.std().item() - 0.02) < 0.004


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


def rows_of(q_len, k_len):
    """get_rel_pos on a table whose row r holds the number r: the row index of every (query, key) pair."""
    table = torch.arange(2 * max(q_len, k_len) - 1, dtype=torch.float64)[:, None]  # (L, 1)
    R = mvit.get_rel_pos(q_len, k_len, table)
    assert tuple(R.shape) == (q_len, k_len, 1)
    return R[..., 0].long()


def test_decomposed_rel_pos_table_rows_examples_and_range():
    # T block 0: q grid 56, kv grid 14 -> row i - 4j + 52 of a table of 111 rows (the last 3 unused)
    idx = rows_of(56, 14)
    i, j = torch.arange(56)[:, None], torch.arange(14)[None, :]
    assert torch.equal(idx, i - 4 * j + 52) and idx.min() == 0 and idx.max() == 107
    # T block 3 (q pooled 28 -> 14, kv stays 28): row 2i - j + 27
    assert torch.equal(rows_of(14, 28), 2 * torch.arange(14)[:, None] - torch.arange(28)[None, :] + 27)
    for q_len, k_len in [(56, 14), (14, 28), (28, 14), (7, 7), (8, 3), (3, 8), (5, 3), (3, 5), (7, 4)]:
        idx = rows_of(q_len, k_len)
        assert idx.min() >= 0 and idx.max() <= 2 * max(q_len, k_len) - 2
        assert torch.equal(idx, ref_index(q_len, k_len)), (q_len, k_len)  # floor, also for ratios like 8/3
    # equal grids: the plain relative distance i - j shifted by L - 1
    assert torch.equal(rows_of(5, 5), torch.arange(5)[:, None] - torch.arange(5)[None, :] + 4)
    # the rows themselves, all channels: R[i, j] = table[idx[i, j]]
    table = torch.randn(2 * 8 - 1, 4)
    assert torch.equal(mvit.get_rel_pos(8, 3, table), table[ref_index(8, 3)])


def test_decomposed_rel_pos_tables_of_another_length_are_resized():
    # a table built for another resolution is linearly resized along its rows to 2 * max - 1
    torch.manual_seed(0)
    for rows, q_len, k_len in [(13, 14, 14), (27, 7, 7), (27, 28, 14), (15, 4, 2)]:
        table = torch.randn(rows, 3, dtype=torch.float64)
        want = ref_resize(table, 2 * max(q_len, k_len) - 1)[ref_index(q_len, k_len)]
        assert torch.allclose(mvit.get_rel_pos(q_len, k_len, table), want, atol=1e-12), (rows, q_len, k_len)
    assert torch.equal(mvit.get_rel_pos(7, 7, torch.ones(27, 2)), torch.ones(7, 7, 2))


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
    ((1, 5, 4), (1, 3, 7), False),  # ratios 5/3 and 7/4: the offsets are not whole numbers
    ((2, 4, 6), (1, 2, 3), True),  # everything pooled, non-square
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


def test_decomposed_rel_pos_full_table_for_large_unequal_grids():
    # 56 vs 14 and 14 vs 28 (T blocks 0 and 3): the full (Nq, Nk, c) table by indexing every pair
    torch.manual_seed(0)
    c = 3
    for qs, ks in [(56, 14), (14, 28)]:
        Rh, Rw = torch.randn(2 * max(qs, ks) - 1, c), torch.randn(2 * max(qs, ks) - 1, c)
        q = torch.randn(1, 1, qs * qs, c)
        ih, iw = ref_index(qs, ks), ref_index(qs, ks)
        qh, qw = torch.arange(qs).repeat_interleave(qs), torch.arange(qs).repeat(qs)  # query (h, w), row-major
        kh, kw = torch.arange(ks).repeat_interleave(ks), torch.arange(ks).repeat(ks)
        full = Rh[ih[qh[:, None], kh[None, :]]] + Rw[iw[qw[:, None], kw[None, :]]]  # (Nq, Nk, c)
        want = torch.einsum("qc,qkc->qk", q[0, 0], full)
        got = mvit.decomposed_rel_pos(q, (1, qs, qs), (1, ks, ks), Rh, Rw)[0, 0]
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("video,size", [(False, 32), (False, 48), (True, 32)])
def test_decomposed_rel_pos_where_the_model_uses_it(monkeypatch, video, size):
    # every block of the tiny model, q and kv grids as the model pools them (8x8 vs 4x4, 4x4 vs 4x4,
    # 2x2 vs 2x2, ...; at 48 px the tables are resized; video adds the t axis and the cls token):
    # the model with decomposed_rel_pos gives the logits it gives with the full pairwise table
    model, x = tiny(video), tiny_input(video, size)
    monkeypatch.setattr(mvit, "attention_pool", ref_pool)  # the blocks' shortcuts
    use_ref_forward(monkeypatch, rel_pos=ref_rel_pos)
    want = model(x)
    use_ref_forward(monkeypatch, rel_pos=lambda q, qg, kg, tables: torch.zeros(
        *q.shape[:3], math.prod(kg), dtype=q.dtype))
    assert not torch.allclose(model(x), want, atol=1e-2)  # E_rel matters with these tables
    use_ref_forward(monkeypatch, rel_pos=student_rel_pos)
    assert torch.allclose(model(x), want, atol=1e-8, rtol=1e-6)


def test_rel_pos_tables_interpolate_to_other_resolutions():
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


def test_pooling_attention_adds_rel_pos_unscaled(monkeypatch):
    # the official code: logits = (q * d^-0.5) @ k^T + E_rel(q), with E_rel from the *unscaled* q.
    # With k = 0 (norm_k zeroed) the logits are E_rel alone, so out = softmax(E_rel) @ v + q.
    use_ref_pool_and_rel_pos(monkeypatch)
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
    E = ref_rel_pos(q, (1, 6, 6), (1, 3, 3), {1: attn.rel_pos_h, 2: attn.rel_pos_w})
    want = attn.proj((E.softmax(-1) @ v + q).transpose(1, 2).reshape(2, 36, 32))
    assert torch.allclose(out, want, atol=1e-5)


def test_pooling_attention_residual_pooling_and_the_cls_row(monkeypatch):
    use_ref_pool_and_rel_pos(monkeypatch)
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


ATTENTIONS = [
    dict(),  # cls token, q and kv pooled by 2, 2 heads
    dict(has_cls=False, stride_q=(1, 1), stride_kv=(2, 2)),  # an ordinary block of an image model
    dict(has_cls=False, stride_q=(2, 2), stride_kv=(1, 1), input_grid=(6, 4)),  # transition, non-square
    dict(dim_out=24, num_heads=3, input_grid=(4, 6, 6), kernel=(3, 3, 3), stride_q=(1, 2, 2),
         stride_kv=(2, 2, 2), rel_pos_t=True),  # video: t table, cls token, 3 heads
]


@pytest.mark.parametrize("kw", ATTENTIONS)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_pooling_attention_equals_a_loop_reference(monkeypatch, kw, use_sdpa):
    # the whole of MultiScaleAttention.forward (heads, P(.) of q, k, v, E_rel on the grid part of the
    # logits, softmax, residual pooling, heads merged, proj) against ref_forward, with random LayerNorm
    # weights and biases, qkv biases and large rel-pos tables; both attention paths
    use_ref_pool_and_rel_pos(monkeypatch)
    attn = perturb(attention(**kw))
    attn.use_sdpa = use_sdpa
    grid = kw.get("input_grid", (6, 6))
    torch.manual_seed(1)
    x = torch.randn(2, int(attn.has_cls) + math.prod(grid), 16, dtype=torch.float64)
    got, got_grid = attn(x, grid)
    want, want_grid = ref_forward(attn, x, grid)
    assert tuple(got_grid) == want_grid and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("video", [False, True])
def test_pooling_attention_in_the_model(monkeypatch, video):
    # every block of the tiny model (image: no cls, kv stride 2 then 1; video: cls token, t axis):
    # the model's own attention gives the logits of ref_forward
    use_ref_pool_and_rel_pos(monkeypatch)
    model, x = tiny(video), tiny_input(video)
    got = model(x)
    use_ref_forward(monkeypatch)
    assert torch.allclose(got, model(x), atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------------ pooling P(.)


@pytest.mark.parametrize("grid,stride,has_cls", [
    ((6, 6), (2, 2), True),  # q pooling of a transition block, with a cls token
    ((8, 8), (4, 4), False),  # kv pooling in the first stage (adaptive stride 4)
    ((6, 4), (2, 1), True),  # non-square grid, unequal strides: H and W must not trade places
    ((5, 7), (1, 1), False),  # stride 1 still pools (3x3 kernel); the grid stays
    ((4, 6, 5), (1, 2, 2), True),  # video: (T, H, W) and a Conv3d
])
def test_attention_pool_equals_a_loop_reference(grid, stride, has_cls):
    torch.manual_seed(0)
    c, d = 4, len(grid)
    conv = (torch.nn.Conv3d if d == 3 else torch.nn.Conv2d)(c, c, 3, stride, 1, groups=c, bias=False)
    norm = torch.nn.LayerNorm(c)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3), norm.bias.normal_(0, 0.5)
    x = torch.randn(2, 3, int(has_cls) + math.prod(grid), c)
    got, got_grid = mvit.attention_pool(x, conv, norm, grid, has_cls)
    want, want_grid = ref_pool(x, conv, norm, grid, has_cls)
    assert tuple(got_grid) == want_grid and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    # the block's shortcut: a max pool (kernel s + 1) and no LayerNorm
    skip = (torch.nn.MaxPool3d if d == 3 else torch.nn.MaxPool2d)(
        [s + 1 if s > 1 else s for s in stride], stride, [(s + 1 if s > 1 else s) // 2 for s in stride])
    got, got_grid = mvit.attention_pool(x, skip, None, grid, has_cls)
    want, want_grid = ref_pool(x, skip, None, grid, has_cls)
    assert tuple(got_grid) == want_grid and torch.equal(got, want)


def test_attention_pool_keeps_the_cls_token_apart_and_normalizes_it():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3), norm.bias.normal_(0, 0.5)
    pool = torch.nn.Conv2d(4, 4, 3, 2, 1, groups=4, bias=False)
    x = torch.randn(2, 3, 1 + 36, 4)
    y, grid = mvit.attention_pool(x, pool, norm, (6, 6), has_cls=True)
    assert tuple(grid) == (3, 3) and tuple(y.shape) == (2, 3, 1 + 9, 4)
    assert torch.allclose(y[:, :, 0], norm(x[:, :, 0]), atol=1e-6)  # first, not pooled, normalized
    x2 = x.clone()
    x2[:, :, 0] += 3.0  # another cls token: the pooled grid tokens must not see it
    assert torch.allclose(mvit.attention_pool(x2, pool, norm, (6, 6), True)[0][:, :, 1:], y[:, :, 1:], atol=1e-6)
    y3, _ = mvit.attention_pool(x[:, :, 1:], pool, norm, (6, 6), has_cls=False)  # no cls: nothing set apart
    assert torch.allclose(y3, y[:, :, 1:], atol=1e-6)
    same, g = mvit.attention_pool(x, None, None, (6, 6), True)  # no pool (1x1 kernel, stride 1): identity
    assert same is x and tuple(g) == (6, 6)


@pytest.mark.parametrize("video", [False, True])
def test_attention_pool_where_the_model_uses_it(monkeypatch, video):
    # q, k, v of every attention and the shortcut of every transition block of the tiny model (video:
    # with a cls token), through attention_pool: the logits equal those with the loop reference
    model, x = tiny(video), tiny_input(video)
    monkeypatch.setattr(mvit, "attention_pool", ref_pool)  # the blocks' shortcuts
    use_ref_forward(monkeypatch, pool=ref_pool)
    want = model(x)
    monkeypatch.undo()
    use_ref_forward(monkeypatch, pool=mvit.attention_pool)
    assert torch.allclose(model(x), want, atol=1e-8, rtol=1e-6)


def test_attention_pool_sizes_reaching_attention():
    # the q and k/v token counts each attention of MViTv2-T at 224 (no cls) and of the K400 MViTv2-S
    # (cls token, kv stride 1x8x8 in stage 1; 4 frames here instead of 16) computes with: P(.) with each block's own q and kv
    # pools on the grid the block before it returns
    def sizes(model, grid):
        seen = []
        for blk in model.blocks:
            a = blk.attn
            x = torch.zeros(1, a.num_heads, int(a.has_cls) + math.prod(grid), a.dim_out // a.num_heads)
            with torch.no_grad():  # the meta model's pools and norms made real (uninitialized: sizes only)
                (q, q_grid), (k, k_grid) = [mvit.attention_pool(x, p.to_empty(device="cpu"),
                                                                norm.to_empty(device="cpu"), grid, a.has_cls)
                                            for p, norm in ((a.pool_q, a.norm_q), (a.pool_k, a.norm_k))]
            seen.append((q.shape[2], tuple(q_grid), k.shape[2], tuple(k_grid)))
            grid = q_grid
        return seen

    q_side = [56, 28, 28, 14, 14, 14, 14, 14, 7, 7]
    kv_side = [14, 28, 14, 28, 14, 14, 14, 14, 14, 7]
    assert sizes(meta_model("T"), (56, 56)) == [(q * q, (q, q), k * k, (k, k)) for q, k in zip(q_side, kv_side)]
    seen = sizes(meta_model("S", video=True, num_frames=4, num_classes=400), (2, 56, 56))
    cube = lambda t, s: (1 + t * s * s, (t, s, s))
    assert seen[0] == cube(2, 56) + cube(2, 7)  # kv stride 1x8x8
    assert seen[1] == cube(2, 28) + cube(2, 14)  # transition: q 56 -> 28, kv stride 1x4x4 (56 -> 14)
    assert seen[3] == cube(2, 14) + cube(2, 14)  # transition: q 28 -> 14, kv stride 1x2x2
    assert seen[-1] == cube(2, 7) + cube(2, 7)


# ------------------------------------------------------------------ MViTv1's attention (the Explore switches)


def test_mvitv1_attention_without_rel_pos_ignores_where_the_keys_are():
    # with no pooling (1x1 kernel, stride 1) and no rel-pos, attention cannot tell positions apart:
    # shuffling the tokens shuffles the output rows the same way. E_rel is what breaks this.
    torch.manual_seed(0)
    kw = dict(dim=8, dim_out=8, num_heads=2, input_grid=(4, 4), kernel=(1, 1), stride_q=(1, 1), stride_kv=(1, 1))
    x, perm = torch.randn(2, 16, 8, dtype=torch.float64), torch.randperm(16)
    for rel_pos, equivariant in [(False, True), (True, False)]:
        attn = perturb(mvit.MultiScaleAttention(rel_pos=rel_pos, **kw)).eval()
        assert attn.pool_q is None and attn.pool_k is None
        out, _ = attn(x, (4, 4))
        shuffled, _ = attn(x[:, perm], (4, 4))
        assert torch.allclose(shuffled, out[:, perm], atol=1e-9) == equivariant


def test_mvitv1_switches_of_the_command_line():
    # --no_rel_pos drops every rel-pos table, --no_residual_pooling the + Q, --kv_stride the kv pooling
    def build(kv_stride=None, no_rel_pos=False, no_residual_pooling=False):
        args = argparse.Namespace(video=False, kv_stride=kv_stride, no_rel_pos=no_rel_pos,
                                  no_residual_pooling=no_residual_pooling)
        return mvit.create_model("tiny", num_classes=3, **mvit.design_overrides(args))
    torch.manual_seed(0)
    base, v1 = build(), build(no_rel_pos=True, no_residual_pooling=True)
    tables = sum(p.numel() for n, p in base.named_parameters() if "rel_pos" in n)
    assert tables > 0 and n_params(base) - n_params(v1) == tables
    assert not any(b.attn.rel_pos or b.attn.residual_pooling for b in v1.blocks)
    assert [b.attn.pool_k.stride for b in build(kv_stride=[1, 1]).blocks] == [(1, 1)] * 4
    assert [b.attn.pool_k.stride for b in base.blocks] == [(2, 2), (1, 1), (1, 1), (1, 1)]


# ------------------------------------------------------------------ the command line


def test_smoke_and_a_wrong_weights_file(tmp_path):
    mvit.main(["--smoke", "--out", str(tmp_path / "smoke")])  # raises SystemExit(1) if the loss does not fall
    bad = tmp_path / "other.pt"  # a video model's weights offered to an image model
    torch.save({"model_state": mvit.create_model("tiny", num_classes=6, video=True).state_dict()}, bad)
    with pytest.raises(SystemExit, match="other.pt: does not fit this model: unexpected cls_token"):
        mvit.load_weights(mvit.create_model("tiny", num_classes=6), str(bad), run=None)
