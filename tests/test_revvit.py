"""Tests for revvit.py: the reversible backward pass must give plain autograd's gradients while
storing activations that do not grow with depth."""
import math
import types

import pytest
import torch

import common as C
import revvit as R


def small_model(depth=4, drop_path_rate=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = R.create_model("tiny", img_size=16, patch_size=4, embed_dim=16, num_heads=2, depth=depth,
                       drop_path_rate=drop_path_rate)
    return m.to(dtype).train()


def batch(dtype=torch.float64, B=4, S=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, S, S, generator=g, dtype=dtype, requires_grad=True)
    return x, torch.randint(0, 6, (B,), generator=g)


def grads(model, x, y, vanilla, step_seed=7):
    """Gradients of the loss w.r.t. every parameter and the input. torch.autograd.grad (not
    .backward) also checks that the reversible Function hands the parameter grads to autograd."""
    model.no_custom_backward = vanilla
    torch.manual_seed(step_seed)  # the same drop-path seeds are drawn in both modes
    loss = R.loss_fn(model, (x, y))
    return torch.autograd.grad(loss, [*model.parameters(), x])


def max_rel_diff(model, a, b):
    """Largest |a - b| / |b| over the gradient tensors (norms). The key biases are left out: their
    true gradient is exactly 0 (k.bias adds q.b to every logit of a row, and softmax ignores a
    shift shared by the row), so what autograd returns for them is rounding noise."""
    names = [n for n, _ in model.named_parameters()] + ["input"]
    return max(((u - v).norm() / v.norm()).item() for n, u, v in zip(names, a, b) if not n.endswith("attn.k.bias"))


def perturb(model, seed=5, scale=0.2):
    """Move every parameter off its initial value (LayerNorm (1, 0.02), biases 0.02 and the small
    trunc-normal weights hide mistakes): sharper attention, branches as large as the streams."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---------------------------------------------------------------- slow, obvious references
# Each exercise's tests use these in place of the OTHER exercises' functions (monkeypatch), so
# that blanking one function fails only its own exercise's tests.

def ref_layernorm(ln, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_F(sub, x):
    """F = LayerNorm + multi-head attention with an explicit softmax (no residual)."""
    a, h = sub.attn, ref_layernorm(sub.norm, x)
    B, N, D = h.shape
    H = a.num_heads
    q, k, v = [(h @ lin.weight.T + lin.bias).reshape(B, N, H, D // H).transpose(1, 2) for lin in (a.q, a.k, a.v)]
    w = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).softmax(-1)  # (B, H, N, N)
    return (w @ v).transpose(1, 2).reshape(B, N, D) @ a.proj.weight.T + a.proj.bias


def ref_G(sub, x):
    """G = LayerNorm + MLP with the exact (erf) GELU (no residual)."""
    z = ref_layernorm(sub.norm, x) @ sub.mlp.fc1.weight.T + sub.mlp.fc1.bias
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return z @ sub.mlp.fc2.weight.T + sub.mlp.fc2.bias


def ref_mask(blk, seed, B, dtype):
    """The per-sample drop-path factor of one block: keep with probability 1 - p, scaled by
    1 / (1 - p), drawn from a CPU generator seeded with the block's seed (1 when not dropping)."""
    p = blk.drop_path_rate
    if not blk.training or p == 0:
        return torch.ones(B, 1, 1, dtype=dtype)
    u = torch.rand(B, 1, 1, generator=torch.Generator().manual_seed(seed))
    return (u < 1 - p).to(dtype) / (1 - p)


def ref_block(blk, X1, X2, seed):
    """Y1 = X1 + m F(X2), Y2 = X2 + m G(Y1), m the sample's drop-path factor (one for both)."""
    m = ref_mask(blk, seed, len(X1), X1.dtype)
    Y1 = X1 + m * ref_F(blk.F, X2)
    return Y1, X2 + m * ref_G(blk.G, Y1)


def ref_block_forward(self, X1, X2):  # stands in for ReversibleBlock.forward
    self.seed = R.new_seed()
    Y1 = X1 + self.dropped(self.F(X2), self.seed)
    return Y1, X2 + self.dropped(self.G(Y1), self.seed)


def ref_backward_pass(self, Y1, Y2, dY1, dY2):  # stands in for ReversibleBlock.backward_pass
    pF, pG = list(self.F.parameters()), list(self.G.parameters())
    with torch.enable_grad():
        Y1 = Y1.detach().requires_grad_(True)
        g = self.dropped(self.G(Y1), self.seed)
        dY1_G, *dG = torch.autograd.grad(g, [Y1, *pG], dY2)
    with torch.no_grad():
        X2, dX1 = Y2 - g, dY1 + dY1_G
    with torch.enable_grad():
        X2 = X2.detach().requires_grad_(True)
        f = self.dropped(self.F(X2), self.seed)
        dX2_F, *dF = torch.autograd.grad(f, [X2, *pF], dX1)
    with torch.no_grad():
        return Y1.detach() - f, X2.detach(), dX1, dY2 + dX2_F, dF + dG


def ref_rev_forward(ctx, x, blocks, *params):  # stands in for RevBackProp.forward
    X1, X2 = x.detach().chunk(2, dim=-1)
    for blk in blocks:
        X1, X2 = blk(X1, X2)
    Y = torch.cat([X1, X2], dim=-1)
    ctx.save_for_backward(Y)
    ctx.blocks = blocks
    dev = x.device.type
    ctx.amp = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
    return Y


def ref_rev_backward(ctx, dY):  # stands in for RevBackProp.backward
    (Y,) = ctx.saved_tensors
    (Y1, Y2), (dY1, dY2), grads = Y.chunk(2, dim=-1), dY.chunk(2, dim=-1), []
    dev, dtype, enabled = ctx.amp
    with torch.autocast(dev, dtype=dtype, enabled=enabled):
        for blk in reversed(ctx.blocks):
            Y1, Y2, dY1, dY2, g = blk.backward_pass(Y1, Y2, dY1, dY2)
            grads = list(g) + grads
    return torch.cat([dY1, dY2], dim=-1), None, *grads


def use_refs(monkeypatch, *names):
    """Replace the named exercise functions by the references above."""
    for name in names:
        if name == "forward":
            monkeypatch.setattr(R.ReversibleBlock, "forward", ref_block_forward)
        elif name == "backward_pass":
            monkeypatch.setattr(R.ReversibleBlock, "backward_pass", ref_backward_pass)
        else:  # "revbackprop": the autograd Function
            monkeypatch.setattr(R.RevBackProp, "forward", staticmethod(ref_rev_forward))
            monkeypatch.setattr(R.RevBackProp, "backward", staticmethod(ref_rev_backward))


def assert_grads_equal(model, rev, van, atol=1e-11):
    for (name, _), a, b in zip([*model.named_parameters(), ("input", None)], rev, van):
        assert torch.allclose(a, b, rtol=0, atol=atol), (name, (a - b).abs().max().item())
    assert max(g.abs().max().item() for g in van) > 1e-3  # the gradients are not trivially zero


# ---------------------------------------------------------------- exercise: ReversibleBlock.forward

def dropping_block(seed=0, p=0.5):
    """One perturbed float64 block in training mode that drops branches with probability p."""
    blk = perturb(small_model(depth=2, seed=seed), seed=seed + 5).rev_backbone.layers[1]
    blk.drop_path_rate = p
    return blk


def test_block_forward_equals_the_explicit_equations():
    blk = dropping_block()
    torch.manual_seed(0)
    X1, X2 = torch.randn(2, 8, 16, 16, dtype=torch.float64)  # (B, N, D) each, X1 != X2
    with torch.no_grad():
        Y1, Y2 = blk(X1, X2)
        m = ref_mask(blk, blk.seed, 8, X1.dtype)  # the mask of the seed this forward drew
        assert 0 < (m == 0).sum() < 8  # some samples dropped, some kept
        Y1_ref, Y2_ref = ref_block(blk, X1, X2, blk.seed)  # Y1 = X1 + F(X2), Y2 = X2 + G(Y1)
        assert torch.allclose(Y1, Y1_ref, atol=1e-12, rtol=0), (Y1 - Y1_ref).abs().max().item()
        assert torch.allclose(Y2, Y2_ref, atol=1e-12, rtol=0), (Y2 - Y2_ref).abs().max().item()
        blk.eval()  # no drop path at evaluation
        Y1, Y2 = blk(X1, X2)
        Y1_ref, Y2_ref = ref_block(blk, X1, X2, 0)
        assert torch.allclose(Y1, Y1_ref, atol=1e-12) and torch.allclose(Y2, Y2_ref, atol=1e-12)


def test_block_forward_f_and_g_share_one_drop_path_mask_per_sample():
    # SlowFast replays the "droppath" seed for G, so a sample either keeps both branches of a
    # block or loses both: then Y1 == X1 and Y2 == X2 exactly.
    blk = dropping_block(1)
    torch.manual_seed(0)
    X1, X2 = torch.randn(2, 64, 16, 16, dtype=torch.float64)  # (B, N, D) each, 64 samples
    with torch.no_grad():
        Y1, Y2 = blk(X1, X2)
    f_dropped = (Y1 - X1).flatten(1).abs().amax(1) == 0  # (B,)
    g_dropped = (Y2 - X2).flatten(1).abs().amax(1) == 0  # (B,)
    assert torch.equal(f_dropped, g_dropped) and 10 < f_dropped.sum() < 54


def test_block_forward_draws_a_fresh_seed_each_step_from_the_global_generator():
    blk = dropping_block(2)
    X1, X2 = torch.randn(2, 64, 16, 16, dtype=torch.float64)
    seeds, outs = [], []
    for s in (11, 12, 11):
        torch.manual_seed(s)
        want = R.new_seed()  # one draw from the global generator, as the training loop seeds it
        torch.manual_seed(s)
        with torch.no_grad():
            outs.append(blk(X1, X2)[0])
        seeds.append(blk.seed)
        assert blk.seed == want  # the block keeps the seed it drew, for the backward to replay
    assert seeds[0] != seeds[1] and not torch.equal(outs[0], outs[1])  # a new mask each step
    assert torch.equal(outs[0], outs[2])  # reproducible from the global seed


@pytest.mark.parametrize("train", [False, True])
def test_block_forward_in_the_model(train):
    # the model's own forward (vanilla path: the streams duplicated, every block, LN over 2D, mean)
    m = perturb(small_model(depth=3, drop_path_rate=0.6)).train(train)
    m.no_custom_backward = True
    x, _ = batch(B=8)
    with torch.no_grad():
        torch.manual_seed(4)
        out = m(x)
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2) + m.pos_embed  # (B, N, D)
        X1, X2 = t, t
        for blk in m.rev_backbone.layers:
            X1, X2 = ref_block(blk, X1, X2, blk.seed)
        ref = m.head.projection(ref_layernorm(m.norm, torch.cat([X1, X2], -1)).mean(1))
    assert torch.allclose(out, ref, atol=1e-11, rtol=0), (out - ref).abs().max().item()


