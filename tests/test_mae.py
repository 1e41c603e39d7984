"""MAE's mechanism: patch order, masking, un-shuffling, sin-cos table, loss, drop path, official
names and counts.

The tests are grouped by the exercises of mae.py's docstring (their names carry the -k word):
`masking` (random_masking), `unshuffle` (forward_decoder), `patchify or loss` (patchify,
unpatchify, forward_loss), `drop_path` (drop_path), `mask_ratio` (the explore exercise). A test of
one exercise that runs the model replaces the OTHER exercises' functions by the slow references
below (`use_references`), so that a blanked function fails only its own exercise.
"""
import json
import math

import pytest
import torch

import common as C
import mae

# ------------------------------------------------------------------ slow, obvious references


def ref_masking(x, mask_ratio, noise=None):
    """Loops: sort the patches of each sample by their noise (ascending), keep the first
    floor(L (1 - r)); mask 1 = removed in the original order; restore[l] = rank of patch l."""
    N, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L) if noise is None else noise
    kept, mask, restore = [], torch.ones(N, L), torch.empty(N, L, dtype=torch.long)
    for n in range(N):
        order = sorted(range(L), key=lambda l: noise[n, l].item())
        for rank, l in enumerate(order):
            restore[n, l] = rank
            if rank < keep:
                mask[n, l] = 0.0
        kept.append(torch.stack([x[n, l] for l in order[:keep]]))
    return torch.stack(kept), mask, restore


def ref_drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = (torch.rand(x.shape[0]) >= p).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * keep / (1 - p)


def ref_patchify(imgs, p):
    """Loops: token i*w + j is patch (row i, column j); value index (a*p + b)*c + ch is pixel
    (row a, column b) of that patch in channel ch (channel fastest, then column, then row)."""
    N, c, H, W = imgs.shape
    h, w = H // p, W // p
    out = torch.empty(N, h * w, p * p * c)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for ch in range(c):
                        out[:, i * w + j, (a * p + b) * c + ch] = imgs[:, ch, i * p + a, j * p + b]
    return out


def ref_unpatchify(x, p, c=3):
    N, L, _ = x.shape
    h = w = int(round(math.sqrt(L)))
    imgs = torch.empty(N, c, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for ch in range(c):
                        imgs[:, ch, i * p + a, j * p + b] = x[:, i * w + j, (a * p + b) * c + ch]
    return imgs


def ref_decoder(model, latent, ids_restore):
    """Loops: slot 0 = the cls latent, slot 1 + l = patch l's latent if l was kept (its rank < K)
    else the mask token; positions added to every slot; then the decoder's own blocks and head.
    Returns (prediction (N, L, p*p*3) without the cls slot, the decoder blocks' input)."""
    y = model.decoder_embed(latent)                                       # (N, 1 + K, Dd)
    N, L = ids_restore.shape
    K = y.shape[1] - 1
    pos = model.decoder_pos_embed[0]
    seq = torch.empty(N, 1 + L, y.shape[2])
    for n in range(N):
        seq[n, 0] = y[n, 0] + pos[0]
        for l in range(L):
            r = int(ids_restore[n, l])
            seq[n, 1 + l] = (y[n, 1 + r] if r < K else model.mask_token[0, 0]) + pos[1 + l]
    z = seq
    for blk in model.decoder_blocks:
        z = blk(z)
    return model.decoder_pred(model.decoder_norm(z))[:, 1:, :], seq


def ref_loss(imgs, pred, mask, p, norm_pix):
    """Loops: per-patch mean squared error on the removed patches, averaged over them; norm-pix
    targets standardized per patch with the UNBIASED variance and eps 1e-6 inside the root."""
    target = ref_patchify(imgs, p)
    N, L, P = target.shape
    total, count = 0.0, 0.0
    for n in range(N):
        for l in range(L):
            t = target[n, l].double()
            if norm_pix:
                mean = t.sum() / P
                var = ((t - mean) ** 2).sum() / (P - 1)
                t = (t - mean) / (var + 1e-6).sqrt()
            total += float(mask[n, l]) * float(((pred[n, l].double() - t) ** 2).sum() / P)
            count += float(mask[n, l])
    return total / count


def use_references(monkeypatch, *names):
    """Replace the named exercise functions of mae.py by the references above."""
    refs = {"random_masking": ref_masking, "drop_path": ref_drop_path, "patchify": ref_patchify,
            "unpatchify": ref_unpatchify}
    for name in names:
        if name == "forward_decoder":
            monkeypatch.setattr(mae.MaskedAutoencoderViT, "forward_decoder",
                                lambda self, x, ids: ref_decoder(self, x, ids)[0])
        elif name == "forward_loss":
            monkeypatch.setattr(mae.MaskedAutoencoderViT, "forward_loss", lambda self, imgs, pred, mask: torch.tensor(
                ref_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)))
        else:
            monkeypatch.setattr(mae, name, refs[name])


