"""Tests for videomae.py (MAE-ST): each checks a property of the paper's mechanism or of mae_st.

The tests of an exercise are named after its -k expression (tokens, masking, pos_embed, unshuffle /
loss). A test that needs the model's forward replaces the OTHER exercises' functions by the slow,
obvious references below (`use_refs`), so that a blanked or wrong function fails only its own
exercise's tests."""
import pytest
import torch

import common as C
import videomae as V


def small(**kw):
    torch.manual_seed(0)
    return V.create_model("tiny", **kw)


# ------------------------------------------------------------ slow, obvious references (loops)

def ref_patch_embed(self, x):
    """PatchEmbed.forward by a loop over the cubes: token (t, i, j) = W . cube + b, time-major."""
    N, u, p = x.shape[0], self.t_patch_size, self.patch_size
    T, H, W = self.input_size
    w = self.proj.weight.reshape(self.proj.out_channels, -1)          # (D, 3 u p p), (c, u, p, q) order
    slices = []
    for t in range(T):
        row = []
        for i in range(H):
            for j in range(W):
                cube = x[:, :, t * u:(t + 1) * u, i * p:(i + 1) * p, j * p:(j + 1) * p]   # (N, 3, u, p, p)
                row.append(cube.reshape(N, -1) @ w.t() + self.proj.bias)
        slices.append(torch.stack(row, 1))                             # (N, S, D)
    return torch.stack(slices, 1)                                      # (N, T', S, D)