# ---------------------------------------------------------------- exercise: ReversibleBlock.inverse

def test_inverse_reconstructs_every_block_input(monkeypatch):
    use_refs(monkeypatch, "forward")
    m = perturb(small_model(depth=6, drop_path_rate=0.6))
    torch.manual_seed(3)
    X1, X2 = torch.randn(2, 8, 16, 16, dtype=torch.float64)  # (B, N, D) each
    inputs = []
    with torch.no_grad():
        for blk in m.rev_backbone.layers:
            inputs.append((X1, X2))
            X1, X2 = blk(X1, X2)
    for blk, (A1, A2) in zip(reversed(m.rev_backbone.layers), reversed(inputs)):
        X1, X2 = blk.inverse(X1, X2)  # X2 = Y2 - G(Y1); X1 = Y1 - F(X2)
        assert torch.allclose(X2, A2, rtol=0, atol=1e-10), (X2 - A2).abs().max().item()
        assert torch.allclose(X1, A1, rtol=0, atol=1e-10), (X1 - A1).abs().max().item()
    assert not torch.allclose(inputs[0][0], inputs[-1][0], atol=1e-3)  # the blocks do change the streams


def test_inverse_recovers_the_duplicated_embedding_from_the_model_output(monkeypatch):
    use_refs(monkeypatch, "forward")
    m = perturb(small_model(depth=4, drop_path_rate=0.6))
    m.no_custom_backward = True
    x, _ = batch(B=8)
    with torch.no_grad():
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2) + m.pos_embed  # (B, N, D)
        Y1, Y2 = m.blocks(t).chunk(2, dim=-1)  # the last block's outputs, (B, N, D) each
        for blk in reversed(m.rev_backbone.layers):
            Y1, Y2 = blk.inverse(Y1, Y2)
    assert torch.allclose(Y1, t, atol=1e-10, rtol=0) and torch.allclose(Y2, t, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- exercise: ReversibleBlock.backward_pass

@pytest.mark.parametrize("p", [0.0, 0.5])
def test_backward_pass_one_block_equals_autograd(monkeypatch, p):
    use_refs(monkeypatch, "forward")
    blk = dropping_block(3, p)
    torch.manual_seed(1)
    X1, X2, dY1, dY2 = torch.randn(4, 8, 16, 16, dtype=torch.float64)  # X1 != X2: both streams matter
    X1.requires_grad_(True), X2.requires_grad_(True)
    Y1, Y2 = blk(X1, X2)  # the forward with autograd on: the slow reference's graph
    params = list(blk.parameters())
    want = torch.autograd.grad([Y1, Y2], [X1, X2, *params], [dY1, dY2])
    rX1, rX2, dX1, dX2, dP = blk.backward_pass(Y1.detach(), Y2.detach(), dY1, dY2)
    assert torch.allclose(rX1, X1, atol=1e-11, rtol=0) and torch.allclose(rX2, X2, atol=1e-11, rtol=0)
    assert torch.allclose(dX1, want[0], atol=1e-11, rtol=0), (dX1 - want[0]).abs().max().item()
    assert torch.allclose(dX2, want[1], atol=1e-11, rtol=0), (dX2 - want[1]).abs().max().item()
    assert len(dP) == len(params)  # F's parameters, then G's, in self.parameters() order
    for (name, _), a, b in zip(blk.named_parameters(), dP, want[2:]):
        assert torch.allclose(a, b, atol=1e-11, rtol=0), (name, (a - b).abs().max().item())
    if p:
        assert 0 < (ref_mask(blk, blk.seed, 8, X1.dtype) == 0).sum() < 8  # some samples dropped


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
def test_backward_pass_model_gradients_equal_autograd_float64(monkeypatch, drop_path_rate):
    use_refs(monkeypatch, "forward", "revbackprop")
    m = perturb(small_model(depth=4, drop_path_rate=drop_path_rate))
    x, y = batch(B=8)
    rev, van = grads(m, x, y, vanilla=False), grads(m, x, y, vanilla=True)
    assert len(rev) == len(list(m.parameters())) + 1
    assert_grads_equal(m, rev, van)


def test_backward_pass_model_gradients_float32_deep(monkeypatch):
    use_refs(monkeypatch, "forward", "revbackprop")
    m = small_model(depth=12, drop_path_rate=0.2, dtype=torch.float32)
    x, y = batch(torch.float32)
    rev, van = grads(m, x, y, False), grads(m, x, y, True)
    assert max_rel_diff(m, rev, van) < 1e-5
    kb = [i for i, (n, _) in enumerate(m.named_parameters()) if n.endswith("attn.k.bias")]
    assert max(rev[i].abs().max().item() for i in kb) < 1e-9  # zero up to rounding, see max_rel_diff


# ---------------------------------------------------------------- exercise: RevBackProp

def test_revbackprop_two_distinct_streams_equal_autograd(monkeypatch):
    # the Function alone, on streams X1 != X2 (in the model they start equal, which hides a swap)
    use_refs(monkeypatch, "forward", "backward_pass")
    m = perturb(small_model(depth=3, drop_path_rate=0.6))
    layers = m.rev_backbone.layers
    params = list(layers.parameters())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, 32, generator=g, dtype=torch.float64, requires_grad=True)  # (B, N, 2D)
    w = torch.randn(8, 16, 32, generator=g, dtype=torch.float64)
    torch.manual_seed(9)
    rev = torch.autograd.grad((R.RevBackProp.apply(x, layers, *params) * w).sum(), [x, *params])
    torch.manual_seed(9)  # the same seeds: the same drop-path masks
    X1, X2 = x.chunk(2, dim=-1)
    for blk in layers:
        X1, X2 = blk(X1, X2)
    van = torch.autograd.grad((torch.cat([X1, X2], -1) * w).sum(), [x, *params])
    for (name, _), a, b in zip([("input", None), *layers.named_parameters()], rev, van):
        assert torch.allclose(a, b, atol=1e-11, rtol=0), (name, (a - b).abs().max().item())


