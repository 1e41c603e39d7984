"""MAE: Masked Autoencoders Are Scalable Vision Learners.

He, Chen, Xie, Li, Dollar, Girshick, CVPR 2022, arXiv 2111.06377. Official code:
facebookresearch/mae (models_mae.py, models_vit.py, main_pretrain.py, main_finetune.py).

The idea. Cut an image into patches, hide a large random subset (75%), and train a ViT to paint
the hidden patches back. Two choices make it work and make it cheap:
  1. The encoder sees the visible patches ONLY (no mask tokens), so with 75% masking it processes
     a quarter of the tokens: pre-training costs ~3x less (the paper's Table 1c and Table 2).
  2. A small decoder gets the encoded visible patches plus a shared, learned mask token at every
     hidden position, and predicts the pixels of every patch; the loss (mean squared error) is
     taken on the hidden patches only, optionally on per-patch normalized pixels (--norm_pix_loss).
After pre-training the decoder is thrown away and the encoder is fine-tuned (--finetune) or probed.

What this file reproduces in miniature: MAE pre-training of a tiny ViT on the synthetic shapes
(32x32 images, 4x4 patches), the held-out reconstruction loss, the linear probe and kNN accuracy of
the frozen encoder against the same encoder at initialization, the reconstruction picture, the
paper's comparison (fine-tuning from the MAE encoder vs. training the same classifier from scratch,
same recipe and epochs), and the encoder-sparsity FLOP and time ratio (--bench).

    python mae.py                                   # pre-train tiny, evaluate, save the picture
    # the paper's comparison, from that checkpoint: fine-tune from MAE, then the same from scratch
    python mae.py --finetune --weights runs/mae/checkpoint.pt --out runs/mae_ft &&
    python mae.py --finetune --out runs/mae_scratch                     # (one command: && ends the line)
    python mae.py --smoke ; python mae.py --bench   # --bench: ViT-B unless --model large / huge

Official weights: `--weights mae_pretrain_vit_base.pth` (encoder only: the decoder stays at its
initialization), `mae_pretrain_vit_base_full.pth` and `mae_visualize_vit_base.pth` (everything) load
with every key matched into `--model base` (and large / huge); `--epochs 0` just evaluates and
draws them. The `*_full.pth` files were trained with norm-pix targets: evaluate them with
`--norm_pix_loss` (without it the held-out loss compares their normalized output with raw pixels);
the `visualize` files predict raw pixels (no flag). With `--finetune` the encoder of any of these
(or `mae_finetuned_vit_*.pth`) is used.

Departures from the official code, and why:
- Defaults are sized for a CPU minute: the `tiny` preset (D=192, 4 blocks, decoder 96-d x 2),
  32x32 inputs, 10 epochs, batch 32 and --blr 8e-3, i.e. lr 1e-3 (the paper's 1.5e-4 is for 800+
  epochs at batch 4096; a few hundred steps need a bigger step, and with fewer, larger batches or
  a smaller lr the tiny model stays at blurry colour blobs). The presets base / large / huge are
  the official ones, number for number.
- Synthetic images are augmented with flips only (RandomResizedCrop could cut the shape out);
  folders of user images get the official RandomResizedCrop(scale 0.2-1) + flip.
- Linear probe: MAE trains BatchNorm + linear with LARS for 90 epochs on the cls token; here the
  mean of the encoder's patch tokens is standardized and probed with Adam, cosine lr, a seeded head
  (common.linear_probe), which is faster and steadier on small data.
- --finetune keeps the official recipe's shape (global pool + fc_norm + head, layer-wise lr decay,
  drop path, label smoothing, AdamW (0.9, 0.999)) but leaves out mixup, cutmix, random erasing and
  RandAugment, which are ImageNet-scale regularizers; its default is 3 epochs (FINETUNE_EPOCHS, so
  that the comparison above runs in minutes on a CPU), --epochs sets another.
- The classifier (models_vit.py) is initialized as the official one (timm 0.3.2's ViT: Linear and
  cls token trunc_normal(0.02); the head re-drawn with std 2e-5 after a checkpoint is loaded, as
  main_finetune.py does) except pos_embed: timm draws it from trunc_normal(0.02), here it starts
  from MAE's 2-D sin-cos table. Fine-tuning replaces it with the checkpoint's (the same table, as
  MAE keeps it frozen), so only the from-scratch run differs: its positions start from the same
  table as the MAE run's, a fairer and stronger baseline on 2000 images (the comparison then
  measures what the pre-trained weights add, not what a random position table costs).
- Attention runs through F.scaled_dot_product_attention (same maths as timm's explicit softmax).

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `random_masking(x, mask_ratio, noise=None)` (Sec. 3 "Masking", reading map step 2:
   per-sample shuffle by the given uniform noise (N, L), or torch.rand(N, L) when None, keep the
   first floor(L (1 - r)) in ascending-noise order, mask 1 = removed in the original order,
   ids_restore = the inverse permutation; return (x kept, mask, ids_restore)).
   Grade: `python -m pytest tests/test_mae.py -k "masking"`
2. Re-implement `MaskedAutoencoderViT.forward_decoder` (Sec. 3 "MAE decoder", steps 4-5: append
   the mask tokens after the visible tokens, un-shuffle with ids_restore, cls back in front, add
   the positions AFTER the un-shuffle, decoder blocks, norm, prediction, drop the cls slot).
   Grade: `python -m pytest tests/test_mae.py -k "unshuffle"`
3. Re-implement `patchify`, `unpatchify` and `MaskedAutoencoderViT.forward_loss` (Sec. 3
   "Reconstruction target", steps 6-7: patch order channel-column-row, per-patch normalized
   pixels (x - mean) / sqrt(var + 1e-6) with the unbiased variance, mean squared error averaged
   over the removed patches only).
   Grade: `python -m pytest tests/test_mae.py -k "patchify or loss"`
4. Re-implement `drop_path` (stochastic depth, used by --finetune: drop a sample's whole residual
   branch with probability p and scale the kept ones by 1 / (1 - p); the identity in eval).
   Grade: `python -m pytest tests/test_mae.py -k "drop_path"`
5. Explore: the mask ratio (the paper's Fig. 5 finds 75% best; 90% still works). Run
   `python mae.py --mask_ratio 0.5 --epochs 3` and `python mae.py --mask_ratio 0.9 --epochs 3`
   (each with its own --out). Predict before you run: how many tokens does the encoder see in
   each (64 patches), and how much cheaper is it at 90%? Which run has the higher held-out
   reconstruction loss `val_loss` (on the hidden patches)? Does the linear probe `probe_acc` beat
   `probe_acc_init`? Read metrics.json. You should see: the encoder runs on 1 + 32 tokens at 50%
   and 1 + 6 at 90%, 4.6x fewer encoder FLOPs (the decoder still runs on all 65); val_loss is
   higher at 90% (measured, seeds 0 / 1: 0.55 / 0.55 at 50%, 0.59 / 0.60 at 90%); and after only
   3 epochs the 90% encoder probes BELOW its initialization (0.31 / 0.30 vs 0.34 / 0.32) while
   the 50% one is at or above it (0.38 / 0.34): six visible patches of 64 are too few for a few
   hundred steps of a tiny model; the paper's high ratios pay off over hundreds of epochs.
   Grade: `python -m pytest tests/test_mae.py -k "mask_ratio"`
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

# ============================================================ the ordinary building blocks


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, each linearly projected to D (a conv with kernel = stride = p)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):                                  # (N, 3, H, W)
        x = self.proj(x)                                   # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)                # (N, L, D), patch (i, j) is token i*W/p + j


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d)) V with a fused qkv projection (timm names)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                  # (N, T, D)
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)               # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)        # (N, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (fine-tuning only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x = x + Attn(LN(x)); x = x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2-D sin-cos positions (mae util/pos_embed.py): float32 (grid_h * grid_w [+ 1 zero row
    first when cls_token], embed_dim); grid_size an int or (grid_h, grid_w).

    Token (row i, column j) gets [PE_{D/2}(j), PE_{D/2}(i)]: the first half of the channels
    encodes the COLUMN, the second half the ROW. Each 1-D half is
        PE_d(pos) = [sin(pos * w_k) for k < d/2] ++ [cos(pos * w_k) for k < d/2],  w_k = 10000^(-k / (d/2)).
    """
    def one_axis(d, pos):                                  # pos (M,) -> (M, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angle = pos[:, None] * omega[None, :]              # (M, d/2)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # (gh, gw) each
    emb = torch.cat([one_axis(embed_dim // 2, cols.flatten()), one_axis(embed_dim // 2, rows.flatten())], dim=1)  # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)     # (1 + L, D)
    return emb.float()


# ============================================================ the paper's idea: masked autoencoding
#
# One pre-training step (Sec. 3 of the paper; models_mae.py), read top to bottom:
#   1. embed all L patches and add their fixed sin-cos positions          (forward_encoder)
#   2. random masking, per sample: noise ~ U[0, 1) of shape (N, L), ids_shuffle = argsort(noise)
#      (small noise = keep), keep the first len_keep = floor(L (1 - r)); the mask (1 = removed)
#      goes back to the original order with ids_restore = argsort(ids_shuffle)   (random_masking)
#   3. put the cls token (+ its zero position) in front and run the encoder on the VISIBLE tokens
#      only, then LayerNorm                                              (forward_encoder)
#   4. decoder_embed; append L - len_keep copies of the one mask token AFTER the visible tokens
#      (that is the shuffled order), un-shuffle with ids_restore, cls back in front
#   5. add the decoder's positions AFTER the un-shuffle (every token now sits at its own patch),
#      decoder blocks, LayerNorm, linear prediction of p*p*3 pixels, drop the cls slot
#                                                                        (forward_decoder)
#   6. target = patchify(imgs) (inside a patch: channel fastest, then column, then row); with
#      --norm_pix_loss each patch is standardized: (x - mean) / sqrt(var + 1e-6)
#   7. loss = per-patch mean squared error, averaged over the REMOVED patches only (forward_loss)


def patchify(imgs, p):
    """(N, 3, H, W) -> (N, L, p*p*3); inside a patch the channel varies fastest, then column, then row."""
    N, c, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, c, h, p, w, p)                     # (N, c, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)                  # (N, h, w, p, q, c)
    return x.reshape(N, h * w, p * p * c)                  # (N, L, p*p*c)


def unpatchify(x, p, c=3):
    """(N, L, p*p*c) -> (N, c, H, W), the exact inverse of patchify (square images)."""
    N, L, _ = x.shape
    h = w = int(round(math.sqrt(L)))
    x = x.reshape(N, h, w, p, p, c)                        # (N, h, w, p, q, c)
    x = torch.einsum("nhwpqc->nchpwq", x)                  # (N, c, h, p, w, q)
    return x.reshape(N, c, h * p, w * p)                   # (N, c, H, W)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by sorting noise: small noise = keep.

    x (N, L, D); noise (N, L) uniform in [0, 1), drawn here when None (pass it to reproduce a
    mask). Keeps len_keep = floor(L (1 - mask_ratio)) tokens of each sample. Returns the kept tokens
    (N, len_keep, D), the binary mask (N, L) in the ORIGINAL order with 1 = removed, 0 = kept, and
    ids_restore (N, L), the permutation that undoes the shuffle.
    """
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device) if noise is None else noise  # step 2
    ids_shuffle = torch.argsort(noise, dim=1)              # ascending: the first len_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))  # (N, len_keep, D)
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)              # back to the original token order
    return x_kept, mask, ids_restore


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and a lightweight ViT decoder (parameter names = models_mae.py)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False):
        super().__init__()
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss
        # --- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # --- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        """The official init: sin-cos tables; patch conv as a Linear (xavier on its (D, 3p^2) view, bias
        untouched); cls and mask tokens N(0, 0.02); every Linear xavier-uniform with zero bias; LN (1, 0)."""
        grid = self.patch_embed.grid
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]             # step 1: (N, L, D), positions first
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)       # step 2: (N, L_vis, D) visible only
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)                                    # step 3: (N, 1 + L_vis, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)                                         # step 4: (N, 1 + L_vis, Dd)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)   # (N, L - L_vis, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)                 # (N, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # step 5: (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))                       # (N, 1 + L, p*p*3)
        return x[:, 1:, :]                                                # (N, L, p*p*3): every patch

    def forward_loss(self, imgs, pred, mask):
        """L = sum_i m_i * mean_j (pred_ij - target_ij)^2 / sum_i m_i   (removed patches only)."""
        target = patchify(imgs, self.patch_size)                          # step 6: (N, L, p*p*3)
        if self.norm_pix_loss:  # per-patch standardized target: (x - mean) / sqrt(var + 1e-6), unbiased var
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)                        # step 7: (N, L) per-patch MSE
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


# ============================================================ the full model and its presets


class VisionTransformer(nn.Module):
    """The fine-tuning model of models_vit.py with global_pool=True: the MAE encoder (positions now
    learnable), mean of the patch tokens, fc_norm, head. Names equal mae_finetuned_vit_*.pth."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=1000, drop_path_rate=0.1, **_):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, self.patch_embed.grid, cls_token=True)[None])
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()           # stochastic depth grows with depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        # timm's init (models_vit subclasses timm 0.3.2's VisionTransformer): Linear trunc_normal(0.02)
        # with zero bias, cls token trunc_normal(0.02); pos_embed is the sin-cos table (a departure: see
        # the docstring). Fine-tuning from a checkpoint re-draws the head with std 2e-5 (finetune()).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x):
        x = self.patch_embed(x)                                           # (N, L, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (N, 1 + L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:, :].mean(dim=1))                      # global pool over patches: (N, D)

    def forward(self, x):
        return self.head(self.forward_features(x))


PRESETS = {  # models_mae.py factories; `tiny` is ours, for a CPU
    "tiny": dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                 decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3),
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "huge": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def create_model(name="tiny", **overrides):
    """The MAE pre-training model: `tiny` (ours) or the official base / large / huge."""
    if name not in PRESETS:
        C.die(f"unknown --model {name!r}; choose from {', '.join(PRESETS)}")
    return MaskedAutoencoderViT(**{**PRESETS[name], **overrides})


def create_classifier(name="tiny", num_classes=1000, **overrides):
    """The fine-tuning ViT (global pool + fc_norm + head) with the same encoder shape as create_model(name)."""
    if name not in PRESETS:
        C.die(f"unknown --model {name!r}; choose from {', '.join(PRESETS)}")
    return VisionTransformer(**{**PRESETS[name], "num_classes": num_classes, **overrides})


# ============================================================ the loss


def make_loss_fn(args):
    """The function handed to C.fit. Pre-training: the model's own forward_loss (step 7) at
    --mask_ratio; --finetune: cross-entropy with label smoothing on the classifier's logits."""
    if args.finetune:
        def loss_fn(net, batch):
            images, labels = batch                                            # (N, 3, H, W), (N,)
            return F.cross_entropy(net(images), labels, label_smoothing=args.smoothing)
    else:
        def loss_fn(net, batch):
            loss, _, _ = net(batch[0], args.mask_ratio)
            return loss
    return loss_fn


# ============================================================ data glue: the reconstruction picture


def visible_stat_denorm(pred, imgs, mask, p, k=4):
    """Undo the per-patch normalization of a norm-pix prediction WITHOUT the hidden pixels: every
    patch gets the mean and std averaged over its k nearest VISIBLE patches (grid distance)."""
    target = patchify(imgs, p)                                            # (N, L, p*p*3)
    mean, std = target.mean(-1), (target.var(-1) + 1e-6).sqrt()           # (N, L): known only where visible
    L = mask.shape[1]
    g = int(round(math.sqrt(L)))
    yx = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(L, 2).float()
    dist = torch.cdist(yx, yx).to(mask.device)[None].expand(mask.shape[0], -1, -1).clone()  # (N, L, L)
    dist[mask[:, None, :].expand_as(dist) > 0] = float("inf")             # only visible patches are neighbours
    idx = dist.topk(k, dim=-1, largest=False).indices                     # (N, L, k)
    m = torch.gather(mean[:, None, :].expand(-1, L, -1), 2, idx).mean(-1) # (N, L)
    s = torch.gather(std[:, None, :].expand(-1, L, -1), 2, idx).mean(-1)
    return pred * s[..., None] + m[..., None]


@torch.no_grad()
def save_reconstructions(model, val_ds, args, run, path, n=8):
    """Rows: original / masked / reconstruction / reconstruction with the visible patches pasted."""
    model.eval()
    imgs = torch.stack([val_ds[i][0] for i in range(min(n, len(val_ds)))]).to(run.device)
    noise = torch.rand(len(imgs), model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0)).to(run.device)
    _, pred, mask = model(imgs, args.mask_ratio, noise)
    p = model.patch_size
    if model.norm_pix_loss:
        pred = visible_stat_denorm(pred, imgs, mask, p)
    m = mask[:, :, None].expand(-1, -1, p * p * 3)                        # (N, L, p*p*3): 1 = hidden
    masked = unpatchify(patchify(imgs, p) * (1 - m), p)
    recon = unpatchify(pred, p)
    pasted = unpatchify(patchify(imgs, p) * (1 - m) + pred * m, p)
    show = lambda x: C.denormalize(x)
    masked_show = show(masked) * unpatchify(1 - m, p).cpu() + 0.5 * unpatchify(m, p).cpu()  # hidden = grey
    how = "norm-pix: hidden patches\nde-normalized with 4 nearest\nvisible patches' mean/std" if model.norm_pix_loss else ""
    texts = [["original"], [f"masked {args.mask_ratio:.0%}"], ["reconstruction"], ["+ visible pasted", how]]
    return C.save_grid(path, [show(imgs), masked_show, show(recon), show(pasted)], texts)


# ============================================================ train, evaluate, bench, smoke: and fine-tune


def load_weights(model, path, run=None):
    """Our checkpoint, *_full / visualize files (everything), or the encoder-only mae_pretrain file."""
    state = C.unwrap_state(C.load_checkpoint(path))
    encoder_only = not any(k.startswith("decoder") for k in state)
    C.load_state(model, state, path, allow_missing=("decoder", "mask_token") if encoder_only else ())
    C.log(run, f"loaded {path}" + (" (encoder only: the decoder keeps its initialization)" if encoder_only else ""))


@torch.no_grad()
def encoder_features(model, imgs):
    """Frozen-encoder features for the probe: all patches visible, mean of the patch tokens (N, D)."""
    latent, _, _ = model.forward_encoder(imgs, mask_ratio=0.0)
    return latent[:, 1:, :].mean(dim=1)


MASK_SEED = 1234  # the held-out loss draws its masks from this seed: the same masks at every call


@torch.no_grad()
def heldout_loss(model, loader, args, run):
    """Reconstruction loss on the held-out images (this rank's shard; sums all-reduced under torchrun),
    with masks from a fixed seed, so that the model before and after training sees the same masks."""
    model.eval()
    g, total, n = torch.Generator().manual_seed(MASK_SEED + run.rank), 0.0, 0
    for imgs, _ in loader:
        noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=g).to(run.device)
        with C.autocast(run):
            loss, _, _ = model(imgs.to(run.device), args.mask_ratio, noise)
        total, n = total + loss.item() * len(imgs), n + len(imgs)
    if run.distributed:
        sums = torch.tensor([total, n], dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(sums)
        total, n = sums.tolist()
    return total / max(n, 1)


def evaluate(model, train_ds, val_ds, labelled, args, run):
    """The held-out reconstruction loss and, on labelled data, the linear probe and kNN accuracy of the
    frozen encoder (C.linear_probe: standardized features, a linear head trained with Adam, seeded).
    Every rank calls it: the loss on sharded loaders, the features shared (C.extract_features), the
    probe and kNN fitted on rank 0 (their figures only there)."""
    model.eval()
    figures = dict(val_loss=heldout_loss(model, C.make_loader(val_ds, args, run, train=False), args, run))
    if labelled:
        whole = lambda ds: C.make_loader(ds, args, run, train=False, whole=True)
        f = lambda x: encoder_features(model, x)
        (Xtr, ytr), (Xva, yva) = [C.extract_features(f, whole(ds), run, shared=True) for ds in (train_ds, val_ds)]
        if run.is_main:
            figures.update(probe_acc=C.linear_probe(Xtr, ytr, Xva, yva), knn_acc=C.knn_accuracy(Xtr, ytr, Xva, yva))
    return figures


def absolute_lr(args, run):
    """The official rule when --lr is not given: absolute lr = blr * effective batch / 256."""
    if args.lr is None:
        args.lr = args.blr * args.batch_size * run.world_size / 256
    C.log(run, f"mae {'fine-tuning' if args.finetune else 'pre-training'} --model {args.model} on "
               f"{args.data or 'synthetic shapes'}, {run.device}, world {run.world_size}, lr {args.lr:.2e}")


def train(args, run):
    """MAE pre-training, then the held-out loss, probe and kNN against the same model at initialization,
    and the reconstruction picture."""
    absolute_lr(args, run)
    train_ds, val_ds, classes = C.image_data(args, args.n_train, args.n_val)
    C.check_enough(train_ds, val_ds, args)  # too few to train and evaluate: one line, before any work
    model = create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    if args.weights:
        load_weights(model, args.weights, run)
    C.check_resume(model, args)  # a --resume of another model ends here, before the evaluation below
    model.to(run.device)
    labelled = len(classes) > 1
    init = evaluate(model, train_ds, val_ds, labelled, args, run)  # the same model before training
    C.log(run, "at initialization: " + "  ".join(f"{k} {v:.4f}" for k, v in init.items()))
    groups = C.param_groups(model, args.weight_decay)  # no decay on biases and norms; frozen tables skipped
    model, history = C.fit(model, make_loss_fn(args), C.make_loader(train_ds, args, run, train=True), args, run,
                           groups=groups, betas=(0.9, 0.95))
    figures = evaluate(model, train_ds, val_ds, labelled, args, run)
    if not run.is_main:
        return None
    figures.update({f"{k}_init": v for k, v in init.items()})
    C.log(run, f"picture: {save_reconstructions(model, val_ds, args, run, Path(args.out) / 'reconstructions.png')}")
    return C.write_metrics(args, run, history, mask_ratio=args.mask_ratio, **figures)


def layer_id(name, depth):
    """models_vit layer ids for layer-wise lr decay: cls/pos/patch_embed 0, blocks.i i+1, the rest depth+1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


HEAD_INIT_STD = 2e-5  # main_finetune.py re-draws the head with this std after loading a checkpoint


def finetune(args, run):
    """Supervised fine-tuning of the classifier (from --weights: an MAE encoder; without: from
    scratch), then its held-out top-1 accuracy."""
    absolute_lr(args, run)
    train_ds, val_ds, classes = C.image_data(args, args.n_train, args.n_val)
    if len(classes) < 2:
        C.die(f"--finetune needs labelled data: class folders in {args.data}")
    C.check_enough(train_ds, val_ds, args, classes, need_classes=True)
    model = create_classifier(args.model, len(classes), img_size=args.input_size, drop_path_rate=args.drop_path)
    if args.weights:  # the pre-trained encoder (ours, official pretrain, or a fine-tuned file)
        state = C.unwrap_state(C.load_checkpoint(args.weights))
        own = model.state_dict()
        encoder = {k: v for k, v in state.items() if k in own}  # the decoder, mask token and `norm` stay behind
        C.load_state(model, encoder, args.weights, allow_missing=("fc_norm.", "head."), new_head="head.", run=run)
        nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)  # as main_finetune.py, after every load
        new = sorted(set(own) - set(encoder))
        C.log(run, f"loaded the encoder from {args.weights} ({len(encoder)} tensors); new: {', '.join(new) or 'none'}")
    C.check_resume(model, args)
    depth = len(model.blocks)
    scale = lambda name: args.layer_decay ** (depth + 1 - layer_id(name, depth))
    groups = C.param_groups(model, args.weight_decay, lr_scale=scale, skip=("pos_embed", "cls_token"))
    model, history = C.fit(model, make_loss_fn(args), C.make_loader(train_ds, args, run, train=True), args, run,
                           groups=groups)
    model.eval()
    acc, _ = C.top1(model, C.make_loader(val_ds, args, run, train=False), run)  # every rank: its shard
    return C.write_metrics(args, run, history, acc=acc, pretrained=bool(args.weights))


def encoder_with_mask_tokens(model, imgs, mask_ratio, enc_mask_token):
    """The paper's Table 1c baseline "encoder w/ [M]": the hidden patches are replaced by a learned
    mask token and the encoder runs on ALL L tokens; the decoder is the same as MAE's."""
    x = model.patch_embed(imgs)                                           # (N, L, D)
    _, mask, _ = random_masking(x, mask_ratio)
    x = torch.where(mask[..., None] > 0, enc_mask_token.expand_as(x), x) + model.pos_embed[:, 1:, :]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1, :]).expand(len(x), -1, -1), x], 1)  # (N, 1 + L, D)
    for blk in model.blocks:
        x = blk(x)
    x = model.decoder_embed(model.norm(x)) + model.decoder_pos_embed      # (N, 1 + L, Dd): nothing to add
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    return model.forward_loss(imgs, pred, mask)


