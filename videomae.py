"""Masked Autoencoders As Spatiotemporal Learners (MAE-ST).

Christoph Feichtenhofer, Haoqi Fan, Yanghao Li, Kaiming He. arXiv 2205.09113 (NeurIPS 2022).
Official code: github.com/facebookresearch/mae_st (this file keeps its parameter names).

The idea. MAE (He et al. 2021) cuts an image into patches, hides most of them, runs a ViT encoder
on the few visible patches only and asks a small decoder to paint the hidden pixels back. MAE-ST
does the same with a video: a 2x16x16 (t x h x w) cube is one token, so a 16x224x224 clip becomes
8 x 14 x 14 = 1568 spacetime tokens. Videos are highly redundant in time, so the mask can be much
larger than for images: 90% of the tokens are removed, chosen at random over space AND time
("spacetime-agnostic"), and the encoder sees 156 tokens. The encoder is a plain ViT with global
attention over the visible tokens and learned separable positional embeddings (space + time).
Because the encoder never sees the removed tokens, pre-training costs 7.7x fewer FLOPs than
running the encoder over all tokens with mask tokens (paper Table 1), at equal accuracy.

What this file reproduces in miniature. A tiny MAE-ST trained on 8-frame 32x32 videos of a shape
moving in one of four directions over a still textured background (the label; one frame alone
cannot tell it). The default run (400 steps) brings the held-out reconstruction loss well down,
but the pictures show that it has learned the backgrounds, not yet the small moving shape: with
8x8 patches and 90% masking the encoder sees 6 of 64 tokens, and the (seeded) linear probe and kNN
on the frozen encoder's mean token stay at or below the untrained encoder's (the README gives the
figures). What was tried to make a CPU minute learn motion, and why it falls short, is below
("Why the default run does not learn motion", before the exercises). `--bench` measures the paper's
Table 1 claim (encoder with mask tokens vs. encoder on the visible 10%) as a FLOP ratio and a
time ratio for ViT-L.

Commands:
    python videomae.py                      # train tiny on synthetic videos, evaluate, picture
    python videomae.py --data DIR           # DIR/<class>/*.mp4|avi|mkv|webm|mov (PyAV)
    python videomae.py --smoke              # seconds: loss finite and falling, exit status
    python videomae.py --bench              # FLOP and time ratio, ViT-L at 90% (Table 1)
    python videomae.py --mask_type tube     # the paper's Table 2a ablation (space-only masks)
    torchrun --nproc_per_node=N videomae.py --data DIR

Departures from the official code (facebookresearch/mae_st), and why:
- Decoder depth defaults to 4 for the paper's sizes, as the paper and the official README command
  (`--decoder_depth 4`); the code's argparse default is 8. `huge` uses 16x16 patches as the paper
  and the released ViT-H weights do (mae_st's pre-training factory says patch 14).
- `tiny` (CPU) is 8 frames of 32x32 with 8x8 patches, width 128, depth 4, decoder 64 x 2; the
  paper's models are `base`/`large`/`huge` with the exact official numbers.
- sep_pos_embed and cls_embed are always on (the official CLI forces both to True, they cannot be
  switched off there either); the non-separable `pos_embed` variant is not written.
- Attention calls F.scaled_dot_product_attention (same maths as mae_st's explicit softmax).
  `--bench` counts FLOPs with torch's FLOP counter (C.count_flops), which counts the attention
  inside SDPA, on the meta device, so that ViT-L costs neither memory nor time there (a test
  checks 24ND^2 + 4N^2D per block).
- --trunc_init, --bias_wd, --accum_iter, --fp32 and the Kinetics CSV loader are not written:
  common.py's loop (AdamW, per-iteration warmup + cosine, clip_grad) and folder loader are used.
  Weight decay follows common.param_groups (no decay on 1-D params and biases; as mae_st without
  --bias_wd, pos tables and class tokens are decayed).
- Normalisation is ImageNet mean/std (common.py) instead of Kinetics' 0.45/0.225.
- Data: common.video_data replaces the Kinetics decoder (random short-side jitter, crop, flip);
  with --repeat_aug R each decoded video gives R clips, reshaped to batch*R like mae_st.
- `--weights` also reads the released PySlowFast-format checkpoints (k400_400ep_rep4_mr9_16x4.pyth):
  their decoder keys `pred_head.transforms.0.{k}` / `pred_head.transforms.0.{depth}` /
  `pred_head.projections.0` / `dec_pos_embed_*` are renamed to mae_st's names. That decoder has
  8 heads (512/64) and no decoder_cls_token (it reuses the encoder's cls output), so after such a
  load the decoder runs with 8 heads and a zero decoder_cls_token. Encoder features are those of
  the released model; reconstructions are not bit-identical to PySlowFast's (decoder cls input, and
  PySlowFast's targets are frames 0,2,..,14 where mae_st's are linspace: 0,2,..,12,15).
- Training defaults are sized for a minute on a CPU: tiny, 8 epochs of 800 synthetic videos, batch 16
  videos x --repeat_aug 2 clips, lr 1.5e-3 with 0.2 warmup epochs. --mask_ratio defaults to the
  paper's 0.9 (mae_st's argparse says 0.75, its README command 0.9). For base/large/huge, lr =
  blr * batch / 256 with the paper's blr 1.6e-3, as mae_st (repeat_aug not counted in the batch).
- `--bench` times a training step (forward + backward) on a GPU; on a CPU it times the forward pass
  only, because ViT-L's backward over 1569 tokens needs more than 4 GB.

How this differs from MCG-NJU VideoMAE (Tong et al. 2022, a different paper with the same idea):
VideoMAE masks "tubes" (one spatial mask repeated over time; `--mask_type tube` here), uses fixed
sin-cos positions and no class token, splits the qkv bias into q_bias/v_bias, has a 384-d decoder
for ViT-B, and predicts the whole 2-frame tubelet (1536 values, per-channel normalised); MAE-ST
masks at random over spacetime, learns separable positions, uses separate q/k/v Linears, a 512-d
decoder, and predicts one frame per 2-frame token (768 values, whole-patch normalised).

Why the default run does not learn motion (issue 14's target, not met). Each run below is the
default recipe (lr 1.5e-3, batch 16 x --repeat_aug 2, 0.2 warmup epochs) with one thing changed;
seeded probe on the frozen encoder's mean token, the same encoder at init in brackets (chance
0.25). Every one stays at or below its untrained encoder, and every picture paints each removed
patch the clip's mean background, the moving shape nowhere:
- default (8x8 patches, 8 frames, mask 0.9, 8 epochs = 400 steps): probe 0.285 (0.345), kNN 0.22
  (0.265), held-out loss 0.378 (1.370);
- --mask_ratio 0.75 (16 of 64 tokens visible): probe 0.33 (0.345), kNN 0.18 (0.265), loss 0.376;
- 4x4 patches (PRESETS["tiny"]["patch_size"] = 4), --num_frames 4 (2 time slices of 64 tokens, the
  shape 10-22 px apart), --mask_ratio 0.75, 6 epochs: probe 0.25 (0.405), loss 0.381; the same with
  --norm_pix_loss: probe 0.30 (0.405) (its picture, un-normalised with each patch's TRUE mean/std,
  shows blobs where the shape is: those statistics leak it, the model does not know it);
- a plain background (common.background's mean colour + its pixel noise, no stripes; the world
  patched in memory, not an option here), so that the shape is the only thing left to predict:
  8x8 / 8 frames / mask 0.75: probe 0.28 (0.35), loss 0.333 (1.296); 4x4 / 4 frames / mask 0.75,
  6 epochs: probe 0.30 (0.375), loss 0.333.
Probing per-time-slice means (concatenated) or the cls output instead of the mean token does not
help either (at most 0.415 trained vs 0.485 at init, cls, 4x4 patches). So neither the tokens
visible (patch size, mask ratio), nor the target (norm_pix), nor the world's background is what
holds the tiny model back: in a few hundred steps it learns the colour of each clip, and the
shape's pixels (about a tenth of a frame) are left for later. Longer training does not get there
within the 2-minute aim either: --epochs 20 (1000 steps, about 2.5x the default's training time)
gives probe 0.315 (0.345), kNN 0.215 (0.265), held-out loss 0.374: the loss is flat from epoch 4.
Nor do the learning rate or the positions (one CPU thread): --lr 5e-4 probe 0.35 (0.345), --lr
7.5e-4 0.305; the learned separable positions of encoder and decoder started from sin-cos tables
(2-D spatial, 1-D temporal, as MAE's fixed ones) instead of N(0, 0.02), so that a mask token can
find its own place in other frames from the first step: probe 0.24 (0.365), at --mask_ratio
0.75 0.33 (0.365), held-out loss 0.378 either way.
Where the plateau is. Predicting every removed patch as the clip's mean colour scores 0.382 on
the held-out clips at mask 0.9 (the default ends at 0.378); the still background alone (each
pixel's median over the frames, which a model copying a patch from another frame could reach)
scores 0.170. So the model has not learned even to copy the still background from another time
slice. Copying is learnable, but late: on still clips (every frame the first) at --mask_ratio 0.5,
where 7 of 8 removed tokens have their place visible in another slice, the held-out loss stays at
the mean colour's 0.375 for about 600 steps of 32 clips and then falls (0.31 at step 750, 0.16 at
1250; a plain training loop of this model on one thread, cosine lr 1.5e-3 over 2000 steps);
positions started large (std 1.0, or the sin-cos tables) halve that wait (0.23 at step 400 of 800).
On the moving clips at mask 0.9 neither gets there: positions at std 1.0 end 800 steps of 32 at
0.372, 1600 steps of 8 at 0.372 (mean colour 0.379 on those masks), probe 0.32 / 0.22 (0.30 at init).
With 4000 steps of 8 (about 4 minutes on one thread, positions at std 1.0) the loss does leave
it, mask 0.9: 0.341, mask 0.75: 0.273 (mean colour 0.379), but the probe stays at 0.28 / 0.295
(0.30 at init): the model learns the background first; the motion is not in its mean token yet.

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `PatchEmbed.forward` and `MaskedAutoencoderViT.patchify` (Sec. 3 "Patch embedding";
   reading map steps 1 and 6): one token per 2 x p x p cube, numbered time-major t*H'W' + i*W' + j,
   and the loss target of token i made of the same cube's pixels (frames t*u .. t*u+u-1), values
   in (u, p, q, c) order. Grade: `python -m pytest tests/test_videomae.py -k "tokens"`
2. Re-implement `random_masking` (Sec. 3 "Masking", Table 2a; step 2), mae.py's signature plus
   keyword options: `random_masking(x, mask_ratio, noise=None, *, mask_type="random", t_size=1)`.
   Use the given noise or draw noise = torch.rand(N, L), keep the floor(L (1 - r)) tokens with
   the smallest noise (156 of 1568 at r = 0.9), mask 1 = removed in token order; for `tube`, one
   noise per spatial position (N, S) (torch.rand(N, S) when not given) shared by the T' slices
   and T' * floor(S (1 - r)) kept. Return x kept, mask, ids_restore and ids_keep.
   Grade: `python -m pytest tests/test_videomae.py -k "masking"`
3. Re-implement `separable_pos_embed` (Sec. 4, learned separable positions; step 3):
   pos[t*S + s] = spatial[s] + temporal[t], then read how `forward_encoder` adds it after masking,
   gathered at ids_keep, so that every kept token keeps its own (t, s).
   Grade: `python -m pytest tests/test_videomae.py -k "pos_embed"`
4. Re-implement `MaskedAutoencoderViT.forward_decoder` and `forward_loss` (Sec. 3 "Autoencoding";
   steps 5 and 7): mask tokens appended after the visible ones, un-shuffled with ids_restore, the
   decoder's positions added in token order, decoder cls in front and dropped after decoder_pred;
   loss = per-token MSE averaged over the removed tokens of the whole batch.
   Grade: `python -m pytest tests/test_videomae.py -k "unshuffle or loss"`
5. Explore: `--mask_type tube` (one spatial mask for every time slice, MCG-NJU VideoMAE's choice)
   vs the paper's spacetime-agnostic `random` (Table 2a: 83.5 vs 84.4 top-1 at 90%). A tube leaves
   nothing to copy from other frames (with random masking 1 - r^(T'-1) of the removed tokens, 58%
   here at r = 0.75, have their position visible in another slice). At --mask_ratio 0.75 both keep
   16 of the tiny model's 64 tokens. Predict which val_loss is higher, then run
   `python videomae.py --mask_ratio 0.75 --epochs 3` and the same with `--mask_type tube` (each
   val_loss is measured with its own kind of mask) and look at reconstruction.png. You should see
   no gap: measured 0.3886 (random) vs 0.3880 (tube) after 3 epochs, 0.3764 vs 0.3755 after the
   default 8; in both pictures every removed patch is painted the clip's mean background: the
   tiny model has not (yet) learned to copy a patch from another frame, the shortcut a tube
   takes away, so taking it away costs nothing here. At the default 0.9 the tube run is worse
   (0.494 vs 0.425 after 3 epochs), but only because a tube keeps 4 tokens where random keeps 6:
   count the visible tokens (printed at the start) before comparing.
   Grade: `python -m pytest tests/test_videomae.py -k "tube"`
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

# ============================================================ the ordinary building blocks: ViT parts
# mae_st util/video_vit.py names: q, k, v, proj, fc1, fc2


class PatchEmbed(nn.Module):
    """A Conv3d with kernel = stride = (t_patch, p, p): one token per t x p x p cube of the video."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, frames=16, t_patch_size=2):
        super().__init__()
        assert img_size % patch_size == 0 and frames % t_patch_size == 0
        self.input_size = (frames // t_patch_size, img_size // patch_size, img_size // patch_size)  # (T', H', W')
        self.num_patches = self.input_size[0] * self.input_size[1] * self.input_size[2]
        self.patch_size, self.t_patch_size, self.frames, self.img_size = patch_size, t_patch_size, frames, img_size
        kernel = (t_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x):                                   # x: (N, 3, T, H, W)
        N, _, T, H, W = x.shape
        if (T, H, W) != (self.frames, self.img_size, self.img_size):
            raise ValueError(f"input {T}x{H}x{W} does not match the model's "
                             f"{self.frames}x{self.img_size}x{self.img_size}")
        x = self.proj(x)                                    # (N, D, T', H', W')
        x = x.flatten(3)                                    # (N, D, T', H'W')
        return x.permute(0, 2, 3, 1)                        # step 1: (N, T', H'W', D), token (t, s), time-major


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (as mae_st's video_vit)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                   # x: (B, N, D)
        B, N, D = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)   # (B, h, N, D/h)
        k = self.k(x).reshape(B, N, h, D // h).transpose(1, 2)   # (B, h, N, D/h)
        v = self.v(x).reshape(B, N, h, D // h).transpose(1, 2)   # (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v)              # softmax(q k^T / sqrt(d)) v
        x = x.transpose(1, 2).reshape(B, N, D)                   # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ============================================================ the paper's idea: spacetime-agnostic masking
# and an encoder that only ever sees the visible ~10% of the spacetime tokens
#
# One pre-training step on a clip (N, 3, T, H, W) (paper Sec. 3-4; mae_st models_mae.py), in order:
#   1. tubelets: a Conv3d with kernel = stride = (2, p, p) makes one token per 2 x p x p cube; the
#      L = T' H' W' tokens are numbered time-major, token (t, i, j) = t*H'W' + i*W' + j
#                                                                        (PatchEmbed.forward)
#   2. masking, per sample: noise ~ U[0, 1) of shape (N, L) ("spacetime-agnostic"; `tube`: one
#      noise per spatial position, repeated over the T' slices), ids_shuffle = argsort(noise)
#      (small noise = keep), keep the first len_keep = floor(L (1 - r)) (156 of 1568 at r = 0.9);
#      the mask (1 = removed) goes back to token order with ids_restore = argsort(ids_shuffle)
#                                                                        (random_masking)
#   3. positions: pos[t*S + s] = spatial[s] + temporal[t] (S = H'W'), gathered at ids_keep and
#      added after masking, so every kept token still carries its own (t, s); the cls token gets
#      pos_embed_class                                (separable_pos_embed, forward_encoder)
#   4. the encoder runs on the 1 + len_keep visible tokens only, then LayerNorm; its cls output
#      is dropped                                                        (forward_encoder)
#   5. decoder_embed; append L - len_keep copies of the mask token AFTER the visible tokens (the
#      shuffled order), un-shuffle with ids_restore, add the decoder's separable positions (in
#      token order), put decoder_cls_token + decoder_pos_embed_class in front; decoder blocks,
#      LayerNorm, predict u*p*p*3 pixels per token, drop the cls slot    (forward_decoder)
#   6. target: the frames linspace(0, T-1, pred_t_dim), patchified in the same token order
#      (t, h, w), values in (u, p, q, c) order; with --norm_pix_loss standardised per patch
#                                        (target_frame_indices, patchify, prediction_target)
#   7. loss = per-token mean squared error, averaged over the REMOVED tokens only (forward_loss)


def random_masking(x, mask_ratio, noise=None, *, mask_type="random", t_size=1):
    """Keep a random subset of the L = T'*H'W' tokens of each sample (mae.py's random_masking,
    with the masking type and the number of time slices T' = t_size as keyword options).

    random (MAE-ST, "spacetime-agnostic"): every token is dropped independently of where it sits
        in space or time; len_keep = floor(L * (1 - mask_ratio)), e.g. 156 of 1568 at 0.9.
        noise: (N, L), one per token.
    tube (space-only, MCG-NJU VideoMAE's choice; paper Table 2a): one spatial mask shared by every
        time slice; len_keep = T' * floor(H'W' * (1 - mask_ratio)). noise: (N, S), S = H'W' =
        L / t_size, one per spatial position, repeated over the T' slices.
    x: (N, L, D) in time-major order; noise uniform in [0, 1), drawn here when None. Returns
    x_masked (N, len_keep, D), mask (N, L) with 1 = removed and 0 = kept, ids_restore (N, L), and,
    as the official mae_st's random_masking, ids_keep (N, len_keep): forward_encoder gathers the
    kept tokens' positions with it.
    """
    N, L, D = x.shape
    if mask_type == "random":
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device) if noise is None else noise   # step 2: (N, L), small = keep
    elif mask_type == "tube":
        S = L // t_size
        len_keep = t_size * int(S * (1 - mask_ratio))
        noise = torch.rand(N, S, device=x.device) if noise is None else noise   # (N, S): one per position
        noise = noise[:, None, :].expand(N, t_size, S).reshape(N, L)            # (N, T', S) -> (N, L): same in every t
    else:
        raise ValueError(f"unknown mask_type {mask_type!r}")
    # a stable sort keeps the T' copies of a spatial position together, so the first len_keep
    # positions of a tube mask are whole tubes; for random noise (no ties) it changes nothing.
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)          # (N, L), kept ones first
    ids_restore = torch.argsort(ids_shuffle, dim=1)                 # (N, L), inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]                            # (N, len_keep)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))   # (N, len_keep, D)
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0                                          # in shuffled order
    mask = torch.gather(mask, 1, ids_restore)                       # (N, L) in token order
    return x_masked, mask, ids_restore, ids_keep


def separable_pos_embed(spatial, temporal):
    """Learned separable positions: pos[t * S + s] = spatial[s] + temporal[t].

    spatial: (1, S, D) with S = H'W'; temporal: (1, T', D). Returns (1, T'S, D), time-major like the
    tokens: the spatial table repeated T' times plus the temporal one repeated S times per entry.
    """
    S, T = spatial.shape[1], temporal.shape[1]
    return spatial.repeat(1, T, 1) + torch.repeat_interleave(temporal, S, dim=1)   # step 3: (1, T'S, D)


def target_frame_indices(num_frames, pred_t_dim):
    """Frames whose pixels the decoder predicts: linspace(0, T-1, pred_t_dim) rounded down, as mae_st.

    One frame per 2-frame token: T=16 gives [0, 2, 4, 6, 8, 10, 12, 15] (the last is 15, not 14).
    """
    return torch.linspace(0, num_frames - 1, pred_t_dim).long()


class MaskedAutoencoderViT(nn.Module):
    """MAE-ST: ViT encoder on the visible spacetime tokens, light ViT decoder on all of them."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=False, num_frames=16, t_patch_size=2, pred_t_dim=None, no_qkv_bias=False,
                 mask_type="random"):
        super().__init__()
        pred_t_dim = pred_t_dim or num_frames // t_patch_size
        self.pred_t_dim = pred_t_dim
        self.t_pred_patch_size = t_patch_size * pred_t_dim // num_frames   # u: frames predicted per token
        assert self.t_pred_patch_size >= 1, "pred_t_dim must be at least num_frames / t_patch_size"
        self.norm_pix_loss, self.mask_type = norm_pix_loss, mask_type
        self.num_frames, self.patch_size, self.in_chans = num_frames, patch_size, in_chans
        qkv_bias = not no_qkv_bias

        # --- encoder ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size)
        T, H, W = self.input_size = self.patch_embed.input_size        # token grid (T', H', W')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, H * W, embed_dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, T, embed_dim))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, H * W, decoder_embed_dim))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, T, decoder_embed_dim))
        self.decoder_pos_embed_class = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.t_pred_patch_size * patch_size ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        """mae_st's init (trunc_init off). decoder_cls_token is never initialised there: it stays 0."""
        for p in (self.cls_token, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class,
                  self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal, self.decoder_pos_embed_class):
            nn.init.trunc_normal_(p, std=0.02)                       # cutoff +-2 absolute: ~ normal(0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))              # as a Linear; the conv bias keeps its default
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- pixels <-> tokens ------------------------------------------------------------------------
    def patchify(self, videos):
        """(N, 3, T, H, W) -> (N, t*h*w, u*p*p*3), token order (t, h, w), values in (u, p, q, c) order."""
        N, c, T, H, W = videos.shape
        p, u = self.patch_size, self.t_pred_patch_size
        t, h, w = T // u, H // p, W // p
        x = videos.reshape(N, c, t, u, h, p, w, p)                  # (N, c, t, u, h, p, w, q)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)                       # (N, t, h, w, u, p, q, c)
        return x.reshape(N, t * h * w, u * p * p * c)               # (N, L, u p^2 c)

    def unpatchify(self, x, t=None):
        """Exact inverse of patchify: (N, L, u*p*p*3) -> (N, 3, t*u, H, W)."""
        N, L, _ = x.shape
        p, u, c = self.patch_size, self.t_pred_patch_size, self.in_chans
        t = t or self.input_size[0]
        h = w = int(math.isqrt(L // t))
        x = x.reshape(N, t, h, w, u, p, p, c)                       # (N, t, h, w, u, p, q, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                       # (N, c, t, u, h, p, w, q)
        return x.reshape(N, c, t * u, h * p, w * p)                 # (N, 3, T, H, W)

    # ---- encoder ------------------------------------------------------------------------------------
    def forward_encoder(self, videos, mask_ratio, noise=None, mask_type=None):
        """noise: the masking draw, as random_masking's (drawn when None), as mae.py's forward_encoder."""
        x = self.patch_embed(videos)                                # (N, T', S, D)
        N, T, S, D = x.shape
        x = x.reshape(N, T * S, D)                                  # (N, L, D), token index t*S + s
        x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, noise, mask_type=mask_type or self.mask_type,
                                                       t_size=T)
        # positions added after masking: gather the table at the kept indices (= adding it before)
        pos = separable_pos_embed(self.pos_embed_spatial, self.pos_embed_temporal)    # step 3: (1, L, D)
        pos = torch.gather(pos.expand(N, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, len_keep, D)
        x = x + pos
        cls = (self.cls_token + self.pos_embed_class).expand(N, -1, -1)             # (N, 1, D)
        x = torch.cat([cls, x], dim=1)                              # (N, 1 + len_keep, D)
        for blk in self.blocks:                                     # step 4: visible tokens only
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:], mask, ids_restore                          # the cls output is dropped (mae_st)

    # ---- decoder ------------------------------------------------------------------------------------
    def forward_decoder(self, x, ids_restore):
        """x: (N, len_keep, D) encoded visible tokens in shuffled order; returns (N, L, u p^2 3)."""
        x = self.decoder_embed(x)                                   # step 5: (N, len_keep, Dd)
        N, n_vis, Dd = x.shape
        L = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(N, L - n_vis, -1)], dim=1)        # (N, L, Dd) shuffled
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))       # (N, L, Dd) token order
        x = x + separable_pos_embed(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)
        cls = (self.decoder_cls_token + self.decoder_pos_embed_class).expand(N, -1, -1)   # (N, 1, Dd)
        x = torch.cat([cls, x], dim=1)                              # (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))                 # (N, 1 + L, u p^2 3)
        return x[:, 1:]                                             # (N, L, u p^2 3)

    def forward_features(self, videos):
        """Frozen-encoder clip feature for probing: mean of the encoder's tokens with no mask."""
        x, _, _ = self.forward_encoder(videos, 0.0, mask_type="random")  # (N, L, D)
        return x.mean(dim=1)                                        # (N, D)

    def forward(self, videos, mask_ratio=0.9, noise=None):
        latent, mask, ids_restore = self.forward_encoder(videos, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)            # (N, L, u p^2 3)
        loss = forward_loss(self, videos, pred, mask)
        return loss, pred, mask