def ref_patchify(self, videos):
    """patchify by a loop: token (t, i, j) holds its cube with the channel varying fastest."""
    N, _, T, H, W = videos.shape
    p, u = self.patch_size, self.t_pred_patch_size
    rows = []
    for t in range(T // u):
        for i in range(H // p):
            for j in range(W // p):
                cube = videos[:, :, t * u:(t + 1) * u, i * p:(i + 1) * p, j * p:(j + 1) * p]   # (N, c, u, p, q)
                rows.append(cube.permute(0, 2, 3, 4, 1).reshape(N, -1))                   # (u, p, q, c)
    return torch.stack(rows, 1)                                        # (N, L, u p p c)


def ref_random_masking(x, mask_ratio, noise=None, *, mask_type="random", t_size=1):
    """The given noise or the same draw as mae_st (noise = torch.rand(N, L), or (N, S) for tubes),
    then by hand: sort the tokens by their noise (ties by index), keep the first len_keep."""
    N, L, D = x.shape
    if mask_type == "random":
        noise = torch.rand(N, L) if noise is None else noise
        len_keep = int(L * (1 - mask_ratio))
        order = [sorted(range(L), key=lambda l: (noise[n, l].item(), l)) for n in range(N)]
    else:
        S = L // t_size
        noise = torch.rand(N, S) if noise is None else noise
        len_keep = t_size * int(S * (1 - mask_ratio))
        order = [[t * S + s for s in sorted(range(S), key=lambda s: (noise[n, s].item(), s))
                  for t in range(t_size)] for n in range(N)]
    ids_shuffle = torch.tensor(order)                                  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep]
    ids_restore = torch.empty_like(ids_shuffle)
    mask = torch.ones(N, L)
    for n in range(N):
        for k, l in enumerate(order[n]):
            ids_restore[n, l] = k
        for l in order[n][:len_keep]:
            mask[n, l] = 0.0
    x_masked = torch.stack([x[n, ids_keep[n]] for n in range(N)])     # (N, len_keep, D)
    ref_random_masking.last = dict(mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)
    return x_masked, mask, ids_restore, ids_keep


def ref_separable_pos_embed(spatial, temporal):
    """pos[t * S + s] = spatial[s] + temporal[t], one row at a time."""
    S, T = spatial.shape[1], temporal.shape[1]
    return torch.stack([spatial[0, s] + temporal[0, t] for t in range(T) for s in range(S)])[None]


def use_refs(monkeypatch, *names):
    """Replace the named exercises' functions in videomae by the references above."""
    table = {"tokens": [(V.PatchEmbed, "forward", ref_patch_embed),
                        (V.MaskedAutoencoderViT, "patchify", ref_patchify)],
             "masking": [(V, "random_masking", ref_random_masking)],
             "pos_embed": [(V, "separable_pos_embed", ref_separable_pos_embed)]}
    for name in names:
        for obj, attr, fn in table[name]:
            monkeypatch.setattr(obj, attr, fn)


def perturb(model, seed=3):
    """Non-trivial parameters: every zero-initialised table, bias, token gets random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "token" in name or "pos_embed" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def first_input(module):
    """Records the input of `module` at the next forward."""
    seen = {}
    module.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("x", inp[0].detach().clone()))
    return seen


def test_tokens_are_time_major_conv_output():
    """Token t*H'W' + i*W' + j is the Conv3d output at (t, i, j): the layout the pos tables assume."""
    m = small()
    x = torch.randn(2, 3, 8, 32, 32)
    tokens = m.patch_embed(x)                                   # (N, T', S, D)
    conv = m.patch_embed.proj(x)                                # (N, D, T', H', W')
    T, H, W = m.input_size
    flat = tokens.reshape(2, T * H * W, -1)
    for t, i, j in [(0, 0, 0), (1, 2, 3), (3, 3, 0), (2, 0, 1)]:
        assert torch.equal(flat[:, t * H * W + i * W + j], conv[:, :, t, i, j])


def test_tokens_equal_a_loop_over_the_cubes():
    """Every token, not a few: the embedding of cube (t, i, j) sits at t*H'W' + i*W' + j."""
    m = perturb(small())
    x = torch.randn(2, 3, 8, 32, 32)
    assert torch.allclose(m.patch_embed(x), ref_patch_embed(m.patch_embed, x), atol=1e-5)
    # a clip whose tubelet grid is not square in spacetime (T' = 2, H' = W' = 3)
    pe = V.PatchEmbed(img_size=24, patch_size=8, embed_dim=16, frames=4, t_patch_size=2)
    x = torch.randn(3, 3, 4, 24, 24)
    assert pe(x).shape == (3, 2, 9, 16)
    assert torch.allclose(pe(x), ref_patch_embed(pe, x), atol=1e-5)


def test_tokens_patchify_layout_and_round_trip():
    m = small()
    v = torch.randn(2, 3, 4, 32, 32)                            # the 4 target frames
    x = m.patchify(v)                                           # (N, L, p*p*3), u = 1
    assert x.shape == (2, 4 * 16, 8 * 8 * 3)
    assert torch.equal(m.unpatchify(x), v)
    # token (t=1, row 2, col 3), values in (p, q, c) order: the channel varies fastest
    ref = v[1, :, 1, 16:24, 24:32].permute(1, 2, 0).reshape(-1)
    assert torch.equal(x[1, 1 * 16 + 2 * 4 + 3], ref)
    assert torch.equal(x, ref_patchify(m, v))


def test_tokens_patchify_two_frames_per_token():
    """pred_t_dim = num_frames: u = 2 frames per token, values (u, p, q, c); the two frames of a
    token are frames 2t and 2t+1 (a tubelet), not t and t + T/2."""
    m = small(pred_t_dim=8)
    assert m.t_pred_patch_size == 2
    v = torch.randn(2, 3, 8, 32, 32)
    x = m.patchify(v)
    assert x.shape == (2, 64, 2 * 8 * 8 * 3)
    assert torch.equal(x, ref_patchify(m, v))
    assert torch.equal(x[0, 3 * 16 + 1 * 4 + 2, :192], v[0, :, 6, 8:16, 16:24].permute(1, 2, 0).reshape(-1))
    assert torch.equal(x[0, 3 * 16 + 1 * 4 + 2, 192:], v[0, :, 7, 8:16, 16:24].permute(1, 2, 0).reshape(-1))


def test_tokens_encoder_token_and_target_token_are_the_same_cube():
    """The loss compares prediction i with target i: token i of the encoder (PatchEmbed) and token i
    of the target (patchify) must be made of the same 2 x p x p cube of the clip."""
    m = small(pred_t_dim=8)                                     # u = 2: the target token is the whole cube
    T, H, W = m.input_size
    zero = torch.zeros(1, 3, 8, 32, 32)
    base = m.patch_embed(zero)[0].reshape(T * H * W, -1)        # (L, D): the conv bias alone
    for t, i, j in [(0, 0, 0), (1, 2, 3), (3, 0, 1), (2, 3, 2)]:
        v = zero.clone()
        v[0, :, 2 * t:2 * t + 2, 8 * i:8 * i + 8, 8 * j:8 * j + 8] = torch.randn(3, 2, 8, 8)
        changed_enc = (m.patch_embed(v)[0].reshape(T * H * W, -1) - base).abs().sum(-1) > 0   # (L,)
        changed_tgt = m.patchify(v)[0].abs().sum(-1) > 0                                      # (L,)
        k = t * H * W + i * W + j
        assert changed_enc.nonzero().flatten().tolist() == [k]
        assert changed_tgt.nonzero().flatten().tolist() == [k]


def test_tokens_reach_the_encoder_in_time_major_order(monkeypatch):
    """Where the model uses them: the encoder's first block sees cls, then the kept tokens, each
    the embedding of its own cube plus its own position (masking and positions: references)."""
    use_refs(monkeypatch, "masking", "pos_embed")
    m = perturb(small())
    x = torch.randn(2, 3, 8, 32, 32)
    seen = first_input(m.blocks[0])
    torch.manual_seed(4)
    m.forward_encoder(x, 0.75)
    ids_keep = ref_random_masking.last["ids_keep"]
    tokens = ref_patch_embed(m.patch_embed, x).reshape(2, 64, -1)     # (N, L, D)
    pos = ref_separable_pos_embed(m.pos_embed_spatial, m.pos_embed_temporal)[0]
    assert seen["x"].shape == (2, 1 + 16, 128)
    for n in range(2):
        for k, l in enumerate(ids_keep[n].tolist()):
            assert torch.allclose(seen["x"][n, 1 + k], tokens[n, l] + pos[l], atol=1e-5)


def test_masking_keeps_156_of_1568():
    torch.manual_seed(0)
    x = torch.randn(3, 1568, 4)
    kept, mask, ids_restore, ids_keep = V.random_masking(x, 0.9)
    assert kept.shape == (3, 156, 4) and ids_keep.shape == (3, 156)
    assert torch.equal(mask.sum(1), torch.full((3,), 1568.0 - 156))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)     # the kept indices are the unmasked ones
    # [kept, removed] in shuffled order, gathered with ids_restore, is the original sequence
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    removed = torch.gather(x, 1, ids_shuffle[:, 156:, None].expand(-1, -1, 4))
    back = torch.gather(torch.cat([kept, removed], 1), 1, ids_restore[:, :, None].expand(-1, -1, 4))
    assert torch.equal(back, x)
    # masking is different for each sample
    assert not torch.equal(mask[0], mask[1])


def test_masking_tube_is_the_same_in_every_time_slice():
    torch.manual_seed(0)
    T, S = 8, 196
    x = torch.randn(4, T * S, 2)
    kept, mask, ids_restore, ids_keep = V.random_masking(x, 0.9, mask_type="tube", t_size=T)
    m = mask.reshape(4, T, S)                                   # (N, T', S)
    assert torch.equal(m, m[:, :1].expand(-1, T, -1))           # one spatial mask, repeated over time
    assert kept.shape[1] == T * int(S * 0.1) == 152
    assert torch.equal(mask.sum(1), torch.full((4,), T * S - 152.0))
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
    assert torch.equal(kept, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 2)))
    assert not torch.equal(m[0], m[1])                          # a different tube set per sample
    # while random masking is not a tube
    _, mask_r, _, _ = V.random_masking(x, 0.9, mask_type="random", t_size=T)
    mr = mask_r.reshape(4, T, S)
    assert not torch.equal(mr, mr[:, :1].expand(-1, T, -1))


