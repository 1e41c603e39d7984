"""Make tests/parity/flip.pt from the official FLIP code (JAX / Flax; not run by CI).

Official code: github.com/facebookresearch/flip at commit 9bf6bf810d6697d7a6376093d41d88320e225c8d
(models_flip.py, t5x/layers.py, utils/posembed_util.py, utils/initializers_util.py), run on
jax 0.4.13, jaxlib 0.4.13 (CPU), flax 0.7.0, ml_collections 1.1.0, numpy 1.26.4. No stand-in
is needed: models_flip.py imports only absl.logging, jax, flax and those three files of the
checkout (t5x/ and utils/ load as namespace packages from the checkout on sys.path); nothing of
TensorFlow, tensorflow_text or tfds (input pipelines, train.py) is imported.

One small seeded models_flip.FLIP, built from a ConfigDict with the keys of configs/default.py
(the official defaults: sincos image positions, learned text positions, img_avg_token=True,
txt_avg_token=False, bias-free projections, learnable clipped temperature, dropout 0):
image tower 24x24 pixels, patch 4 (36 patches), width 40, 2 blocks, 2 heads; text tower vocab
64, context 8, width 32, 2 blocks, 2 heads; projections to 24. The official `init` draws every
parameter (model.init, PRNGKey(seed)); then every parameter except the image position table
gets N(0, 0.05) noise (numpy, names in sorted order), so no LayerNorm is (1, 0), no bias 0,
and the logit scale is off ln(1/0.07). The image pos_embedding stays the official sin-cos table:
it is under stop_gradient and excluded from weight decay, so training never moves it, and
flip.from_flax regenerates it rather than loading it (the test checks our table equals it).

Saved (float32, NCHW images for our model; the maker feeds NHWC to JAX):
  "params": the raw official parameter tree, flattened with '/'-joined names as in a t5x
      checkpoint ("img_encoder/Transformer/encoderblock_00/MultiHeadDotProductAttention_0/
      query/kernel" of shape (D, heads, D / heads), ...): the test runs flip.from_flax on it.
  "unmasked" (apply(train=False): mask ratio 0): the pooled tower outputs (image: mean of the
      final-LayerNorm tokens; text: the first token), the projections before and after the
      L2 normalisation, the contrastive loss and the temperature; the loss and temperature
      again with the logit scale set to 5.0 and to -0.5 (clipped to ln 100 and to 0).
  "masked" (apply(train=True), the official mask ratio 0.5): the noise that random_mask drew
      (recorded by wrapping jax.random.uniform as models_flip calls it), the mask it made, the
      loss and its jax.grad under the official names (only here: the gradients of both paths
      would not fit in 1 MB, and these reach every parameter). Our random_masking takes no
      noise argument, so the test hands the same noise to it in place of torch.rand.

Run (a venv beside the system torch; the numpy pin: jax 0.4.13 does not import on numpy 2):
    python3 -m venv --system-site-packages /tmp/venv
    /tmp/venv/bin/pip install jax==0.4.13 jaxlib==0.4.13 flax==0.7.0 ml_collections \
        numpy==1.26.4 ml_dtypes==0.2.0
    /tmp/venv/bin/python tests/parity/make_flip.py --flip /path/to/flip
"""
import types

import numpy as np
import torch

import maker_common as M

COMMIT = "9bf6bf810d6697d7a6376093d41d88320e225c8d"
IMG = dict(img_size=24, patch_size=4, width=40, depth=2, heads=2)
TXT = dict(vocab_size=64, context_length=8, text_width=32, text_depth=2, text_heads=2)
EMBED_DIM = 24
MASK_RATIO = 0.5
BATCH = 4