def test_revbackprop_model_gradients_equal_autograd(monkeypatch):
    use_refs(monkeypatch, "forward", "backward_pass")
    m = perturb(small_model(depth=5, drop_path_rate=0.5))
    x, y = batch(B=8)
    assert_grads_equal(m, grads(m, x, y, vanilla=False), grads(m, x, y, vanilla=True))


def test_revbackprop_saved_bytes_flat_for_reversible_and_linear_for_vanilla(monkeypatch):
    use_refs(monkeypatch, "forward", "backward_pass")
    x, _ = batch(torch.float32)
    rev, van = {}, {}
    for depth in (2, 4, 8, 16):
        m = small_model(depth=depth, drop_path_rate=0.1, dtype=torch.float32)
        for store, vanilla in ((rev, False), (van, True)):
            m.no_custom_backward = vanilla
            store[depth] = C.saved_bytes(lambda: m(x).sum(), list(m.parameters()))[0]
    assert rev[2] == rev[4] == rev[8] == rev[16] > 0
    per_block = (van[4] - van[2]) / 2
    assert per_block > 0
    assert van[8] - van[4] == 4 * per_block and van[16] - van[8] == 8 * per_block  # exactly linear
    assert van[16] > 10 * rev[16]


def test_revbackprop_peak_memory_of_forward_and_backward_barely_grows_with_depth(monkeypatch):
    # The true peak (every tensor storage made and not yet freed, C.peak_memory) of forward + backward.
    # Vanilla: each block adds at least what autograd saves for it. Reversible: each block adds only
    # its parameters' gradients, at most twice (the Function returns them, autograd copies them into
    # .grad at the end) -- never the block's activations.
    use_refs(monkeypatch, "forward", "backward_pass")
    cpu = type("Run", (), {"device": torch.device("cpu")})()
    x, y = batch(torch.float32, B=8)
    x = x.detach()
    peak, saved = {}, {}
    for depth in (4, 8, 16):
        m = small_model(depth=depth, drop_path_rate=0.1, dtype=torch.float32)
        for vanilla in (False, True):
            m.no_custom_backward = vanilla
            m.zero_grad(set_to_none=True)
            peak[depth, vanilla] = C.peak_memory(lambda: R.loss_fn(m, (x, y)).backward(), cpu)[0]
            saved[depth, vanilla] = C.saved_bytes(lambda: R.loss_fn(m, (x, y)), list(m.parameters()))[0]
    block_params = sum(p.numel() * 4 for p in m.rev_backbone.layers[0].parameters())
    for a, b in ((4, 8), (8, 16)):
        per_block = lambda d, v: (d[b, v] - d[a, v]) / (b - a)
        assert 0 < per_block(peak, False) <= 2 * block_params
        assert per_block(peak, True) >= per_block(saved, True) > 4 * block_params
    assert peak[16, False] < peak[16, True] / 3


