"""Tests for memvit.py: each checks a property of MeMViT's memory mechanism.

The tests of one exercise (their names hold its -k word: cache, compress, memory_positions,
switch) run the model with the OTHER exercises' functions replaced by the slow references below
(`use_refs`), so that a blanked or wrong function fails only its own exercise."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import memvit as M

Attn = M.MemoryMultiScaleAttention

# ------------------------------------------------------------------ slow, obvious references


def ref_sample_memory(self):
    """Clips t-gap, t-2gap, ... (at most ATTN_MAX_LEN - 1 of them), as indices into the cache of
    length L, oldest first; `all` is gap 1."""
    L = len(self.blocks[0].attn.cached_k)
    gap = int(self.sampler[3:]) if self.sampler.startswith("gap") else 1
    back = [j * gap for j in range(1, self.blocks[0].attn.attn_max_len) if j * gap <= L]
    return sorted(L - b for b in back)


def ref_mask_memory(self, ids, selections):
    """Zero the cached clips of another video, sample by sample; drop them when the cache holds
    batches of one (its oldest entry says, not the current batch: the official rule)."""
    B = len(ids)
    if self.cached_k and self.cached_k[0].shape[0] == 1:
        keep = [i for i in range(len(self.cached_ids)) if int(self.cached_ids[i][0]) == int(ids[0])]
        self.cached_k = [self.cached_k[i] for i in keep]
        self.cached_v = [self.cached_v[i] for i in keep]
        self.cached_ids = [self.cached_ids[i] for i in keep]
        return [keep.index(s) for s in selections if s in keep]
    for i in range(len(self.cached_ids)):
        for b in range(B):
            if int(self.cached_ids[i][b]) != int(ids[b]):
                self.cached_k[i] = self.cached_k[i].clone()
                self.cached_v[i] = self.cached_v[i].clone()
                self.cached_k[i][b] = 0.0
                self.cached_v[i][b] = 0.0
    return selections


def ref_compress(self, mem, pool, norm, thw):
    """f(M) = LN(depthwise Conv3d(M)) on the T x H x W grid; the cls token only goes through LN."""
    B, N, D = mem.shape
    grid = mem[:, 1:].transpose(1, 2).reshape(B, D, *thw)  # (B, D, T, H, W)
    y = F.conv3d(grid, pool.weight, None, pool.stride, pool.padding, groups=D)
    out = torch.cat([mem[:, :1], y.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + T'H'W', D)
    return norm(out), list(y.shape[2:])


def ref_compress_previous(self, thw):
    if len(self.cached_k) < 2:
        return None
    self.cached_k[-2], out = ref_compress(self, self.cached_k[-2], self.compress_k,
                                          self.norm_compress_k, thw)
    self.cached_v[-2], _ = ref_compress(self, self.cached_v[-2], self.compress_v,
                                        self.norm_compress_v, thw)
    return out


def ref_update_memory(self, k, v, thw, ids, selections):
    selections = self.mask_memory(ids, selections)
    self.cached_k, self.cached_v = self.cached_k + [k.detach()], self.cached_v + [v.detach()]
    self.cached_ids = self.cached_ids + [ids]
    mem_thw = self.compress_previous(thw)
    mem_k = [self.cached_k[i][:len(ids)] for i in selections]
    mem_v = [self.cached_v[i][:len(ids)] for i in selections]
    if len(self.cached_k) > 1:
        self.cached_k[-2] = self.cached_k[-2].detach()
        self.cached_v[-2] = self.cached_v[-2].detach()
    while len(self.cached_k) >= self.keep_max_len:
        self.cached_k, self.cached_v = self.cached_k[1:], self.cached_v[1:]
        self.cached_ids = self.cached_ids[1:]
    return mem_k, mem_v, mem_thw


def sp(i, j, nq, nk):
    """MViTv2 spatial rel-pos index, in the finer grid's units."""
    rq, rk = max(nk / nq, 1), max(nq / nk, 1)
    return int(i * rq - j * rk + (nk - 1) * rk)


def ref_table(table, length):
    """The table linearly resampled to `length` rows (align_corners=False, as F.interpolate), by
    hand: row r reads the source at x = (r + 0.5) * L / length - 0.5, clamped to the ends."""
    L = table.shape[0]
    if L == length:
        return table
    rows = []
    for r in range(length):
        x = min(max((r + 0.5) * L / length - 0.5, 0.0), L - 1.0)
        lo = int(x)
        hi = min(lo + 1, L - 1)
        rows.append(table[lo] * (1 - (x - lo)) + table[hi] * (x - lo))
    return torch.stack(rows)