def perturb(model, seed=0):
    """Non-trivial parameters: every tensor moved off its init, the frozen position tables (and
    their zero cls rows), the LayerNorms and the zero biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            big = t.ndim < 2 or name in ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token")
            t.add_(torch.randn(t.shape, generator=g) * (0.5 if big else 0.03))
    return model


def capture_input(module):
    """Record what enters `module` (e.g. the first encoder or decoder block)."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mae.create_model("tiny")


@pytest.fixture
def rough():
    """The tiny model with every parameter perturbed (a fresh one per test: hooks are added)."""
    torch.manual_seed(0)
    return perturb(mae.create_model("tiny"))


# ------------------------------------------------------------------ exercise: random_masking ("masking")


@pytest.mark.parametrize("L,ratio", [(196, 0.75), (196, 0.9), (64, 0.75), (50, 0.9), (49, 0.5), (10, 0.33)])
def test_masking_keeps_floor_of_visible_tokens(L, ratio):
    x = torch.randn(4, L, 8)
    kept, mask, ids_restore = mae.random_masking(x, ratio)
    keep = int(L * (1 - ratio))                                           # floor: 196 at 90% keeps 19, not 20
    assert kept.shape == (4, keep, 8)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == L - keep).all()                                # 1 = removed
    for n in range(4):                                                    # the kept tokens are those with mask 0
        visible = x[n][mask[n] == 0]
        assert torch.equal(kept[n].sort(0).values, visible.sort(0).values)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_masking_matches_loop_reference_with_given_noise(ratio):
    """The smallest noise is kept, the kept tokens come in ascending-noise order (the decoder's
    un-shuffle relies on it), the mask is in the original order, ids_restore = rank of each patch."""
    torch.manual_seed(1)
    x, noise = torch.randn(5, 36, 6), torch.rand(5, 36)
    kept, mask, ids_restore = mae.random_masking(x, ratio, noise.clone())
    ref_kept, ref_mask, ref_restore = ref_masking(x, ratio, noise)
    assert torch.equal(kept, ref_kept)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(ids_restore, ref_restore)


def test_masking_ids_restore_inverts_the_shuffle():
    x = torch.randn(3, 20, 5)
    noise = torch.rand(3, 20)
    kept, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    ids_shuffle = torch.argsort(noise, 1)
    removed = torch.gather(x, 1, ids_shuffle[:, kept.shape[1]:, None].expand(-1, -1, 5))
    shuffled = torch.cat([kept, removed], 1)                              # what the decoder builds
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, 5)), x)


