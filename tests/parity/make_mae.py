"""Make tests/parity/mae.pt from the official MAE code (not run by CI).

Official code: github.com/facebookresearch/mae at commit efb2a8062c206524e35e47d04501ed4f544c0ae8
(models_mae.py, models_vit.py, util/pos_embed.py), run on timm 1.0.31 with two shims that change
no number: models_mae passes `qk_scale=None` to timm's Block (a timm 0.3 argument, dropped here)
and util/pos_embed.py uses `np.float` (gone from numpy >= 1.24; aliased to float).

Two small seeded models (32x32 images, 4x4 patches = 64 patches), every parameter perturbed by
N(0, 0.05), the fixed sin-cos tables included (so a model that rebuilds them instead of loading
them fails):
  "pretrain": MaskedAutoencoderViT, encoder width 32, 2 blocks, 2 heads; decoder width 24,
      1 block, 2 heads; mask ratio 0.75. The masking noise is the official torch.rand(N, L) under
      a seed, saved and handed to our model as `noise`. Saved: latent, mask, ids_restore, pred,
      the loss with norm_pix_loss off and on, and the gradients of the norm-pix loss.
  "finetune": models_vit.VisionTransformer(global_pool=True), the same encoder, 5 classes:
      logits and the gradients of sum(w * logits) (w seeded).

Run (a venv with timm beside the system torch; torchvision is not needed, see maker_common.py):
    python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip install timm==1.0.31
    (then `pip uninstall torch torchvision` in the venv if pip pulled them, to use the system torch)
    /tmp/venv/bin/python tests/parity/make_mae.py --mae /path/to/mae
"""
from functools import partial

import numpy as np
import torch
import torch.nn as nn

import maker_common as M

ENCODER = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
DECODER = dict(decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
MASK_RATIO = 0.75


def import_official():
    if not hasattr(np, "float"):
        np.float = float  # util/pos_embed.py: np.arange(..., dtype=np.float)
    import timm.models.vision_transformer as tv
    import models_mae
    import models_vit

    class Block(tv.Block):  # timm 0.3's Block took qk_scale; None meant the default 1/sqrt(d)
        def __init__(self, *args, qk_scale=None, **kwargs):
            assert qk_scale is None
            super().__init__(*args, **kwargs)
    models_mae.Block = Block
    return models_mae, models_vit


def pretrain(models_mae, seed):
    torch.manual_seed(seed)
    model = models_mae.MaskedAutoencoderViT(**ENCODER, **DECODER,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                            norm_pix_loss=True).eval()
    M.perturb(model, seed)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    L = model.patch_embed.num_patches
    torch.manual_seed(seed + 3)
    noise = torch.rand(2, L)  # what random_masking draws next under the same seed
    torch.manual_seed(seed + 3)
    latent, mask, ids_restore = model.forward_encoder(imgs, MASK_RATIO)
    assert torch.equal(ids_restore, noise.argsort(1).argsort(1)), "masking drew other noise"
    pred = model.forward_decoder(latent, ids_restore)
    loss = model.forward_loss(imgs, pred, mask)  # norm_pix_loss=True
    model.norm_pix_loss = False
    with torch.no_grad():
        loss_plain = model.forward_loss(imgs, pred, mask)
    model.norm_pix_loss = True
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    config = dict(**ENCODER, **DECODER)
    return dict(config=config, mask_ratio=MASK_RATIO, state_dict=model.state_dict(), imgs=imgs,
                noise=noise, latent=latent, mask=mask, ids_restore=ids_restore, pred=pred,
                loss_norm_pix=loss, loss=loss_plain, grads=grads)


def finetune(models_vit, seed):
    torch.manual_seed(seed)
    model = models_vit.VisionTransformer(global_pool=True, **ENCODER, num_classes=5,
                                         qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    M.perturb(model, seed)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    x = imgs.clone().requires_grad_(True)
    logits = model.head(model.forward_features(x))  # timm 0.3's forward (see make_tome.py)
    grads, weight = M.grads_of(model, {"imgs": x}, logits, seed + 2)
    return dict(config=dict(ENCODER, num_classes=5), state_dict=model.state_dict(), imgs=imgs,
                logits=logits, grad_weight=weight, grads=grads)


def main():
    args = M.parse_args(__doc__, "mae")
    M.stand_in_torchvision()
    import timm
    models_mae, models_vit = import_official()
    fixture = {"timm_version": timm.__version__,
               "pretrain": pretrain(models_mae, seed=20), "finetune": finetune(models_vit, seed=30)}
    M.save(fixture, "mae", args.out)


if __name__ == "__main__":
    main()