# ============================================================ the full model and its presets
# tiny for a CPU; base / large / huge with the paper's numbers (16x224x224, 2x16x16 patches,
# decoder 512-d x 4 blocks, 16 heads as mae_st; 1568 tokens).

PRESETS = {
    "tiny": dict(img_size=32, patch_size=8, num_frames=8, t_patch_size=2, embed_dim=128, depth=4, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "base": dict(img_size=224, patch_size=16, num_frames=16, t_patch_size=2, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16),
    "large": dict(img_size=224, patch_size=16, num_frames=16, t_patch_size=2, embed_dim=1024, depth=24, num_heads=16,
                  decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16),
    "huge": dict(img_size=224, patch_size=16, num_frames=16, t_patch_size=2, embed_dim=1280, depth=32, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16),
}


def create_model(name="tiny", **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    return MaskedAutoencoderViT(**{**PRESETS[name], **overrides})


# ============================================================ the loss: pixel MSE on the removed tokens
# one frame predicted per 2-frame token


def forward_loss(model, videos, pred, mask):
    """videos (N, 3, T, H, W); pred (N, L, u p^2 3); mask (N, L) with 1 = removed.

    target = patchify(videos at the target frames), optionally per-patch normalised
             (x - mean) / sqrt(var + 1e-6) with the unbiased variance (--norm_pix_loss);
    loss   = sum_i mask_i * mean_j (pred_ij - target_ij)^2 / sum_i mask_i.
    """
    target = prediction_target(model, videos)                      # step 6: (N, L, u p^2 3)
    loss = ((pred - target) ** 2).mean(dim=-1)                      # step 7: (N, L) per-token mse
    return (loss * mask).sum() / mask.sum()                         # mean over removed tokens


def prediction_target(model, videos, normalize=None):
    frames = target_frame_indices(videos.shape[2], model.pred_t_dim).to(videos.device)
    target = model.patchify(videos.index_select(2, frames))        # (N, L, u p^2 3)
    if model.norm_pix_loss if normalize is None else normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)                      # unbiased, as mae_st
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


# ============================================================ data glue: loader clips to model clips
# common.video_data gives (B, T, 3, S, S), or (B, R, T, 3, S, S) with --repeat_aug R


def to_clips(videos):
    """Loader layout -> model layout (N, 3, T, S, S); R repeated clips of a video become R samples."""
    if videos.dim() == 6:
        videos = videos.flatten(0, 1)                               # (B*R, T, 3, S, S), as mae_st's b*r
    return videos.permute(0, 2, 1, 3, 4)                            # (N, 3, T, S, S)


# ============================================================ train, evaluate, bench, smoke


EVAL_MASK_SEED = 777         # offset from --seed: the held-out masks, the same for the model at init and trained


def evaluate(model, val_ds, train_ds, args, labelled, run):
    """Held-out reconstruction loss and, on labelled data, a linear probe and kNN on the frozen
    encoder's clip feature (forward_features) at mask 0.

    The held-out masks come from a fixed seed, so the model at init and trained are scored on the
    same masks. Under torchrun every rank scores its shard of the held-out clips (sums all-reduced)
    and extracts its share of the features (all ranks receive the whole); the probe and kNN are
    fitted on rank 0, the others return None for them."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)       # (sum of losses, clips)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(args.seed + EVAL_MASK_SEED + run.rank)
        for videos, _ in C.make_loader(val_ds, args, run, train=False):
            x = to_clips(videos.to(run.device))
            with torch.no_grad(), C.autocast(run):
                loss, _, _ = model(x, args.mask_ratio)
            total += torch.tensor([loss.float().item() * len(x), len(x)], dtype=torch.float64, device=run.device)
    if run.distributed:
        torch.distributed.all_reduce(total)
    out = dict(val_loss=(total[0] / total[1]).item(), probe_acc=None, knn_acc=None)
    if labelled:
        @torch.no_grad()
        def feats(x):
            return model.forward_features(to_clips(x))                      # (B, D)
        whole = lambda ds: C.make_loader(ds, args, run, train=False, whole=True)
        Xtr, ytr = C.extract_features(feats, whole(train_ds), run, shared=True)   # un-augmented (C.eval_view)
        Xva, yva = C.extract_features(feats, whole(val_ds), run, shared=True)
        if run.is_main:
            out["probe_acc"] = C.linear_probe(Xtr, ytr, Xva, yva)           # seeded: init and trained alike
            out["knn_acc"] = C.knn_accuracy(Xtr, ytr, Xva, yva)
    model.train()
    return out


@torch.no_grad()
def save_reconstructions(model, val_ds, args, run, n=3):
    """Rows of the predicted frames of n held-out clips: original / masked / reconstruction /
    reconstruction with the visible patches pasted back."""
    model.eval()
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(args.seed + EVAL_MASK_SEED)
        videos = torch.stack([val_ds[i][0] for i in range(min(n, len(val_ds)))])
        x = to_clips(videos.to(run.device))                         # (n, 3, T, S, S)
        _, pred, mask = model(x, args.mask_ratio)                   # (n, L, u p^2 3), (n, L)
    target = prediction_target(model, x, normalize=False)           # (n, L, u p^2 3) raw (normalised) pixels
    if model.norm_pix_loss:   # the model predicts per-patch standardised pixels: undo it with each
        mean = target.mean(-1, keepdim=True)                        # patch's own mean/std, which the
        std = (target.var(-1, keepdim=True) + 1e-6) ** 0.5          # model never saw (so say it)
        pred = pred * std + mean
    m = mask.unsqueeze(-1)                                          # (n, L, 1), 1 = removed
    grey = torch.full_like(target, 0.0)                             # mean colour after normalisation
    views = [target, target * (1 - m) + grey * m, pred, target * (1 - m) + pred * m]
    names = ["original", "masked", "recon" + (" (true patch mean/std)" if model.norm_pix_loss else ""),
             "recon + visible"]
    rows, texts = [], []
    frames = target_frame_indices(model.num_frames, model.pred_t_dim).tolist()
    for i in range(len(x)):
        for v, name in zip(views, names):
            clip = model.unpatchify(v[i:i + 1])[0]                  # (3, T', S, S)
            rows.append(torch.stack([C.denormalize(f) for f in clip.permute(1, 0, 2, 3)]))   # (T', 3, S, S)
            texts.append([f"{name} f{frames[0]}"] + [f"f{t}" for t in frames[1:]])
    model.train()
    return C.save_grid(f"{args.out}/reconstruction.png", rows, texts)


def forward_with_mask_tokens(model, videos, mask_ratio):
    """Paper Table 1 baseline "encoder w/ [M]": the removed tokens are replaced by a mask token and
    the encoder runs on all L tokens; the decoder and loss are unchanged. The mask token here is a
    zero vector of the encoder's width (a learned one costs the same)."""
    x = model.patch_embed(videos)                                   # (N, T', S, D)
    N, T, S, D = x.shape
    x = x.reshape(N, T * S, D)                                      # (N, L, D)
    _, mask, _, _ = random_masking(x, mask_ratio, mask_type=model.mask_type, t_size=T)
    x = x * (1 - mask.unsqueeze(-1))                                # removed tokens -> [M] = 0
    x = x + separable_pos_embed(model.pos_embed_spatial, model.pos_embed_temporal)
    x = torch.cat([(model.cls_token + model.pos_embed_class).expand(N, -1, -1), x], dim=1)   # (N, 1 + L, D)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)[:, 1:]                                        # (N, L, D), already in token order
    identity = torch.arange(T * S, device=x.device).expand(N, -1)   # nothing to unshuffle
    pred = model.forward_decoder(x, identity)
    return forward_loss(model, videos, pred, mask)


def bench(args, run):
    """Paper Table 1: MAE-ST with the encoder on all tokens (mask tokens in it) vs. on the visible
    tokens only, at the same mask ratio, for ViT-L (the paper's size; --model another preset).
    FLOPs are counted on the meta device (no memory, no time; the counter includes the attention
    inside SDPA). Time is a training step (forward + backward) on a GPU; the CPU fallback times the
    forward pass at batch 1, since ViT-L's backward over 1569 tokens needs more than 4 GB."""
    name = args.model or "large"
    kw = dict(num_frames=args.num_frames or PRESETS[name]["num_frames"])
    with torch.device("meta"):
        meta = create_model(name, **kw)
    size, T = meta.patch_embed.img_size, meta.num_frames
    L = meta.patch_embed.num_patches
    vis = int(L * (1 - args.mask_ratio))
    xm = torch.empty(1, 3, T, size, size, device="meta")
    flops_m = C.count_flops(lambda: forward_with_mask_tokens(meta, xm, args.mask_ratio))
    flops_s = C.count_flops(lambda: meta(xm, args.mask_ratio))

    cuda = run.device.type == "cuda"
    model = create_model(name, **kw).to(run.device)
    batch = min(args.batch_size, 8) if cuda else 1                 # ViT-L's dense encoder: 1569 tokens a clip
    x = torch.randn(batch, 3, T, size, size, device=run.device)

    def step(fn):
        if cuda:     # a training step's compute: forward + backward
            def go():
                with C.autocast(run):
                    loss = fn()
                loss.backward()
                model.zero_grad(set_to_none=True)
        else:        # a CPU: forward only, since ViT-L's backward at 1568 tokens needs > 4 GB
            def go():
                with torch.no_grad():
                    fn()
        return go
    dense = step(lambda: forward_with_mask_tokens(model, x, args.mask_ratio))
    sparse = step(lambda: model(x, args.mask_ratio)[0])
    times = C.time_ab({"dense": dense, "sparse": sparse}, run, rounds=10 if cuda else 3, warmup=1)
    t_m, t_s = times["dense"], times["sparse"]                     # interleaved rounds, medians
    what = f"fwd+bwd, batch {batch}, {args.precision}" if cuda else "forward, batch 1, fp32"
    C.log(run, f"MAE-ST {name}: {T}x{size}x{size} clip, {L} tokens, mask {args.mask_ratio} "
               f"({vis} visible), decoder {meta.decoder_embed.out_features} x {len(meta.decoder_blocks)}; "
               f"{run.device}, {what}")
    C.log(run, f"{'':28s}{'GFLOPs/clip':>12s}{'ms/clip':>12s}")
    C.log(run, f"{'encoder w/ [M] (all tokens)':28s}{flops_m / 1e9:12.2f}{t_m / batch * 1e3:12.1f}")
    C.log(run, f"{'encoder w/o [M] (visible)':28s}{flops_s / 1e9:12.2f}{t_s / batch * 1e3:12.1f}")
    C.log(run, f"{'gain':28s}{flops_m / flops_s:11.2f}x{t_m / t_s:11.2f}x")
    C.log(run, f"{'paper (ViT-L, A100)':28s}{'7.7x':>12s}{'5.8x':>12s}   (627.5 vs 81.0 GFLOPs; 141.1 vs 24.5 h)")
    C.log(run, f"bench: FLOP ratio {flops_m / flops_s:.2f}x (paper 7.7x), time ratio {t_m / t_s:.2f}x "
               f"(paper 5.8x) for {name} at mask {args.mask_ratio} on {run.device} ({what})")
    return flops_m / flops_s, t_m / t_s


def convert_pyslowfast(state, decoder_depth):
    """Rename the released PySlowFast MaskMViT keys to mae_st's (the encoder's already match)."""
    out = {}
    for k, v in state.items():
        if k.startswith("pred_head.transforms.0."):
            rest = k[len("pred_head.transforms.0."):]
            idx, sub = rest.split(".", 1)
            k = f"decoder_norm.{sub}" if int(idx) == decoder_depth else f"decoder_blocks.{idx}.{sub}"
        elif k.startswith("pred_head.projections.0."):
            k = "decoder_pred." + k[len("pred_head.projections.0."):]
        elif k.startswith("dec_pos_embed_"):
            k = "decoder_pos_embed_" + k[len("dec_pos_embed_"):]
        out[k] = v
    return out


PYSLOWFAST_HEAD_DIM = 64     # PySlowFast's MaskMViT decoder: num_heads = dim / 64 (8 for the 512-d decoder)


def load_weights(model, path, run):
    """Our checkpoint.pt, or a released PySlowFast MAE-ST file (its decoder renamed), loaded strictly."""
    state = C.unwrap_state(C.load_checkpoint(path))
    if not isinstance(state, dict):
        C.die(f"{path}: not a state dict")
    if any(k.startswith("pred_head.") for k in state):             # a released PySlowFast checkpoint
        state = convert_pyslowfast(state, len(model.decoder_blocks))
        width = model.decoder_embed.out_features
        heads = width // PYSLOWFAST_HEAD_DIM                        # PySlowFast's decoder: width / 64 heads
        for blk in model.decoder_blocks:
            blk.attn.num_heads = heads
        C.load_state(model, state, path, allow_missing=("decoder_cls_token",), run=run)
        C.log(run, f"loaded PySlowFast weights from {path} (decoder renamed; {heads} decoder heads = width "
                   f"{width} / {PYSLOWFAST_HEAD_DIM}; zero decoder_cls_token)")
    else:
        C.load_state(model, state, path, run=run)
        C.log(run, f"loaded weights from {path}")


def make_loss_fn(args):
    def loss_fn(model, batch):
        videos, _ = batch
        loss, _, _ = model(to_clips(videos), args.mask_ratio)
        return loss
    return loss_fn


def smoke(args, run):
    """A few steps on one tiny batch of 4 synthetic clips: the loss finite and falling."""
    model = create_model("tiny", num_frames=8, img_size=32, norm_pix_loss=args.norm_pix_loss,
                         mask_type=args.mask_type)
    d = C.shapes_videos(4, frames=8, size=32, seed=0)
    videos = torch.stack([C.normalize(v) for v in d["videos"]])     # (4, T, 3, S, S)
    C.smoke(model, make_loss_fn(args), (videos, d["labels"]), run, steps=30, lr=1e-3)


TINY_LR = 1.5e-3             # tiny's default peak lr: a one-minute CPU run needs a large step
PAPER_BLR = 1.6e-3           # the paper's base lr (per 256 clips) for base / large / huge


def prepare(args, run):
    """The model for the command line (preset, overrides, --weights), with the lr settled."""
    overrides = {k: getattr(args, k) for k in ("num_frames", "t_patch_size", "pred_t_dim", "decoder_embed_dim",
                                               "decoder_depth", "decoder_num_heads") if getattr(args, k) is not None}
    try:
        model = create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                             mask_type=args.mask_type, no_qkv_bias=args.no_qkv_bias, **overrides)
    except AssertionError:
        C.die(f"--input_size {args.input_size} / --num_frames must be divisible by the patch size "
              f"{PRESETS[args.model]['patch_size']} / --t_patch_size")
    if args.weights:
        load_weights(model, args.weights, run)
    if args.lr is None and args.blr is None and args.model == "tiny":
        args.lr = TINY_LR
    elif args.lr is None:                                           # mae_st: clips per step x repeat_aug not counted
        args.lr = (args.blr or PAPER_BLR) * args.batch_size * run.world_size / 256
    return model


