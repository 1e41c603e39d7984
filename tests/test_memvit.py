"""Tests for memvit.py: each checks a property of MeMViT's memory mechanism."""
import torch
import torch.nn.functional as F

import memvit as M


def tiny(**kw):
    torch.manual_seed(0)
    return M.create_model("tiny", **kw).eval()


def clips(n, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 8, 32, 32, generator=g) for _ in range(n)]  # (B, 3, T, S, S) each


@torch.no_grad()
def walk(model, xs, ids=None):
    """Feed one stream of clips; outputs (logits) at every step."""
    model.clear_memory()
    ids = torch.zeros(xs[0].shape[0], dtype=torch.long) if ids is None else ids
    return [model(x, ids) for x in xs]


def test_memory_reaches_forward_only_and_as_far_as_the_support():
    # with `all` (2 memories) and memory in blocks 0 and 2, clip t influences the outputs at
    # t .. t + temporal_support - 1 (here 5 clips: direct reach 2 per memory layer), never before t
    model = tiny(sampler="all")
    assert M.temporal_support(model) == 5
    xs = clips(8)
    base = walk(model, xs)
    t = 1
    xs2 = [x.clone() for x in xs]
    xs2[t] = xs2[t] + 1.0
    out = walk(model, xs2)
    changed = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(base, out)]
    assert changed == [False, True, True, True, True, True, False, False], changed
    # without memory, only clip t itself changes
    model.use_memory = False
    changed = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(walk(model, xs), walk(model, xs2))]
    assert changed == [i == t for i in range(8)]


def test_gap_sampler_skips_t_minus_1_and_selections_follow_the_rule():
    model = tiny(sampler="gap2")
    model.clear_memory()
    got = []
    for x in clips(7, B=1):
        got.append(model.sample_memory())
        with torch.no_grad():
            model(x, torch.zeros(1, dtype=torch.long))
        # the cap: at most keep_max_len - 1 = (ATTN_MAX_LEN - 1) * gap = 4 cached clips per layer
        for blk in model.blocks:
            assert len(blk.attn.cached_k) == len(blk.attn.cached_v) <= 4
    assert got == [[], [], [0], [1], [0, 2], [0, 2], [0, 2]]
    assert M.temporal_support(M.create_model("16")) == 33  # 1 + 8 memory layers x 2 memories x gap 2


def test_cache_is_detached_and_backward_works_at_every_step():
    model = tiny(sampler="all").train()
    for i, x in enumerate(clips(4)):
        loss = F.cross_entropy(model(x, torch.zeros(2, dtype=torch.long)), torch.tensor([0, 1]))
        loss.backward()  # would fail ("backward through the graph a second time") if not detached
        for blk in model.blocks:
            assert all(not m.requires_grad for m in blk.attn.cached_k + blk.attn.cached_v)
        model.zero_grad()


def compressor_grads(sampler, steps=4):
    model = tiny(sampler=sampler).train()
    grads = []
    for x in clips(steps):
        model.zero_grad()
        F.cross_entropy(model(x, torch.zeros(2, dtype=torch.long)), torch.tensor([0, 1])).backward()
        g = model.blocks[0].attn.compress_k.weight.grad
        grads.append(None if g is None else g.abs().sum().item())
    return grads


def test_pipelined_compression_trains_the_compressor():
    # `all`: the t-1 memory is compressed during step t with gradient and attended -> gradient
    g = compressor_grads("all")
    assert g[0] is None and all(v is not None and v > 0 for v in g[1:]), g
    # official gap2 quirk: the freshly compressed t-1 memory is never selected -> no gradient
    assert all(v is None or v == 0 for v in compressor_grads("gap2")), compressor_grads("gap2")


def test_switching_video_stops_reading_the_old_memory():
    model = tiny(sampler="all")
    xs, old = clips(5), clips(3, seed=1)
    same, new = torch.tensor([0, 7]), torch.tensor([1, 7])  # slot 0 moves to video 1, slot 1 stays

    @torch.no_grad()
    def run(history):
        model.clear_memory()
        for x in history:
            model(x, same)
        return [model(x, new) for x in xs[3:]]

    a = run(xs[:3])
    b = run([torch.cat([o[:1], x[1:]]) for o, x in zip(old, xs[:3])])  # other old video in slot 0
    for ya, yb in zip(a, b):
        assert torch.allclose(ya[0], yb[0], atol=1e-6)  # slot 0: the old video no longer matters
    # the rule itself: the switching slot's cached memory is zeroed, the other slot's is kept
    attn = model.blocks[0].attn
    attn.cached_k, attn.cached_v = [torch.ones(2, 5, 3)], [torch.ones(2, 5, 3)]
    attn.cached_ids = [same]
    assert attn.mask_memory(new, [0]) == [0]
    for m in attn.cached_k + attn.cached_v:
        assert m[0].abs().sum() == 0 and torch.equal(m[1], torch.ones(5, 3))
    # batch of one: stale entries are dropped, so the stream restarts exactly like a fresh model
    with torch.no_grad():
        model.clear_memory()
        for x in xs[:3]:
            model(x[:1], torch.tensor([0]))
        switched = [model(x[:1], torch.tensor([1])) for x in xs[3:]]
        fresh = walk(model, [x[:1] for x in xs[3:]], torch.tensor([1]))
    for ys, yf in zip(switched, fresh):
        assert torch.allclose(ys, yf, atol=1e-6)


