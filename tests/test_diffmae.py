"""Tests of DiffMAE's mechanism (diffmae.py): diffusion on the masked patches only, the schedule,
the x0-parameterized posterior, the loss, the sampler's call pattern, the decoders' attention
pattern and the top-down pairing; the sampler check's figures (posterior_figures) on known laws.

The names match the exercises' -k expressions: forward_process (make_schedule, q_sample,
q_sample_masked), sampler (posterior_step, x0_from_output, sample_timesteps, the sample loop),
conditioning (timestep_embedding, forward_decoder), loss (forward_loss). So that blanking one
exercise fails only its own tests, the tests of the other exercises use the slow references below
in place of the blanked functions (the schedule, the forward process, the decoder, the loss)."""
import json
import math

import pytest
import torch

import common as C
import diffmae as M


# ---------------------------------------------------------------- slow, obvious references

def ref_schedule(schedule, T, rho):
    """betas (T,), abar (T+1,) one timestep at a time in Python floats."""
    betas = []
    for i in range(T):
        if schedule == "linear":
            b = 1e-4 + (0.02 - 1e-4) * i / (T - 1)
        else:
            f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
            b = min(1 - f(i + 1) / f(i), 0.999)
        betas.append(b ** rho)
    abar = [1.0]
    for b in betas:
        abar.append(abar[-1] * (1 - b))
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(abar, dtype=torch.float64)


