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


# ---------------------------------------------------------------- slow, obvious references
# Each exercise's tests use the references below in place of the OTHER exercises' functions
# (monkeypatch), so that blanking one function fails only its own exercise's tests.

def ref_assignment(metric, r, class_token=True):
    """Bipartite soft matching written out with loops. Returns M (B, T - r, T) float64 with
    M[b, k, j] = 1 iff input token j ends up in output token k (output order as the paper's code:
    the unmerged A tokens, in their original order with a class token, else strongest edge first;
    then every B token, each with its sources)."""
    n, T, _ = metric.shape
    r = max(0, min(r, (T - (1 if class_token else 0)) // 2))
    if r == 0:  # nothing to merge: the tokens stay as they are, in their order
        return torch.eye(T, dtype=torch.float64).expand(n, T, T)
    M = torch.zeros(n, T - r, T, dtype=torch.float64)
    for b in range(n):
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True)  # cosine similarity = dot of unit vectors
        A, B = list(range(0, T, 2)), list(range(1, T, 2))
        best = {}  # A token -> (cosine of its best edge, its B partner)
        for i in A:
            sims = [-math.inf if (class_token and i == 0) else float(m[i] @ m[j]) for j in B]
            t = max(range(len(B)), key=lambda t: sims[t])
            best[i] = (sims[t], B[t])
        ranked = sorted(A, key=lambda i: -best[i][0])  # strongest edge first
        sources = ranked[:r]
        unmerged = [i for i in A if i not in sources] if class_token else ranked[r:]
        for k, i in enumerate(unmerged):
            M[b, k, i] = 1
        for t, j in enumerate(B):
            M[b, len(unmerged) + t, j] = 1
        for i in sources:
            M[b, len(unmerged) + B.index(best[i][1]), i] = 1
    return M


def ref_merge_fn(metric, r, class_token=True):
    """A merge(x, mode) built from the dense assignment matrix: sum, mean or max over each group."""
    M = ref_assignment(metric, r, class_token)

    def merge(x, mode="sum"):
        Mx = M.to(x.dtype)
        if mode == "sum":
            return Mx @ x
        if mode == "mean":
            return Mx @ x / Mx.sum(-1, keepdim=True)
        return torch.where(Mx[..., None] > 0, x[:, None], -math.inf).amax(2)  # amax
    return merge


def ref_merge_wavg(merge, x, size=None):
    """x' = sum(s x) / sum(s), s' = sum(s) over each group."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    total = merge(size, mode="sum")
    return merge(x * size, mode="sum") / total, total


def ref_attention(attn, x, size=None):
    """Proportional attention with an explicit softmax: a token of size s counts as s copies,
    out_i = sum_j s_j exp(q_i.k_j / sqrt(d)) v_j / sum_j s_j exp(q_i.k_j / sqrt(d)), per head.
    Returns (proj(out), keys averaged over heads)."""
    B, N, D = x.shape
    H = attn.num_heads
    d = D // H
    W, bias = attn.qkv.weight, attn.qkv.bias  # rows: [q of every head; k ...; v ...]
    q, k, v = [(x @ W[i * D:(i + 1) * D].T + bias[i * D:(i + 1) * D]).reshape(B, N, H, d)
               for i in range(3)]  # (B, N, H, d) each
    s = torch.ones(B, N, dtype=x.dtype) if size is None else size[..., 0]  # (B, N)
    heads = []
    for h in range(H):
        logits = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h]) / math.sqrt(d)  # (B, N, N)
        w = s[:, None, :] * (logits - logits.amax(-1, keepdim=True)).exp()  # s_j exp(...)
        heads.append((w / w.sum(-1, keepdim=True)) @ v[:, :, h])  # (B, N, d)
    out = torch.cat(heads, dim=-1)  # (B, N, H*d), heads side by side as in the projection
    return attn.proj(out), k.mean(2)  # (B, N, D), (B, N, d)


def ref_attention_forward(self, x, size=None):  # to monkeypatch tome.Attention.forward
    return ref_attention(self, x, size)


def ref_forward_tokens(model, images, schedule):
    """The whole ToMe ViT written out: plain blocks, proportional attention, the merge as a dense
    assignment matrix M: x <- M(s x) / M s, s <- M s, source <- M source. Returns x, size, source."""
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, L, D)
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], 1) + model.pos_embed
    B, T0, _ = x.shape
    size = torch.ones(B, T0, 1, dtype=x.dtype)
    source = torch.eye(T0, dtype=x.dtype).expand(B, T0, T0)
    for blk, r in zip(model.blocks, schedule):
        a, metric = ref_attention(blk.attn, blk.norm1(x), size if model.prop_attn else None)
        x = x + a
        if r > 0:
            M = ref_assignment(metric, r).to(x.dtype)  # (B, T - r, T)
            x = M @ (size * x) / (M @ size)
            size, source = M @ size, M @ source
        x = x + blk.mlp(blk.norm2(x))
    return x, size, source


def perturbed_vit(**kw):
    """A float64 model whose every parameter is moved off its initial value (LayerNorm (1, 0),
    zero biases and the small trunc-normal weights hide mistakes): sharp attention, varied keys."""
    model = small_vit(**kw).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.2
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def model_tokens_vs_reference(model, schedule, n=3):
    x = images(n).double()
    with torch.no_grad():
        got = model.forward_tokens(x, schedule, trace_source=True)
        want = ref_forward_tokens(model, x, tome.parse_r(len(model.blocks), schedule))
    return got, want


def assert_tokens_match(got, want):
    (x, size, source), (x_ref, size_ref, source_ref) = got, want
    assert x.shape == x_ref.shape, (x.shape, x_ref.shape)
    assert torch.equal(size, size_ref), "token sizes differ from the reference"
    assert torch.equal(source.double(), source_ref), "merged groups (sources) differ from the reference"
    assert torch.allclose(x, x_ref, atol=1e-9, rtol=0), (x - x_ref).abs().max().item()


# ---------------------------------------------------------------- exercise: Attention.forward

@pytest.mark.parametrize("global_pool", [False, True])
def test_attention_r0_is_exactly_the_plain_vit(global_pool):
    model, x = small_vit(global_pool=global_pool), images()
    with torch.no_grad():
        out0 = model(x, r=0)
        assert torch.allclose(out0, reference_vit(model, x), atol=1e-5)
        assert torch.equal(out0, model(x, r=[0] * 4))  # an all-zero schedule is the same model


def sized_attention(seed=0):
    """A float64 Attention with sharp logits and non-zero biases, tokens and varied sizes."""
    torch.manual_seed(seed)
    attn = tome.Attention(16, 4).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * (0.4 if p.dim() > 1 else 0.3))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    sizes = torch.tensor([[1, 3, 2, 1, 4], [5, 1, 1, 2, 1]])  # (B, N)
    return attn, x, sizes


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    attn, x, sizes = sized_attention()
    out, _ = attn(x, sizes.double()[..., None])  # (B, N, 1) sizes
    for b in range(2):  # token j copied s_j times, no sizes: what log s must stand for
        out_dup, _ = attn(x[b:b + 1].repeat_interleave(sizes[b], dim=1))
        first = torch.cumsum(sizes[b], 0) - sizes[b]  # index of each token's first copy
        assert torch.allclose(out[b], out_dup[0, first], atol=1e-10)
    ones = torch.ones(2, 5, 1, dtype=torch.float64)
    assert torch.allclose(attn(x, ones)[0], attn(x)[0], atol=1e-12)  # all sizes 1 = plain


def test_proportional_attention_equals_the_explicit_softmax():
    attn, x, sizes = sized_attention(1)
    size = sizes.double()[..., None]
    out, metric = attn(x, size)
    out_ref, metric_ref = ref_attention(attn, x, size)  # s_j exp(q_i.k_j / sqrt d), per head
    assert torch.allclose(out, out_ref, atol=1e-10), (out - out_ref).abs().max().item()
    assert torch.allclose(metric, metric_ref, atol=1e-12)
    assert (out - attn(x)[0]).abs().max() > 1e-2  # the sizes do change the output


def test_attention_metric_is_the_keys_averaged_over_heads():
    attn, x, _ = sized_attention(2)
    k = attn.qkv(x)[..., 16:32].reshape(2, 5, 4, 4)  # (B, N, heads, d): qkv rows are [q; k; v]
    metric = attn(x)[1]
    assert metric.shape == (2, 5, 4)
    assert torch.allclose(metric, k.mean(2), atol=1e-12)


def test_attention_sizes_reach_every_block_of_the_model(monkeypatch):
    # the model's own forward, with the reference matching and merge in place of the exercises'
    monkeypatch.setattr(tome, "bipartite_soft_matching", ref_merge_fn)
    monkeypatch.setattr(tome, "merge_wavg", ref_merge_wavg)
    model = perturbed_vit()
    got, want = model_tokens_vs_reference(model, [10, 8, 6, 4])
    assert_tokens_match(got, want)
    model.prop_attn = False  # without proportional attention the sizes must not reach attention
    got_off, _ = model_tokens_vs_reference(model, [10, 8, 6, 4])
    model.prop_attn = True
    assert (got_off[0] - got[0]).abs().max() > 1e-3


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


# ---------------------------------------------------------------- exercise: bipartite_soft_matching

def test_matching_class_token_never_merged_even_if_identical():
    torch.manual_seed(0)
    metric = torch.randn(2, 9, 8)
    metric[:, 0] = metric[:, 1]  # the cls key equals a B token: the best possible edge
    merge = tome.bipartite_soft_matching(metric, 4, class_token=True)
    ids = torch.arange(9.0).reshape(1, 9, 1).expand(2, 9, 1)
    out = merge(ids, mode="amax")  # (2, 5, 1): which original index survives where
    assert out.shape == (2, 5, 1) and torch.equal(out[:, 0, 0], torch.zeros(2))
    # even when the cap takes all but the cls: T = 10, (10 - 1) // 2 = 4 merges, never 5
    merge = tome.bipartite_soft_matching(torch.randn(2, 10, 8), 9, class_token=True)
    out = merge(torch.arange(10.0).reshape(1, 10, 1).expand(2, 10, 1), mode="amax")
    assert out.shape == (2, 6, 1) and torch.equal(out[:, 0, 0], torch.zeros(2))


def test_matching_single_merge_known_output():
    torch.manual_seed(0)
    metric = torch.randn(1, 7, 4)
    metric[0, 4] = metric[0, 3] * 2.0  # A token 4 points exactly like B token 3: cosine 1
    x = torch.randn(1, 7, 3)
    merge = tome.bipartite_soft_matching(metric, 1, class_token=True)
    # output = unmerged A (0, 2, 6 in order), then B (1, 3, 5) with token 4 added into 3
    assert torch.allclose(merge(x, mode="sum")[0], torch.stack(
        [x[0, 0], x[0, 2], x[0, 6], x[0, 1], x[0, 3] + x[0, 4], x[0, 5]]))
    assert merge(torch.ones(1, 7, 1), mode="sum")[0, :, 0].tolist() == [1, 1, 1, 1, 2, 1]


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("T, r", [(17, 5), (16, 3), (12, 0), (13, 6), (14, 20), (9, 1)])
def test_matching_equals_the_dense_reference(class_token, T, r):
    g = torch.Generator().manual_seed(T * 100 + r)
    metric = torch.randn(3, T, 6, generator=g) * torch.rand(3, T, 1, generator=g) * 5  # unequal norms
    metric[:, :, 0] += 1.0  # keys share a direction, as real keys do: cosine, not dot, must decide
    x = torch.randn(3, T, 5, generator=g)
    merge = tome.bipartite_soft_matching(metric, r, class_token)
    M = ref_assignment(metric, r, class_token).float()  # (3, T - r', T)
    got = merge(x, mode="sum")
    assert got.shape == (3, M.shape[1], 5)
    assert torch.allclose(got, M @ x, atol=1e-5), "sum over each group, in the paper's order"
    assert torch.equal(merge(x, mode="amax"), ref_merge_fn(metric, r, class_token)(x, "amax"))


def test_matching_in_the_model_forward(monkeypatch):
    # the model's own forward (this block's keys, every token in its slot, the cap in the last
    # blocks), with the reference merge and attention in place of the other exercises'
    monkeypatch.setattr(tome, "merge_wavg", ref_merge_wavg)
    monkeypatch.setattr(tome.Attention, "forward", ref_attention_forward)
    got, want = model_tokens_vs_reference(perturbed_vit(), [12, 16, 9, 20])
    assert_tokens_match(got, want)
    assert got[1].max() > 2  # some tokens hold several patches


# ---------------------------------------------------------------- exercise: merge_wavg

def reference_groups(seed, T=17, r=5):
    """A reference merge over T tokens and its assignment M, non-trivial sizes and tokens."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, T, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, T, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 6, (2, T, 1), generator=g).double()
    return ref_merge_fn(metric, r), ref_assignment(metric, r), x, size


def test_wavg_preserves_weighted_sum_and_total_size():
    merge, _, x, size = reference_groups(0)
    x2, size2 = tome.merge_wavg(merge, x, size)
    assert x2.shape == (2, 12, 6) and size2.shape == (2, 12, 1)
    assert torch.allclose((size2 * x2).sum(1), (size * x).sum(1))  # sum_k s'_k x'_k = sum_j s_j x_j
    assert torch.equal(size2.sum(1), size.sum(1))  # total size is conserved exactly


def test_wavg_equals_the_group_loop():
    merge, M, x, size = reference_groups(1)
    x2, size2 = tome.merge_wavg(merge, x, size)
    for b in range(2):
        for k in range(M.shape[1]):
            group = M[b, k].nonzero()[:, 0]  # the input tokens in output token k
            s = size[b, group]  # (n, 1)
            assert size2[b, k, 0] == s.sum()  # sizes add
            assert torch.allclose(x2[b, k], (s * x[b, group]).sum(0) / s.sum(), atol=1e-12)
    x1, size1 = tome.merge_wavg(merge, x)  # no sizes yet (first block): every token is one patch
    assert torch.equal(size1, M.sum(-1, keepdim=True))
    assert torch.allclose(x1, M @ x / M.sum(-1, keepdim=True), atol=1e-12)  # the plain mean


def test_wavg_gradients_are_the_size_shares():
    torch.manual_seed(0)
    x = torch.randn(1, 7, 3, requires_grad=True)
    size = torch.tensor([1.0, 1, 1, 3, 2, 1, 1]).view(1, 7, 1)
    metric = torch.randn(1, 7, 4)
    metric[0, 4] = metric[0, 3]  # A token 4 (size 2) merges into B token 3 (size 3)
    merged, size2 = tome.merge_wavg(ref_merge_fn(metric, 1), x, size)
    merged[0, 4].sum().backward()  # the merged token (B token 3 sits at output index 3 + 1)
    assert size2[0, 4, 0] == 5
    assert torch.allclose(x.grad[0, 3], torch.full((3,), 3 / 5))  # d x' / d x_j = s_j / s'
    assert torch.allclose(x.grad[0, 4], torch.full((3,), 2 / 5))


def test_wavg_in_the_model_forward(monkeypatch):
    # the model's own forward: the sizes carried from block to block, with the reference matching
    # and attention in place of the other exercises'
    monkeypatch.setattr(tome, "bipartite_soft_matching", ref_merge_fn)
    monkeypatch.setattr(tome.Attention, "forward", ref_attention_forward)
    model = perturbed_vit(global_pool=True)
    got, want = model_tokens_vs_reference(model, [12, 10, 8, 6])
    assert_tokens_match(got, want)
    x = images().double()
    with torch.no_grad():  # the size-weighted pool: sum_k s_k x_k / T0 over the patch tokens
        feat = (want[1] * want[0])[:, 1:].sum(1) / 64
        assert torch.allclose(model(x, r=[12, 10, 8, 6]), model.head(model.fc_norm(feat)), atol=1e-9)


def test_sources_partition_the_patches_and_sum_to_the_sizes():
    model, x = small_vit(), images()
    with torch.no_grad():
        _, size, source = model.forward_tokens(x, (8, -1), trace_source=True)
    assert source.shape == (3, len(size[0]), 65)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source.sum(1), torch.ones(3, 65))  # every original token lives in one token
    assert torch.equal(source.sum(-1, keepdim=True), size)  # a token's size = patches it holds


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
    model = small_vit().train()  # (d x' / d x_j = s_j / s' itself: test_wavg_gradients_...)
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


def test_sincos_table_is_maes():
    # the same concept, the same name and numbers as mae.py (there in float64, here in float32)
    import mae
    for D, g in ((96, 8), (192, (4, 6))):
        ours = tome.get_2d_sincos_pos_embed(D, g, cls_token=True)
        assert ours.dtype == torch.float32 and torch.equal(ours[0], torch.zeros(D))
        torch.testing.assert_close(ours, mae.get_2d_sincos_pos_embed(D, g, cls_token=True), atol=1e-5, rtol=0)
    model = tome.create_model("tiny")
    D = tome.PRESETS["tiny"]["embed_dim"]
    assert torch.equal(model.pos_embed[0], tome.get_2d_sincos_pos_embed(D, 8, cls_token=True))


def test_command_line_rejects_a_negative_r(tmp_path, capsys):
    for argv in (["--r", "-1"], ["--r_eval", "0,-4"], ["--r_eval", "a,b"]):
        with pytest.raises(SystemExit):
            tome.main(argv + ["--out", str(tmp_path)])
        assert ">= 0" in capsys.readouterr().err
