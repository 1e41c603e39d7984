"""Make tests/parity/tome.pt from the official Token Merging code (not run by CI).

Official code: github.com/facebookresearch/ToMe at commit af95e4b1befa172dadccd8c81e223b10090f9579
(tome/merge.py, tome/patch/timm.py, tome/patch/mae.py), on timm 1.0.31, and for the MAE-style
classifier github.com/facebookresearch/mae at commit efb2a8062c206524e35e47d04501ed4f544c0ae8
(models_vit.py).

Two small seeded models (32x32 images, 4x4 patches = 64 tokens + cls, width 32, 3 blocks,
2 heads, 5 classes), every parameter perturbed by N(0, 0.05):
  "timm": a timm ViT with class token + `norm`, tome.patch.timm (proportional attention on),
          r = (4, -0.5) -> per-block [6, 4, 2];
  "mae":  MAE's models_vit ViT with global pool + `fc_norm`, tome.patch.mae (proportional
          attention off, size-weighted pool), r = 6 in every block, token sources traced.
Saved per model: config, state_dict, images, logits at r = 0 and at r, the sources ("mae"), and
the gradients of sum(w * logits) at r (w seeded) for every parameter and the images.

Run (a venv with timm beside the system torch; torchvision is not needed, see maker_common.py):
    python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip install timm==1.0.31
    (pip may pull torch / torchvision into the venv: `pip uninstall torch torchvision` there
    to use the system torch)
    /tmp/venv/bin/python tests/parity/make_tome.py --ToMe /path/to/ToMe --mae /path/to/mae
"""
from functools import partial

import torch
import torch.nn as nn

import maker_common as M

CONFIG = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
R = {"timm": (4, -0.5), "mae": 6}


def official_logits(model, kind, images, r, trace_source=False):
    """What ToMeVisionTransformer.forward does (fresh r list, size and source), then the logits:
    timm's own forward for "timm"; head(forward_features(x)) for "mae", the forward of the timm
    0.3.2 that models_vit.py was written for (timm 1.0 would pool the pooled vector again)."""
    from tome.utils import parse_r
    model.r = r
    model._tome_info.update(r=parse_r(len(model.blocks), r), size=None, source=None,
                            trace_source=trace_source)
    if kind == "timm":
        return model(images)
    return model.head(model.forward_features(images))


def make(kind, seed):
    import timm.models.vision_transformer as tv
    import tome
    import models_vit

    torch.manual_seed(seed)
    if kind == "timm":
        model = tv.VisionTransformer(**CONFIG, mlp_ratio=4.0, qkv_bias=True,
                                     global_pool="token", class_token=True)
        tome.patch.timm(model, prop_attn=True)
    else:
        model = models_vit.VisionTransformer(global_pool=True, **CONFIG, mlp_ratio=4,
                                             qkv_bias=True,
                                             norm_layer=partial(nn.LayerNorm, eps=1e-6))
        tome.patch.mae(model, prop_attn=False)
    model.eval()
    M.perturb(model, seed)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))

    with torch.no_grad():
        logits_r0 = official_logits(model, kind, images, 0)
    x = images.clone().requires_grad_(True)
    logits = official_logits(model, kind, x, R[kind], trace_source=(kind == "mae"))
    source = model._tome_info["source"]
    grads, weight = M.grads_of(model, {"images": x}, logits, seed + 2)
    fixture = dict(config=dict(CONFIG, global_pool=(kind == "mae"), prop_attn=(kind == "timm")),
                   r=R[kind], state_dict=model.state_dict(), images=images,
                   logits_r0=logits_r0, logits=logits, grad_weight=weight, grads=grads)
    if source is not None:
        fixture["source"] = source
    print(kind, "r schedule", tome.utils.parse_r(CONFIG["depth"], R[kind]),
          "tokens out", None if source is None else tuple(source.shape))
    return fixture


def main():
    args = M.parse_args(__doc__, "ToMe", "mae")
    M.stand_in_torchvision()
    import timm
    fixture = {"timm_version": timm.__version__,
               "timm": make("timm", seed=0), "mae": make("mae", seed=10)}
    M.save(fixture, "tome", args.out)


if __name__ == "__main__":
    main()