def train(args, run):
    """Pre-train on the clips, evaluate the model at init and trained (held-out loss, probe, kNN),
    draw the reconstructions and write the metrics."""
    args.model = args.model or "tiny"                               # (--bench's default is large)
    args.sampling_rate = args.sampling_rate or (1 if args.data is None else 4)
    model = prepare(args, run)
    C.check_resume(model, args)                                     # before the evaluation at init
    model.to(run.device)
    T, H, W = model.input_size                                      # as random_masking counts them
    n_vis = int(T * H * W * (1 - args.mask_ratio)) if args.mask_type == "random" else T * int(H * W * (1 - args.mask_ratio))
    C.log(run, f"MAE-ST {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"{model.patch_embed.num_patches} tokens per clip, {n_vis} "
               f"visible at mask {args.mask_ratio} ({args.mask_type}); lr {args.lr:.2e}")

    train_ds, val_ds, classes = C.video_data(args, model.num_frames, args.sampling_rate, args.repeat_aug)
    C.check_enough(train_ds, val_ds, args)                          # too few: one line, before any work
    labelled = len(classes) >= 2

    init = evaluate(model, val_ds, train_ds, args, labelled, run)
    C.log(run, "at init: " + "  ".join(f"{k} {v:.4f}" for k, v in init.items() if v is not None))
    loader = C.make_loader(train_ds, args, run, train=True)
    groups = C.param_groups(model, args.weight_decay)
    model, history = C.fit(model, make_loss_fn(args), loader, args, run, groups=groups, betas=(0.9, 0.95))
    final = evaluate(model, val_ds, train_ds, args, labelled, run)
    if run.is_main:
        C.log(run, "picture:", save_reconstructions(model, val_ds, args, run))
    figures = {}
    for k in ("val_loss", "probe_acc", "knn_acc"):
        figures[k], figures[k + "_init"] = final[k], init[k]
    return C.write_metrics(args, run, history, mask_type=args.mask_type, mask_ratio=args.mask_ratio, **figures)


