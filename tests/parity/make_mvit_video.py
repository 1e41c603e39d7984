"""Make tests/parity/mvit_video.pt from the official MViTv2 video code (not run by CI).

Official code: github.com/facebookresearch/SlowFast at commit
287ec0076846560f44a9327e931a5a2360240533 (slowfast/models/video_model_builder.py MViT,
slowfast/models/attention.py), configured from configs/Kinetics/MVITv2_S_16x4.yaml at a smaller
size; imported through maker_common.import_slowfast (fvcore is required).

The model (the shape of our `tiny --video`, narrower): 4 frames of 32x32, patch conv 3x7x7
stride 2x4x4 -> 2 x 8 x 8 tokens + cls token, 3 stages of depths (1, 2, 1), width 16 -> 32 -> 64,
heads 1 -> 2 -> 4, q stride 1x2x2 at the stage transitions, adaptive kv stride 1x2x2, kernel
3x3x3, decomposed relative positions in space and time, residual pooling, 5 classes, drop path
and head dropout 0; every parameter perturbed by N(0, 0.05) (cls token, rel-pos tables
included). Saved: config, state_dict, clips; training-mode logits and the gradients of
sum(w * logits) (w seeded) for every parameter and the clips; eval-mode probabilities.

Run (a venv beside the system torch, with fvcore; no torchvision or timm needed):
    python3 -m venv --system-site-packages /tmp/venv
    /tmp/venv/bin/pip install --no-deps fvcore yacs iopath portalocker termcolor tabulate
    /tmp/venv/bin/python tests/parity/make_mvit_video.py --SlowFast /path/to/SlowFast
"""
import os

import torch

import maker_common as M

CONFIG = dict(video=True, num_frames=4, depths=(1, 2, 1), embed_dim=16, num_heads=1,
              input_size=32, kv_stride=(1, 2, 2), num_classes=5, drop_path_rate=0.0,
              head_dropout=0.0)


def import_official(root):
    video_model_builder, get_cfg = M.import_slowfast(root)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(root, "configs", "Kinetics", "MVITv2_S_16x4.yaml"))
    cfg.MVIT.DEPTH = sum(CONFIG["depths"])
    cfg.MVIT.DIM_MUL = [[1, 2.0], [3, 2.0]]  # the first block of stages 2 and 3
    cfg.MVIT.HEAD_MUL = [[1, 2.0], [3, 2.0]]
    cfg.MVIT.POOL_Q_STRIDE = [[0, 1, 1, 1], [1, 1, 2, 2], [2, 1, 1, 1], [3, 1, 2, 2]]
    cfg.MVIT.POOL_KV_STRIDE_ADAPTIVE = list(CONFIG["kv_stride"])
    cfg.MVIT.EMBED_DIM, cfg.MVIT.NUM_HEADS = CONFIG["embed_dim"], CONFIG["num_heads"]
    cfg.MVIT.DROPPATH_RATE = CONFIG["drop_path_rate"]
    cfg.MODEL.DROPOUT_RATE = CONFIG["head_dropout"]
    cfg.DATA.NUM_FRAMES = CONFIG["num_frames"]
    cfg.DATA.TRAIN_CROP_SIZE = cfg.DATA.TEST_CROP_SIZE = CONFIG["input_size"]
    cfg.MODEL.NUM_CLASSES = CONFIG["num_classes"]
    cfg.NUM_GPUS = 0
    return video_model_builder.MViT(cfg)


def main():
    args = M.parse_args(__doc__, "SlowFast")
    seed = 70
    torch.manual_seed(seed)
    model = import_official(os.path.abspath(args.SlowFast))
    M.perturb(model, seed)
    clips = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    model.eval()
    with torch.no_grad():
        probs = model([clips])
    model.train()
    x = clips.clone().requires_grad_(True)
    logits = model([x])
    grads, weight = M.grads_of(model, {"clips": x}, logits, seed + 2)
    fixture = dict(config=CONFIG, state_dict=model.state_dict(), clips=clips, probs=probs,
                   logits=logits, grad_weight=weight, grads=grads)
    M.save(fixture, "mvit_video", args.out)


if __name__ == "__main__":
    main()