@pytest.mark.parametrize("mask_type, L, T, ratio", [("random", 1568, 8, 0.9), ("random", 64, 4, 0.75),
                                                    ("tube", 64, 4, 0.75), ("tube", 1568, 8, 0.9)])
def test_masking_matches_the_reference_draw(mask_type, L, T, ratio):
    """The official draw: noise = torch.rand(N, L) (tube: torch.rand(N, S)), the tokens with the
    SMALLEST noise kept, in increasing noise order; every output equal to the loop reference."""
    x = torch.randn(3, L, 5)
    torch.manual_seed(11)
    got = V.random_masking(x, ratio, mask_type=mask_type, t_size=T)
    torch.manual_seed(11)
    ref = ref_random_masking(x, ratio, mask_type=mask_type, t_size=T)
    for name, a, b in zip(["x_masked", "mask", "ids_restore", "ids_keep"], got, ref):
        assert a.shape == b.shape and torch.equal(a.to(b.dtype), b), name


@pytest.mark.parametrize("mask_type, L, T, ratio", [("random", 64, 4, 0.75), ("tube", 64, 4, 0.75),
                                                    ("tube", 1568, 8, 0.9)])
def test_masking_uses_the_given_noise(mask_type, L, T, ratio):
    """noise= (as mae.py's): (N, L) for random, (N, S) one per spatial position for tube; the
    result is the loop reference's on that noise, whatever the global generator holds."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, L, 5, generator=g)
    noise = torch.rand(3, L if mask_type == "random" else L // T, generator=g)
    torch.manual_seed(0)
    got = V.random_masking(x, ratio, noise.clone(), mask_type=mask_type, t_size=T)
    torch.manual_seed(1)
    ref = ref_random_masking(x, ratio, noise, mask_type=mask_type, t_size=T)
    for name, a, b in zip(["x_masked", "mask", "ids_restore", "ids_keep"], got, ref):
        assert a.shape == b.shape and torch.equal(a.to(b.dtype), b), name


@pytest.mark.parametrize("mask_type", ["random", "tube"])
def test_model_forward_masking_uses_the_given_noise(mask_type):
    """model(videos, mask_ratio, noise) hands the noise to random_masking (as mae.py's forward):
    the mask is random_masking's on that noise, whatever the global generator holds."""
    torch.manual_seed(0)
    m = small(mask_type=mask_type).eval()
    videos = torch.randn(2, 3, 8, 32, 32)
    T, S = 4, 16                                                # tiny: 2x8x8 cubes of an 8x32x32 clip
    noise = torch.rand(2, T * S if mask_type == "random" else S, generator=torch.Generator().manual_seed(5))
    _, want, _, _ = V.random_masking(torch.zeros(2, T * S, 1), 0.75, noise, mask_type=mask_type, t_size=T)
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            _, _, mask = m(videos, 0.75, noise)
        assert torch.equal(mask, want)


def test_masking_tube_leaves_nothing_to_copy_from_other_frames():
    """Why tubes are harder (explore exercise): with random spacetime masking a removed token's
    spatial position is often visible in another time slice (1 - r^(T'-1) of them: 0.52 for the
    paper's 8 x 196 at 90%), so the decoder can copy a static background from there; a tube
    removes the position in every slice, so nothing of it is left anywhere in the clip."""
    def copyable(mask, T, S):
        m = mask.reshape(-1, T, S)                              # (N, T', S)
        visible_somewhere = (m == 0).any(1, keepdim=True).expand(-1, T, -1)   # (N, T', S)
        return (visible_somewhere & (m == 1)).sum().item() / (m == 1).sum().item()
    torch.manual_seed(0)
    T, S = 8, 196
    x = torch.zeros(16, T * S, 1)
    _, mask_r, _, _ = V.random_masking(x, 0.9, mask_type="random", t_size=T)
    _, mask_t, _, _ = V.random_masking(x, 0.9, mask_type="tube", t_size=T)
    assert abs(copyable(mask_r, T, S) - (1 - 0.9 ** (T - 1))) < 0.03
    assert copyable(mask_t, T, S) == 0.0


def test_masking_where_the_encoder_uses_it(monkeypatch):
    """The model's own forward: the encoder sees exactly the tokens with mask 0 (in ids_keep
    order), and the returned mask / ids_restore are those of that draw; tube via mask_type."""
    use_refs(monkeypatch, "tokens", "pos_embed")
    for mask_type, n_keep in [("random", 16), ("tube", 16)]:
        m = perturb(small(mask_type=mask_type))
        x = torch.randn(3, 3, 8, 32, 32)
        seen = first_input(m.blocks[0])
        torch.manual_seed(6)
        latent, mask, ids_restore = m.forward_encoder(x, 0.75)
        assert latent.shape == (3, n_keep, 128) and seen["x"].shape == (3, 1 + n_keep, 128)
        tokens = ref_patch_embed(m.patch_embed, x).reshape(3, 64, -1)
        tokens = tokens + ref_separable_pos_embed(m.pos_embed_spatial, m.pos_embed_temporal)
        for n in range(3):
            kept = (mask[n] == 0).nonzero().flatten()              # token indices the model kept
            assert len(kept) == n_keep
            order = ids_restore[n, kept].argsort()                 # their order in the shuffled sequence
            assert torch.allclose(seen["x"][n, 1:], tokens[n, kept[order]], atol=1e-5)
        torch.manual_seed(6)
        _, ref_mask, ref_restore, _ = ref_random_masking(tokens, 0.75, mask_type=mask_type, t_size=4)
        assert torch.equal(mask, ref_mask) and torch.equal(ids_restore, ref_restore)
        if mask_type == "tube":
            assert torch.equal(mask.reshape(3, 4, 16), mask.reshape(3, 4, 16)[:, :1].expand(-1, 4, -1))


def test_pos_embed_table_is_spatial_plus_temporal():
    spatial, temporal = torch.randn(1, 6, 5), torch.randn(1, 3, 5)
    table = V.separable_pos_embed(spatial, temporal)
    assert table.shape == (1, 18, 5)
    for t in range(3):
        for s in range(6):
            assert torch.equal(table[0, t * 6 + s], spatial[0, s] + temporal[0, t])
    # the paper's grid: 8 time slices x 196 positions, every one of the 1568 rows
    spatial, temporal = torch.randn(1, 196, 4), torch.randn(1, 8, 4)
    assert torch.equal(V.separable_pos_embed(spatial, temporal), ref_separable_pos_embed(spatial, temporal))


def test_pos_embed_every_kept_token_gets_its_own_position(monkeypatch):
    """Where the model uses it (mae_st adds the table AFTER masking, gathered at ids_keep): the
    encoder's k-th input token is the embedding of token l = ids_keep[k] plus spatial[s] +
    temporal[t] of that token's own (t, s) = divmod(l, S); the cls token carries pos_embed_class."""
    use_refs(monkeypatch, "tokens", "masking")
    m = perturb(small())
    with torch.no_grad():                                       # trained tables are far from 0.02-noise
        m.pos_embed_spatial.normal_()
        m.pos_embed_temporal.normal_()
    x = torch.randn(2, 3, 8, 32, 32)
    seen = first_input(m.blocks[0])
    torch.manual_seed(5)
    m.forward_encoder(x, 0.75)
    ids_keep = ref_random_masking.last["ids_keep"]
    tokens = ref_patch_embed(m.patch_embed, x).reshape(2, 64, -1)      # (N, L, D)
    S = 16
    for n in range(2):
        for k, l in enumerate(ids_keep[n].tolist()):
            t, s = divmod(l, S)
            expect = tokens[n, l] + m.pos_embed_spatial[0, s] + m.pos_embed_temporal[0, t]
            assert torch.allclose(seen["x"][n, 1 + k], expect, atol=1e-5), (n, k, t, s)
        assert torch.allclose(seen["x"][n, 0], m.cls_token[0, 0] + m.pos_embed_class[0, 0])


def test_pos_embed_gives_gradient_to_the_rows_in_use(monkeypatch):
    """Both tables are learned: temporal[t] gets the gradient of every kept token in slice t, and
    spatial[s] of every kept token at position s; rows no kept token uses get none."""
    use_refs(monkeypatch, "tokens", "masking")
    m = small()
    x = torch.randn(1, 3, 8, 32, 32)
    torch.manual_seed(7)
    latent, _, _ = m.forward_encoder(x, 0.9)                   # 6 of 64 tokens kept
    # a random read-out: the plain sum of a LayerNorm's output (unit weight, zero bias) has a zero
    # gradient up to rounding, which made the test depend on floating-point noise
    w = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    (latent * w).sum().backward()
    kept = ref_random_masking.last["ids_keep"][0].tolist()
    used_t, used_s = {l // 16 for l in kept}, {l % 16 for l in kept}
    g_t = m.pos_embed_temporal.grad[0].abs().sum(-1)            # (T',)
    g_s = m.pos_embed_spatial.grad[0].abs().sum(-1)             # (S,)
    assert [t for t in range(4) if g_t[t] > 0] == sorted(used_t)
    assert [s for s in range(16) if g_s[s] > 0] == sorted(used_s)


def test_target_frames_one_per_token_at_official_indices(monkeypatch):
    use_refs(monkeypatch, "tokens")
    assert V.target_frame_indices(16, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 15]   # 15, not 14 (mae_st)
    assert V.target_frame_indices(8, 4).tolist() == [0, 2, 4, 7]
    with torch.device("meta"):
        m = V.create_model("large")
    assert m.t_pred_patch_size == 1 and m.decoder_pred.out_features == 16 * 16 * 3  # 768: one frame per token
    # the target really is those frames: changing any other frame leaves it unchanged
    t = small()
    v = torch.randn(1, 3, 8, 32, 32)
    w = v.clone()
    w[:, :, [1, 3, 5, 6]] += 1.0
    assert torch.equal(V.prediction_target(t, v), V.prediction_target(t, w))
    w[:, :, 7] += 1.0
    assert not torch.equal(V.prediction_target(t, v), V.prediction_target(t, w))


def ref_loss(pred, target, mask):
    """Mean over the removed tokens of each token's mean squared error, by a loop."""
    total, count = 0.0, 0
    for n in range(mask.shape[0]):
        for l in range(mask.shape[1]):
            if mask[n, l] == 1:
                total += ((pred[n, l] - target[n, l]) ** 2).mean().item()
                count += 1
    return total / count


def test_loss_only_on_removed_patches(monkeypatch):
    use_refs(monkeypatch, "tokens")
    m = small()
    v = torch.randn(2, 3, 8, 32, 32)
    pred = torch.randn(2, 64, 192, requires_grad=True)
    mask = torch.ones(2, 64)
    mask[0, [3, 7, 8, 20, 41, 63]] = 0                         # an uneven number removed per sample
    mask[1, [0, 1, 2, 5, 9, 10, 11, 30, 33, 50, 60]] = 0
    loss = V.forward_loss(m, v, pred, mask)
    loss.backward()
    vis = mask == 0
    assert torch.all(pred.grad[vis] == 0) and torch.all(pred.grad[~vis].abs().sum(-1) > 0)
    changed = pred.detach().clone()
    changed[vis] += 100.0
    assert torch.equal(V.forward_loss(m, v, changed, mask), loss.detach())
    # the value: the mean over ALL removed tokens of the batch of the per-token mean squared error
    target = ref_patchify(m, v[:, :, [0, 2, 4, 7]])
    assert abs(loss.item() - ref_loss(pred.detach(), target, mask)) < 1e-5
    # a batch-level mean, not the mean of per-sample means (the two samples remove 58 and 53)
    per_sample = [((pred[n] - target[n]) ** 2).mean(-1)[mask[n] == 1].mean().item() for n in range(2)]
    assert abs(loss.item() - sum(per_sample) / 2) > 1e-4


def test_loss_in_the_model_forward(monkeypatch):
    """model(videos) returns the loss of ITS prediction against the patchified target frames on the
    removed tokens of ITS mask (norm_pix: each target patch standardised, unbiased var, eps 1e-6)."""
    use_refs(monkeypatch, "tokens", "masking", "pos_embed")
    for norm_pix in (False, True):
        m = perturb(small(norm_pix_loss=norm_pix))
        v = torch.randn(2, 3, 8, 32, 32) * 2 + 0.5
        torch.manual_seed(8)
        loss, pred, mask = m(v, 0.9)
        assert pred.shape == (2, 64, 192) and torch.equal(mask, ref_random_masking.last["mask"])
        target = ref_patchify(m, v[:, :, [0, 2, 4, 7]])
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        assert abs(loss.item() - ref_loss(pred.detach(), target, mask)) < 1e-5


def test_norm_pix_target_is_standardised_per_patch(monkeypatch):
    use_refs(monkeypatch, "tokens")
    m = small(norm_pix_loss=True)
    v = torch.randn(2, 3, 8, 32, 32) * 3 + 1
    target = V.prediction_target(m, v)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 64), atol=1e-3)     # unbiased variance, as mae_st