# ============================================================ command line


def main(argv=None):
    p = C.make_parser("videomae", __doc__, presets=PRESETS, model=None, epochs=8, batch_size=16, lr=None, warmup_epochs=0.2,
                      weight_decay=0.05, input_size=32)
    p.add_argument("--blr", type=float, default=None, help="base lr: lr = blr * batch_size * world / 256 when "
                   f"--lr is not given (default: the paper's {PAPER_BLR} for base/large/huge; tiny uses lr {TINY_LR})")
    p.add_argument("--mask_ratio", type=float, default=0.9, help="fraction of spacetime tokens removed (paper 0.9)")
    p.add_argument("--mask_type", default="random", choices=["random", "tube"],
                   help="random: spacetime-agnostic (MAE-ST); tube: space-only, same in every time slice")
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixel targets")
    p.add_argument("--num_frames", type=int, default=None, help="frames per clip (tiny 8, paper 16)")
    p.add_argument("--sampling_rate", type=int, default=None, help="frame stride (default 4 with --data, as "
                   "the paper's 16x4; 1 on the synthetic videos)")
    p.add_argument("--repeat_aug", type=int, default=2, help="clips taken from each decoded video (paper 4)")
    p.add_argument("--t_patch_size", type=int, default=None, help="frames per token (2)")
    p.add_argument("--pred_t_dim", type=int, default=None, help="frames predicted (default num_frames/t_patch)")
    p.add_argument("--decoder_embed_dim", type=int, default=None)
    p.add_argument("--decoder_depth", type=int, default=None)
    p.add_argument("--decoder_num_heads", type=int, default=None)
    p.add_argument("--no_qkv_bias", action="store_true")
    args = p.parse_args(argv)
    run = C.init_run(args, patch_size=None if args.bench else PRESETS[args.model or "tiny"]["patch_size"])
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    return train(args, run)


if __name__ == "__main__":
    main()
