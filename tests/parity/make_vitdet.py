"""Make tests/parity/vitdet.pt from the official ViTDet code (not run by CI).

Official code: github.com/facebookresearch/detectron2 at commit
02b5c4e295e990042a714712c21dc79b731e8833: detectron2/modeling/backbone/vit.py (ViT, Block,
Attention, ResBottleneckBlock, SimpleFeaturePyramid), modeling/backbone/utils.py
(window_partition / window_unpartition, get_rel_pos / add_decomposed_rel_pos, get_abs_pos,
PatchEmbed), modeling/backbone/fpn.py (LastLevelMaxPool: p6), layers (Conv2d with norm, the "LN"
LayerNorm of get_norm, CNNBlockBase, ShapeSpec), built as
configs/common/models/mask_rcnn_vitdet.py builds model.backbone (norm_layer LayerNorm eps 1e-6,
use_rel_pos, top_block LastLevelMaxPool, norm "LN"), with a smaller size.

Stand-ins (maker_common.import_detectron2; nothing of detectron2 is built or compiled):
  * detectron2.modeling and detectron2.modeling.backbone are registered as empty packages over
    the checkout, so their __init__.py files (which import every meta-architecture and the
    LazyConfig system: omegaconf, hydra) do not run; the modules the backbone needs run unchanged.
  * torchvision (maker_common.stand_in_torchvision): detectron2.layers imports
    torchvision.ops.{boxes, nms, roi_align, deform_conv2d} (for NMS, ROIAlign, DeformConv) and
    timm imports a few transforms/ops names; none is called by ViT or SimpleFeaturePyramid.
  The real fvcore (weight_init.c2_msra_fill, ResBottleneckBlock's init) and the real timm
  (timm.models.layers DropPath and Mlp, which Block uses) are used.

The model: 48x48 images, 8x8 patches (a 6x6 map), width 32, 4 blocks, 2 heads, use_rel_pos,
window 4 (the 6x6 map zero-padded to 8x8: 2x2 windows of 4x4), a 32x32 "pre-training" pos_embed
(4x4 + cls, resized bicubically to 6x6 at every forward), drop path 0, the pyramid's scale
factors (4, 2, 1, 0.5) with 8 output channels + LastLevelMaxPool. At patch 8 the levels have
strides 2, 4, 8, 16 (+ 32), so detectron2 names them p1..p4 (+ p5), as vitdet.py does; its
LastLevelMaxPool reads "p5" by default (patch 16), here set to read the last level, p4.
ours: create_model("tiny", **config); two kinds:
  "global": blocks 1 and 3 attend globally (rel-pos tables of 2 * 6 - 1 rows), 0 and 2 in
      windows (2 * 4 - 1 rows): ours propagation="global", global_block_indexes=(1, 3).
      Every parameter perturbed by N(0, 0.05) (rel-pos tables, norms and biases included), the
      rel-pos tables by a further N(0, 0.5) (at 0.05 their term is small beside q k^T / sqrt(d)
      in so small a model). Saved: config, the SimpleFeaturePyramid's state_dict (keys net.*
      and simfp_*: a released ViTDet file holds them under backbone.*, which vitdet.load_weights
      strips before loading into model.backbone), images (2, 3, 48, 48), the ViT's last map and
      p1..p5, the gradients of sum(w * concat(last map, p1..p5)) / sqrt(its length) (w seeded)
      for every parameter and the images; images_small (1, 3, 40, 40), a 5x5 map at which the
      global blocks' tables are linearly interpolated (11 -> 9 rows) and pos_embed resized to
      5x5: its last map and p1..p5.
  "conv": every block in windows, a residual bottleneck block after blocks 1 and 3: ours
      propagation="conv", global_block_indexes=(1, 3) (detectron2's residual_block_indexes).
      It takes every tensor of "global" it has with the same shape; its own (residual.*, whose
      zero-initialized last norm is perturbed too, and the window-sized tables of blocks 1 and
      3) are perturbed as above and saved as `own`. Saved: the last map and p1..p5 on the same
      images (no gradients: the fixture stays under 1 MB).

Run (a venv beside the system torch; detectron2 is not installed, only checked out):
    python3 -m venv --system-site-packages /tmp/venv
    /tmp/venv/bin/pip install --no-deps fvcore timm==1.0.31 yacs iopath portalocker termcolor \
        tabulate pyyaml
    /tmp/venv/bin/python tests/parity/make_vitdet.py --detectron2 /path/to/detectron2
"""
import math
import os
from functools import partial