def decoder_case(monkeypatch, mask_ratio=0.75, seed=9):
    use_refs(monkeypatch, "tokens", "masking", "pos_embed")
    m = perturb(small())
    with torch.no_grad():
        m.decoder_pos_embed_spatial.normal_()
        m.decoder_pos_embed_temporal.normal_()
    x = torch.randn(2, 3, 8, 32, 32)
    torch.manual_seed(seed)
    latent, mask, ids_restore = m.forward_encoder(x, mask_ratio)
    return m, latent, mask, ids_restore, ref_random_masking.last["ids_keep"]


def test_unshuffle_every_token_reaches_its_slot(monkeypatch):
    """The decoder's first block sees, at slot 1 + l (token order): decoder_embed of the encoded
    token l if it was kept (the k-th encoder output for l = ids_keep[k]), else the mask token; plus
    token l's own decoder position; slot 0 is decoder_cls_token + decoder_pos_embed_class."""
    for ratio in (0.75, 0.9):
        m, latent, mask, ids_restore, ids_keep = decoder_case(monkeypatch, ratio)
        seen = first_input(m.decoder_blocks[0])
        pred = m.forward_decoder(latent, ids_restore)
        assert pred.shape == (2, 64, 192) and seen["x"].shape == (2, 65, 64)
        S = 16
        for n in range(2):
            slot_of = {l: k for k, l in enumerate(ids_keep[n].tolist())}
            for l in range(64):
                t, s = divmod(l, S)
                content = m.decoder_embed(latent[n, slot_of[l]]) if l in slot_of else m.mask_token[0, 0]
                expect = content + m.decoder_pos_embed_spatial[0, s] + m.decoder_pos_embed_temporal[0, t]
                assert torch.allclose(seen["x"][n, 1 + l], expect, atol=1e-5), (n, l)
            assert torch.allclose(seen["x"][n, 0], m.decoder_cls_token[0, 0] + m.decoder_pos_embed_class[0, 0])