def test_revbackprop_recomputes_under_the_forwards_autocast(monkeypatch):
    # The last block's G sees exactly the stored Y1 in both modes, so with the recomputation in the
    # forward's precision (bf16 here) its weight gradients match vanilla autograd's bit for bit;
    # recomputing in fp32 would move them by bf16 rounding (~1e-3).
    use_refs(monkeypatch, "forward", "backward_pass")
    m = small_model(depth=3, dtype=torch.float32)
    x, y = batch(torch.float32)
    out = []
    for vanilla in (False, True):
        m.no_custom_backward = vanilla
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = R.loss_fn(m, (x, y))
        out.append(torch.autograd.grad(loss, [m.rev_backbone.layers[-1].G.mlp.fc1.weight])[0])
    assert (out[0] - out[1]).abs().max().item() <= 1e-6 * out[1].abs().max().item()


# ---------------------------------------------------------------- explore: the seed replay

def test_seed_replay_is_what_makes_the_gradients_match():
    # Drop path draws a random mask per sample. If the backward pass recomputes F and G with a NEW
    # mask, the rebuilt inputs X1, X2 and every gradient below the top block are wrong.
    m = small_model(depth=4, drop_path_rate=0.5)
    x, y = batch(B=8)
    van = grads(m, x, y, vanilla=True)
    diff = max_rel_diff(m, grads(m, x, y, vanilla=False), van)
    assert diff < 1e-12, f"reversible vs vanilla gradients differ by {diff:.1e} (relative)"
    for blk in m.rev_backbone.layers:
        blk.replay_seeds = False
    assert max_rel_diff(m, grads(m, x, y, vanilla=False), van) > 1e-2


