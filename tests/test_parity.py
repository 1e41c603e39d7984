"""Parity with the official implementations, pinned: each fixture in tests/parity/ holds a small
seeded configuration of the official model (every parameter perturbed away from its initial
value), its state dict under the official parameter names, an input, and the official outputs
and gradients. Here our model is built with the same configuration through create_model, loaded
with strict=True (every key matched), run on the same input, and compared.

The fixtures were made by tests/parity/make_<script>.py from the official code (repository and
commit in each maker's docstring); CI runs only this comparison.

Tolerance: float32 throughout, ATOL / RTOL below. Where our attention goes through
scaled_dot_product_attention and the official code through an explicit softmax the last bits
differ: measured max |ours - official| at most 1e-6 on outputs and 3.3e-6 on gradients (whose
size goes up to 10; MAE: bit-identical; ViTDet: 3.6e-7 on the ViT's last map, 2.5e-6 on the
pyramid's levels of size up to 3.3 after its deconvolutions and channel LayerNorms, 1.6e-6 on
gradients up to 2.1). A real departure (proportional attention off, a biased variance in the
norm-pix target, positions laid out space-major, LayerNorm after the mean, the rel-pos distance
reversed, mean pooling instead of the cls token, MeMViT's memory off or not zeroed at a change
of video; ViTDet's windows padded at the top-left, pos_embed resized bilinearly, q scaled in the
rel-pos term, rel-pos tables resized by nearest, no residual conv block, the pyramid's LayerNorm
eps 1e-5) shows as 2e-3 or more (ViTDet's GELU in its tanh form: 7.5e-5); MeMViT's compression
run without gradient shows as 7.5e-5 on the compressor's gradients (which are about 1e-4).

FLIP is compared with the official JAX / Flax code: its fixture holds the raw t5x parameter
tree (official '/'-joined names, JAX layouts), which the test converts with flip.from_flax
before the strict load, so the conversion is pinned too. Measured: 9.5e-7 on outputs of size up
to 2.4, 4.8e-6 on a loss of 12 (logit scale clipped to ln 100), 2.6e-6 on gradients up to 4.7.
Departures seen (in a scratch copy of flip.py): block LayerNorm eps 1e-5 1.2e-4, exact GELU
1.4e-4 (pooled image tower, about 1.3), queries not scaled 0.37, q and k swapped by the
conversion 0.18, positions added after masking to the first kept slots 0.097 (masked loss),
the logit scale not clipped 3.3e-3 (temperature 0.01), sin-cos rows and columns swapped 2.0.

Rev-ViT is compared with SlowFast, whose names and order (LayerNorm, then mean) revvit.py
follows, not with karttikeya/minREV: minREV's parameters are named otherwise (pos_embeddings,
patch_embed.weight, F.attn.in_proj_weight of nn.MultiheadAttention, G.mlp.0 / G.mlp.2, head.weight),
it takes the mean before the LayerNorm, and its G and final LayerNorms use eps 1e-5.
"""
import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity")
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def keep_global_rng():
    """Building a model draws from the global generator: leave it as the other tests found it."""
    with torch.random.fork_rng():
        yield


def load(name):
    return torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)