def ref_memory_rel_pos(self, r_q, mem_thw, num_mem):
    """One column per memory key, built from its clip-wide frame number: q . (R_t + R_h + R_w)."""
    B, n, qt, qh, qw, d = r_q.shape
    mt, mh, mw = mem_thw
    Mt, s = num_mem * mt, self.compress_stride[0]
    Th = ref_table(self.rel_pos_mem_h, 2 * max(qh, mh) - 1)
    Tw = ref_table(self.rel_pos_mem_w, 2 * max(qw, mw) - 1)
    cols = []
    for m in range(num_mem):
        cols.append(r_q.new_zeros(B, n, qt * qh * qw))  # the memory's cls column
        for j in range(mt):
            frame = m * mt + j  # in the list of all memory frames, oldest first
            for y in range(mh):
                for x in range(mw):
                    Rt = self.rel_pos_mem_t[[i + (Mt - 1 - frame) * s for i in range(qt)]]
                    Rh = Th[[sp(i, y, qh, mh) for i in range(qh)]]
                    Rw = Tw[[sp(i, x, qw, mw) for i in range(qw)]]
                    R = Rt[:, None, None] + Rh[None, :, None] + Rw[None, None, :]  # (qt, qh, qw, d)
                    cols.append(torch.einsum("bnthwd,thwd->bnthw", r_q, R).reshape(B, n, -1))
    return torch.stack(cols, dim=-1)  # (B, n, Nq-1, num_mem * (1 + mt mh mw))


REFS = {"update_memory": ref_update_memory, "compress_previous": ref_compress_previous,
        "compress": ref_compress, "memory_rel_pos": ref_memory_rel_pos,
        "mask_memory": ref_mask_memory}


def use_refs(monkeypatch, *own):
    """Replace every exercise function except `own` (the exercise under test) by its reference."""
    for name, fn in REFS.items():
        if name not in own:
            monkeypatch.setattr(Attn, name, fn)
    if "sample_memory" not in own:
        monkeypatch.setattr(M.MeMViT, "sample_memory", ref_sample_memory)


CACHE = ("update_memory", "sample_memory")
COMPRESS = ("compress", "compress_previous")
POSITIONS = ("memory_rel_pos",)
SWITCH = ("mask_memory",)

# ---------------------------------------------------------- one attention layer, from scratch

LAYER = dict(dim=8, dim_out=16, num_heads=2, input_size=[8, 8, 8], kernel_q=(3, 3, 3),
             kernel_kv=(3, 3, 3), stride_q=(1, 2, 2), stride_kv=(1, 2, 2))


def layer(attn_max_len, gap, seed=0):
    torch.manual_seed(seed)
    attn = Attn(**LAYER, attn_max_len=attn_max_len, keep_max_len=(attn_max_len - 1) * gap + 1)
    with torch.no_grad():  # non-trivial: LN biases/weights, Linear biases, tables, compressor
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return attn