def official_config(ml_collections):
    """The keys of configs/default.py's model config, at the sizes above."""
    def tower(hidden, heads, layers):
        t = dict(mlp_dim=4 * hidden, num_heads=heads, num_layers=layers,
                 attention_dropout_rate=0.0, dropout_rate=0.0, droppath_rate=0.0)
        return hidden, ml_collections.ConfigDict(t)

    cfg = ml_collections.ConfigDict()
    hidden, t = tower(IMG["width"], IMG["heads"], IMG["depth"])
    t.remat_policy = "none"
    cfg.model_img = ml_collections.ConfigDict(dict(
        mask_ratio=MASK_RATIO, sincos=True, name="img_encoder", hidden_size=hidden, transformer=t,
        patches=ml_collections.ConfigDict({"size": (IMG["patch_size"], IMG["patch_size"])})))
    hidden, t = tower(TXT["text_width"], TXT["text_heads"], TXT["text_depth"])
    cfg.model_txt = ml_collections.ConfigDict(dict(
        mask_ratio=0.0, sincos=False, name="txt_encoder", vocab_size=TXT["vocab_size"],
        hidden_size=hidden, transformer=t))
    cfg.clr = ml_collections.ConfigDict(dict(
        tau=0.01, tau_learnable=True, proj_dim_out=EMBED_DIM, proj_out_bias=False, clr_loss=True,
        img_avg_token=True, txt_avg_token=False))
    return cfg


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def unflatten(flat):
    tree = {}
    for name, v in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def main():
    args = M.parse_args(__doc__, "flip")
    import flax
    import jax
    import jax.numpy as jnp
    import ml_collections
    import models_flip

    seed = 40
    model = models_flip.FLIP(config=official_config(ml_collections))
    g = torch.Generator().manual_seed(seed + 1)
    imgs = torch.randn(BATCH, 3, IMG["img_size"], IMG["img_size"], generator=g)  # NCHW (ours)
    tokens = torch.randint(1, TXT["vocab_size"], (BATCH, TXT["context_length"]), generator=g)
    for i, n in enumerate((8, 5, 3, 6)):  # captions of several lengths, padded with 0
        tokens[i, n:] = 0
    batch = {"image": jnp.asarray(imgs.permute(0, 2, 3, 1).numpy()),  # NHWC for JAX
             "txt": jnp.asarray(tokens.numpy().astype(np.int32)),
             "txt_is_valid": jnp.asarray((tokens > 0).numpy().astype(np.int32))}

    key_init, key_drop = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": key_init, "dropout": key_drop}, batch, train=False)
    params = flatten(flax.core.unfreeze(variables["params"]))
    pos_name = "img_encoder/posembed_encoder/pos_embedding"
    rng = np.random.default_rng(seed + 2)
    for name in sorted(params):
        if name != pos_name:  # the fixed sin-cos table: never trained (stop_gradient)
            noise = 0.05 * rng.standard_normal(params[name].shape)
            params[name] = (params[name] + noise).astype(np.float32)
    tree = unflatten({k: jnp.asarray(v) for k, v in params.items()})

    def run(p, train, key, capture=False):
        return model.apply({"params": p}, batch, train=train, rngs={"dropout": key},
                           capture_intermediates=capture and (lambda mdl, method: method in (
                               "__call__", "apply_encoder")),
                           mutable=["intermediates"] if capture else False)

    # ---- unmasked: every intermediate the test compares, the loss and its gradients
    (loss, art), state = run(tree, False, key_drop, capture=True)
    inter = state["intermediates"]
    x_img = inter["img_encoder"]["Transformer"]["__call__"][0]  # (B, 1+L, D), final LayerNorm
    x_txt = inter["txt_encoder"]["Transformer"]["__call__"][0]  # (B, T, W)
    unmasked = dict(h_img=x_img.mean(axis=1), h_txt=x_txt[:, 0],
                    z_img_raw=inter["img_mlp1"]["__call__"][0],
                    z_txt_raw=inter["txt_mlp1"]["__call__"][0],
                    z_img=art["z_img"], z_txt=art["z_txt"], loss=loss, tau=art["tau"])
    for s in (5.0, -0.5):  # a logit scale above ln 100 and one below 0: clipped to them
        at_s = {**tree, "logit_scale": jnp.full((1,), s, jnp.float32)}
        loss_s, art_s = run(at_s, False, key_drop)
        unmasked[f"loss_at_{s}"], unmasked[f"tau_at_{s}"] = loss_s, art_s["tau"]

    # ---- masked (train=True, ratio 0.5): record the noise random_mask draws
    drawn = []

    def uniform(key, shape, *a, **kw):
        u = jax.random.uniform(key, shape, *a, **kw)
        drawn.append(np.asarray(u))
        return u
    models_flip.random = types.SimpleNamespace(uniform=uniform)
    key_train = jax.random.PRNGKey(seed + 3)
    (loss_m, _), state = run(tree, True, key_train, capture=True)
    assert len(drawn) == 1, "random_mask drew more than once"
    _, mask, _ = state["intermediates"]["img_encoder"]["apply_encoder"][0]
    grads_m = jax.grad(lambda p: run(p, True, key_train)[0])(tree)
    assert len(drawn) == 2 and np.array_equal(drawn[0], drawn[1]), "the gradient pass: other noise"
    masked = dict(mask_ratio=MASK_RATIO, noise=drawn[0], mask=mask, loss=loss_m,
                  grads=flatten(flax.core.unfreeze(grads_m)))

    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))
    for part in (unmasked, masked):
        for k, v in part.items():
            if k == "grads":
                part[k] = {n: t(g) for n, g in v.items()}
            elif not isinstance(v, float):
                part[k] = t(v)
    fixture = dict(official=dict(repo="facebookresearch/flip", commit=COMMIT, jax=jax.__version__,
                                 flax=flax.__version__),
                   config=dict(**IMG, **TXT, embed_dim=EMBED_DIM), imgs=imgs, tokens=tokens,
                   params={k: t(v) for k, v in params.items()}, unmasked=unmasked, masked=masked)
    for k, v in unmasked.items():
        if k != "grads":
            print(k, tuple(v.shape), float(v.abs().max()))
    print("loss unmasked", float(unmasked["loss"]), "masked", float(masked["loss"]),
          "kept", int((masked["mask"] == 0).sum(1)[0]))
    M.save(fixture, "flip", args.out)


if __name__ == "__main__":
    main()