def strict_load(model, state_dict):
    """load_state_dict(strict=True), but with a message that lists every mismatched name/shape."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    shapes = sorted(k for k in set(ours) & set(state_dict) if ours[k].shape != state_dict[k].shape)
    assert not (missing or unexpected or shapes), (
        f"official names do not match: missing {missing}, unexpected {unexpected}, "
        f"shape {[(k, tuple(ours[k].shape), tuple(state_dict[k].shape)) for k in shapes]}")
    model.load_state_dict(state_dict, strict=True)


def close(ours, official, what):
    err = (ours - official).abs().max().item()
    assert torch.allclose(ours, official, atol=ATOL, rtol=RTOL), f"{what}: max |diff| {err:.3g}"


def check_grads(model, ours_inputs, grads):
    """Our gradients of the same projection sum(w * out), parameter by parameter and input.
    A parameter the official backward did not reach (no .grad: not in `grads`) must get a zero
    gradient (or none) here; every parameter it reached must be one of our trainable ones."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    official = {name for name in grads if not name.startswith("input.")}
    assert official <= set(trained), f"not trainable here: {official - set(trained)}"
    assert official, "the fixture holds no gradient"
    for name, p in trained.items():
        ours = torch.zeros_like(p) if p.grad is None else p.grad
        close(ours, grads[name] if name in grads else torch.zeros_like(p), f"grad {name}")
    for name, x in ours_inputs.items():
        close(x.grad, grads[f"input.{name}"], f"grad input {name}")


# ------------------------------------------------------------------------------------- ToMe

@pytest.mark.parametrize("kind", ["timm", "mae"])
def test_tome_parity(kind):
    """Official ToMe (tome.patch.timm: cls token, proportional attention, r = (4, -0.5);
    tome.patch.mae: global pool weighted by size, no proportional attention, r = 6, sources)."""
    import tome
    fx = load("tome")[kind]
    assert (fx["logits"] - fx["logits_r0"]).abs().max() > 100 * ATOL  # the fixture does merge
    model = tome.create_model("tiny", **fx["config"], patch_kernel=None).eval()  # official: no overlap
    strict_load(model, fx["state_dict"])
    with torch.no_grad():
        close(model(fx["images"], r=0), fx["logits_r0"], "logits at r = 0")
    x = fx["images"].clone().requires_grad_(True)
    r = fx["r"] if isinstance(fx["r"], int) else tuple(fx["r"])
    logits = model(x, r=r)
    close(logits, fx["logits"], f"logits at r = {r}")
    (logits * fx["grad_weight"]).sum().backward()
    check_grads(model, {"images": x}, fx["grads"])
    if "source" in fx:
        with torch.no_grad():
            _, _, source = model.forward_tokens(fx["images"], r=r, trace_source=True)
        assert torch.equal(source, fx["source"]), "merge groups (sources) differ"


# -------------------------------------------------------------------------------------- MAE

def test_mae_pretrain_parity():
    """Official models_mae.MaskedAutoencoderViT: masking from the same noise, encoder latent,
    decoder prediction, loss with and without norm_pix_loss, gradients of the norm-pix loss
    (the fixed sin-cos tables are perturbed in the fixture: they must be loaded, not rebuilt)."""
    import mae
    fx = load("mae")["pretrain"]
    model = mae.create_model("tiny", **fx["config"], norm_pix_loss=True).eval()
    strict_load(model, fx["state_dict"])
    latent, mask, ids_restore = model.forward_encoder(fx["imgs"], fx["mask_ratio"], fx["noise"])
    assert torch.equal(ids_restore, fx["ids_restore"]), "another masking from the same noise"
    assert torch.equal(mask, fx["mask"]), "another mask from the same noise"
    close(latent, fx["latent"], "encoder latent")
    pred = model.forward_decoder(latent, ids_restore)
    close(pred, fx["pred"], "decoder prediction")
    loss = model.forward_loss(fx["imgs"], pred, mask)
    close(loss, fx["loss_norm_pix"], "norm-pix loss")
    model.norm_pix_loss = False
    close(model.forward_loss(fx["imgs"], pred.detach(), mask), fx["loss"], "plain loss")
    loss.backward()
    check_grads(model, {}, fx["grads"])
    model.zero_grad()
    model.norm_pix_loss = True  # forward() in one call: the same numbers
    loss2, _, _ = model(fx["imgs"], fx["mask_ratio"], fx["noise"])
    close(loss2, fx["loss_norm_pix"], "forward() loss")


