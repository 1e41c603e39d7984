"""Make tests/parity/memvit.pt from the official MeMViT code (not run by CI).

Official code: github.com/facebookresearch/MeMViT at commit
20a24f05ca756a254d52c71011990ff419d399e6 (memvit/models/video_model_builder.py MViT with
MEMVIT.ENABLE, memvit/models/attention.py), configured from configs/AVA/MeMViT_16_K400.yaml at
a smaller size with the classification head (DETECTION.ENABLE off, no box blocks); imported
through maker_common.import_slowfast(root, "memvit") (fvcore is required).

The model (the shape of our `tiny`, narrower): 8 frames of 32x32 -> 4 x 8 x 8 tokens + cls,
4 blocks in 3 stages, width 8 -> 16 -> 32, heads 1 -> 2 -> 4, adaptive kv stride 1x2x2, memory
in the even blocks (EXCLUDE_LAYERS [1, 3]), sampler `all`, ATTN_MAX_LEN 3, compression 7x3x3
stride 4x2x2, 4 classes, drop path and dropout 0; every parameter perturbed by N(0, 0.05) (the
memory rel-pos tables and compressors included). Three consecutive training steps on two
streams; stream 1 moves to another video at step 3, so its memory must be zeroed. Each step:
forward with the video names, backward of sum(w_t * logits_t) (w_t seeded), as training does
(so step t trains the compressor of step t-1's memory). Saved: config, state_dict, clips,
video names, per step the logits, and the last step's gradients of every parameter.

Run (a venv beside the system torch, with fvcore; no torchvision or timm needed):
    python3 -m venv --system-site-packages /tmp/venv
    /tmp/venv/bin/pip install --no-deps fvcore yacs iopath portalocker termcolor tabulate
    /tmp/venv/bin/python tests/parity/make_memvit.py --MeMViT /path/to/MeMViT
"""
import os

import torch

import maker_common as M

CONFIG = dict(num_frames=8, input_size=32, embed_dim=8, num_heads=1, depth=4, stage_starts=(1, 3),
              kv_stride_adaptive=(1, 2, 2), drop_path=0.0, head_dropout=0.0, sampler="all",
              attn_max_len=3, exclude_layers=(1, 3), compress_kernel=(7, 3, 3),
              compress_stride=(4, 2, 2), num_classes=4)
VIDEOS = [["a", "b"], ["a", "b"], ["a", "c"]]  # the video of each stream at each step


def import_official(root):
    video_model_builder, get_cfg = M.import_slowfast(root, "memvit")
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(root, "configs", "AVA", "MeMViT_16_K400.yaml"))
    cfg.DETECTION.ENABLE = False
    cfg.MVIT.BOX_DEPTH = 0
    cfg.MVIT.DEPTH = CONFIG["depth"]
    cfg.MVIT.DIM_MUL = [[s, 2.0] for s in CONFIG["stage_starts"]]
    cfg.MVIT.HEAD_MUL = [[s, 2.0] for s in CONFIG["stage_starts"]]
    cfg.MVIT.POOL_Q_STRIDE = [[i, 1, 2, 2] if i in CONFIG["stage_starts"] else [i, 1, 1, 1]
                              for i in range(CONFIG["depth"])]
    cfg.MVIT.POOL_KV_STRIDE_ADAPTIVE = list(CONFIG["kv_stride_adaptive"])
    cfg.MVIT.EMBED_DIM, cfg.MVIT.NUM_HEADS = CONFIG["embed_dim"], CONFIG["num_heads"]
    cfg.MVIT.DROPPATH_RATE = CONFIG["drop_path"]
    cfg.MODEL.DROPOUT_RATE = CONFIG["head_dropout"]
    cfg.MEMVIT.SAMPLER, cfg.MEMVIT.ATTN_MAX_LEN = CONFIG["sampler"], CONFIG["attn_max_len"]
    cfg.MEMVIT.EXCLUDE_LAYERS = list(CONFIG["exclude_layers"])
    cfg.MEMVIT.COMPRESS.POOL_KERNEL = list(CONFIG["compress_kernel"])
    cfg.MEMVIT.COMPRESS.POOL_STRIDE = list(CONFIG["compress_stride"])
    cfg.DATA.NUM_FRAMES = CONFIG["num_frames"]
    cfg.DATA.TRAIN_CROP_SIZE = cfg.DATA.TEST_CROP_SIZE = CONFIG["input_size"]
    cfg.MODEL.NUM_CLASSES = CONFIG["num_classes"]
    cfg.NUM_GPUS = 0
    return video_model_builder.MViT(cfg)


def main():
    args = M.parse_args(__doc__, "MeMViT")
    seed = 80
    torch.manual_seed(seed)
    model = import_official(os.path.abspath(args.MeMViT))
    M.perturb(model, seed)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    clips = [torch.randn(2, 3, 8, 32, 32, generator=g) for _ in VIDEOS]
    model.train()
    model.clear_memory()
    steps = []
    for t, (clip, names) in enumerate(zip(clips, VIDEOS)):
        logits = model([clip], video_names=names)
        grads, weight = M.grads_of(model, {}, logits, seed + 2 + t)
        steps.append(dict(logits=logits, grad_weight=weight))
    steps[-1]["grads"] = grads  # the last step's only (the file stays under 1 MB)
    fixture = dict(config=CONFIG, state_dict=state_dict, clips=clips, videos=VIDEOS, steps=steps)
    M.save(fixture, "memvit", args.out)


if __name__ == "__main__":
    main()