def test_unshuffle_prediction_of_token_l_is_slot_l(monkeypatch):
    """After the blocks: decoder_norm, decoder_pred, and the cls slot dropped, so that pred[:, l]
    is token l's prediction (what the loss compares with target l)."""
    m, latent, mask, ids_restore, _ = decoder_case(monkeypatch)
    out = {}
    m.decoder_blocks[-1].register_forward_hook(lambda mod, inp, o: out.__setitem__("x", o.detach()))
    pred = m.forward_decoder(latent, ids_restore)
    expect = m.decoder_pred(m.decoder_norm(out["x"]))          # (N, 1 + L, 192)
    assert torch.allclose(pred, expect[:, 1:], atol=1e-5)


def test_unshuffle_decoder_is_order_free(monkeypatch):
    """The same visible tokens in another shuffled order (with the matching ids_restore) give the
    same prediction for every token: the un-shuffle, not the order of the encoder, places them."""
    m, latent, mask, ids_restore, _ = decoder_case(monkeypatch)
    a = m.forward_decoder(latent, ids_restore)
    K = latent.shape[1]
    perm = torch.randperm(K)
    ids_shuffle = ids_restore.argsort(1)
    ids_shuffle2 = torch.cat([ids_shuffle[:, :K][:, perm], ids_shuffle[:, K:]], 1)
    b = m.forward_decoder(latent[:, perm], ids_shuffle2.argsort(1))
    assert torch.allclose(a, b, atol=1e-5)