import torch
import torch.nn as nn

import maker_common as M

CONFIG = dict(img_size=48, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0,
              window_size=4, global_block_indexes=(1, 3), use_rel_pos=True, pretrain_img_size=32,
              out_channels=8, head_convs=(32,), num_classes=3)
CONFIGS = {"global": dict(CONFIG, propagation="global"), "conv": dict(CONFIG, propagation="conv")}


def build_official(vit, fpn, cfg):
    """Our create_model arguments -> detectron2's ViT(...) inside SimpleFeaturePyramid(...)."""
    depth = cfg["depth"]
    if cfg["propagation"] == "global":
        window_blocks = [i for i in range(depth) if i not in cfg["global_block_indexes"]]
        residual_blocks = []
    else:
        window_blocks, residual_blocks = list(range(depth)), list(cfg["global_block_indexes"])
    net = vit.ViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                  embed_dim=cfg["embed_dim"], depth=depth, num_heads=cfg["num_heads"],
                  drop_path_rate=cfg["drop_path_rate"],
                  window_size=cfg["window_size"], mlp_ratio=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), window_block_indexes=window_blocks,
                  residual_block_indexes=residual_blocks, use_rel_pos=cfg["use_rel_pos"],
                  pretrain_img_size=cfg["pretrain_img_size"], out_feature="last_feat")
    top_block = fpn.LastLevelMaxPool()
    top_block.in_feature = f"p{int(math.log2(cfg['patch_size'] * 2))}"  # p5 at patch 16; p4 at 8
    return vit.SimpleFeaturePyramid(net, in_feature="last_feat", out_channels=cfg["out_channels"],
                                    scale_factors=(4.0, 2.0, 1.0, 0.5), top_block=top_block,
                                    norm="LN")


def outputs(model, images):
    """The ViT's last map and the pyramid levels (detectron2's names: p1..p5 at patch 8)."""
    out = {"last_feat": model.net(images)["last_feat"]}
    out.update(model(images))
    return out


def perturb_rel_pos(model, seed, names=None):
    """A further N(0, 0.5) on the rel-pos tables (among `names`, if given), in name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".rel_pos_" in name and (names is None or name in names):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def make_global(vit, fpn, seed):
    torch.manual_seed(seed)
    model = build_official(vit, fpn, CONFIGS["global"]).eval()
    M.perturb(model, seed)
    perturb_rel_pos(model, seed + 3)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(seed + 1))
    images_small = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(seed + 4))
    with torch.no_grad():
        small = outputs(model, images_small)
    x = images.clone().requires_grad_(True)
    out = outputs(model, x)
    flat = torch.cat([v.flatten() for v in out.values()])  # last_feat, p1, ..., p5
    # sum(w * flat) / sqrt(n): gradients of order 1 (not sqrt(n) = 85), as the other fixtures'
    grads, weight = M.grads_of(model, {"images": x}, flat / math.sqrt(flat.numel()), seed + 2)
    return dict(config=CONFIGS["global"], state_dict=model.state_dict(), images=images,
                outputs=out, grad_weight=weight, grads=grads, images_small=images_small,
                outputs_small=small)


def make_conv(vit, fpn, shared, images, seed):
    """The conv-propagation model takes every tensor of `shared` (the global model) that it has
    with the same shape; only the others (residual.*, the window-sized rel-pos tables of blocks
    1 and 3) are its own, perturbed here, and saved (as `own`)."""
    torch.manual_seed(seed)
    model = build_official(vit, fpn, CONFIGS["conv"]).eval()
    M.perturb(model, seed)
    theirs = model.state_dict()
    taken = {k: v for k, v in shared.items() if k in theirs and v.shape == theirs[k].shape}
    model.load_state_dict(taken, strict=False)
    own = [k for k in theirs if k not in taken]
    perturb_rel_pos(model, seed + 3, own)
    with torch.no_grad():
        out = outputs(model, images)
    state = model.state_dict()
    return dict(config=CONFIGS["conv"], own={k: state[k] for k in own}, outputs=out)


def main():
    args = M.parse_args(__doc__, "detectron2")
    vit, fpn = M.import_detectron2(os.path.abspath(args.detectron2))
    fixture = {"global": make_global(vit, fpn, 60)}
    fixture["conv"] = make_conv(vit, fpn, fixture["global"]["state_dict"],
                                fixture["global"]["images"], 70)
    M.save(fixture, "vitdet", args.out)


if __name__ == "__main__":
    main()
