"""Make tests/parity/revvit.pt from the official Rev-ViT code (not run by CI).

Official code: github.com/facebookresearch/SlowFast at commit
287ec0076846560f44a9327e931a5a2360240533: slowfast/models/video_model_builder.py (MViT with
MVIT.REV.ENABLE), slowfast/models/reversible_mvit.py (ReversibleMViT, RevBackProp), configured
from configs/ImageNet/REV_VIT_S.yaml with a smaller size. (karttikeya/minREV, the authors'
minimal version, is not the reference here: revvit.py follows SlowFast's parameter names and
its order LayerNorm -> mean, which minREV does not share; see tests/test_parity.py.)

SlowFast imports its whole model zoo; maker_common.import_slowfast imports only the modules the
MViT builder needs, with stand-ins for names imported but not used by Rev-ViT (detectron2,
pytorchvideo, simplejson-based logging). fvcore is required.

The model: 32x32 images, 4x4 patches = 64 tokens, width 32, 3 reversible blocks, 2 heads,
5 classes, drop path 0 (so the run is deterministic), every parameter perturbed by N(0, 0.05).
Saved: config, state_dict, images; in training mode (the reversible backward pass) the logits
and the gradients of sum(w * logits) (w seeded) for every parameter and the images; in eval mode
(vanilla forward, SlowFast's head applies softmax) the probabilities.

Run (a venv beside the system torch, with fvcore; no torchvision or timm needed):
    python3 -m venv --system-site-packages /tmp/venv
    /tmp/venv/bin/pip install --no-deps fvcore yacs iopath portalocker termcolor tabulate
    /tmp/venv/bin/python tests/parity/make_revvit.py --SlowFast /path/to/SlowFast
"""
import os

import torch

import maker_common as M

CONFIG = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
              drop_path_rate=0.0)


def import_official(root):
    video_model_builder, get_cfg = M.import_slowfast(root)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(root, "configs", "ImageNet", "REV_VIT_S.yaml"))
    cfg.MVIT.EMBED_DIM, cfg.MVIT.NUM_HEADS, cfg.MVIT.DEPTH = (CONFIG["embed_dim"],
                                                              CONFIG["num_heads"], CONFIG["depth"])
    cfg.MVIT.PATCH_KERNEL = cfg.MVIT.PATCH_STRIDE = [CONFIG["patch_size"]] * 2
    cfg.MVIT.DROPPATH_RATE = CONFIG["drop_path_rate"]
    cfg.DATA.TRAIN_CROP_SIZE = cfg.DATA.TEST_CROP_SIZE = CONFIG["img_size"]
    cfg.MODEL.NUM_CLASSES = CONFIG["num_classes"]
    cfg.NUM_GPUS = 0
    return video_model_builder.MViT(cfg)


def main():
    args = M.parse_args(__doc__, "SlowFast")
    seed = 50
    torch.manual_seed(seed)
    model = import_official(os.path.abspath(args.SlowFast))
    M.perturb(model, seed)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    model.eval()
    with torch.no_grad():
        probs = model([images])
    model.train()  # the reversible backward pass (RevBackProp) runs in training mode only
    x = images.clone().requires_grad_(True)
    logits = model([x])
    grads, weight = M.grads_of(model, {"images": x}, logits, seed + 2)
    fixture = dict(config=CONFIG, state_dict=model.state_dict(), images=images, probs=probs,
                   logits=logits, grad_weight=weight, grads=grads)
    M.save(fixture, "revvit", args.out)


if __name__ == "__main__":
    main()
