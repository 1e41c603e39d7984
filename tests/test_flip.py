"""Tests for flip.py: each one checks a property of FLIP's mechanism (masking, pooling, temperature,
the contrastive loss, the text tower, the global-batch loss under DDP, the official-weight mapping)."""
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flip  # noqa: E402

SMALL = dict(img_size=16, patch_size=4, width=32, depth=2, heads=2, text_width=32, text_depth=2,
             text_heads=2, embed_dim=16, vocab_size=50, context_length=8)


def small_model(**kw):
    torch.manual_seed(0)
    return flip.create_model("tiny", **{**SMALL, **kw})


def batch(n=4, model=None):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(2, 50, (n, 8), generator=g)


def perturbed_model(**kw):
    """small_model with nothing left at a trivial value: LayerNorm scales and biases, every bias,
    the cls token and both position tables perturbed (zero or one hides many mistakes)."""
    model = small_model(**kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or name.endswith("cls_token"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.text.pos_embed.add_(0.3 * torch.randn(model.text.pos_embed.shape, generator=g))
        model.visual.pos_embed[:, 1:] += 0.1 * torch.randn(model.visual.pos_embed[:, 1:].shape, generator=g)
    return model


def gen(seed=5):
    return torch.Generator().manual_seed(seed)


def uniform(B, L, seed):
    """The masking noise a test hands to random_masking (noise=): (B, L) uniform in [0, 1)."""
    return torch.rand(B, L, generator=gen(seed))


# ------------------------------------------------------------------ slow obvious references
# (the tests of one exercise monkeypatch the OTHER exercises' functions with these, so that a
# blanked function fails only its own exercise's tests)


def ref_random_masking(x, mask_ratio, noise=None, *, bias=None):
    """One sample at a time: the same uniform noise (plus the bias), sorted by Python; the first
    int(L(1-r)) patches in order of increasing noise are kept."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L) if noise is None else noise
    if bias is not None:
        noise = noise + bias
    visible, mask, restore = [], torch.ones(B, L), torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        order = sorted(range(L), key=lambda j: noise[b, j].item())  # patch ids, smallest noise first
        visible.append(torch.stack([x[b, j] for j in order[:keep]]))
        for rank, j in enumerate(order):
            restore[b, j] = rank  # where patch j sits in the shuffled order
            mask[b, j] = 0.0 if rank < keep else 1.0
    return torch.stack(visible), mask, restore


def ref_patch_tokens(tower, imgs):
    """(B, L, D): patch j is the p x p square at row j // w, column j % w (for a k x k kernel,
    k > p, the k x k window centred on it, zero-padded at the border), embedded by an explicit
    dot product with the conv kernel, plus ITS OWN position (row 1 + j of the table)."""
    p, w = tower.patch_size, tower.grid
    W, bias = tower.patch_embed.proj.weight, tower.patch_embed.proj.bias  # (D, 3, k, k), (D,)
    k = W.shape[-1]
    padded = F.pad(imgs, [(k - p) // 2] * 4)  # (B, 3, H + k - p, W + k - p)
    out = []
    for b in range(len(imgs)):
        tokens = []
        for j in range(w * w):
            r, c = divmod(j, w)
            window = padded[b, :, r * p:r * p + k, c * p:c * p + k]  # (3, k, k)
            tokens.append((W * window).sum((1, 2, 3)) + bias + tower.pos_embed[0, 1 + j])
        out.append(torch.stack(tokens))
    return torch.stack(out)


def ref_vision_forward(tower, imgs, mask_ratio=0.0, noise=None):
    """VisionTower.forward written out; it masks with flip.random_masking (whatever that is)."""
    x, mask = ref_patch_tokens(tower, imgs), None
    if mask_ratio > 0:
        x, mask, _ = flip.random_masking(x, mask_ratio, noise)
    x = torch.cat([tower.cls_token.expand(len(x), 1, -1), x], dim=1)
    for blk in tower.blocks:
        x = blk(x)
    return tower.norm(x).mean(dim=1), mask


def ref_text_forward(tower, tokens, mask_ratio=0.0, noise=None):
    """TextTower.forward written out: table look-up plus positions 0..T-1, blocks, LN, token 0;
    with text masking, the tokens flip.random_masking keeps (pads biased to go first), in order."""
    x = tower.token_embed.weight[tokens] + tower.pos_embed[0, : tokens.shape[1]]  # (B, T, W)
    if mask_ratio > 0:
        _, mask, _ = flip.random_masking(x, mask_ratio, noise, bias=(tokens == 0).float())
        x = torch.stack([torch.stack([x[b, j] for j in range(x.shape[1]) if mask[b, j] == 0]) for b in range(len(x))])
    for blk in tower.blocks:
        x = blk(x)
    return tower.norm(x)[:, 0]


@pytest.fixture
def ref_masking(monkeypatch):
    monkeypatch.setattr(flip, "random_masking", ref_random_masking)


@pytest.fixture
def ref_towers(monkeypatch):
    monkeypatch.setattr(flip, "random_masking", ref_random_masking)
    monkeypatch.setattr(flip.VisionTower, "forward", ref_vision_forward)
    monkeypatch.setattr(flip.TextTower, "forward", ref_text_forward)


# ------------------------------------------------------------------ exercise 1: random_masking


@pytest.mark.parametrize("ratio,keep", [(0.5, 98), (0.75, 49), (0.0, 196), (0.9, 19)])
def test_masking_keeps_int_L_times_1_minus_r(ratio, keep):
    x = torch.randn(3, 196, 8)
    vis, mask, ids_restore = flip.random_masking(x, ratio)
    assert vis.shape == (3, keep, 8)
    assert int(196 * (1 - ratio)) == keep
    assert (mask.sum(1) == 196 - keep).all()  # 1 = removed
    for b in range(3):  # the kept tokens are exactly the unmasked rows, nothing invented
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept.sum(1)).values, torch.sort(vis[b].sum(1)).values)
    assert torch.equal(ids_restore.sort(1).values, torch.arange(196).expand(3, -1))


@pytest.mark.parametrize("ratio,L", [(0.5, 16), (0.75, 16), (0.75, 10), (0.3, 7)])
def test_masking_equals_slow_reference_with_the_same_noise(ratio, L):
    """Every kept token in its slot (increasing noise), the mask in the patch order, ids_restore,
    all from the given noise (B, L): a new mask for every sample."""
    x = torch.randn(3, L, 5, generator=gen(0))
    vis, mask, ids_restore = flip.random_masking(x, ratio, uniform(3, L, 11))
    ref_vis, ref_mask, ref_restore = ref_random_masking(x, ratio, uniform(3, L, 11))
    assert vis.shape == ref_vis.shape == (3, int(L * (1 - ratio)), 5)
    assert torch.equal(vis, ref_vis)
    assert torch.equal(mask.float(), ref_mask)  # 1 = removed, 0 = kept, patch order
    assert torch.equal(ids_restore, ref_restore)
    assert not torch.equal(mask[0], mask[1])  # each sample draws its own noise
    # ids_restore undoes the shuffle: [visible, removed] gathered by it is x again
    removed = torch.stack([x[b][mask[b] == 1] for b in range(3)])  # any order is fine here
    full = torch.cat([vis, removed], dim=1)
    assert torch.equal(full.gather(1, ids_restore[:, :, None].expand(-1, -1, 5))[mask == 0],
                      x[mask == 0])


def test_masking_draws_its_own_uniform_noise_when_none_is_given():
    """noise=None: random_masking draws torch.rand(B, L) itself (the draw the training step
    uses), one row per sample, so every image loses its own patches."""
    x = torch.randn(8, 16, 5, generator=gen(0))
    torch.manual_seed(4)
    vis, mask, ids_restore = flip.random_masking(x, 0.5)
    torch.manual_seed(4)
    ref_vis, ref_mask, ref_restore = ref_random_masking(x, 0.5, torch.rand(8, 16))
    assert torch.equal(vis, ref_vis) and torch.equal(mask, ref_mask) and torch.equal(ids_restore, ref_restore)
    assert len({tuple(m.tolist()) for m in mask}) == 8  # 8 different masks


def test_masking_where_the_image_tower_uses_it(monkeypatch):
    """In the model's image tower (written out in the test): the tokens that reach the blocks are
    the cls token and exactly the patches the returned mask keeps, each with its own position."""
    monkeypatch.setattr(flip.VisionTower, "forward", ref_vision_forward)
    model = perturbed_model()
    m, imgs = model.visual, batch()[0]
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    for ratio in (0.5, 0.75):
        seen.clear()
        pooled, mask = m(imgs, ratio, uniform(4, 16, 3))
        _, ref_mask, _ = ref_random_masking(torch.zeros(4, 16, 1), ratio, uniform(4, 16, 3))
        assert torch.equal(mask.float(), ref_mask)
        tokens = ref_patch_tokens(m, imgs)  # (B, L, D), positions included
        keep = int(16 * (1 - ratio))
        assert seen[0].shape == (4, 1 + keep, 32)
        for b in range(4):
            assert torch.allclose(seen[0][b, 0], m.cls_token[0, 0])
            want = tokens[b][ref_mask[b] == 0]  # the kept patches, in patch order
            got = seen[0][b, 1:]
            order = [int(((want - g).abs().amax(1) < 1e-5).nonzero()[0]) for g in got]
            assert sorted(order) == list(range(keep))  # each kept patch once, nothing else
        t = torch.cat([m.cls_token.expand(4, 1, -1), torch.stack([tokens[b][ref_mask[b] == 0] for b in range(4)])], 1)
        for blk in m.blocks:
            t = blk(t)
        assert torch.allclose(pooled, m.norm(t).mean(1), atol=1e-5)


# ------------------------------------------------------------------ exercise 2: VisionTower.forward


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_vision_tower_equals_slow_reference(ratio, ref_masking):
    model = perturbed_model()
    m, imgs = model.visual, batch()[0]
    pooled, mask = m(imgs, ratio, uniform(4, 16, 4))
    ref_pooled, ref_mask = ref_vision_forward(m, imgs, ratio, uniform(4, 16, 4))
    assert torch.allclose(pooled, ref_pooled, atol=1e-5)
    if ratio == 0:
        assert mask is None
    else:  # the tower hands its noise to random_masking and returns the mask it made
        assert torch.equal(mask, ref_mask)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_vision_tower_sends_every_kept_token_in_its_slot(ratio, ref_masking):
    """The block input is [cls, the kept patches in the order of increasing noise], each patch
    with ITS OWN position (added before masking), and no more tokens than 1 + int(L (1 - r))."""
    model = perturbed_model()
    m, imgs = model.visual, batch()[0]
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    m(imgs, ratio, uniform(4, 16, 6))
    tokens = ref_patch_tokens(m, imgs)  # (B, L, D)
    if ratio > 0:
        tokens = ref_random_masking(tokens, ratio, uniform(4, 16, 6))[0]  # (B, L_keep, D)
    want = torch.cat([m.cls_token.expand(4, 1, -1), tokens], dim=1)
    assert seen[0].shape == want.shape == (4, 1 + int(16 * (1 - ratio)), 32)
    assert torch.allclose(seen[0], want, atol=1e-5)


def test_vision_tower_pools_mean_of_cls_and_visible_tokens(ref_masking):
    model = perturbed_model()
    m, imgs = model.visual, batch()[0]
    pooled, mask = m(imgs, 0.5, uniform(4, 16, 5))
    # redo the tower by hand on the patches the mask kept, one image at a time
    x = ref_patch_tokens(m, imgs)
    for b in range(len(imgs)):
        t = torch.cat([m.cls_token[0], x[b][mask[b] == 0]])[None]  # (1, 1 + 8, D)
        for blk in m.blocks:
            t = blk(t)
        assert torch.allclose(m.norm(t).mean(1)[0], pooled[b], atol=1e-5)
        assert not torch.allclose(m.norm(t)[0, 1:].mean(0), pooled[b], atol=1e-3)  # cls counts


# ------------------------------------------------------------------ the model as a whole


def test_eval_sees_every_patch_and_training_a_new_random_half():
    model = small_model()
    imgs, tokens = batch()
    model.eval()
    a, b = model(imgs, tokens)[0], model(imgs, tokens)[0]
    assert torch.equal(a, b)  # no randomness: every patch is seen
    assert torch.allclose(a, model.encode_image(imgs, 0.0)[0])
    model.train()
    c, d = model(imgs, tokens)[0], model(imgs, tokens)[0]
    assert not torch.allclose(c, d)  # a new random half of the patches each time


def test_weight_decay_groups_follow_the_official_mask():
    """Official t5x/train_state_initializer.py: decay everything but biases, norm scales and the
    position embeddings; the cls token, the logit scale and the token table ARE decayed."""
    model = small_model()
    decay, no_decay = flip.flip_param_groups(model, 0.2)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    name = {id(p): n for n, p in model.named_parameters()}
    decayed, exempt = {name[id(p)] for p in decay["params"]}, {name[id(p)] for p in no_decay["params"]}
    assert {"visual.cls_token", "logit_scale", "text.token_embed.weight", "img_proj.weight",
            "visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight"} <= decayed
    assert {"text.pos_embed", "visual.norm.weight", "text.blocks.1.norm2.weight",
            "visual.patch_embed.proj.bias", "text.blocks.0.mlp.fc1.bias"} <= exempt
    assert "visual.pos_embed" not in decayed | exempt  # fixed: not trained at all
    assert len(decayed) + len(exempt) == sum(p.requires_grad for p in model.parameters())


def test_embeddings_have_unit_norm():
    model = small_model().train()
    z_img, z_txt, _ = model(*batch())
    assert torch.allclose(z_img.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(z_txt.norm(dim=1), torch.ones(4), atol=1e-6)


def test_sincos_positions_first_half_encodes_the_column():
    pe = flip.get_2d_sincos_pos_embed(16, 3, cls_token=True)  # (1 + 9, 16)
    assert pe.dtype == torch.float32 and pe.shape == (10, 16)
    assert torch.equal(pe[0], torch.zeros(16))  # the cls slot
    assert torch.equal(flip.get_2d_sincos_pos_embed(16, 3), pe[1:])  # no cls row unless asked
    rect = flip.get_2d_sincos_pos_embed(16, (2, 3))  # 2 rows of 3 columns, row by row
    assert rect.shape == (6, 16) and torch.equal(rect, pe[1:7])
    row0 = torch.cat([torch.zeros(4), torch.ones(4)])  # [sin(0), cos(0)] of position 0
    assert torch.allclose(pe[1 + 0 * 3 + 2, 8:], row0)  # row 0, column 2: second half = row 0
    assert torch.allclose(pe[1 + 2 * 3 + 0, :8], row0)  # row 2, column 0: first half = column 0
    assert math.isclose(pe[1 + 0 * 3 + 1, 0].item(), math.sin(1.0), rel_tol=1e-6)  # column 1


def test_fused_qkv_init_matches_official_separate_kernels():
    D = 128
    model = flip.create_model("tiny", width=D, heads=4, depth=1, text_depth=1, vocab_size=10)
    w = model.visual.blocks[0].attn.qkv.weight
    # official: variance_scaling(0.5, "fan_avg", "uniform") on each [D, D] kernel -> var 0.5 / D
    assert abs(w.var().item() / (0.5 / D) - 1) < 0.03
    assert w.abs().max().item() <= math.sqrt(1.5 / D) + 1e-6


# ------------------------------------------------------------------ exercise 3: flip_loss, clipped_logit_scale


def test_infonce_logit_scale_init_and_clipping():
    model = small_model()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(model.clipped_logit_scale().exp().item(), 1 / 0.07, rel_tol=1e-5)
    z_img, z_txt = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    for value, grad_is_zero in ((5.0, True), (3.0, False), (-1.0, True)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        model.logit_scale.grad = None
        s = model.clipped_logit_scale()
        assert math.isclose(s.item(), min(max(value, 0.0), math.log(100)), rel_tol=1e-6)  # the LOG scale
        flip.flip_loss(z_img, z_txt, s).backward()
        assert (model.logit_scale.grad.abs().item() == 0) == grad_is_zero
        assert model.logit_scale.item() == value  # the parameter itself is never clamped


def slow_infonce(z_img, z_txt, s):  # the official hand-written log-softmax, one row at a time
    N = len(z_img)
    logits = [[math.exp(s) * float(z_img[i] @ z_txt[j]) for j in range(N)] for i in range(N)]
    rows = [-(logits[i][i] - math.log(sum(math.exp(v) for v in logits[i]))) for i in range(N)]
    cols = [-(logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(N)))) for i in range(N)]
    return (sum(rows) / N + sum(cols) / N) / 2


def test_infonce_equals_slow_reference_and_is_symmetric():
    torch.manual_seed(0)
    z_img, z_txt = torch.nn.functional.normalize(torch.randn(2, 6, 8, dtype=torch.float64), dim=-1)
    s = torch.tensor([2.3], dtype=torch.float64)
    loss = flip.flip_loss(z_img, z_txt, s).item()
    assert math.isclose(loss, slow_infonce(z_img, z_txt, 2.3), rel_tol=1e-9)
    assert math.isclose(loss, flip.flip_loss(z_txt, z_img, s).item(), rel_tol=1e-12)


def test_infonce_is_ln_batch_for_identical_embeddings_and_zero_for_matched_pairs():
    z = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1).expand(16, 8)
    for s in (0.0, 2.0, math.log(100)):
        assert math.isclose(flip.flip_loss(z, z, torch.tensor([s])).item(), math.log(16), rel_tol=1e-5)
    eye = torch.eye(16)  # matched pairs, every other pair orthogonal
    assert flip.flip_loss(eye, eye, torch.tensor([math.log(100)])).item() < 1e-6  # ~15 exp(-100)
    assert flip.flip_loss(eye, eye.roll(1, 0), torch.tensor([math.log(100)])).item() > 50  # mismatched


def test_infonce_contrasts_the_global_batch(monkeypatch):
    """Under DDP, gather_global returns the rows of every rank: the loss must contrast those
    (here another 'rank' holding 5 more pairs is simulated), with the positives on the diagonal."""
    torch.manual_seed(1)
    z_img, z_txt, o_img, o_txt = torch.nn.functional.normalize(torch.randn(4, 3, 8, dtype=torch.float64), dim=-1)
    o_img, o_txt = torch.cat([o_img, o_img[:2].flip(1)]), torch.cat([o_txt, o_txt[:2].flip(1)])  # 5 rows
    calls = []

    def fake_gather(z):  # this rank's rows first, then the other rank's
        calls.append(len(z))
        other = o_img if torch.equal(z, z_img) else o_txt
        return torch.cat([z, other])

    monkeypatch.setattr(flip, "gather_global", fake_gather)
    loss = flip.flip_loss(z_img, z_txt, torch.tensor([1.7], dtype=torch.float64)).item()
    assert calls == [3, 3]  # both modalities gathered
    want = slow_infonce(torch.cat([z_img, o_img]), torch.cat([z_txt, o_txt]), 1.7)  # 8 x 8 logits
    assert math.isclose(loss, want, rel_tol=1e-9)


def test_infonce_in_the_model_uses_the_clipped_scale(ref_towers):
    """The model's loss (loss_fn on a batch): e^s with s clipped at ln 100, and no gradient to the
    logit scale once it is clipped."""
    model = perturbed_model(mask_ratio=0.0).train()
    imgs, tokens = batch(6)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    loss = flip.loss_fn(model, (imgs, tokens, None))
    with torch.no_grad():
        z_img, z_txt = model.encode_image(imgs)[0].double(), model.encode_text(tokens).double()
    assert math.isclose(loss.item(), slow_infonce(z_img, z_txt, math.log(100)), rel_tol=1e-5)
    loss.backward()
    assert model.logit_scale.grad.abs().item() == 0
    assert model.visual.cls_token.grad.abs().sum() > 0  # the towers do learn


# ------------------------------------------------------------------ exercise 4: TextTower.forward


@pytest.mark.parametrize("T", [8, 5])
def test_text_tower_equals_slow_reference(T):
    """First-token output after the final LayerNorm, for a full context and for a shorter one
    (positions 0..T-1), with padding (id 0) inside the text: no pooling of the last or the
    end-of-text token, no mean."""
    model = perturbed_model().eval()
    tokens = batch()[1][:, :T].clone()
    tokens[0, 3:] = 0  # a short caption, padded
    tokens[1, T - 1] = 0
    out = model.text(tokens)
    assert out.shape == (4, 32)
    assert torch.allclose(out, ref_text_forward(model.text, tokens), atol=1e-5)
    # where the model uses it: the text embedding of the contrastive loss
    z = model.encode_text(tokens)
    want = model.txt_proj(ref_text_forward(model.text, tokens))
    assert torch.allclose(z, want / want.norm(dim=1, keepdim=True), atol=1e-5)


def test_text_tower_uses_position_embeddings_in_order():
    """The same word at another place gives another first-token output only through the positions:
    with the position table zeroed, swapping tokens 1 and 2 leaves the output unchanged (no causal
    mask, no position); with the real table it changes."""
    model = perturbed_model().eval()
    tokens = batch()[1]
    swapped = tokens.clone()
    swapped[:, [1, 2]] = tokens[:, [2, 1]]
    a, b = model.text(tokens), model.text(swapped)
    assert (a - b).abs().amax(1).min() > 1e-4
    with torch.no_grad():
        model.text.pos_embed.zero_()
    assert torch.allclose(model.text(tokens), model.text(swapped), atol=1e-5)


def test_text_tower_attention_is_not_causal():
    model = small_model().eval()
    tokens = batch()[1]
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50  # only the LAST token changes
    a, b = model.text(tokens), model.text(changed)  # first-token pooled outputs
    assert (a - b).abs().amax(1).min() > 1e-4  # a causal mask would keep them equal


def test_text_tower_txt_mask_ratio_removes_pads_first_and_keeps_caption_order(ref_masking, monkeypatch):
    """The text-masking ablation (--txt_mask_ratio): random_masking with bias +1 on the pads, so
    every pad goes before any word; the kept tokens reach the blocks in caption order (so the
    first kept one is pooled); the model masks the text in training only, when asked."""
    model = perturbed_model().eval()
    tokens = batch()[1].clone()  # (4, 8)
    tokens[0, 3:] = 0  # 3 words + 5 pads: keep 4 = the 3 words and one pad
    tokens[1, 6:] = 0  # 6 words + 2 pads: keep 4 of the 6 words, no pad
    seen = []
    model.text.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    out = model.text(tokens, 0.5, uniform(4, 8, 2))
    emb = model.text.token_embed.weight[tokens] + model.text.pos_embed[0, :8]  # (4, 8, 32)
    _, mask, _ = ref_random_masking(emb, 0.5, uniform(4, 8, 2), bias=(tokens == 0).float())
    assert seen[0].shape == (4, 4, 32)
    assert (mask[0, :3] == 0).all() and mask[0, 3:].sum() == 4  # every word kept, pads removed first
    assert (mask[1, 6:] == 1).all() and mask[1, :6].sum() == 2
    for b in range(4):
        assert torch.allclose(seen[0][b], emb[b][mask[b] == 0], atol=1e-6)  # in caption order
    assert torch.allclose(out, ref_text_forward(model.text, tokens, 0.5, uniform(4, 8, 2)), atol=1e-5)
    monkeypatch.setattr(flip.VisionTower, "forward", ref_vision_forward)  # the other exercises' parts
    monkeypatch.setattr(flip.FLIP, "clipped_logit_scale", lambda self: self.logit_scale)
    imgs = batch()[0]
    model.txt_mask_ratio, model.mask_ratio = 0.5, 0.0
    seen.clear()
    model(imgs, tokens)  # evaluation: every token
    model.train()
    model(imgs, tokens)  # training: half of them
    assert [t.shape[1] for t in seen] == [8, 4]


def test_tokenizer_pads_truncates_and_marks_unknown_words():
    tok = flip.Tokenizer.build(["a red circle", "a blue square."], context_length=5)
    ids = tok(["A red, circle", "a green square at the top left"])
    assert ids.shape == (2, 5)
    v = tok.index
    assert ids[0].tolist() == [v["a"], v["red"], 1, v["circle"], 0]  # "," unseen -> [UNK]=1, pad 0
    assert ids[1].tolist() == [v["a"], 1, v["square"], 1, 1]  # truncated to 5
    assert flip.words("一只猫 cat") == ["一", "只", "猫", "cat"]


# ------------------------------------------------------------------ the global batch under DDP


def _ddp_worker(rank, world, port, imgs, tokens, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = small_model(mask_ratio=0.0)
    net = torch.nn.parallel.DistributedDataParallel(model)
    n = len(imgs) // world
    loss = flip.flip_loss(*net(imgs[rank * n:(rank + 1) * n], tokens[rank * n:(rank + 1) * n]))
    loss.backward()  # DDP averages the gradients of the ranks
    torch.save(dict(loss=loss.detach(), grads={k: p.grad for k, p in model.named_parameters() if p.grad is not None}),
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_global_batch_loss_equals_one_process_with_the_whole_batch(tmp_path):
    imgs, tokens = batch(8)
    model = small_model(mask_ratio=0.0)
    loss = flip.flip_loss(*model(imgs, tokens))
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, imgs, tokens, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)  # 8x8 logits, not two 4x4
        for k, p in model.named_parameters():
            if p.grad is not None:
                assert torch.allclose(got["grads"][k], p.grad, atol=1e-6, rtol=1e-4), k


# ------------------------------------------------------------------ official weights


def test_official_parameter_tree_converts_with_jax_semantics():
    model = small_model(patch_kernel=None)  # the official p x p patch conv (tiny's windows overlap)
    D, W, p = 32, 32, 4
    rng = np.random.default_rng(0)
    shapes = {"img_encoder/embedding/kernel": (p, p, 3, D), "img_encoder/embedding/bias": (D,),
              "img_encoder/cls": (1, 1, D), "img_encoder/posembed_encoder/pos_embedding": (1, 17, D),
              "txt_encoder/token_embedding/embedding": (50, W),
              "txt_encoder/posembed_encoder/pos_embedding": (1, 8, W),
              "img_mlp1/kernel": (D, 16), "txt_mlp1/kernel": (W, 16), "logit_scale": (1,)}
    for enc, w in (("img_encoder", D), ("txt_encoder", W)):
        for i in range(2):
            b = f"{enc}/Transformer/encoderblock_{i:02d}"
            for ln in ("LayerNorm_0", "LayerNorm_1"):
                shapes[f"{b}/{ln}/scale"] = shapes[f"{b}/{ln}/bias"] = (w,)
            for n in ("query", "key", "value", "out"):
                shapes[f"{b}/MultiHeadDotProductAttention_0/{n}/kernel"] = (w, w)
                shapes[f"{b}/MultiHeadDotProductAttention_0/{n}/bias"] = (w,)
            shapes[f"{b}/MlpBlock_0/Dense_0/kernel"], shapes[f"{b}/MlpBlock_0/Dense_0/bias"] = (w, 4 * w), (4 * w,)
            shapes[f"{b}/MlpBlock_0/Dense_1/kernel"], shapes[f"{b}/MlpBlock_0/Dense_1/bias"] = (4 * w, w), (w,)
        shapes[f"{enc}/Transformer/encoder_norm/scale"] = shapes[f"{enc}/Transformer/encoder_norm/bias"] = (w,)
    tree = {"params/" + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    sd = flip.from_flax(tree, "test")
    sd.pop("visual.pos_embed", None)
    flip.C.load_state(model, sd, "test", allow_missing=("visual.pos_embed",))  # every key matched
    t = {k[len("params/"):]: torch.from_numpy(v) for k, v in tree.items()}
    img = torch.randn(1, 3, 16, 16)
    # JAX conv, NHWC with an HWIO kernel: out[i, j] = sum_{y, x, c} img[c, 4i + y, 4j + x] * k[y, x, c, :]
    patches = img[0].reshape(3, 4, p, 4, p).permute(1, 3, 2, 4, 0)  # (i, j, y, x, c)
    jax_out = torch.einsum("ijyxc,yxcd->ijd", patches, t["img_encoder/embedding/kernel"]) + t["img_encoder/embedding/bias"]
    ours = model.visual.patch_embed.proj(img)[0].permute(1, 2, 0)  # (i, j, D)
    assert torch.allclose(ours, jax_out, atol=1e-4)
    # JAX dense: y = x @ kernel + bias, for query / key / value and the projection head
    x = torch.randn(5, D)
    a = "img_encoder/Transformer/encoderblock_01/MultiHeadDotProductAttention_0"
    qkv = model.visual.blocks[1].attn.qkv(x)
    for k, n in enumerate(("query", "key", "value")):
        assert torch.allclose(qkv[:, k * D:(k + 1) * D], x @ t[f"{a}/{n}/kernel"] + t[f"{a}/{n}/bias"], atol=1e-4)
    assert torch.allclose(model.img_proj(x), x @ t["img_mlp1/kernel"], atol=1e-4)


# ------------------------------------------------------------------ the command line


def test_smoke_and_bad_weights(tmp_path):
    flip.main(["--smoke", "--out", str(tmp_path)])  # raises SystemExit(1) if the loss does not fall
    with pytest.raises(SystemExit, match="error: .*no_such.pt"):
        flip.main(["--weights", str(tmp_path / "no_such.pt"), "--out", str(tmp_path)])