def test_large_has_official_names_and_shapes():
    with torch.device("meta"):
        m = V.create_model("large")
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expect = {
        "cls_token": (1, 1, 1024), "decoder_cls_token": (1, 1, 512), "mask_token": (1, 1, 512),
        "pos_embed_spatial": (1, 196, 1024), "pos_embed_temporal": (1, 8, 1024), "pos_embed_class": (1, 1, 1024),
        "patch_embed.proj.weight": (1024, 3, 2, 16, 16), "patch_embed.proj.bias": (1024,),
        "blocks.23.attn.q.weight": (1024, 1024), "blocks.23.attn.k.bias": (1024,), "blocks.0.attn.v.weight": (1024, 1024),
        "blocks.0.attn.proj.weight": (1024, 1024), "blocks.0.mlp.fc1.weight": (4096, 1024),
        "blocks.0.mlp.fc2.weight": (1024, 4096), "blocks.0.norm1.weight": (1024,), "blocks.0.norm2.bias": (1024,),
        "norm.weight": (1024,), "decoder_embed.weight": (512, 1024),
        "decoder_pos_embed_spatial": (1, 196, 512), "decoder_pos_embed_temporal": (1, 8, 512),
        "decoder_pos_embed_class": (1, 1, 512), "decoder_blocks.3.attn.q.weight": (512, 512),
        "decoder_norm.weight": (512,), "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    assert "blocks.24.norm1.weight" not in sd and "decoder_blocks.4.norm1.weight" not in sd   # 24 + 4 blocks
    # cls + 3 pos tables, patch embed, 24 blocks of 16, norm, decoder_embed, mask + cls + 3 pos, 4 blocks, norm, pred
    assert len(sd) == 4 + 2 + 16 * 24 + 2 + 2 + 5 + 16 * 4 + 2 + 2 == 467
    assert m.patch_embed.num_patches == 1568
    assert m.blocks[0].attn.num_heads == 16 and m.decoder_blocks[0].attn.num_heads == 16


def test_official_init():
    m = small()
    assert torch.all(m.decoder_cls_token == 0)                  # never initialised in mae_st
    assert torch.all(m.blocks[0].attn.q.bias == 0) and torch.all(m.norm.weight == 1)
    w = m.blocks[0].mlp.fc1.weight                              # xavier_uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (w.shape[0] + w.shape[1])) ** 0.5
    pe = m.patch_embed.proj.weight                              # xavier on the (D, 3*2*8*8) view
    assert pe.abs().max() <= (6 / (pe.shape[0] + pe[0].numel())) ** 0.5
    assert 0.01 < m.pos_embed_spatial.std() < 0.03


def test_pyslowfast_checkpoint_loads_after_renaming(tmp_path, capsys):
    """The released files store the decoder as pred_head.* with dec_pos_embed_*; they load strictly,
    and the log names the head count the load really set (width / 64, not always 8)."""
    src = small()
    sd, depth = src.state_dict(), len(src.decoder_blocks)
    ported = {}
    for k, v in sd.items():
        if k == "decoder_cls_token":
            continue                                            # PySlowFast has none
        if k.startswith("decoder_blocks."):
            k = "pred_head.transforms.0." + k[len("decoder_blocks."):]
        elif k.startswith("decoder_norm."):
            k = f"pred_head.transforms.0.{depth}." + k[len("decoder_norm."):]
        elif k.startswith("decoder_pred."):
            k = "pred_head.projections.0." + k[len("decoder_pred."):]
        elif k.startswith("decoder_pos_embed_"):
            k = "dec_pos_embed_" + k[len("decoder_pos_embed_"):]
        ported[k] = v
    path = tmp_path / "k400.pyth"
    torch.save({"model_state": ported}, path)
    torch.manual_seed(1)
    dst = V.create_model("tiny", decoder_embed_dim=128)         # 128 / 64 = 2 heads after the load
    with pytest.raises(SystemExit, match="k400.pyth"):          # wrong decoder width: one-line error
        V.load_weights(dst, str(path), C.init_run(C.make_parser("t", "").parse_args(["--out", str(tmp_path)])))
    dst = V.create_model("tiny")
    run = C.init_run(C.make_parser("t", "").parse_args(["--out", str(tmp_path)]))
    V.load_weights(dst, str(path), run)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, torch.zeros_like(v) if k == "decoder_cls_token" else sd[k]), k
    assert dst.decoder_blocks[0].attn.num_heads == 1            # 64-d decoder / 64 per head
    assert "1 decoder heads = width 64 / 64" in capsys.readouterr().out


