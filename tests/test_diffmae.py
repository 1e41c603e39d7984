"""Tests of DiffMAE's mechanism (diffmae.py): diffusion on the masked patches only, the schedule,
the x0-parameterized posterior, the loss, the sampler's call pattern, the decoders' attention
pattern and the top-down pairing."""
import math

import pytest
import torch

import diffmae as M


def micro(**kw):
    """A very small DiffMAE: 16x16 images, 4x4 patches (L = 16), 4 encoder and 2 decoder blocks."""
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2,
               decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, T=100)
    torch.manual_seed(0)
    return M.create_model("tiny", **{**cfg, **kw}).eval()


def test_patchify_order_and_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    p = M.patchify(x, 4)  # (2, 4, 48)
    assert torch.equal(M.unpatchify(p, 4), x)
    # token 1 is row 0, column 1; inside a patch the channel varies fastest, then column, then row
    assert torch.equal(p[1, 1], x[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_sincos_first_half_encodes_the_column():
    pe = M.sincos_pos_embed(16, 4)  # (17, 16)
    assert torch.all(pe[0] == 0)  # the cls slot
    # token 1 = (row 0, col 1): column half has sin(1)/cos(1) at k = 0, row half sin(0)/cos(0)
    assert pe[2, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pe[2, 4].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert pe[2, 8].item() == 0 and pe[2, 12].item() == 1
    assert pe[1 + 4, 8].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # token 4 = (row 1, col 0)


def test_visible_patches_never_noised_and_encoder_blind_to_t_and_noise():
    m = micro()
    imgs = torch.randn(3, 3, 16, 16)
    ids, keep = M.random_masking(3, 16, 0.75, "cpu", torch.Generator().manual_seed(0))
    ids_keep, ids_masked, _, mask = M.split_ids(ids, keep)
    x0 = M.patchify(imgs, 4)
    x_t = m.q_sample_masked(x0, torch.tensor([100, 50, 1]), torch.randn_like(x0), mask)
    vis = mask == 0
    assert torch.equal(x_t[vis], x0[vis])  # bit for bit
    assert not torch.isclose(x_t[~vis], x0[~vis]).all()

    seen = {}
    m.norm.register_forward_hook(lambda mod, i, o: seen.setdefault("enc", []).append(o.clone()))
    m.decoder_patch_embed.register_forward_hook(lambda mod, i, o: seen.setdefault("dec_in", []).append(i[0].clone()))
    for t in (torch.tensor([1, 1, 1]), torch.tensor([100, 37, 5])):
        noise = torch.randn_like(x0)
        m(imgs, ids_shuffle=ids, len_keep=keep, t=t, noise=noise)
        # the decoder's noisy input holds the masked patches only, diffused to level t
        assert torch.allclose(seen["dec_in"][-1], M.take(m.q_sample(x0, t, noise), ids_masked))
    assert seen["enc"][0].shape == (3, 1 + keep, 32)  # the encoder saw the visible patches only
    assert torch.equal(seen["enc"][0], seen["enc"][1])  # ... and neither t nor the noise


def test_schedule_decreases_to_zero_and_rho_one_is_ddpm_linear():
    for schedule in ("linear", "cosine"):
        for rho in (1.0, 0.8):
            betas, abar = M.make_schedule(schedule, 1000, rho)
            assert abar[0] == 1 and torch.all(abar[1:] < abar[:-1]) and abar[-1] < 1e-3
            assert torch.allclose(abar[1:], torch.cumprod(1 - betas.double(), 0).float())
    betas, _ = M.make_schedule("linear", 1000, 1.0)
    assert torch.allclose(betas, torch.linspace(1e-4, 0.02, 1000))
    b8, a8 = M.make_schedule("linear", 1000, 0.8)
    assert torch.all(b8 > betas)  # rho < 1 is a noisier schedule
    assert torch.all(a8[1:] < M.make_schedule("linear", 1000, 1.0)[1][1:])


def test_q_sample_matches_the_step_by_step_forward_chain():
    m = micro(T=100)
    torch.manual_seed(1)
    x0 = torch.full((200000, 1), 1.5)
    x = x0.clone()
    for t in range(1, 31):  # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t
        x = (1 - m.betas[t - 1]).sqrt() * x + m.betas[t - 1].sqrt() * torch.randn_like(x)
    closed = m.q_sample(x0, torch.full((200000,), 30), torch.randn_like(x0))
    ab = m.abar[30]
    for sample in (x, closed):
        assert sample.mean().item() == pytest.approx(ab.sqrt().item() * 1.5, abs=0.01)
        assert sample.std().item() == pytest.approx((1 - ab).sqrt().item(), abs=0.01)
    # and the closed form itself, exactly
    eps = torch.randn(4, 1)
    assert torch.allclose(m.q_sample(x0[:4], torch.full((4,), 30), eps), ab.sqrt() * 1.5 + (1 - ab).sqrt() * eps)


def test_eps_prediction_inverts_q_sample():
    m = micro(pred="eps")
    x0, eps, t = torch.randn(2, 5, 48), torch.randn(2, 5, 48), torch.tensor([3, 60])
    assert torch.allclose(m.x0_from_output(eps, m.q_sample(x0, t, eps), t), x0, atol=1e-4)


def test_posterior_step():
    m = micro(T=100)
    x0, x_t, z = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    # last step (s = 0): the variance is 0 and x_0 = x0_hat
    assert torch.allclose(m.posterior_step(x_t, x0, torch.tensor(40), torch.tensor(0), z), x0, atol=1e-6)
    # s = t - 1 is DDPM's posterior (Ho et al. eq. 7)
    t, b, ab, ab1 = 40, m.betas[39], m.abar[40], m.abar[39]
    mean = b * ab1.sqrt() / (1 - ab) * x0 + (1 - b).sqrt() * (1 - ab1) / (1 - ab) * x_t
    var = (1 - ab1) / (1 - ab) * b
    assert torch.allclose(m.posterior_step(x_t, x0, torch.tensor(t), torch.tensor(t - 1), z), mean + var.sqrt() * z, atol=1e-6)
    # with the true x0, a (strided) step from x_t ~ q(x_t | x0) lands on the marginal q(x_s | x0)
    torch.manual_seed(2)
    x0 = torch.full((200000, 1), -0.7)
    xt = m.q_sample(x0, torch.full((200000,), 80), torch.randn_like(x0))
    xs = m.posterior_step(xt, x0, torch.tensor(80), torch.tensor(25), torch.randn_like(x0))
    assert xs.mean().item() == pytest.approx(-0.7 * m.abar[25].sqrt().item(), abs=0.01)
    assert xs.std().item() == pytest.approx((1 - m.abar[25]).sqrt().item(), abs=0.01)


def test_loss_ignores_visible_patches():
    target, mask = torch.randn(2, 16, 48), (torch.rand(2, 16) < 0.75).float()
    pred = torch.randn(2, 16, 48, requires_grad=True)
    loss = M.forward_loss(target, pred, mask)
    loss.backward()
    assert torch.all(pred.grad[mask == 0] == 0)
    moved = pred.detach() + 5 * (1 - mask).unsqueeze(-1)  # change the visible predictions only
    assert M.forward_loss(target, moved, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # the model's visible outputs carry no loss either
    m = micro().train()
    imgs = torch.randn(2, 3, 16, 16)
    loss, pred, mask = m(imgs)
    assert torch.all(pred[mask == 0] == 0) and torch.isfinite(loss)


def test_sampling_runs_the_encoder_once_and_the_decoder_once_per_step():
    for decoder in ("cross_self", "joint"):
        m = micro(decoder=decoder, T=100)
        calls = {"enc": 0, "dec": 0}
        m.patch_embed.register_forward_hook(lambda *a: calls.__setitem__("enc", calls["enc"] + 1))
        m.decoder_pred.register_forward_hook(lambda *a: calls.__setitem__("dec", calls["dec"] + 1))
        imgs = torch.randn(2, 3, 16, 16)
        ids, keep = M.random_masking(2, 16, 0.75, "cpu")
        out, preds, ts = m.sample(imgs, ids, keep, steps=7)
        assert calls == {"enc": 1, "dec": 7} and len(preds) == 7
        assert ts[0] == 100 and ts[-1] == 1 and all(a > b for a, b in zip(ts, ts[1:]))
        vis = M.split_ids(ids, keep)[3] == 0
        assert torch.equal(M.patchify(out, 4)[vis], M.patchify(imgs, 4)[vis])  # visible pasted back


def test_cross_decoder_tokens_never_attend_to_each_other():
    for decoder, isolated in (("cross", True), ("cross_self", False), ("joint", False)):
        m = micro(decoder=decoder)
        imgs = torch.randn(2, 3, 16, 16)
        ids, keep = M.random_masking(2, 16, 0.75, "cpu", torch.Generator().manual_seed(3))
        _, ids_masked, ids_restore, _ = M.split_ids(ids, keep)
        latent, feats = m.forward_encoder(imgs, ids[:, :keep])
        t = torch.tensor([10, 90])
        x_t = torch.randn(2, ids_masked.shape[1], 48)
        out = m.forward_decoder(x_t, t, latent, feats, ids_masked, ids_restore)
        x_t2 = x_t.clone()
        x_t2[:, 0] += 3.0  # perturb the first noisy token only
        out2 = m.forward_decoder(x_t2, t, latent, feats, ids_masked, ids_restore)
        assert not torch.allclose(out[:, 0], out2[:, 0])
        assert torch.allclose(out[:, 1:], out2[:, 1:], atol=1e-6) == isolated


def test_top_down_pairing():
    assert M.top_down_pairing(24, 8) == [23, 20, 17, 14, 11, 8, 5, 2]  # ViT-L: blocks 24, 21, ..., 3
    assert M.top_down_pairing(6, 3) == [5, 3, 1]  # tiny
    assert M.top_down_pairing(12, 12) == list(range(11, -1, -1))
    # decoder block j really reads encoder block pairing[j] (the deepest one after the final norm)
    m = micro(decoder="cross_self")  # 4 encoder blocks, 2 decoder blocks -> [3, 1]
    assert m.pairing == [3, 1]
    enc, mem = {}, {}
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, inp, o, i=i: enc.__setitem__(i, o.clone()))
    m.norm.register_forward_hook(lambda mod, inp, o: enc.__setitem__("norm", o.clone()))
    for j, blk in enumerate(m.decoder_blocks):
        blk.norm_mem.register_forward_hook(lambda mod, inp, o, j=j: mem.__setitem__(j, inp[0].clone()))
    m(torch.randn(2, 3, 16, 16))
    assert torch.equal(mem[0], enc["norm"]) and torch.equal(mem[1], enc[1])


def test_mae_encoder_checkpoint_initializes_the_encoder(tmp_path):
    mae_like = micro(decoder="mae")  # MAE's names: cls_token, pos_embed, blocks.N.attn.qkv, ..., mask_token
    keys = set(mae_like.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.3.mlp.fc2.bias", "norm.weight", "mask_token", "decoder_pred.weight"} <= keys
    torch.save({"model": mae_like.state_dict()}, tmp_path / "mae.pth")
    m = micro(decoder="cross_self")
    torch.manual_seed(5)
    m.blocks[0].attn.qkv.weight.data.normal_()
    before = m.decoder_pred.weight.clone()
    M.load_weights(m, str(tmp_path / "mae.pth"))
    assert torch.equal(m.blocks[0].attn.qkv.weight, mae_like.blocks[0].attn.qkv.weight)
    assert torch.equal(m.decoder_pred.weight, before)  # the decoder keeps its initialization


def test_smoke_command(tmp_path):
    M.main(["--smoke", "--out", str(tmp_path)])  # exits non-zero (SystemExit) on failure
