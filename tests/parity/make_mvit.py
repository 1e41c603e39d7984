"""Make tests/parity/mvit.pt from the official MViTv2 image code (not run by CI).

Official code: github.com/facebookresearch/mvit at commit dfbdfdf60efb36128cb2847950deaa560ceb7bfc
(mvit/models/mvit_model.py, mvit/models/attention.py, mvit/config/defaults.py), configured like
configs/MVITv2_T.yaml at a smaller size. mvit/utils/logging.py (simplejson) and mvit/utils/misc.py
(psutil, fvcore's counters) are replaced by stand-ins with the two names the model imports
(get_logger, validate_checkpoint_wrapper_import); fvcore and iopath are required.

The model (the shape of our `tiny`, narrower): 32x32 images, patch conv 7x7 stride 4 -> 8x8
tokens, 3 stages of depths (1, 2, 1), width 16 -> 32 -> 64, heads 1 -> 2 -> 4, q stride 2 at
the stage transitions, adaptive kv stride 2 (2 -> 1 -> 1), kernel 3x3, decomposed relative
positions and residual pooling on, no cls token, 5 classes, drop path 0; every parameter
perturbed by N(0, 0.05) (the rel-pos tables included). Saved: config, state_dict, images;
training-mode logits and the gradients of sum(w * logits) (w seeded) for every parameter and
the images; eval-mode probabilities (the official head applies softmax in eval).

Run (a venv beside the system torch, with fvcore and iopath; no torchvision or timm needed):
    python3 -m venv --system-site-packages /tmp/venv
    /tmp/venv/bin/pip install --no-deps fvcore yacs iopath portalocker termcolor tabulate
    /tmp/venv/bin/python tests/parity/make_mvit.py --mvit /path/to/mvit
"""
import logging
import sys
import types

import torch

import maker_common as M

CONFIG = dict(depths=(1, 2, 1), embed_dim=16, num_heads=1, input_size=32, kv_stride=(2, 2),
              num_classes=5, drop_path_rate=0.0)


def import_official():
    import mvit  # noqa: F401  (the official package, from the checkout on sys.path)
    sys.modules["mvit.utils.logging"] = types.SimpleNamespace(get_logger=logging.getLogger)
    sys.modules["mvit.utils.misc"] = types.SimpleNamespace(
        validate_checkpoint_wrapper_import=lambda checkpoint_wrapper: None)
    from mvit.config.defaults import get_cfg
    from mvit.models.mvit_model import MViT
    cfg = get_cfg()
    cfg.MVIT.DEPTH = sum(CONFIG["depths"])
    cfg.MVIT.DIM_MUL = [[1, 2.0], [3, 2.0]]  # the first block of stages 2 and 3
    cfg.MVIT.HEAD_MUL = [[1, 2.0], [3, 2.0]]
    cfg.MVIT.POOL_Q_STRIDE = [[0, 1, 1], [1, 2, 2], [2, 1, 1], [3, 2, 2]]
    cfg.MVIT.POOL_KV_STRIDE_ADAPTIVE = list(CONFIG["kv_stride"])
    cfg.MVIT.POOL_KVQ_KERNEL = [3, 3]
    cfg.MVIT.EMBED_DIM, cfg.MVIT.NUM_HEADS = CONFIG["embed_dim"], CONFIG["num_heads"]
    cfg.MVIT.DROPPATH_RATE = CONFIG["drop_path_rate"]
    cfg.DATA.TRAIN_CROP_SIZE = cfg.DATA.TEST_CROP_SIZE = CONFIG["input_size"]
    cfg.MODEL.NUM_CLASSES = CONFIG["num_classes"]
    return MViT(cfg)


def main():
    args = M.parse_args(__doc__, "mvit")
    seed = 60
    torch.manual_seed(seed)
    model = import_official()
    M.perturb(model, seed)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    model.eval()
    with torch.no_grad():
        probs = model(images)
    model.train()
    x = images.clone().requires_grad_(True)
    logits = model(x)
    grads, weight = M.grads_of(model, {"images": x}, logits, seed + 2)
    fixture = dict(config=CONFIG, state_dict=model.state_dict(), images=images, probs=probs,
                   logits=logits, grad_weight=weight, grads=grads)
    M.save(fixture, "mvit", args.out)


if __name__ == "__main__":
    main()
