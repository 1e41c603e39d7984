"""Tests for revvit.py: the reversible backward pass must give plain autograd's gradients while
storing activations that do not grow with depth."""
import pytest
import torch

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


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
def test_reversible_gradients_equal_autograd_float64(drop_path_rate):
    m = small_model(depth=4, drop_path_rate=drop_path_rate)
    x, y = batch()
    rev, van = grads(m, x, y, vanilla=False), grads(m, x, y, vanilla=True)
    assert len(rev) == len(list(m.parameters())) + 1
    for (name, _), a, b in zip([*m.named_parameters(), ("input", None)], rev, van):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (name, (a - b).abs().max().item())
    assert max(g.abs().max().item() for g in van) > 1e-3  # the gradients are not trivially zero


def test_reversible_gradients_equal_autograd_float32_deep():
    m = small_model(depth=12, drop_path_rate=0.2, dtype=torch.float32)
    x, y = batch(torch.float32)
    rev, van = grads(m, x, y, False), grads(m, x, y, True)
    assert max_rel_diff(m, rev, van) < 1e-5
    kb = [i for i, (n, _) in enumerate(m.named_parameters()) if n.endswith("attn.k.bias")]
    assert max(rev[i].abs().max().item() for i in kb) < 1e-9  # zero up to rounding, see max_rel_diff


def test_without_seed_replay_gradients_are_wrong():
    # Drop path draws a random mask per sample. If the backward pass recomputes F and G with a NEW
    # mask, the rebuilt inputs X1, X2 and every gradient below the top block are wrong.
    m = small_model(depth=4, drop_path_rate=0.5)
    x, y = batch(B=8)
    van = grads(m, x, y, vanilla=True)
    assert max_rel_diff(m, grads(m, x, y, vanilla=False), van) < 1e-12
    for blk in m.rev_backbone.layers:
        blk.replay_seeds = False
    assert max_rel_diff(m, grads(m, x, y, vanilla=False), van) > 1e-2


def test_inverse_reconstructs_every_block_input():
    m = small_model(depth=6, drop_path_rate=0.3)
    torch.manual_seed(3)
    X1, X2 = torch.randn(2, 4, 16, 16, dtype=torch.float64)  # (B, N, D) each
    inputs = []
    with torch.no_grad():
        for blk in m.rev_backbone.layers:
            inputs.append((X1, X2))
            X1, X2 = blk(X1, X2)
    for blk, (A1, A2) in zip(reversed(m.rev_backbone.layers), reversed(inputs)):
        X1, X2 = blk.inverse(X1, X2)  # X2 = Y2 - G(Y1); X1 = Y1 - F(X2)
        assert torch.allclose(X1, A1, rtol=0, atol=1e-12) and torch.allclose(X2, A2, rtol=0, atol=1e-12)
    assert not torch.allclose(inputs[0][0], inputs[-1][0], atol=1e-3)  # the blocks do change the streams


def test_f_and_g_share_one_drop_path_mask_per_sample():
    # SlowFast replays the "droppath" seed for G, so a sample either keeps both branches of a
    # block or loses both: then Y1 == X1 and Y2 == X2 exactly.
    blk = small_model(depth=1, drop_path_rate=0.5).rev_backbone.layers[0]
    blk.drop_path_rate = 0.5  # linspace(0, rate, depth=1) gives the first (only) block rate 0
    torch.manual_seed(0)
    X1, X2 = torch.randn(2, 64, 16, 16, dtype=torch.float64)  # (B, N, D) each, 64 samples
    with torch.no_grad():
        Y1, Y2 = blk(X1, X2)
    f_dropped = (Y1 - X1).flatten(1).abs().amax(1) == 0  # (B,)
    g_dropped = (Y2 - X2).flatten(1).abs().amax(1) == 0  # (B,)
    assert torch.equal(f_dropped, g_dropped) and 10 < f_dropped.sum() < 54


def test_saved_bytes_flat_for_reversible_and_linear_for_vanilla():
    x, _ = batch(torch.float32)
    rev, van = {}, {}
    for depth in (2, 4, 8, 16):
        m = small_model(depth=depth, drop_path_rate=0.1, dtype=torch.float32)
        for store, vanilla in ((rev, False), (van, True)):
            m.no_custom_backward = vanilla
            store[depth] = R.saved_bytes(lambda: m(x).sum(), list(m.parameters()))[0]
    assert rev[2] == rev[4] == rev[8] == rev[16] > 0
    per_block = (van[4] - van[2]) / 2
    assert per_block > 0
    assert van[8] - van[4] == 4 * per_block and van[16] - van[8] == 8 * per_block  # exactly linear
    assert van[16] > 10 * rev[16]


def test_recomputation_runs_under_the_forwards_autocast():
    # The last block's G sees exactly the stored Y1 in both modes, so with the recomputation in the
    # forward's precision (bf16 here) its weight gradients match vanilla autograd's bit for bit;
    # recomputing in fp32 would move them by bf16 rounding (~1e-3).
    m = small_model(depth=3, dtype=torch.float32)
    x, y = batch(torch.float32)
    out = []
    for vanilla in (False, True):
        m.no_custom_backward = vanilla
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = R.loss_fn(m, (x, y))
        out.append(torch.autograd.grad(loss, [m.rev_backbone.layers[-1].G.mlp.fc1.weight])[0])
    assert (out[0] - out[1]).abs().max().item() <= 1e-6 * out[1].abs().max().item()


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