def test_mae_finetune_parity():
    """Official models_vit.VisionTransformer(global_pool=True): logits and gradients."""
    import mae
    fx = load("mae")["finetune"]
    cfg = dict(fx["config"])
    model = mae.create_classifier("tiny", cfg.pop("num_classes"), **cfg).eval()
    strict_load(model, fx["state_dict"])
    x = fx["imgs"].clone().requires_grad_(True)
    logits = model(x)
    close(logits, fx["logits"], "logits")
    (logits * fx["grad_weight"]).sum().backward()
    check_grads(model, {"imgs": x}, fx["grads"])


# ---------------------------------------------------------------------------------- MAE-ST

def test_videomae_parity():
    """Official mae_st models_mae.MaskedAutoencoderViT (sep_pos_embed, cls_embed): the same
    masking draw after the same seed, encoder latent, decoder prediction (pred_t_dim < T: the
    target frames), norm-pix loss and its gradients."""
    import videomae
    fx = load("videomae")
    model = videomae.create_model("tiny", **fx["config"], norm_pix_loss=fx["norm_pix_loss"]).eval()
    strict_load(model, fx["state_dict"])
    with torch.random.fork_rng():
        torch.manual_seed(fx["mask_seed"])  # random_masking draws torch.rand(N, L), as mae_st
        latent, mask, ids_restore = model.forward_encoder(fx["videos"], fx["mask_ratio"])
    assert torch.equal(ids_restore, fx["ids_restore"]), "another masking from the same noise"
    assert torch.equal(mask, fx["mask"]), "another mask from the same noise"
    close(latent, fx["latent"], "encoder latent")
    pred = model.forward_decoder(latent, ids_restore)
    close(pred, fx["pred"], "decoder prediction")
    loss = videomae.forward_loss(model, fx["videos"], pred, mask)
    close(loss, fx["loss"], "norm-pix loss")
    loss.backward()
    check_grads(model, {}, fx["grads"])


# ----------------------------------------------------------------------------------- Rev-ViT

def test_revvit_parity():
    """Official SlowFast MViT with MVIT.REV.ENABLE (REV_VIT_S config, smaller): in training mode
    the logits and the gradients from the reversible backward pass (ours: RevBackProp, which
    rebuilds the activations; SlowFast's: its own RevBackProp), in eval mode the probabilities
    (SlowFast's head applies softmax at eval; ours returns logits)."""
    import revvit
    fx = load("revvit")
    model = revvit.create_model("tiny", **fx["config"], patch_kernel=None)  # SlowFast ViT: no overlap
    strict_load(model, fx["state_dict"])
    model.eval()
    with torch.no_grad():
        close(model(fx["images"]).softmax(-1), fx["probs"], "eval probabilities")
    model.train()
    x = fx["images"].clone().requires_grad_(True)
    logits = model(x)
    assert logits.grad_fn is not None
    close(logits, fx["logits"], "training-mode logits")
    (logits * fx["grad_weight"]).sum().backward()
    check_grads(model, {"images": x}, fx["grads"])


# ------------------------------------------------------------------------------------- MViTv2

@pytest.mark.parametrize("fixture", ["mvit", "mvit_video"])
def test_mvit_parity(fixture):
    """Official MViTv2, small 3-stage configurations with q and adaptive kv pooling, decomposed
    rel-pos and residual pooling: images from facebookresearch/mvit (MVITv2_T-like, no cls token),
    video from SlowFast (MVITv2_S_16x4-like: 3-D convs, cls token, temporal rel-pos table).
    Training-mode logits and gradients, eval-mode probabilities (the official head's softmax)."""
    import mvit
    fx = load(fixture)
    cfg = dict(fx["config"])
    cfg["depths"], cfg["kv_stride"] = tuple(cfg["depths"]), tuple(cfg["kv_stride"])
    model = mvit.create_model("tiny", **cfg)
    strict_load(model, fx["state_dict"])
    inputs = fx["clips"] if cfg.get("video") else fx["images"]
    model.eval()
    with torch.no_grad():
        close(model(inputs).softmax(-1), fx["probs"], "eval probabilities")
    model.train()
    x = inputs.clone().requires_grad_(True)
    logits = model(x)
    close(logits, fx["logits"], "training-mode logits")
    (logits * fx["grad_weight"]).sum().backward()
    check_grads(model, {"clips" if cfg.get("video") else "images": x}, fx["grads"])