def test_masking_draws_fresh_noise_for_every_sample():
    """Without given noise every sample gets its own mask (and a new call a new one)."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, 4)
    _, mask_a, _ = mae.random_masking(x, 0.75)
    _, mask_b, _ = mae.random_masking(x, 0.75)
    assert len({tuple(m.tolist()) for m in mask_a}) == 16                 # 16 different masks
    assert not torch.equal(mask_a, mask_b)
    assert (mask_a.sum(1) == 48).all() and (mask_b.sum(1) == 48).all()


def test_masking_where_the_encoder_uses_it(rough, monkeypatch):
    """What reaches the first encoder block: [cls + pos_0, then for the kept patches in ascending-
    noise order: embed(patch l) + pos_{1+l}], and the returned mask / ids_restore, by loops."""
    use_references(monkeypatch, "drop_path")
    seen = capture_input(rough.blocks[0])
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    _, mask, ids_restore = rough.forward_encoder(imgs, 0.75, noise.clone())
    _, ref_mask, ref_restore = ref_masking(torch.zeros(3, 64, 1), 0.75, noise)
    assert torch.equal(mask, ref_mask) and torch.equal(ids_restore, ref_restore)
    with torch.no_grad():
        tokens = rough.patch_embed(imgs)                                  # (N, L, D)
        pos = rough.pos_embed[0]
        for n in range(3):
            order = sorted(range(64), key=lambda l: noise[n, l].item())[:16]
            expect = torch.stack([rough.cls_token[0, 0] + pos[0]] + [tokens[n, l] + pos[1 + l] for l in order])
            assert torch.allclose(seen[0][n], expect, atol=1e-6)


def test_masking_encoder_ignores_hidden_content(tiny, monkeypatch):
    """The encoder output depends on the visible patches only (no leak from the hidden ones)."""
    use_references(monkeypatch, "drop_path")
    imgs = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 64)
    a, mask, _ = tiny.forward_encoder(imgs, 0.75, noise)
    hidden = ref_unpatchify(ref_masking(torch.zeros(1, 64, 1), 0.75, noise)[1][:, :, None].expand(-1, -1, 48), 4)
    b, _, _ = tiny.forward_encoder(imgs + 10 * hidden * torch.randn_like(imgs), 0.75, noise)
    assert torch.allclose(a, b, atol=1e-5)
    c, _, _ = tiny.forward_encoder(imgs + 10 * (1 - hidden) * torch.randn_like(imgs), 0.75, noise)
    assert not torch.allclose(a, c, atol=1e-3)                            # but it does see the visible ones


# ------------------------------------------------------------------ exercise: forward_decoder ("unshuffle")


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_unshuffle_puts_every_token_in_its_slot(rough, ratio, monkeypatch):
    """The decoder blocks' input: slot 0 = embed(cls latent) + pos_0; slot 1 + l = embed(latent of
    patch l) + pos_{1+l} if l was kept, else mask_token + pos_{1+l}: positions added AFTER un-shuffle."""
    use_references(monkeypatch, "drop_path")
    torch.manual_seed(2)
    noise = torch.rand(3, 64)
    _, _, ids_restore = ref_masking(torch.zeros(3, 64, 1), ratio, noise)
    K = int(64 * (1 - ratio))
    latent = torch.randn(3, 1 + K, 192)
    seen = capture_input(rough.decoder_blocks[0])
    with torch.no_grad():
        pred = rough.forward_decoder(latent, ids_restore.clone())
        ref_pred, ref_seq = ref_decoder(rough, latent, ids_restore)
    assert seen[0].shape == (3, 65, 96)
    assert torch.allclose(seen[0], ref_seq, atol=1e-5)
    assert pred.shape == (3, 64, 48)
    assert torch.allclose(pred, ref_pred, atol=1e-4)


def test_unshuffle_output_is_every_patch_without_the_cls_slot(rough, monkeypatch):
    """Row l of the prediction is slot 1 + l (patch l): the cls slot's prediction is the one
    dropped, not the last patch's."""
    use_references(monkeypatch, "drop_path")
    torch.manual_seed(3)
    noise = torch.rand(2, 64)
    _, _, ids_restore = ref_masking(torch.zeros(2, 64, 1), 0.75, noise)
    latent = torch.randn(2, 17, 192)
    with torch.no_grad():
        pred = rough.forward_decoder(latent, ids_restore)
        _, seq = ref_decoder(rough, latent, ids_restore)
        z = seq
        for blk in rough.decoder_blocks:
            z = blk(z)
        full = rough.decoder_pred(rough.decoder_norm(z))                  # (N, 1 + L, p*p*3)
    assert torch.allclose(pred, full[:, 1:], atol=1e-4)
    assert not torch.allclose(pred[:, 0], full[:, 0], atol=1e-2)


