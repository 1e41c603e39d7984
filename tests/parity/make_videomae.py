"""Make tests/parity/videomae.pt from the official MAE-ST code (not run by CI).

Official code: github.com/facebookresearch/mae_st at commit c5dec1bc01062097906ea67fe47935ec33fd46df
(models_mae.py, util/video_vit.py), on timm 1.0.31, configured as its pre-training recipe
(run_pretrain.py / PRETRAIN.md: --sep_pos_embed --cls_embed, trunc_init off, LayerNorm eps 1e-6,
qkv bias). Its util/logging.py needs simplejson and iopath only to log: a stand-in module with
`master_print = print` is registered in its place (no number changes).

A small seeded model: 4 frames of 16x16, 2x4x4 tubes -> 2 x 16 = 32 tokens, width 32, 2 blocks,
2 heads; decoder width 24, 1 block, 2 heads; pred_t_dim 2 (the decoder predicts frames 0 and 3,
one per 2-frame token); norm_pix_loss on; mask ratio 0.75. Every parameter is perturbed by
N(0, 0.05) (decoder_cls_token and the class position tables included). The masking noise is
what random_masking draws first after torch.manual_seed(MASK_SEED); ours draws the same call.
Saved: config, state_dict, videos, latent, mask, ids_restore, pred, the loss and its gradients.

Run (a venv with timm beside the system torch; torchvision is not needed, see maker_common.py):
    python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip install timm==1.0.31
    /tmp/venv/bin/python tests/parity/make_videomae.py --mae_st /path/to/mae_st
    (the checkout's folder must be named mae_st: the code imports itself as `mae_st.util...`)
"""
import logging
import os
import sys
import types
from functools import partial

import torch
import torch.nn as nn

import maker_common as M

CONFIG = dict(img_size=16, patch_size=4, num_frames=4, t_patch_size=2, embed_dim=32, depth=2,
              num_heads=2, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
              pred_t_dim=2, mlp_ratio=4.0)
MASK_RATIO, MASK_SEED = 0.75, 43


def import_official(path):
    path = os.path.abspath(path)
    assert os.path.basename(path) == "mae_st", "the checkout folder must be named mae_st"
    sys.path.insert(0, os.path.dirname(path))
    sys.modules["mae_st.util.logging"] = types.SimpleNamespace(
        master_print=print, get_logger=logging.getLogger)
    from mae_st import models_mae
    return models_mae


def main():
    args = M.parse_args(__doc__, "mae_st")
    M.stand_in_torchvision()
    import timm
    models_mae = import_official(args.mae_st)
    seed = 40
    torch.manual_seed(seed)
    model = models_mae.MaskedAutoencoderViT(**CONFIG, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                            norm_pix_loss=True, sep_pos_embed=True,
                                            cls_embed=True, trunc_init=False).eval()
    M.perturb(model, seed)
    videos = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(MASK_SEED)
    latent, mask, ids_restore = model.forward_encoder(videos, MASK_RATIO)
    pred = model.forward_decoder(latent, ids_restore)
    loss = model.forward_loss(videos, pred, mask)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fixture = dict(timm_version=timm.__version__, config=CONFIG, norm_pix_loss=True,
                   mask_ratio=MASK_RATIO, mask_seed=MASK_SEED, state_dict=model.state_dict(),
                   videos=videos, latent=latent, mask=mask, ids_restore=ids_restore, pred=pred,
                   loss=loss, grads=grads)
    M.save(fixture, "videomae", args.out)


if __name__ == "__main__":
    main()