# ------------------------------------------------------------------------------------- MeMViT

def test_memvit_parity():
    """Official MeMViT (MeMViT_16_K400 config, smaller, classification head): three consecutive
    training steps on two streams with memory carried between them (caches, pipelined
    compression, memory rel-pos tables, memory zeroed where a stream changed video at step 3):
    every step's logits, the last step's gradients."""
    import memvit
    fx = load("memvit")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in fx["config"].items()}
    model = memvit.create_model("tiny", **cfg)
    strict_load(model, fx["state_dict"])
    model.train()
    model.clear_memory()
    ids = {}
    for t, (clip, names, step) in enumerate(zip(fx["clips"], fx["videos"], fx["steps"])):
        video_ids = [ids.setdefault(n, len(ids)) for n in names]  # official names -> our ids
        model.zero_grad()
        logits = model(clip, video_ids)
        close(logits, step["logits"], f"logits at step {t + 1}")
        (logits * step["grad_weight"]).sum().backward()
    check_grads(model, {}, fx["steps"][-1]["grads"])


# --------------------------------------------------------------------------------------- FLIP

def flip_model(fx):
    """Ours at the fixture's sizes, loaded from the RAW official parameter tree (t5x names, JAX
    layouts: [in, out] kernels, q / k / v as (D, heads, D / heads), an HWIO patch conv) through
    flip.from_flax, so that the conversion is pinned with the model. from_flax leaves out the
    image position table (fixed sin-cos, regenerated): ours must equal the official one."""
    import flip
    model = flip.create_model("tiny", **fx["config"], patch_kernel=None)  # official: no overlap
    sd = flip.from_flax({k: v.numpy() for k, v in fx["params"].items()}, "flip.pt")
    table = model.visual.pos_embed.detach().clone()
    close(table, fx["params"]["img_encoder/posembed_encoder/pos_embedding"], "sin-cos positions")
    strict_load(model, {**sd, "visual.pos_embed": table})
    return flip, model


def test_flip_parity_unmasked():
    """Official models_flip.FLIP, apply(train=False) (no masking): the pooled image tower (mean
    of all tokens after the final LayerNorm) and text tower (first token), the projections before
    and after the L2 normalisation, the clipped temperature and the contrastive loss."""
    fx = load("flip")
    flip, model = flip_model(fx)
    u = fx["unmasked"]
    model.eval()
    with torch.no_grad():
        h_img, mask = model.visual(fx["imgs"])
        assert mask is None
        h_txt = model.text(fx["tokens"])
        close(h_img, u["h_img"], "pooled image tower")
        close(h_txt, u["h_txt"], "pooled text tower")
        close(model.img_proj(h_img), u["z_img_raw"], "image projection")
        close(model.txt_proj(h_txt), u["z_txt_raw"], "text projection")
        z_img, z_txt, s = model(fx["imgs"], fx["tokens"])
        close(z_img, u["z_img"], "normalised image embedding")
        close(z_txt, u["z_txt"], "normalised text embedding")
        close((-s).exp(), u["tau"], "temperature")
        close(flip.flip_loss(z_img, z_txt, s), u["loss"], "contrastive loss")
        for value in (5.0, -0.5):  # outside [0, ln 100]: the official clip
            model.logit_scale.fill_(value)
            s = model.clipped_logit_scale()
            close((-s).exp(), u[f"tau_at_{value}"], f"temperature at logit scale {value}")
            close(flip.flip_loss(z_img, z_txt, s), u[f"loss_at_{value}"], f"loss at scale {value}")