def test_parameter_names_match_slowfast_rev_vit_b():
    with torch.device("meta"):
        sd = R.create_model("base").state_dict()
    assert len(sd) == 199  # SlowFast REV_VIT_B.pyth model_state
    shapes = {"pos_embed": (1, 196, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
              "rev_backbone.layers.11.F.attn.q.weight": (768, 768), "rev_backbone.layers.0.F.attn.proj.bias": (768,),
              "rev_backbone.layers.3.G.mlp.fc1.weight": (3072, 768), "rev_backbone.layers.3.G.mlp.fc2.weight": (768, 3072),
              "rev_backbone.layers.5.F.norm.weight": (768,), "rev_backbone.layers.5.G.norm.bias": (768,),
              "norm.weight": (1536,), "head.projection.weight": (1000, 1536)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    n = sum(v.numel() for v in sd.values())
    assert abs(n / 1e6 - 87.34) < 0.01


def test_official_style_checkpoint_loads_and_replaces_a_foreign_head(tmp_path):
    src = R.create_model("tiny", num_classes=1000)
    torch.save({"model_state": src.state_dict(), "epoch": 300}, tmp_path / "REV.pyth")
    run = type("Run", (), {"is_main": False})()
    dst = R.create_model("tiny", num_classes=6)
    R.load_weights(dst, tmp_path / "REV.pyth", run)
    assert torch.equal(dst.rev_backbone.layers[2].F.attn.k.weight, src.rev_backbone.layers[2].F.attn.k.weight)
    bad = R.create_model("tiny", embed_dim=32, num_heads=2)
    with pytest.raises(SystemExit, match="REV.pyth.*wrong shape"):
        R.load_weights(bad, tmp_path / "REV.pyth", run)


def test_smoke(tmp_path):
    R.main(["--smoke", "--out", str(tmp_path)])  # raises SystemExit(1) if the loss does not fall


def test_training_loss_uses_the_runs_label_smoothing():
    """make_loss_fn(args) (what C.fit gets) is cross-entropy with --smoothing: 0.1 by default, and the
    plain cross-entropy (loss_fn's default, used by smoke and bench) is another number."""
    torch.manual_seed(0)
    model = R.create_model("tiny").eval()
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 5]))
    logits = model(batch[0])
    args = types.SimpleNamespace(smoothing=0.1)  # the default of --smoothing
    want = torch.nn.functional.cross_entropy(logits, batch[1], label_smoothing=0.1)
    got = R.make_loss_fn(args)(model, batch)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, R.loss_fn(model, batch), atol=1e-4)