def ref_pooled(mod, x, thw):
    """Step 1 of the layer: q (B, n, Nq, hd) projected; k, v (B, 1 + Nk, dim) before the Linear."""
    B, N, dim = x.shape
    n = mod.num_heads
    xh = x.reshape(B, N, n, dim // n).transpose(1, 2)  # (B, n, N, dim/n)
    q, q_thw = M.pool_tokens(xh, mod.pool_q, thw, mod.norm_q)
    k, k_thw = M.pool_tokens(xh, mod.pool_k, thw, mod.norm_k)
    v, _ = M.pool_tokens(xh, mod.pool_v, thw, mod.norm_v)
    Nq, Nk = q.shape[2], k.shape[2]
    q = mod.q(q.transpose(1, 2).reshape(B, Nq, dim)).reshape(B, Nq, n, -1).transpose(1, 2)
    k, v = k.transpose(1, 2).reshape(B, Nk, dim), v.transpose(1, 2).reshape(B, Nk, dim)
    return q, k, v, q_thw, k_thw


def ref_layer(mods, xs, thw, t, clips, other_video):
    """The layer's output at step t computed from scratch over explicitly listed clips.
    mods[s]: the layer's parameters at step s (they change from step to step, like after an
    optimizer step; mods[t] is the one to differentiate). clips: the clips tau < t to attend,
    oldest first. other_video[tau]: (B,) bool, samples whose clip tau is from another video.
    Memory of clip tau = its pooled k/v made at step tau with mods[tau], compressed ONCE at step
    tau + 1 with mods[tau + 1] (with gradient only when tau + 1 == t), zeroed for another video
    (before compression if tau = t - 1, so f(0) = LN bias), projected by mods[t]."""
    cur = mods[t]
    q, k, v, q_thw, k_thw = ref_pooled(cur, xs[t], thw)
    mem_k, mem_v = [], []
    for tau in clips:
        with torch.no_grad():
            _, k_raw, v_raw, _, _ = ref_pooled(mods[tau], xs[tau], thw)
        gone = other_video[tau][:, None, None]
        if tau == t - 1:
            k_raw, v_raw = torch.where(gone, 0.0, k_raw), torch.where(gone, 0.0, v_raw)
        with torch.set_grad_enabled(tau == t - 1):
            f = mods[tau + 1]
            mk, mem_thw = ref_compress(f, k_raw, f.compress_k, f.norm_compress_k, k_thw)
            mv, _ = ref_compress(f, v_raw, f.compress_v, f.norm_compress_v, k_thw)
        if tau < t - 1:
            mk, mv = torch.where(gone, 0.0, mk), torch.where(gone, 0.0, mv)
        mem_k.append(mk)
        mem_v.append(mv)
    B, n = q.shape[:2]
    K = cur.k(torch.cat(mem_k + [k], 1)).reshape(B, -1, n, cur.dim_out // n).transpose(1, 2)
    V = cur.v(torch.cat(mem_v + [v], 1)).reshape(B, -1, n, cur.dim_out // n).transpose(1, 2)
    E = cur.rel_pos_bias(q, q_thw, k_thw, None, 0)  # current-clip columns (MViTv2)
    if clips:
        r_q = q[:, :, 1:].reshape(B, n, *q_thw, -1)
        E_mem = ref_memory_rel_pos(cur, r_q, mem_thw, len(clips))  # (B, n, Nq-1, Nmem)
        E = torch.cat([F.pad(E_mem, (0, 0, 1, 0)), E], dim=-1)  # cls query row: 0
    P = torch.softmax(q @ K.transpose(-2, -1) * cur.scale + E, dim=-1)  # (B, n, Nq, Nk_total)
    out = P @ V
    out = torch.cat([out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]], dim=2)
    return cur.proj(out.transpose(1, 2).reshape(B, q.shape[2], -1))


def check_layer(attn_max_len, gap, steps=6, switch_at=None):
    """Run the layer clip after clip (its cache carried), changing every parameter between
    steps, and compare each step's output and every parameter's gradient with ref_layer."""
    attn = layer(attn_max_len, gap)
    g = torch.Generator().manual_seed(1)
    thw, B = LAYER["input_size"], 2
    xs = [torch.randn(B, 1 + 8 * 8 * 8, 8, generator=g) for _ in range(steps)]
    ids = [torch.tensor([0 if switch_at is None or t < switch_at else 1, 7]) for t in range(steps)]
    mods, keep = [], attn.keep_max_len
    attn.clear_memory()
    for t in range(steps):
        with torch.no_grad():
            for p in attn.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        mods.append(Attn(**LAYER, attn_max_len=attn_max_len, keep_max_len=keep))
        mods[-1].load_state_dict(attn.state_dict())
        L = min(t, keep - 1)  # cached clips t-L .. t-1
        clips = [t - j * gap for j in range(attn_max_len - 1, 0, -1) if t - j * gap >= 0]
        sel = [tau - (t - L) for tau in clips]
        w = torch.randn(B, 1 + 8 * 4 * 4, 16, generator=g)
        attn.zero_grad()
        out, q_thw = attn(xs[t], thw, sel, ids[t])
        (out * w).sum().backward()
        other = {tau: ids[tau] != ids[t] for tau in range(t)}
        ref = ref_layer(mods, xs, thw, t, clips, other)
        (ref * w).sum().backward()
        assert q_thw == [8, 4, 4]
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (t, (out - ref).abs().max())
        for (name, p), p_ref in zip(attn.named_parameters(), mods[t].parameters()):
            a = torch.zeros_like(p) if p.grad is None else p.grad
            b = torch.zeros_like(p) if p_ref.grad is None else p_ref.grad
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (t, name, (a - b).abs().max())
        assert len(attn.cached_k) == len(attn.cached_v) == min(t + 1, keep - 1)


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


# ------------------------------------------------------------------ exercise: the memory cache


@pytest.mark.parametrize("gap, switch_at", [(1, None), (2, None), (1, 4)])
def test_cache_layer_matches_attention_over_explicit_clips(monkeypatch, gap, switch_at):
    # the layer's own forward, clip after clip, against attention over the explicitly listed
    # memory clips: detached, compressed once, selected oldest first, cache capped
    use_refs(monkeypatch, *CACHE)
    check_layer(3, gap, switch_at=switch_at)


def test_cache_reaches_forward_only_and_as_far_as_the_support(monkeypatch):
    use_refs(monkeypatch, *CACHE)
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


def test_cache_gap_sampler_skips_t_minus_1_and_selections_follow_the_rule(monkeypatch):
    use_refs(monkeypatch, *CACHE)
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
    # `all` attends every cached clip, at most ATTN_MAX_LEN - 1 = 2 of them; gap3 and a longer
    # ATTN_MAX_LEN follow the same rule (t-3, t-6, t-9: the cache holds 9 clips at most)
    for sampler, attn_max_len, want in (
            ("all", 3, [[], [0], [0, 1], [0, 1], [0, 1]]),
            ("gap3", 4, [[], [], [], [0], [1], [2], [0, 3], [1, 4], [2, 5], [0, 3, 6], [0, 3, 6]])):
        model = tiny(sampler=sampler, attn_max_len=attn_max_len)
        model.clear_memory()
        got = []
        for x in clips(len(want), B=1):
            got.append(model.sample_memory())
            with torch.no_grad():
                model(x, torch.zeros(1, dtype=torch.long))
        assert got == want, (sampler, got)
        for blk in model.blocks:  # the cap: (ATTN_MAX_LEN - 1) * gap clips kept = 2, 9
            kept = 2 if sampler == "all" else 9
            assert len(blk.attn.cached_k) == len(blk.attn.cached_v) == kept
    assert M.temporal_support(M.create_model("16")) == 33  # 1 + 8 memory layers x 2 memories x gap 2


def test_cache_is_detached_and_backward_works_at_every_step(monkeypatch):
    use_refs(monkeypatch, *CACHE)
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


# ------------------------------------------------------------------ exercise: memory compression


def test_compress_matches_a_slow_depthwise_conv():
    # f(M): every output token by hand, sum over the 7x3x3 window of the zero-padded grid,
    # then LayerNorm (perturbed); the cls token skips the conv but not the LayerNorm
    torch.manual_seed(0)
    attn = Attn(4, 4, 1, [8, 6, 4], (3, 3, 3), (3, 3, 3), (1, 1, 1), (1, 1, 1))
    with torch.no_grad():
        for p in (attn.norm_compress_k.weight, attn.norm_compress_k.bias):
            p.add_(torch.randn_like(p))
    thw, D = [8, 6, 4], 4
    mem = torch.randn(2, 1 + 8 * 6 * 4, D)
    out, thw_c = attn.compress(mem, attn.compress_k, attn.norm_compress_k, thw)
    assert thw_c == [2, 3, 2]  # ceil over stride 4x2x2 with padding 3x1x1
    grid = mem[:, 1:].reshape(2, 8, 6, 4, D)  # (B, T, H, W, D): token order t, y, x
    w = attn.compress_k.weight[:, 0]  # (D, 7, 3, 3)
    want = [mem[:, 0]]
    for t in range(2):
        for y in range(3):
            for x in range(2):
                acc = torch.zeros(2, D)
                for a in range(7):
                    for b in range(3):
                        for c in range(3):
                            tt, yy, xx = 4 * t - 3 + a, 2 * y - 1 + b, 2 * x - 1 + c
                            if 0 <= tt < 8 and 0 <= yy < 6 and 0 <= xx < 4:
                                acc = acc + grid[:, tt, yy, xx] * w[:, a, b, c]
                want.append(acc)
    want = attn.norm_compress_k(torch.stack(want, dim=1))  # (B, 1 + 12, D)
    assert torch.allclose(out, want, atol=1e-5)


def test_compress_shape_official_16():
    # MeMViT-16 block 0: raw memory 8x7x7 (+cls) = 393 tokens -> kernel 7x3x3 stride 4x2x2 -> 2x4x4 (+cls)
    attn = M.MemoryMultiScaleAttention(8, 8, 1, [8, 56, 56], (3, 3, 3), (3, 3, 3), (1, 1, 1),
                                       (1, 8, 8))
    mem = torch.randn(2, 1 + 8 * 7 * 7, 8)
    out, thw = attn.compress(mem, attn.compress_k, attn.norm_compress_k, [8, 7, 7])
    assert thw == [2, 4, 4] and out.shape == (2, 1 + 2 * 4 * 4, 8)
    assert torch.equal(out[:, 0], attn.norm_compress_k(mem[:, 0]))  # cls bypasses the conv


@pytest.mark.parametrize("gap", [1, 2])
def test_compress_pipelined_layer_matches_attention_over_explicit_clips(monkeypatch, gap):
    # compressed once, at the next step, with that step's weights and with gradient: the
    # compressor's gradient at step t comes from step t's loss through f(M_{t-1})
    use_refs(monkeypatch, *COMPRESS)
    check_layer(3, gap)


def test_compress_pipelined_trains_the_compressor_with_all_not_gap2(monkeypatch):
    use_refs(monkeypatch, *COMPRESS)
    # `all`: the t-1 memory is compressed during step t with gradient and attended -> gradient
    g = compressor_grads("all")
    assert g[0] is None and all(v is not None and v > 0 for v in g[1:]), g
    # official gap2 quirk: the freshly compressed t-1 memory is never selected -> no gradient
    assert all(v is None or v == 0 for v in compressor_grads("gap2")), compressor_grads("gap2")


# ------------------------------------------------------------------ exercise: switching video


@pytest.mark.parametrize("gap", [1, 2])
def test_switch_layer_zeroes_the_other_videos_memory(monkeypatch, gap):
    # slot 0 moves to another video at step 3: its cached clips are zeroed, not dropped nor
    # masked (after W_k a zero memory is the k bias; a raw t-1 memory zeroed and then
    # compressed is the LayerNorm bias); slot 1 keeps its memory
    use_refs(monkeypatch, *SWITCH)
    check_layer(3, gap, switch_at=3)


def test_switching_video_stops_reading_the_old_memory(monkeypatch):
    use_refs(monkeypatch, *SWITCH)
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


def test_switch_decided_by_the_stored_batch_not_the_current_one(monkeypatch):
    use_refs(monkeypatch, *SWITCH)
    # official mask_memory: entries are dropped only when the CACHE holds batches of one
    # (cached_mem[0].shape[0] == 1); a batch of one after a batch of two (the last, smaller batch
    # of an evaluation) zeroes sample 0's memory of another video and keeps every cached clip
    attn = Attn(**LAYER)
    attn.cached_k = [torch.ones(2, 5, 3), torch.ones(2, 5, 3)]
    attn.cached_v = [torch.ones(2, 5, 3), torch.ones(2, 5, 3)]
    attn.cached_ids = [torch.tensor([0, 7]), torch.tensor([1, 7])]
    assert attn.mask_memory(torch.tensor([1]), [0, 1]) == [0, 1]
    assert len(attn.cached_k) == len(attn.cached_v) == len(attn.cached_ids) == 2
    for m in (attn.cached_k[0], attn.cached_v[0]):  # clip of video 0: sample 0 zeroed, 1 kept
        assert m[0].abs().sum() == 0 and torch.equal(m[1], torch.ones(5, 3))
    for m in (attn.cached_k[1], attn.cached_v[1]):  # clip of video 1: untouched
        assert torch.equal(m, torch.ones(2, 5, 3))
    # in the model: two streams for 3 clips, then one stream of another video. Its memory is
    # zeroed, not dropped: the old video no longer matters, but the zero memory still takes
    # attention (after W_k it is the k bias), so the output is not a fresh model's
    model = tiny(sampler="all")
    xs, old = clips(4), clips(3, seed=1)

    @torch.no_grad()
    def after(history):
        model.clear_memory()
        for x in history:
            model(x, torch.tensor([0, 7]))
        return model(xs[3][:1], torch.tensor([1]))

    a, b = after(xs[:3]), after(old)
    assert torch.allclose(a, b, atol=1e-6)
    fresh = walk(model, [xs[3][:1]], torch.tensor([1]))[0]
    assert not torch.allclose(a, fresh, atol=1e-4)


# ------------------------------------------------------------------ exercise: memory positions


@pytest.mark.parametrize("input_size, k_thw, mem_thw, num_mem", [
    ([4, 4, 4], [4, 2, 2], [1, 1, 1], 2),
    ([8, 4, 4], [8, 2, 2], [2, 2, 2], 2),
    ([8, 4, 4], [8, 2, 2], [2, 1, 2], 1)])
def test_memory_positions_bias_matches_a_slow_reference(input_size, k_thw, mem_thw, num_mem):
    # every (query, key) pair by hand, 2 heads sharing the tables: current keys use
    # rel_pos_{t,h,w}; memory keys use rel_pos_mem_* with t-index i + (Mt - 1 - j) * stride_t,
    # j the key's frame in the list of all memory frames (oldest memory first)
    torch.manual_seed(0)
    attn = Attn(8, 8, 2, input_size, (3, 3, 3), (3, 3, 3), (1, 1, 1), (1, 2, 2))
    with torch.no_grad():
        for p in (attn.rel_pos_mem_t, attn.rel_pos_mem_h, attn.rel_pos_mem_w):
            p.normal_()
    q_thw, s = input_size, 4
    qt, qh, qw = q_thw
    q = torch.randn(1, 2, 1 + qt * qh * qw, 4)
    fast = attn.rel_pos_bias(q, q_thw, k_thw, mem_thw, num_mem)[0]  # (n, Nq, Nk)

    mt, mh, mw = mem_thw
    Mt = num_mem * mt
    cols = []  # (kind, t, y, x) or None for a cls column
    for m in range(num_mem):
        cols.append(None)
        cols += [("mem", m * mt + t, y, x) for t in range(mt) for y in range(mh) for x in range(mw)]
    cols.append(None)
    cols += [("cur", t, y, x) for t in range(k_thw[0]) for y in range(k_thw[1])
             for x in range(k_thw[2])]
    Th = ref_table(attn.rel_pos_mem_h, 2 * max(qh, mh) - 1)
    Tw = ref_table(attn.rel_pos_mem_w, 2 * max(qw, mw) - 1)
    slow = torch.zeros(2, 1 + qt * qh * qw, len(cols))
    queries = [(t, y, x) for t in range(qt) for y in range(qh) for x in range(qw)]
    for n, (t, y, x) in enumerate(queries):
        for c, col in enumerate(cols):
            if col is None:
                continue
            kind, kt, ky, kx = col
            if kind == "cur":
                R = (attn.rel_pos_t[t - kt + k_thw[0] - 1] + attn.rel_pos_h[sp(y, ky, qh, k_thw[1])]
                     + attn.rel_pos_w[sp(x, kx, qw, k_thw[2])])
            else:
                R = (attn.rel_pos_mem_t[t + (Mt - 1 - kt) * s] + Th[sp(y, ky, qh, mh)]
                     + Tw[sp(x, kx, qw, mw)])
            slow[:, 1 + n, c] = q[0, :, 1 + n] @ R
    assert torch.allclose(fast, slow, atol=1e-4)


def test_memory_positions_layer_matches_attention_over_explicit_clips(monkeypatch):
    # in the layer's own forward: 2 memories of 2x2x2 compressed tokens each
    use_refs(monkeypatch, *POSITIONS)
    check_layer(3, 1, steps=4)


def test_memory_positions_space_terms_computed_once_for_all_memories():
    # the official cost (attention.py cal_rel_pos_spatial / _temporal): every memory has the same
    # compressed grid, so q . R_h and q . R_w are computed ONCE and shared by the m memories, and
    # q . R_t once over all Mt frames: 2 * B n qt qh qw d * (Mt + mh + mw) FLOPs. Recomputing the
    # space terms per memory costs 2 * B n qt qh qw d * m (mt + mh + mw) (MeMViT-16 with two
    # memories: +2.42% FLOPs over no memory instead of the official +2.32%)
    torch.manual_seed(0)
    attn = Attn(8, 8, 2, [8, 4, 4], (3, 3, 3), (3, 3, 3), (1, 1, 1), (1, 2, 2))
    B, n, qt, qh, qw, d = 2, 2, 8, 4, 4, 4
    r_q = torch.randn(B, n, qt, qh, qw, d)
    mt, mh, mw = 2, 2, 2
    for num_mem in (1, 2):
        flops = M.C.count_flops(lambda: attn.memory_rel_pos(r_q, [mt, mh, mw], num_mem))
        assert flops == 2 * B * n * qt * qh * qw * d * (num_mem * mt + mh + mw), (num_mem, flops)


# ------------------------------------------------------------------ the ordinary parts


def test_rel_pos_helpers_match_a_slow_reference():
    # get_rel_pos: the stride rule R[i, j] = table[i max(k/q, 1) - j max(q/k, 1) + (k-1) max(q/k, 1)]
    # for unequal grids both ways; a table of another length is linearly interpolated first
    torch.manual_seed(0)
    for q, k in ((8, 2), (2, 4), (3, 3)):
        table = torch.randn(2 * max(q, k) - 1, 5)
        R = M.get_rel_pos(q, k, table)
        assert R.shape == (q, k, 5)
        for i in range(q):
            for j in range(k):
                assert torch.equal(R[i, j], table[sp(i, j, q, k)])
    short = torch.randn(5, 3)  # 5 rows where 2 * 4 - 1 = 7 are needed
    want = ref_table(short, 7)[torch.tensor([[sp(i, j, 4, 4) for j in range(4)] for i in range(4)])]
    assert torch.allclose(M.get_rel_pos(4, 4, short), want, atol=1e-6)
    # decomposed_rel_pos: every (query, key) pair by hand, 2 heads sharing the tables, with and
    # without the time axis
    q_size, k_size, c = (2, 4, 4), (2, 2, 2), 3
    th, tw, tt = torch.randn(7, c), torch.randn(7, c), torch.randn(3, c)
    q = torch.randn(1, 2, 2 * 4 * 4, c)
    queries = [(t, y, x) for t in range(2) for y in range(4) for x in range(4)]
    keys = [(t, y, x) for t in range(2) for y in range(2) for x in range(2)]
    for table_t in (tt, None):
        fast = M.decomposed_rel_pos(q, q_size, k_size, th, tw, table_t)
        assert fast.shape == (1, 2, 32, 8)
        for a, (t, y, x) in enumerate(queries):
            for b, (t2, y2, x2) in enumerate(keys):
                R = th[sp(y, y2, 4, 2)] + tw[sp(x, x2, 4, 2)]
                R = R + tt[sp(t, t2, 2, 2)] if table_t is not None else R
                assert torch.allclose(fast[0, :, a, b], q[0, :, a] @ R, atol=1e-5)


MEMORY_WORDS = ("compress_k", "compress_v", "norm_compress_k", "norm_compress_v", "rel_pos_mem_")


def test_no_memory_model_has_no_memory_tables_and_loads_an_official_state():
    # official MEMVIT.ENABLE False (and COMPRESS.ENABLE False, the defaults) builds no
    # compressors and no rel_pos_mem_* tables: MeMViT-16 without memory has 605 - 16 x 9 = 461 keys
    sd = M.create_model("16", use_memory=False).state_dict()
    assert len(sd) == 461 and not [k for k in sd if any(w in k for w in MEMORY_WORDS)]
    # the parity fixture (official code) without its memory tensors loads strictly into a model
    # without memory, and at the fixture's first step (nothing cached: no memory read) the
    # logits are the official ones
    fx = torch.load(os.path.join(os.path.dirname(__file__), "parity", "memvit.pt"), weights_only=True)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in fx["config"].items()}
    torch.manual_seed(0)
    model = M.create_model("tiny", **cfg, use_memory=False)
    state = {k: v for k, v in fx["state_dict"].items() if not any(w in k for w in MEMORY_WORDS)}
    assert len(state) < len(fx["state_dict"])
    model.load_state_dict(state, strict=True)
    logits = model(fx["clips"][0], torch.tensor([0, 1]))
    assert torch.allclose(logits, fx["steps"][0]["logits"], atol=1e-5, rtol=1e-4)
    model.use_memory = True  # a model built without memory cannot switch it on
    with pytest.raises(RuntimeError, match="use_memory=False"):
        model(fx["clips"][0], torch.tensor([0, 1]))


def test_weights_load_across_memory_on_and_off(tmp_path, capsys):
    run = SimpleNamespace(is_main=True)
    torch.manual_seed(0)
    with_mem, without = M.create_model("tiny"), M.create_model("tiny", use_memory=False)
    # a checkpoint with memory into a model without: the memory tensors are dropped, saying so
    torch.save({"model": with_mem.state_dict()}, tmp_path / "mem.pt")
    M.load_weights(without, tmp_path / "mem.pt", run)
    assert "memory" in capsys.readouterr().out
    for k, v in without.state_dict().items():
        assert torch.equal(v, with_mem.state_dict()[k]), k
    # a memory-less checkpoint (official model_state layout) into a model with memory: every key
    # it has is loaded, the memory's own tensors keep their initialisation, saying so
    target = M.create_model("tiny")
    own = {k: v.clone() for k, v in target.state_dict().items()}
    other = M.create_model("tiny", use_memory=False)
    torch.save({"model_state": other.state_dict()}, tmp_path / "nomem.pyth")
    M.load_weights(target, tmp_path / "nomem.pyth", run)
    assert "start from their initialisation" in capsys.readouterr().out
    for k, v in target.state_dict().items():
        memory = any(w in k for w in MEMORY_WORDS)
        assert torch.equal(v, own[k] if memory else other.state_dict()[k]), k
    # a head of another class count starts from scratch (fine-tuning), every other key loaded
    five = M.create_model("tiny", num_classes=5)
    head = five.head.projection.weight.clone()
    M.load_weights(five, tmp_path / "mem.pt", run)
    assert torch.equal(five.head.projection.weight, head)
    assert torch.equal(five.blocks[0].attn.compress_k.weight, with_mem.blocks[0].attn.compress_k.weight)


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


def test_stream_batches_of_fewer_videos_than_a_batch_still_train():
    sampler = M.StreamBatchSampler(num_videos=3, num_clips=2, batch_size=4, train=True)
    torch.manual_seed(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # one group of all 3 videos, 2 clips
    assert sorted(v for v, _, _ in batches[0]) == [0, 1, 2]
    assert [v for v, _, _ in batches[1]] == [v for v, _, _ in batches[0]]
    assert [k for _, k, _ in batches[1]] == [1, 1, 1] and all(s for _, _, s in batches[0])


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


# ------------------------------------------------------------------ reading long videos (--data)


def write_long_video(path, frames, size=32, gop=10):
    """An mp4 whose frame t is uniquely bright (20 + t) with a moving bar; a keyframe every `gop` frames."""
    import av
    import numpy as np
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = gop
        for t in range(frames):
            arr = np.full((size, size, 3), 20 + t, dtype=np.uint8)
            arr[8:14, t % (size - 6): t % (size - 6) + 6] = 250
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_long_video_clips_are_read_in_one_pass_not_from_the_start_each_time(tmp_path, monkeypatch):
    K, T, rate, gop, n = 3, 4, 2, 10, 120
    span = T * rate
    path = write_long_video(tmp_path / "long.mp4", n, gop=gop)
    readers = []

    class Counting(M.C.VideoReader):  # counts the frames every reader decodes
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            readers.append(self)

    monkeypatch.setattr(M.C, "VideoReader", Counting)
    videos, labels = M.read_long_videos([(path, 1)], K, T, rate, 32, train=False, seed=0)
    decoded = sum(r.decoded for r in readers)
    # the slow obvious reference: the whole video, then clip k = frames start + k*span + t*rate
    full = M.C.read_video(path, short_side=32)  # (n, 3, 32, 32)
    assert len(full) == n
    start = int(0.5 * (n - K * span))  # evaluation: u = 0.5
    idx = start + torch.arange(K)[:, None] * span + torch.arange(T) * rate  # (K, T)
    ref = M.C.resize_center_crop(full[idx.flatten()], 32).reshape(K, T, 3, 32, 32)
    assert len(videos) == 1 and labels.tolist() == [1] and torch.equal(videos[0], ref)
    # one seek to the keyframe at or before the first clip (at most gop - 1 frames early), then the
    # K clips in order and one frame of look-ahead; decoding the whole video would be n = 120 frames,
    # and from the start for each clip more (start + span, start + 2 span, ...)
    assert decoded <= K * span + gop + 1, f"decoded {decoded} frames for {K * span} frames of clips"


def test_unreadable_videos_end_the_run_with_one_line(tmp_path):
    for k in range(2):
        (tmp_path / f"{k}.mp4").write_bytes(b"")
    with pytest.raises(SystemExit, match="none of the 2 videos could be read"):
        M.read_long_videos([(tmp_path / f"{k}.mp4", 0) for k in range(2)], 2, 4, 1, 32, True, 0)