def test_flip_parity_masked():
    """Official apply(train=True), mask ratio 0.5: the official uniform noise passed in (noise=,
    as mae.py's) decides the masking: the same mask, the loss, and its gradients (official
    jax.grad, through from_flax to our names)."""
    fx = load("flip")
    flip, model = flip_model(fx)
    m = fx["masked"]
    noise = m["noise"].clone()  # (B, L) the official draw
    model.train()
    with torch.no_grad():
        _, mask = model.encode_image(fx["imgs"], m["mask_ratio"], noise)
    assert torch.equal(mask, m["mask"]), "another mask from the same noise"
    assert (mask.sum(1) == 18).all(), "half of the 36 patches removed"
    assert (fx["unmasked"]["loss"] - m["loss"]).abs() > 0.1  # the masking moves the loss
    z_img, z_txt, s = model(fx["imgs"], fx["tokens"], mask_ratio=m["mask_ratio"], noise=noise)
    assert torch.equal(noise, m["noise"]), "the noise was changed in place"
    loss = flip.flip_loss(z_img, z_txt, s)
    close(loss, m["loss"], "masked contrastive loss")
    loss.backward()
    grads = m["grads"]
    assert not grads["img_encoder/posembed_encoder/pos_embedding"].any()  # stop_gradient
    check_grads(model, {}, flip.from_flax({k: v.numpy() for k, v in grads.items()}, "grads"))


# ------------------------------------------------------------------------------------- ViTDet

def vitdet_outputs(backbone, images):
    """Ours under detectron2's names: the ViT's last map ("last_feat") and the pyramid's levels."""
    out = {"last_feat": backbone.net(images)}
    out.update(backbone(images))
    return out


@pytest.mark.parametrize("kind", ["global", "conv"])
def test_vitdet_parity(kind):
    """Official detectron2 ViT inside SimpleFeaturePyramid (+ LastLevelMaxPool), as
    mask_rcnn_vitdet.py builds model.backbone, smaller: a 6x6 map, window 4 (zero-padded to 8x8),
    decomposed rel-pos tables perturbed, a 4x4 + cls pos_embed resized to 6x6. "global": blocks
    1 and 3 attend globally; the last map, the five pyramid levels and the gradients of a seeded
    projection of them all, then at 40x40 (a 5x5 map: the global tables interpolated 11 -> 9
    rows). "conv": every block windowed, residual conv blocks after 1 and 3 (the global model's
    tensors + its own): the same outputs. The official keys are those of model.backbone (a
    released ViTDet file holds them under backbone.*, which vitdet.load_weights strips)."""
    import vitdet
    fixture = load("vitdet")
    fx = fixture[kind]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in fx["config"].items()}
    model = vitdet.create_model("tiny", **cfg).eval()
    state = dict(fixture["global"]["state_dict"])
    if kind == "conv":
        state.update(fx["own"])
    strict_load(model.backbone, state)
    images = fixture["global"]["images"]
    if kind == "conv":
        with torch.no_grad():
            out = vitdet_outputs(model.backbone, images)
    else:
        x = images.clone().requires_grad_(True)
        out = vitdet_outputs(model.backbone, x)
    assert list(out) == list(fx["outputs"]), f"levels {list(out)} vs official {list(fx['outputs'])}"
    for name, official in fx["outputs"].items():
        close(out[name], official, name)
    if kind == "global":
        flat = torch.cat([v.flatten() for v in out.values()])  # last_feat, p1, ..., p5
        (flat * fx["grad_weight"]).sum().div(flat.numel() ** 0.5).backward()
        check_grads(model.backbone, {"images": x}, fx["grads"])
        with torch.no_grad():
            small = vitdet_outputs(model.backbone, fx["images_small"])
        for name, official in fx["outputs_small"].items():
            close(small[name], official, f"{name} at 40 x 40")