def test_compressed_memory_shape_official_16():
    # MeMViT-16 block 0: raw memory 8x7x7 (+cls) = 393 tokens -> kernel 7x3x3 stride 4x2x2 -> 2x4x4 (+cls)
    attn = M.MemoryMultiScaleAttention(8, 8, 1, [8, 56, 56], (3, 3, 3), (3, 3, 3), (1, 1, 1),
                                       (1, 8, 8))
    mem = torch.randn(2, 1 + 8 * 7 * 7, 8)
    out, thw = attn.compress(mem, attn.compress_k, attn.norm_compress_k, [8, 7, 7])
    assert thw == [2, 4, 4] and out.shape == (2, 1 + 2 * 4 * 4, 8)
    assert torch.equal(out[:, 0], attn.norm_compress_k(mem[:, 0]))  # cls bypasses the conv


def test_rel_pos_bias_matches_a_slow_reference():
    # every (query, key) pair by hand: current keys use rel_pos_{t,h,w}; memory keys use
    # rel_pos_mem_* with t-index i + (Mt - 1 - j) * stride_t over the concatenated memory frames
    torch.manual_seed(0)
    attn = M.MemoryMultiScaleAttention(4, 4, 1, [4, 4, 4], (3, 3, 3), (3, 3, 3), (1, 1, 1),
                                       (1, 2, 2))
    q_thw, k_thw, mem_thw, num_mem, s = [4, 4, 4], [4, 2, 2], [1, 1, 1], 2, 4
    q = torch.randn(1, 1, 1 + 64, 4)
    fast = attn.rel_pos_bias(q, q_thw, k_thw, mem_thw, num_mem)[0, 0]  # (Nq, Nk)

    def sp(i, j, nq, nk):  # MViTv2 spatial index, finer-grid units
        rq, rk = max(nk / nq, 1), max(nq / nk, 1)
        return int(i * rq - j * rk + (nk - 1) * rk)

    Mt = num_mem * mem_thw[0]
    cols = []  # (kind, t, y, x) or None for a cls column
    for m in range(num_mem):
        cols.append(None)
        cols += [("mem", m * mem_thw[0] + t, y, x) for t in range(mem_thw[0])
                 for y in range(mem_thw[1]) for x in range(mem_thw[2])]
    cols.append(None)
    cols += [("cur", t, y, x) for t in range(4) for y in range(2) for x in range(2)]
    slow = torch.zeros(65, len(cols))
    for n, (t, y, x) in enumerate([(t, y, x) for t in range(4) for y in range(4) for x in range(4)]):
        qv = q[0, 0, 1 + n]
        for c, col in enumerate(cols):
            if col is None:
                continue
            kind, kt, ky, kx = col
            if kind == "cur":
                R = (attn.rel_pos_t[t - kt + 3] + attn.rel_pos_h[sp(y, ky, 4, 2)]
                     + attn.rel_pos_w[sp(x, kx, 4, 2)])
            else:
                R = (attn.rel_pos_mem_t[t + (Mt - 1 - kt) * s]
                     + M.resize_table(attn.rel_pos_mem_h, 7)[sp(y, ky, 4, 1)]
                     + M.resize_table(attn.rel_pos_mem_w, 7)[sp(x, kx, 4, 1)])
            slow[1 + n, c] = qv @ R
    assert torch.allclose(fast, slow, atol=1e-5)


def test_stream_batches_walk_consecutive_clips_of_one_video():
    sampler = M.StreamBatchSampler(num_videos=10, num_clips=3, batch_size=4, train=True)
    torch.manual_seed(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 * 3  # 2 full groups of 4 videos, 3 clips each
    for g in range(2):
        group = batches[3 * g:3 * g + 3]
        for k, batch in enumerate(group):
            assert [v for v, _, _ in batch] == [v for v, _, _ in group[0]]  # same videos per slot
            assert all(kk == k for _, kk, _ in batch)  # clip k at the k-th iteration
            assert all(start == (g == 0 and k == 0) for _, _, start in batch)
    seen = [v for b in batches[::3] for v, _, _ in b]
    assert len(set(seen)) == 8


def test_official_key_layout_16():
    model = M.create_model("16")
    sd = model.state_dict()
    assert len(sd) == 605  # the official AVA MeMViT-16 checkpoint's 621 keys minus 16 box_blocks.0
    assert sd["blocks.1.attn.pool_q.weight"].shape == (48, 1, 3, 3, 3)  # pool-first: 96 / 2 heads
    assert sd["blocks.0.attn.compress_k.weight"].shape == (96, 1, 7, 3, 3)
    assert sd["blocks.0.attn.rel_pos_mem_t"].shape == (23, 96)
    assert sd["blocks.15.attn.rel_pos_h"].shape == (13, 96)  # head dim 96 in every block
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 35.39) < 0.01  # README: 35.4M


def test_synthetic_cue_only_in_the_first_clip():
    d = M.cue_videos(6, num_clips=3, frames=4, size=32, seed=0)
    v = d["videos"].float()  # (n, K, T, 3, S, S)
    assert v.shape == (6, 3, 4, 3, 32, 32)
    colours = torch.tensor([M.C.COLORS[c] for c in M.CUE_COLORS]).float()  # (4, 3)
    for video, label in zip(v, d["labels"]):
        corner = video[:, :, :, 0, 0]  # (K, T, 3) top-left pixel: on the border
        assert torch.allclose(corner[0, 0], colours[label], atol=1.0)
        assert not torch.allclose(corner[1:].reshape(-1, 3).mean(0), colours[label], atol=1.0)


def test_smoke_command(tmp_path):
    M.main(["--smoke", "--out", str(tmp_path)])  # raises SystemExit(1) if the loss does not fall