def bench(args, run):
    """The paper's Table 1c / Table 2 claim at its own size (ViT-B by default, --model large / huge):
    encoder on visible patches only (MAE) vs. encoder with mask tokens on all patches, same decoder;
    FLOPs (counted) and wall-clock of one training step (forward + backward), timed in interleaved
    rounds (C.time_ab). It runs at the paper's size on a CPU too (batch 8 by default): no smaller fallback."""
    model = create_model(args.model, norm_pix_loss=args.norm_pix_loss).to(run.device)
    cfg, S = PRESETS[args.model], PRESETS[args.model]["img_size"]
    bs = args.bench_batch
    imgs = torch.randn(bs, 3, S, S, device=run.device)
    token = torch.zeros(1, 1, cfg["embed_dim"], device=run.device, requires_grad=True)

    def step(with_mask_tokens):
        def f():
            with C.autocast(run):
                loss = encoder_with_mask_tokens(model, imgs, args.mask_ratio, token) if with_mask_tokens \
                    else model(imgs, args.mask_ratio)[0]
            loss.backward()
        return f

    L = (S // cfg["patch_size"]) ** 2
    keep = int(L * (1 - args.mask_ratio))
    block = lambda n, d: 12 * n * d * d + 2 * n * n * d                   # multiply-adds of one block
    dec = cfg["decoder_depth"] * block(L + 1, cfg["decoder_embed_dim"])
    analytic = (cfg["depth"] * block(L + 1, cfg["embed_dim"]) + dec) / (cfg["depth"] * block(keep + 1, cfg["embed_dim"]) + dec)
    names = {"encoder w/ [M] (all tokens)": True, "MAE encoder (visible only)": False}
    secs = C.time_ab({name: step(wm) for name, wm in names.items()}, run, rounds=args.bench_reps, warmup=1)
    rows = [(name, C.count_flops(step(wm)), secs[name]) for name, wm in names.items()]
    print(f"MAE-{args.model}, {S}x{S}, mask {args.mask_ratio:.0%}, batch {bs}, {run.device}, {args.precision}; "
          f"one training step (forward + backward)")
    print(f"{'encoder':30s} {'GFLOPs':>10s} {'s/step':>8s}")
    for name, fl, s in rows:
        print(f"{name:30s} {fl / 1e9:10.1f} {s:8.3f}")
    flop_ratio, time_ratio = rows[0][1] / rows[1][1], rows[0][2] / rows[1][2]
    print(f"analytic FLOP ratio (12ND^2 + 2N^2D per block): {analytic:.2f}x; paper (ViT-L, 75%): 3.3x FLOPs, 2.8x wall-clock")
    print(f"bench: model {args.model} mask {args.mask_ratio} flop_ratio {flop_ratio:.2f}x time_ratio {time_ratio:.2f}x "
          f"(analytic {analytic:.2f}x) on {run.device}")
    return flop_ratio, time_ratio


def smoke(args, run):
    """A few steps of MAE pre-training on 8 synthetic images with fixed masks: the loss must fall."""
    model = create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    imgs = C.shapes_images(8, args.input_size, seed=0)["images"]
    batch = (torch.stack([C.normalize(x) for x in imgs]),)
    torch.manual_seed(0)
    C.smoke(model, lambda m, b: m(b[0], args.mask_ratio, torch.rand(len(b[0]), m.patch_embed.num_patches,
                                                                  generator=torch.Generator().manual_seed(0)).to(b[0].device))[0],
            batch, run)


# the CPU recipe: pre-training (python mae.py) and fine-tuning (--finetune) epochs when --epochs is not given
PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 10, 3


def settle(args):
    """The defaults that depend on other flags, before C.init_run: --bench measures base unless told
    otherwise; the preset's image size; the epochs of pre-training or fine-tuning; --finetune writes
    to its own --out (never the folder of the checkpoint it starts from)."""
    args.model = args.model or ("base" if args.bench else "tiny")
    args.input_size = args.input_size or PRESETS[args.model]["img_size"]
    if args.epochs is None:
        args.epochs = FINETUNE_EPOCHS if args.finetune else PRETRAIN_EPOCHS
    if args.finetune:
        C.derived_out(args, "finetune")
    return args


def main(argv=None):
    p = C.make_parser("mae", __doc__, presets=PRESETS, model=None, epochs=None, batch_size=32, input_size=None, lr=None,
                      weight_decay=0.05, warmup_epochs=1)
    next(a for a in p._actions if a.dest == "weights").help = (
        "initial weights: ours or an official file; the *_full.pth files were trained with --norm_pix_loss: "
        "evaluate them with it (their reconstructions are per-patch normalized)")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches removed")
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalized pixels as targets")
    p.add_argument("--blr", type=float, default=8e-3, help="base lr: lr = blr * total batch / 256")
    p.add_argument("--finetune", action="store_true", help="supervised fine-tuning of the (pre-trained) encoder")
    p.add_argument("--layer_decay", type=float, default=0.75, help="fine-tuning: layer-wise lr decay")
    p.add_argument("--drop_path", type=float, default=0.1, help="fine-tuning: stochastic depth rate")
    p.add_argument("--smoothing", type=float, default=0.1, help="fine-tuning: label smoothing")
    p.add_argument("--n_train", type=int, default=2000, help="synthetic training images")
    p.add_argument("--n_val", type=int, default=500, help="synthetic held-out images")
    p.add_argument("--bench_batch", type=int, default=8)
    p.add_argument("--bench_reps", type=int, default=3, help="--bench: interleaved timing rounds")
    args = settle(p.parse_args(argv))
    run = C.init_run(args, patch_size=PRESETS[args.model]["patch_size"])
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    if args.finetune:
        return finetune(args, run)
    return train(args, run)


if __name__ == "__main__":
    main()