def test_flops_match_the_analytic_formula_and_the_paper_ratio():
    """Counted on the meta device (free): one block is 24*N*D^2 + 4*N^2*D FLOPs (attention included),
    and ViT-L at 90% gives the paper's 7.7x (627.5 vs 81.0 GFLOPs, Table 1) within 5%."""
    N, D = 157, 1024
    with torch.device("meta"):
        blk = V.Block(D, 16)
        x = torch.empty(1, N, D)
        assert C.count_flops(lambda: blk(x)) == 24 * N * D * D + 4 * N * N * D
        m = V.create_model("large")
        v = torch.empty(1, 3, 16, 224, 224)
        dense = C.count_flops(lambda: V.forward_with_mask_tokens(m, v, 0.9))
        sparse = C.count_flops(lambda: m(v, 0.9))
    assert abs(dense / sparse / 7.7 - 1) < 0.05
    assert abs(dense / 2e9 / 627.5 - 1) < 0.05 and abs(sparse / 2e9 / 81.0 - 1) < 0.05


def test_mask_token_encoder_at_mask_zero_equals_sparse_encoder():
    """With nothing removed, 'encoder w/ [M]' and the sparse encoder compute the same function
    (attention is permutation-equivariant; the sparse one only works in shuffled order)."""
    m = small()
    v = torch.randn(2, 3, 8, 32, 32)
    torch.manual_seed(2)
    latent, mask, ids_restore = m.forward_encoder(v, 0.0)
    a = m.forward_decoder(latent, ids_restore)
    captured = {}
    orig = m.forward_decoder
    m.forward_decoder = lambda x, ids: captured.setdefault("p", orig(x, ids))
    V.forward_with_mask_tokens(m, v, 0.0)
    assert torch.allclose(a, captured["p"], atol=1e-5)


def test_smoke_and_bad_weights(tmp_path):
    V.main(["--smoke", "--out", str(tmp_path)])                 # returns (raises SystemExit(1) on failure)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt"):
        V.main(["--weights", str(bad), "--out", str(tmp_path), "--epochs", "0"])