def ref_q_sample_masked(abar, x0, t, noise, mask):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on the masked patches, x0 on the visible ones."""
    out = x0.clone()
    for n in range(x0.shape[0]):
        ab = abar[int(t[n])].item()
        for l in range(x0.shape[1]):
            if mask[n, l] == 1:
                out[n, l] = math.sqrt(ab) * x0[n, l] + math.sqrt(1 - ab) * noise[n, l]
    return out


def ref_loss(target, pred, mask):
    """Mean squared error over the pixels of the masked patches of the whole batch."""
    total, count = 0.0, 0
    for n in range(target.shape[0]):
        for l in range(target.shape[1]):
            if mask[n, l] == 1:
                total += ((pred[n, l].double() - target[n, l].double()) ** 2).sum().item()
                count += target.shape[2]
    return total / count


def ref_posterior(abar, x_t, x0, t, s, z):
    """x_s ~ q(x_s | x_t, x0) by Bayes' rule on two Gaussians, in float64:
    q(x_s | x0) = N(sqrt(abar_s) x0, 1 - abar_s), q(x_t | x_s) = N(sqrt(a) x_s, 1 - a), a = abar_t / abar_s;
    the product has precision 1/(1 - abar_s) + a/(1 - a). At s = 0, x_0 = x0 exactly."""
    if s == 0:
        return x0.double()
    ab_t, ab_s = abar[t].item(), abar[s].item()
    a = ab_t / ab_s
    var = 1 / (1 / (1 - ab_s) + a / (1 - a))
    mean = var * (math.sqrt(ab_s) * x0.double() / (1 - ab_s) + math.sqrt(a) * x_t.double() / (1 - a))
    return mean + math.sqrt(var) * z.double()


def ref_timesteps(T, steps):
    """steps timesteps evenly spaced from T down to 1, rounded (all of T..1 when steps >= T)."""
    if steps >= T:
        return list(range(T, 0, -1))
    if steps == 1:
        return [T]
    return [round(T - k * (T - 1) / (steps - 1)) for k in range(steps)]


def ref_temb(t, dim):
    """[cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ...], f_k = 10000^(-k/h), h = dim/2."""
    h = dim // 2
    f = [math.exp(-math.log(10000) * k / h) for k in range(h)]
    return torch.tensor([math.cos(t * fk) for fk in f] + [math.sin(t * fk) for fk in f])


def ref_decoder(m, x_t_m, t, latent, feats, ids_masked, ids_keep):
    """D(x_t^m, t, E(x0^v)) token by token: each noisy token embedded, + the t embedding, + the
    position of ITS patch; joint: every token put in its patch's slot of one sequence."""
    N, Lm, _ = x_t_m.shape
    Dd = m.decoder_pos_embed.shape[-1]
    pos = m.decoder_pos_embed[0]  # (1+L, Dd), row 0 for cls
    tokens = torch.zeros(N, Lm, Dd)
    for n in range(N):
        temb = m.decoder_t_embed(ref_temb(int(t[n]), Dd)) if hasattr(m, "decoder_t_embed") else 0
        for j in range(Lm):
            tokens[n, j] = m.decoder_patch_embed(x_t_m[n, j]) + temb
    if m.decoder == "joint":
        vis = m.decoder_embed(latent)  # (N, 1+Lv, Dd)
        L = ids_keep.shape[1] + Lm
        y = torch.zeros(N, Lm, Dd)
        for n in range(N):
            seq = torch.zeros(1 + L, Dd)
            seq[0] = vis[n, 0]
            for j in range(ids_keep.shape[1]):
                seq[1 + ids_keep[n, j]] = vis[n, 1 + j]
            for j in range(Lm):
                seq[1 + ids_masked[n, j]] = tokens[n, j]
            seq = (seq + pos)[None]
            for blk in m.decoder_blocks:
                seq = blk(seq)
            for j in range(Lm):
                y[n, j] = seq[0, 1 + ids_masked[n, j]]
    else:
        for n in range(N):
            for j in range(Lm):
                tokens[n, j] += pos[1 + ids_masked[n, j]]
        E, D = len(m.blocks), len(m.decoder_blocks)
        y = tokens
        for j, blk in enumerate(m.decoder_blocks):
            y = blk(y, feats[E - 1 - (j * E) // D])  # top-down: block 0 reads the deepest
    return m.decoder_pred(m.decoder_norm(y))


def fake_decoder(m, calls=None):
    """A stand-in for forward_decoder: a fixed non-linear function of the noisy tokens, t and
    their patch indices, reaching beyond the valid pixel range (so the clamp matters)."""
    P = m.decoder_pred.out_features
    W = torch.randn(P, P, generator=torch.Generator().manual_seed(7)) / P ** 0.5

    def f(x_t_m, t, latent, feats, ids_masked, ids_restore):
        if calls is not None:
            calls.append((x_t_m.clone(), t.clone()))
        return 3 * torch.tanh(x_t_m @ W + t.float().view(-1, 1, 1) / m.T + ids_masked.unsqueeze(-1) / 8)
    return f


def perturb(m, seed=0):
    """Non-trivial parameters: every LayerNorm weight/bias and Linear bias moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.add_(0.3 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, torch.nn.Linear):
                mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
    return m


def micro(own_schedule=False, **kw):
    """A very small DiffMAE: 16x16 images, 4x4 patches (L = 16), 4 encoder and 2 decoder blocks.
    Its schedule comes from ref_schedule unless own_schedule (the forward_process exercise)."""
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2,
               decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, T=100)
    torch.manual_seed(0)
    real = M.make_schedule
    if not own_schedule:
        M.make_schedule = lambda schedule="linear", T=1000, rho=0.8: tuple(
            x.float() for x in ref_schedule(schedule, T, rho))
    try:
        return M.create_model("tiny", **{**cfg, **kw}).eval()
    finally:
        M.make_schedule = real


def use_references(monkeypatch, m, decoder=False):
    """The model with the reference forward process and loss (and optionally a fake decoder)."""
    monkeypatch.setattr(m, "q_sample_masked", lambda x0, t, noise, mask: ref_q_sample_masked(
        m.abar, x0, t, noise, mask))
    monkeypatch.setattr(M, "forward_loss", lambda target, pred, mask: torch.tensor(ref_loss(target, pred, mask)))
    if decoder:
        monkeypatch.setattr(m, "forward_decoder", fake_decoder(m))
    return m


def test_patchify_order_and_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    p = M.patchify(x, 4)  # (2, 4, 48)
    assert torch.equal(M.unpatchify(p, 4), x)
    # token 1 is row 0, column 1; inside a patch the channel varies fastest, then column, then row
    assert torch.equal(p[1, 1], x[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_sincos_first_half_encodes_the_column():
    pe = M.get_2d_sincos_pos_embed(16, 4, cls_token=True)  # (17, 16)
    assert pe.dtype == torch.float32 and pe.shape == (17, 16)
    assert torch.all(pe[0] == 0)  # the cls slot
    # token 1 = (row 0, col 1): column half has sin(1)/cos(1) at k = 0, row half sin(0)/cos(0)
    assert pe[2, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pe[2, 4].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert pe[2, 8].item() == 0 and pe[2, 12].item() == 1
    assert pe[1 + 4, 8].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # token 4 = (row 1, col 0)
    assert torch.equal(M.get_2d_sincos_pos_embed(16, 4), pe[1:])  # no cls row by default
    # a (grid_h, grid_w) grid: token 5 of a 2 x 3 grid is (row 1, col 2)
    r = M.get_2d_sincos_pos_embed(16, (2, 3))
    assert r.shape == (6, 16) and r[5, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert r[5, 8].item() == pytest.approx(math.sin(1.0), abs=1e-6)


def test_posterior_figures_known_values():
    """spread / error is 1 for samples drawn from the same law as the truth, 0 for identical
    samples, 2 for pure added noise around the truth; the mean of k samples' error falls as (1 + 1/k)."""
    g = torch.Generator().manual_seed(0)
    N, K = 400, 4
    m = torch.zeros(N, 1, 8, 8)
    m[:, :, :4] = 1  # the top half hidden
    mu = torch.rand(N, 3, 8, 8, generator=g) * 0.5 + 0.25  # each image's posterior mean
    draw = lambda: mu + 0.1 * torch.randn(N, 3, 8, 8, generator=g)
    x0, samples = draw(), torch.stack([draw() for _ in range(K)])
    f = M.posterior_figures(x0, samples, mu, m)
    assert f["spread_over_error"] == pytest.approx(1.0, abs=0.03)
    assert f["mse_1step"] == pytest.approx(0.01, rel=0.03)  # the mean's error: the posterior variance
    for k in (1, 2, 4):
        assert f["mse_mean_k"][k] == pytest.approx(0.01 * (1 + 1 / k), rel=0.05)
        assert f["dist_mean_k"][k] == pytest.approx(0.01 / k, rel=0.05)
    same = M.posterior_figures(x0, mu.expand(K, -1, -1, -1, -1), mu, m)
    assert same["spread_over_error"] == 0 and same["dist_mean_k"][4] == 0
    noisy = torch.stack([x0 + 0.1 * torch.randn(N, 3, 8, 8, generator=g) for _ in range(K)])
    assert M.posterior_figures(x0, noisy, mu, m)["spread_over_error"] == pytest.approx(2.0, abs=0.06)
    # only the hidden pixels count
    moved = samples.clone()
    moved[..., 4:, :] += 5
    assert M.posterior_figures(x0, moved, mu, m)["spread_over_error"] == pytest.approx(f["spread_over_error"], rel=1e-6)


def test_forward_process_visible_patches_never_noised_and_encoder_blind_to_t_and_noise(monkeypatch):
    m = micro(own_schedule=True)
    imgs = torch.randn(3, 3, 16, 16)
    ids, keep = M.random_order(3, 16, 0.75, "cpu", torch.Generator().manual_seed(0))
    ids_keep, ids_masked, _, mask = M.split_ids(ids, keep)
    x0 = M.patchify(imgs, 4)
    t, noise = torch.tensor([100, 50, 1]), torch.randn_like(x0)
    x_t = m.q_sample_masked(x0, t, noise, mask)
    vis = mask == 0
    assert torch.equal(x_t[vis], x0[vis])  # bit for bit
    assert torch.allclose(x_t, ref_q_sample_masked(ref_schedule("linear", 100, 0.8)[1], x0, t, noise, mask), atol=1e-5)

    seen, calls = {}, []
    m.norm.register_forward_hook(lambda mod, i, o: seen.setdefault("enc", []).append(o.clone()))
    monkeypatch.setattr(m, "forward_decoder", fake_decoder(m, calls))
    monkeypatch.setattr(M, "forward_loss", lambda target, pred, mask: torch.tensor(ref_loss(target, pred, mask)))
    abar = ref_schedule("linear", 100, 0.8)[1]
    for t in (torch.tensor([1, 1, 1]), torch.tensor([100, 37, 5])):
        noise = torch.randn_like(x0)
        m(imgs, ids_shuffle=ids, len_keep=keep, t=t, noise=noise)
        # the decoder's noisy input: the masked patches only, in ids_masked order, each diffused
        # to its own sample's level t, from the slow reference
        want = M.take(ref_q_sample_masked(abar, x0, t, noise, torch.ones(3, 16)), ids_masked)
        assert torch.allclose(calls[-1][0], want, atol=1e-5) and torch.equal(calls[-1][1], t)
    assert seen["enc"][0].shape == (3, 1 + keep, 32)  # the encoder saw the visible patches only
    assert torch.equal(seen["enc"][0], seen["enc"][1])  # ... and neither t nor the noise


def test_forward_process_draws_t_uniform_per_sample_and_gaussian_noise(monkeypatch):
    m = micro(own_schedule=True, T=10)
    seen = {}
    real = m.q_sample_masked
    monkeypatch.setattr(m, "q_sample_masked", lambda x0, t, noise, mask: (
        seen.update(t=t, noise=noise), real(x0, t, noise, mask))[1])
    monkeypatch.setattr(m, "forward_decoder", fake_decoder(m))
    monkeypatch.setattr(M, "forward_loss", lambda target, pred, mask: torch.tensor(0.0))
    torch.manual_seed(3)
    m(torch.randn(256, 3, 16, 16))
    assert seen["t"].shape == (256,) and set(seen["t"].tolist()) == set(range(1, 11))  # t ~ U{1..T}
    eps = seen["noise"]
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01  # N(0, I)
    assert (eps < 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_forward_process_schedule_against_a_loop_and_known_values():
    for schedule in ("linear", "cosine"):
        for rho in (1.0, 0.8, 1.3):
            for T in (1000, 50):
                betas, abar = M.make_schedule(schedule, T, rho)
                rb, ra = ref_schedule(schedule, T, rho)
                assert betas.shape == (T,) and abar.shape == (T + 1,)
                assert torch.allclose(betas.double(), rb, rtol=1e-5, atol=1e-9)
                assert torch.allclose(abar.double(), ra, rtol=1e-4, atol=1e-9)
    # known values: DDPM's linear schedule ends at abar_1000 = 4.04e-5, abar_1 = 1 - 1e-4
    _, abar = M.make_schedule("linear", 1000, 1.0)
    assert abar[0] == 1 and abar[1].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    assert abar[1000].item() == pytest.approx(4.036e-5, rel=1e-3)
    # the model's own buffers are that schedule
    m = micro(own_schedule=True, T=100, rho=0.8, schedule="cosine")
    assert torch.allclose(m.abar.double(), ref_schedule("cosine", 100, 0.8)[1], rtol=1e-4, atol=1e-9)
    assert torch.allclose(m.betas.double(), ref_schedule("cosine", 100, 0.8)[0], rtol=1e-5)


def test_forward_process_schedule_decreases_to_zero_and_rho_one_is_ddpm_linear():
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


def test_forward_process_q_sample_matches_the_step_by_step_forward_chain():
    m = micro(own_schedule=True, T=100)
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


def test_sampler_eps_prediction_inverts_the_noising():
    m = micro(pred="eps")
    x0, eps, t = torch.randn(2, 5, 48), torch.randn(2, 5, 48), torch.tensor([3, 60])
    ab = m.abar[t].view(-1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(m.x0_from_output(eps, x_t, t), x0, atol=1e-4)
    assert torch.equal(micro(pred="x0").x0_from_output(eps, x_t, t), eps)  # x0 prediction: itself


def test_sampler_posterior_step_against_bayes_rule():
    m = micro(T=100)
    g = torch.Generator().manual_seed(4)
    x0, x_t, z = (torch.randn(4, 8, generator=g) for _ in range(3))
    for t, s in ((40, 39), (100, 99), (2, 1), (80, 25), (100, 76), (51, 2), (40, 0), (1, 0), (100, 0)):
        got = m.posterior_step(x_t, x0, torch.tensor(t), torch.tensor(s), z)
        assert torch.allclose(got.double(), ref_posterior(m.abar, x_t, x0, t, s, z), atol=1e-5), (t, s)
    # s = t - 1 is DDPM's posterior (Ho et al. eq. 7)
    t, b, ab, ab1 = 40, m.betas[39], m.abar[40], m.abar[39]
    mean = b * ab1.sqrt() / (1 - ab) * x0 + (1 - b).sqrt() * (1 - ab1) / (1 - ab) * x_t
    var = (1 - ab1) / (1 - ab) * b
    assert torch.allclose(m.posterior_step(x_t, x0, torch.tensor(t), torch.tensor(t - 1), z), mean + var.sqrt() * z, atol=1e-6)
    # last step (s = 0): no noise, x_0 = x0_hat
    assert torch.allclose(m.posterior_step(x_t, x0, torch.tensor(40), torch.tensor(0), z), x0, atol=1e-6)


def test_sampler_sample_steps_strided_step_lands_on_the_marginal():
    # with the true x0, a (strided) step from x_t ~ q(x_t | x0) lands on the marginal q(x_s | x0)
    m = micro(T=100)
    torch.manual_seed(2)
    x0 = torch.full((200000, 1), -0.7)
    ab = m.abar[80]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
    xs = m.posterior_step(xt, x0, torch.tensor(80), torch.tensor(25), torch.randn_like(x0))
    assert xs.mean().item() == pytest.approx(-0.7 * m.abar[25].sqrt().item(), abs=0.01)
    assert xs.std().item() == pytest.approx((1 - m.abar[25]).sqrt().item(), abs=0.01)


def test_sampler_sample_steps_timesteps():
    for T, steps in ((100, 5), (100, 7), (1000, 50), (1000, 5), (10, 3), (10, 10), (10, 25), (100, 1), (100, 2)):
        assert M.sample_timesteps(T, steps) == ref_timesteps(T, steps), (T, steps)
    assert M.sample_timesteps(100, 5) == [100, 75, 50, 26, 1]  # known values


@pytest.mark.parametrize("pred", ["x0", "eps"])
def test_sampler_whole_loop_against_a_slow_reference(monkeypatch, pred):
    """model.sample with a stand-in decoder against the loop written out: x_T ~ N(0, I), at each
    strided t: x0_hat (from eps if needed), clamped to the valid pixels, then the posterior step to
    the next timestep (0 after the last), the same generator draws; visible patches pasted back."""
    m = micro(T=100, pred=pred)
    dec = fake_decoder(m)
    monkeypatch.setattr(m, "forward_decoder", dec)
    imgs = torch.randn(2, 3, 16, 16)
    ids, keep = M.random_order(2, 16, 0.75, "cpu", torch.Generator().manual_seed(5))
    _, ids_masked, ids_restore, _ = M.split_ids(ids, keep)
    lo = torch.tensor([(0 - C.MEAN[j % 3].item()) / C.STD[j % 3].item() for j in range(48)])
    hi = torch.tensor([(1 - C.MEAN[j % 3].item()) / C.STD[j % 3].item() for j in range(48)])
    x0 = M.patchify(imgs, 4)

    def paste(xm):
        full = x0.clone()
        for n in range(2):
            for j in range(ids_masked.shape[1]):
                full[n, ids_masked[n, j]] = xm[n, j]
        return M.unpatchify(full, 4)

    for steps in (7, 1, 3):
        out, preds, ts = m.sample(imgs, ids, keep, steps, torch.Generator().manual_seed(9))
        g = torch.Generator().manual_seed(9)
        x = torch.randn(2, ids_masked.shape[1], 48, generator=g)
        want_ts = ref_timesteps(100, steps)
        assert ts == want_ts and len(preds) == len(want_ts)
        for k, t in enumerate(want_ts):
            s = want_ts[k + 1] if k + 1 < len(want_ts) else 0
            o = dec(x, torch.full((2,), t), None, None, ids_masked, ids_restore)
            ab = m.abar[t].item()
            x0_hat = o if pred == "x0" else (x - math.sqrt(1 - ab) * o) / math.sqrt(ab)
            x0_hat = torch.where(x0_hat > hi, hi, torch.where(x0_hat < lo, lo, x0_hat))
            assert torch.allclose(preds[k], paste(x0_hat), atol=1e-4), (steps, k)
            z = torch.randn(x.shape, generator=g)
            x = ref_posterior(m.abar, x, x0_hat, t, s, z).float()
        assert torch.allclose(out, paste(x), atol=1e-4), steps


def test_sampler_call_pattern(monkeypatch):
    m = micro(T=100)
    calls, enc = [], []
    monkeypatch.setattr(m, "forward_decoder", fake_decoder(m, calls))
    m.patch_embed.register_forward_hook(lambda *a: enc.append(1))
    imgs = torch.randn(2, 3, 16, 16)
    ids, keep = M.random_order(2, 16, 0.75, "cpu")
    out, preds, ts = m.sample(imgs, ids, keep, steps=7)
    assert len(enc) == 1 and len(calls) == 7 and len(preds) == 7  # the encoder runs once
    assert [c[1].tolist() for c in calls] == [[t, t] for t in ts]
    assert ts[0] == 100 and ts[-1] == 1 and all(a > b for a, b in zip(ts, ts[1:]))
    assert calls[0][0].std().item() == pytest.approx(1, abs=0.15)  # it starts from pure noise
    vis = M.split_ids(ids, keep)[3] == 0
    assert torch.equal(M.patchify(out, 4)[vis], M.patchify(imgs, 4)[vis])  # visible pasted back


def test_loss_ignores_visible_patches(monkeypatch):
    target, mask = torch.randn(2, 16, 48), (torch.rand(2, 16) < 0.75).float()
    pred = torch.randn(2, 16, 48, requires_grad=True)
    loss = M.forward_loss(target, pred, mask)
    loss.backward()
    assert torch.all(pred.grad[mask == 0] == 0)
    moved = pred.detach() + 5 * (1 - mask).unsqueeze(-1)  # change the visible predictions only
    assert M.forward_loss(target, moved, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # the model's visible outputs carry no loss either
    m = micro().train()
    monkeypatch.setattr(m, "q_sample_masked", lambda x0, t, noise, mask: ref_q_sample_masked(m.abar, x0, t, noise, mask))
    monkeypatch.setattr(m, "forward_decoder", fake_decoder(m))
    imgs = torch.randn(2, 3, 16, 16)
    loss, pred, mask = m(imgs)
    assert torch.all(pred[mask == 0] == 0) and torch.isfinite(loss)


def test_loss_against_a_loop_and_known_values():
    g = torch.Generator().manual_seed(6)
    target, pred = torch.randn(3, 16, 48, generator=g), torch.randn(3, 16, 48, generator=g)
    mask = torch.zeros(3, 16)
    mask[0, :12], mask[1, 3:7], mask[2, [0, 5, 9, 15, 2, 8, 11, 13, 14]] = 1, 1, 1  # 12, 4, 9 hidden
    assert M.forward_loss(target, pred, mask).item() == pytest.approx(ref_loss(target, pred, mask), rel=1e-5)
    # known value: an error of 2 on every pixel of the hidden patches, anything on the visible ones
    bad = target + 2 * mask.unsqueeze(-1) + 7 * (1 - mask).unsqueeze(-1)
    assert M.forward_loss(target, bad, mask).item() == pytest.approx(4.0, rel=1e-6)
    one = torch.zeros(3, 16)
    one[1, 4] = 1  # a single hidden patch whose pixels are off by 0, 1, 2, 0, 1, 2, ...
    off = target.clone()
    off[1, 4] += torch.arange(48) % 3
    assert M.forward_loss(target, off, one).item() == pytest.approx(5 / 3, rel=1e-6)


@pytest.mark.parametrize("pred", ["x0", "eps"])
def test_loss_in_the_model_targets_x0_or_eps_on_masked_patches(monkeypatch, pred):
    m = micro(pred=pred)
    monkeypatch.setattr(m, "q_sample_masked", lambda x0, t, noise, mask: ref_q_sample_masked(m.abar, x0, t, noise, mask))
    monkeypatch.setattr(m, "forward_decoder", fake_decoder(m))
    imgs = torch.randn(3, 3, 16, 16)
    ids, keep = M.random_order(3, 16, 0.75, "cpu", torch.Generator().manual_seed(8))
    _, ids_masked, _, mask = M.split_ids(ids, keep)
    t, noise = torch.tensor([7, 55, 100]), torch.randn(3, 16, 48)
    loss, out, got_mask = m(imgs, ids_shuffle=ids, len_keep=keep, t=t, noise=noise)
    assert torch.equal(got_mask, mask)
    x0 = M.patchify(imgs, 4)
    x_t = ref_q_sample_masked(m.abar, x0, t, noise, mask)
    want = torch.zeros(3, 16, 48)
    o = fake_decoder(m)(M.take(x_t, ids_masked), t, None, None, ids_masked, None)
    for n in range(3):
        for j in range(ids_masked.shape[1]):
            want[n, ids_masked[n, j]] = o[n, j]
    assert torch.allclose(out, want, atol=1e-6)  # each prediction at its own patch
    target = x0 if pred == "x0" else noise
    assert loss.item() == pytest.approx(ref_loss(target, want, mask), rel=1e-5)


def test_conditioning_decoder_against_a_token_by_token_reference():
    for decoder in ("cross_self", "cross", "joint"):
        for t_embed in ("add", "none"):
            m = perturb(micro(decoder=decoder, t_embed=t_embed), seed=1)
            imgs = torch.randn(2, 3, 16, 16)
            ids, keep = M.random_order(2, 16, 0.75, "cpu", torch.Generator().manual_seed(3))
            ids_keep, ids_masked, ids_restore, _ = M.split_ids(ids, keep)
            with torch.no_grad():
                latent, feats = m.forward_encoder(imgs, ids_keep)
                t = torch.tensor([13, 90])
                x_t = torch.randn(2, ids_masked.shape[1], 48)
                got = m.forward_decoder(x_t, t, latent, feats, ids_masked, ids_restore)
                want = ref_decoder(m, x_t, t, latent, feats, ids_masked, ids_keep)
            assert torch.allclose(got, want, atol=1e-5), (decoder, t_embed)


def test_conditioning_each_noisy_token_at_its_own_position_and_t_matters():
    m = perturb(micro(decoder="cross_self"), seed=2)
    imgs = torch.randn(2, 3, 16, 16)
    ids, keep = M.random_order(2, 16, 0.75, "cpu", torch.Generator().manual_seed(4))
    ids_keep, ids_masked, ids_restore, _ = M.split_ids(ids, keep)
    with torch.no_grad():
        latent, feats = m.forward_encoder(imgs, ids_keep)
        x_t, t = torch.randn(2, ids_masked.shape[1], 48), torch.tensor([20, 70])
        out = m.forward_decoder(x_t, t, latent, feats, ids_masked, ids_restore)
        # the same noisy tokens handed over in another order: the same prediction per patch
        perm = torch.randperm(ids_masked.shape[1], generator=torch.Generator().manual_seed(1))
        out_p = m.forward_decoder(x_t[:, perm], t, latent, feats, ids_masked[:, perm], ids_restore)
        assert torch.allclose(out_p, out[:, perm], atol=1e-5)
        # ... but the same tokens told they sit at other patches predict something else
        out_w = m.forward_decoder(x_t, t, latent, feats, ids_masked[:, perm], ids_restore)
        assert not torch.allclose(out_w, out, atol=1e-3)
        # t enters every token: another t, other predictions everywhere
        out_t = m.forward_decoder(x_t, torch.tensor([21, 70]), latent, feats, ids_masked, ids_restore)
        assert (out_t[0] - out[0]).abs().amax(-1).min() > 1e-5 and torch.allclose(out_t[1], out[1], atol=1e-6)


def test_conditioning_cross_decoder_tokens_never_attend_to_each_other():
    for decoder, isolated in (("cross", True), ("cross_self", False), ("joint", False)):
        m = micro(decoder=decoder)
        imgs = torch.randn(2, 3, 16, 16)
        ids, keep = M.random_order(2, 16, 0.75, "cpu", torch.Generator().manual_seed(3))
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


def test_conditioning_top_down_pairing(monkeypatch):
    assert M.top_down_pairing(24, 8) == [23, 20, 17, 14, 11, 8, 5, 2]  # ViT-L: blocks 24, 21, ..., 3
    assert M.top_down_pairing(6, 3) == [5, 3, 1]
    assert M.top_down_pairing(4, 3) == [3, 2, 1]  # tiny (mae.py's 4-block encoder, 3 decoder blocks)
    assert M.top_down_pairing(12, 12) == list(range(11, -1, -1))
    # decoder block j really reads encoder block pairing[j] (the deepest one after the final norm)
    m = micro(decoder="cross_self")  # 4 encoder blocks, 2 decoder blocks -> [3, 1]
    use_references(monkeypatch, m)
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


# ---------------------------------------------------------------- lineage: mae.py -> diffmae.py

@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """A REAL checkpoint of mae.py's main: `tiny` pre-training, very short."""
    import mae
    out = tmp_path_factory.mktemp("mae_pretrain")
    mae.main(["--epochs", "1", "--n_train", "64", "--n_val", "32", "--batch_size", "16", "--num_workers", "0",
              "--out", str(out)])
    return out / "checkpoint.pt"


def test_lineage_tiny_encoder_is_mae_tiny():
    import mae
    enc = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
    assert {k: M.PRESETS["tiny"][k] for k in enc} == {k: mae.PRESETS["tiny"][k] for k in enc}


def test_lineage_mae_tiny_checkpoint_initializes_the_diffmae_tiny_encoder(mae_checkpoint, tmp_path, capsys):
    import mae
    state = C.load_checkpoint(mae_checkpoint)["model"]
    assert any(k.startswith("decoder_blocks.") for k in state)  # the whole pre-training model, as mae.py writes it
    model = M.create_model("tiny")  # diffmae's default: --decoder cross_self
    init = {k: v.clone() for k, v in model.state_dict().items()}
    M.load_weights(model, str(mae_checkpoint))  # diffmae's own loader
    own = model.state_dict()
    encoder = [k for k in own if not k.startswith(("decoder", "mask_token"))]
    # every encoder tensor: patch_embed (2), cls_token, pos_embed, 12 per block, the final norm (2)
    assert len(encoder) == 6 + 12 * mae.PRESETS["tiny"]["depth"] == 6 + 12 * len(model.blocks)
    for k in encoder:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=0, msg=f"{k} is not the checkpoint's")
    assert all(not torch.equal(own[k], init[k]) for k in encoder if k.endswith(("qkv.weight", "fc1.weight")))
    for k in own:  # the DiffMAE decoder is not MAE's: it keeps its initialization
        if k not in encoder:
            assert torch.equal(own[k], init[k]), f"{k} changed"
    # the same names mean the same computation: mae.py's own encoder gives the same features
    # (all patches visible; noise 0, 1, ..., L-1 keeps mae.py's shuffle in patch order)
    ref = mae.create_model("tiny").eval()
    ref.load_state_dict(state)
    x = C.normalize(C.shapes_images(4, 32, seed=3)["images"])
    with torch.no_grad():
        ours = model.eval().forward_encoder(x)[0]  # (4, 1+L, D)
        L = model.grid ** 2
        theirs = ref.forward_encoder(x, 0.0, noise=torch.arange(L, dtype=torch.float).expand(4, L))[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert "loaded the encoder of" in capsys.readouterr().out


def test_lineage_diffmae_main_starts_from_the_mae_checkpoint(mae_checkpoint, tmp_path, capsys):
    """The command a user types, `python diffmae.py --weights runs/mae/checkpoint.pt`, on a small folder."""
    import mae
    from PIL import Image
    d = C.shapes_images(20, 32, seed=5)
    for k, (img, label) in enumerate(zip(d["images"], d["labels"])):
        folder = tmp_path / "data" / C.CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
    capsys.readouterr()
    M.main(["--weights", str(mae_checkpoint), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--batch_size", "8", "--eval_images", "4", "--sample_steps", "2", "--num_workers", "0"])
    out = capsys.readouterr().out
    depth = mae.PRESETS["tiny"]["depth"]
    assert f"loaded the encoder of {mae_checkpoint} ({6 + 12 * depth} tensors" in out and f"{depth} blocks" in out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["script"] == "diffmae" and m["model"] == "tiny" and m["steps"] >= 1 and math.isfinite(m["val_loss"])


def test_bf16_autocast_training_step_and_inpainting_run_on_cpu():
    """--precision bf16 (autocast): the decoder's bf16 output is scattered into the fp32 patch grid;
    a dtype mismatch there stopped `diffmae.py --smoke --precision bf16` (found rehearsing bench_gpu.sh)."""
    torch.manual_seed(0)
    model = M.create_model("tiny", img_size=16, T=10)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(imgs, 0.75)
    loss.backward()
    assert torch.isfinite(loss) and pred.dtype == torch.float32
    L = mask.shape[1]
    ids = torch.argsort(torch.rand(2, L), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.sample(imgs, ids, L // 4, steps=2)
    assert torch.isfinite(out[0]).all()