def test_unshuffle_in_the_model_forward(rough, monkeypatch):
    """The whole chain imgs -> encoder -> decoder: forward_decoder on the model's own latent and
    ids_restore equals the loop reference (masking and drop path by their references)."""
    use_references(monkeypatch, "random_masking", "drop_path")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        latent, mask, ids_restore = rough.forward_encoder(imgs, 0.75, noise)
        pred = rough.forward_decoder(latent, ids_restore)
        ref_pred, _ = ref_decoder(rough, latent, ids_restore)
    assert torch.allclose(pred, ref_pred, atol=1e-4)


def test_sincos_table_against_independent_formula():
    D, g = 16, 4
    table = mae.get_2d_sincos_pos_embed(D, g, cls_token=True)
    assert table.shape == (1 + g * g, D)
    assert torch.equal(table[0], torch.zeros(D))                          # the cls row is zero
    for i in range(g):
        for j in range(g):
            ref = []
            for pos in (j, i):                                            # first half: column; second: row
                w = [1 / 10000 ** (k / (D / 4)) for k in range(D // 4)]
                ref += [math.sin(pos * wk) for wk in w] + [math.cos(pos * wk) for wk in w]
            assert torch.allclose(table[1 + i * g + j], torch.tensor(ref), atol=1e-6)
    # patch (0, 0): sines are 0, cosines are 1
    assert torch.equal(table[1, :D // 4], torch.zeros(D // 4)) and torch.equal(table[1, D // 4:D // 2], torch.ones(D // 4))


def test_sincos_table_of_a_rectangular_grid():
    D = 8
    table = mae.get_2d_sincos_pos_embed(D, (2, 3))                        # 2 rows, 3 columns, no cls row
    assert table.shape == (6, D) and table.dtype == torch.float32
    square = mae.get_2d_sincos_pos_embed(D, 3)                            # 3 x 3: its first two rows
    assert torch.equal(table, square[:6])


def test_classifier_init_is_timms_from_scratch():
    torch.manual_seed(0)
    model = mae.create_classifier("tiny", 6)
    assert 0.015 < model.head.weight.std().item() < 0.025                 # trunc_normal(0.02), not 2e-5
    assert 0.01 < model.cls_token.std().item() < 0.03
    assert torch.equal(model.pos_embed[0], mae.get_2d_sincos_pos_embed(192, 8, cls_token=True))  # documented


# ------------------------------------------------------------------ exercise: patchify, unpatchify, forward_loss ("patchify or loss")


@pytest.mark.parametrize("p", [4, 8])
def test_patchify_order_matches_loop_reference_and_roundtrips(p):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    t = mae.patchify(x, p)
    assert t.shape == (2, (32 // p) ** 2, p * p * 3)
    assert torch.equal(t, ref_patchify(x, p))                             # token i*w+j; channel, column, row
    assert torch.equal(mae.unpatchify(ref_patchify(x, p), p), x)
    assert torch.equal(mae.unpatchify(t, p), x)
    i, j = 2, 5 if p == 4 else 1                                          # row != column
    patch = x[1, :, i * p:(i + 1) * p, j * p:(j + 1) * p]                 # (c, p, q)
    assert torch.equal(t[1, i * (32 // p) + j], patch.permute(1, 2, 0).reshape(-1))


def test_unpatchify_matches_loop_reference():
    torch.manual_seed(5)
    t = torch.randn(2, 64, 48)
    assert torch.equal(mae.unpatchify(t, 4), ref_unpatchify(t, 4))


def images_with_flat_patches(seed=6):
    """Bright images (mean far from 0) where some patches are almost constant (variance ~1e-8,
    so the 1e-6 inside the square root of norm-pix matters)."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(2, 3, 32, 32, generator=g) * 5 + 3
    for n, i, j in [(0, 0, 0), (0, 3, 5), (1, 7, 2), (1, 4, 4)]:
        imgs[n, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = 0.7 + 1e-4 * torch.randn(3, 4, 4, generator=g)
    return imgs


def mask_with_flat_patches_removed(seed=7):
    """A 75% mask (48 removed per sample) that removes the flat patches of images_with_flat_patches."""
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(seed))
    noise[0, [0, 3 * 8 + 5]] = noise[1, [7 * 8 + 2, 4 * 8 + 4]] = 2.0    # the largest noise: removed
    return ref_masking(torch.zeros(2, 64, 1), 0.75, noise)[1]


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_loop_reference(norm_pix):
    model = mae.create_model("tiny", norm_pix_loss=norm_pix)
    imgs = images_with_flat_patches()
    torch.manual_seed(8)
    pred = torch.randn(2, 64, 48) * 2 + (0 if norm_pix else 5)
    mask = mask_with_flat_patches_removed()
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.shape == ()
    assert math.isclose(loss.item(), ref_loss(imgs, pred, mask, 4, norm_pix), rel_tol=1e-5)


def test_loss_norm_pix_targets_are_standardized_per_patch():
    """Predicting the standardized target exactly gives 0; the flat patches are standardized with
    sqrt(var + 1e-6) (unbiased var), so their target is tiny, not blown up to unit variance."""
    model = mae.create_model("tiny", norm_pix_loss=True)
    imgs = images_with_flat_patches()
    target = ref_patchify(imgs, 4).double()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)   # unbiased, as the official
    normed = ((target - mean) / (var + 1e-6) ** 0.5).float()
    mask = torch.ones(2, 64)
    assert model.forward_loss(imgs, normed, mask).item() < 1e-8
    assert 0.9 < model.forward_loss(imgs, torch.zeros(2, 64, 48), mask).item() < 1.0  # not the raw pixels (~30)


def test_loss_known_values_on_removed_patches_only():
    """pred = target + 1 (sample 0) and + 2 (sample 1) on the removed patches, anything on the
    visible ones: per-patch MSE 1 and 4, averaged over all removed patches = 2.5."""
    model = mae.create_model("tiny")
    imgs = torch.randn(2, 3, 32, 32)
    mask = mask_with_flat_patches_removed()
    pred = ref_patchify(imgs, 4) + torch.tensor([1.0, 2.0])[:, None, None]
    pred = torch.where(mask[..., None] > 0, pred, pred + 100 * torch.randn_like(pred))
    assert math.isclose(model.forward_loss(imgs, pred, mask).item(), 2.5, rel_tol=1e-5)
    pred.requires_grad_(True)
    model.forward_loss(imgs, pred, mask).backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).all()


def test_loss_in_the_model_forward(rough, monkeypatch):
    """model(imgs) returns the loss of its own prediction on its own mask (the other exercises'
    functions by their references)."""
    use_references(monkeypatch, "random_masking", "forward_decoder", "drop_path")
    for norm_pix in (False, True):
        rough.norm_pix_loss = norm_pix
        imgs, noise = images_with_flat_patches(9), torch.rand(2, 64)
        with torch.no_grad():
            loss, pred, mask = rough(imgs, 0.75, noise)
        assert torch.equal(mask, ref_masking(torch.zeros(2, 64, 1), 0.75, noise)[1])
        assert math.isclose(loss.item(), ref_loss(imgs, pred, mask, 4, norm_pix), rel_tol=1e-5)


# ------------------------------------------------------------------ exercise: drop_path ("drop_path")


def test_drop_path_keeps_or_drops_whole_samples_and_rescales():
    """Each sample is either all zero or x / (1 - p); about 1 - p of them are kept; E[out] = x."""
    torch.manual_seed(10)
    p = 0.3
    x = torch.rand(20000, 3, 5) + 0.5
    out = mae.drop_path(x, p, True)
    kept = (out != 0).flatten(1)
    assert (kept.all(1) | ~kept.any(1)).all()                             # whole samples only
    k = kept.all(1)
    assert torch.allclose(out[k], x[k] / (1 - p)) and (out[~k] == 0).all()
    assert abs(k.float().mean().item() - (1 - p)) < 0.02                  # keep probability 1 - p
    assert abs((out / x).mean().item() - 1.0) < 0.03                      # unbiased


def test_drop_path_is_the_identity_in_eval_and_at_rate_zero():
    x = torch.randn(64, 4, 8)
    assert torch.equal(mae.drop_path(x, 0.5, False), x)
    assert torch.equal(mae.drop_path(x, 0.0, True), x)


def test_drop_path_where_the_block_uses_it():
    """Block in training: x1 = x + k1 Attn(LN1 x) / (1-p), out = x1 + k2 MLP(LN2 x1) / (1-p), with
    k1, k2 in {0, 1} drawn per sample; in eval: both branches at full strength."""
    torch.manual_seed(11)
    p = 0.4
    blk = perturb(mae.Block(32, 4, drop_path=p), seed=1)
    x = torch.randn(256, 5, 32)
    with torch.no_grad():
        blk.train()
        out = blk(x)
        blk.eval()
        assert torch.allclose(blk(x), x + blk.attn(blk.norm1(x)) + blk.mlp(blk.norm2(x + blk.attn(blk.norm1(x)))), atol=1e-5)
        a = blk.attn(blk.norm1(x))
        seen = []
        for n in range(256):
            for k1 in (0, 1):
                x1 = x[n] + k1 * a[n] / (1 - p)
                m = blk.mlp(blk.norm2(x1))
                hits = [k2 for k2 in (0, 1) if torch.allclose(out[n], x1 + k2 * m / (1 - p), atol=1e-5)]
                if hits:
                    seen.append((k1, hits[0]))
                    break
            else:
                raise AssertionError(f"sample {n}: not x + k1 attn/(1-p) + k2 mlp/(1-p) for any k1, k2 in {{0, 1}}")
    assert set(seen) == {(0, 0), (0, 1), (1, 0), (1, 1)}                  # each sample its own coins
    assert abs(sum(k1 for k1, _ in seen) / 256 - (1 - p)) < 0.12


def test_drop_path_rates_grow_with_depth_in_the_finetune_model():
    model = mae.create_classifier("tiny", 10, drop_path_rate=0.3)
    assert [round(b.drop_path, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3]
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(12)
    assert not torch.allclose(model(x), model(x))


# ------------------------------------------------------------------ explore: the mask ratio ("mask_ratio")


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_mask_ratio_sets_the_encoder_tokens_and_the_graded_patches(rough, ratio):
    """At ratio r the encoder runs on 1 + floor(64 (1 - r)) tokens (33 / 17 / 7), the decoder on
    all 1 + 64, and only the 64 - floor(64 (1 - r)) removed patches of each sample get a gradient."""
    keep = int(64 * (1 - ratio))
    enc, dec = capture_input(rough.blocks[0]), capture_input(rough.decoder_blocks[0])
    imgs = torch.randn(2, 3, 32, 32)
    _, pred, mask = rough(imgs, ratio)
    assert enc[-1].shape[1] == 1 + keep and dec[-1].shape[1] == 65
    assert (mask.sum(1) == 64 - keep).all()
    pred = pred.detach().requires_grad_(True)
    rough.forward_loss(imgs, pred, mask).backward()
    assert ((pred.grad != 0).any(-1).sum(1) == 64 - keep).all()


def test_mask_ratio_encoder_cost_falls_with_the_ratio(tiny):
    """Encoder FLOPs at 90% vs 50%: its token count falls from 33 to 7 and its cost by 4.6x
    (analytic 12 N D^2 + 2 N^2 D per block: 4.8x; the patch embedding runs on all 64 patches)."""
    imgs = torch.randn(2, 3, 32, 32)
    f = {r: C.count_flops(lambda: tiny.forward_encoder(imgs, r)) for r in (0.5, 0.9)}
    block = lambda n, d: 12 * n * d * d + 2 * n * n * d                   # multiply-adds of one block
    analytic = block(33, 192) / block(7, 192)
    assert 0.9 * analytic < f[0.5] / f[0.9] < analytic


def test_encoder_sees_only_visible_tokens_and_decoder_predicts_all(tiny):
    imgs = torch.randn(3, 3, 32, 32)
    latent, mask, ids = tiny.forward_encoder(imgs, 0.75)
    assert latent.shape == (3, 1 + 16, 192)
    assert tiny.forward_decoder(latent, ids).shape == (3, 64, 48)


def test_official_names_shapes_and_counts_for_base():
    with torch.device("meta"):
        model = mae.create_model("base")
    sd = model.state_dict()
    D, P = 768, 16 * 16 * 3
    expect = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
              "blocks.11.attn.qkv.weight": (3 * D, D), "blocks.0.mlp.fc1.weight": (4 * D, D), "norm.weight": (D,),
              "decoder_embed.weight": (512, D), "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 197, 512),
              "decoder_blocks.7.attn.proj.weight": (512, 512), "decoder_norm.bias": (512,), "decoder_pred.weight": (P, 512)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    # cls, pos, patch w/b; 12 blocks x 12; norm; decoder_embed; mask_token; decoder_pos; 8 x 12; decoder norm, pred
    assert len(sd) == 4 + 12 * 12 + 2 + 2 + 1 + 1 + 8 * 12 + 2 + 2     # every tensor of models_mae.py, no more
    trainable = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for n, p in model.named_parameters()
                  if p.requires_grad and not n.startswith(("decoder", "mask_token")))
    assert round(total / 1e6, 2) == 111.66 and round(encoder / 1e6, 2) == 85.65
    assert round((total - encoder) / 1e6, 2) == 26.01
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert trainable("pos_embed") == 0


def test_official_init(tiny):
    assert torch.allclose(tiny.pos_embed[0], mae.get_2d_sincos_pos_embed(192, 8, cls_token=True))
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in tiny.modules() if isinstance(m, torch.nn.Linear))
    w = tiny.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))                      # xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_encoder_only_checkpoint_loads_with_just_the_decoder_missing(tmp_path, tiny):
    enc = {k: v for k, v in tiny.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    C.save_checkpoint(tmp_path / "enc.pth", {"model": enc})
    other = mae.create_model("tiny")
    mae.load_weights(other, tmp_path / "enc.pth")
    assert torch.equal(other.blocks[3].mlp.fc2.weight, tiny.blocks[3].mlp.fc2.weight)
    bad = dict(enc); bad.pop("norm.weight")
    C.save_checkpoint(tmp_path / "bad.pth", {"model": bad})
    with pytest.raises(SystemExit, match="missing norm.weight"):
        mae.load_weights(other, tmp_path / "bad.pth")


def test_layer_decay_ids():
    assert mae.layer_id("cls_token", 12) == 0 and mae.layer_id("patch_embed.proj.weight", 12) == 0
    assert mae.layer_id("blocks.0.norm1.weight", 12) == 1 and mae.layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert mae.layer_id("head.weight", 12) == 13 and mae.layer_id("fc_norm.bias", 12) == 13


def test_norm_pix_picture_uses_no_hidden_statistics():
    imgs = torch.randn(1, 3, 16, 16)
    mask = (torch.rand(1, 16) > 0.5).float()
    mask[0, 0] = 0
    pred = torch.randn(1, 16, 48)
    a = mae.visible_stat_denorm(pred, imgs, mask, 4)
    hidden = mae.unpatchify(mask[:, :, None].expand(-1, -1, 48), 4)
    b = mae.visible_stat_denorm(pred, imgs + 50 * hidden, mask, 4)       # change only hidden pixels
    assert torch.allclose(a, b)


def test_smoke_and_a_short_run(tmp_path):
    mae.main(["--smoke"])
    out = tmp_path / "run"
    mae.main(["--epochs", "1", "--out", str(out), "--n_train", "256", "--n_val", "64"])
    m = json.loads((out / "metrics.json").read_text())
    for k in ("val_loss", "val_loss_init", "probe_acc", "probe_acc_init", "knn_acc", "knn_acc_init", "loss_first", "loss_last"):
        assert k in m
    assert m["val_loss"] < m["val_loss_init"]
    assert (out / "reconstructions.png").exists() and (out / "checkpoint.pt").exists()
