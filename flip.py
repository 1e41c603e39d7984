"""FLIP: Scaling Language-Image Pre-training via Masking.

Yanghao Li, Haoqi Fan, Ronghang Hu, Christoph Feichtenhofer, Kaiming He. CVPR 2023, arXiv 2212.00794.
Official code: github.com/facebookresearch/flip (JAX / t5x, TPU).

The idea
--------
CLIP learns an image tower and a text tower so that an image and its caption land close together
in a shared embedding space (a contrastive InfoNCE loss over the whole batch). FLIP randomly
removes a large part of the image patches (50% or 75%) before the image ViT, as MAE does, and
simply never computes them: the image tower sees only the visible patches, so one step costs
about half (or a quarter) of the compute. For the same wall-clock time FLIP sees 2-4x more
image-text pairs and contrasts more pairs per step (a larger batch fits in the same memory),
which more than pays for the information lost by masking. A short final phase without masking
("unmasked tuning") closes the gap between the masked training view and the full test view.

What this file reproduces in miniature
--------------------------------------
The full FLIP model (ViT image tower with random patch masking, non-causal text transformer,
bias-free projections, learnable clipped temperature, symmetric InfoNCE over the global batch
across DDP ranks) with the paper's presets (B/16, L/16, H/14 of Table 9) and a CPU-sized `tiny`
default. It trains on synthetic shapes with captions ("a large red circle at the top left and a
small blue cross ...") and then classifies held-out images zero-shot by prompting the text tower
with the class names, and measures image-to-text / text-to-image retrieval. `--bench` measures
the paper's Table 1a claim: time per sample (and FLOPs) at mask 0, 0.5 and 0.75. The paper's two
further knobs are flags: `--unmasked_tune_epochs` (the final unmasked phase) and
`--txt_mask_ratio` (its text-masking ablation).

What to expect from the default run (tiny, 32 epochs of 2000 pairs, batch 64, lr 1.5e-3, mask 0.5,
context 8; its figures are in the README's table): zero-shot shape accuracy well above chance, about
two thirds, and retrieval recall@1 between 0.6 and 0.7 both ways. Why this recipe: the zero-shot
task asks the image tower for the shape's kind, and the tiny ViT with plain 4x4 patches learned it
slowly (towers 128 wide: 0.43 after 18 epochs at lr 1e-3; with the whole caption, context 32, 0.31
after 30). Its patch embedding now reads overlapping 8x8 windows at stride 4 ("Size" below); with
towers 128 wide (1.26M parameters) for 18 epochs: 0.58 at lr 1e-3 (R@1 0.58 / 0.63); lr 1.5e-3 0.67
(R@1 0.55 / 0.61; --seed 1: 0.71, R@1 0.50 / 0.59); lr 2e-3 0.71 but R@1 0.27 / 0.27 (one CPU
thread); batch 32 0.59 (one thread); 16 / 17 epochs 0.56 / 0.58. That was the default until it
measured 118-124 s on idle cores. Towers 64 wide (0.33M parameters, a quarter of the FLOPs per
sample, though 2 threads speed them up less) run about 2x the samples per second, and the
steps are what the zero-shot accuracy follows here: 30 epochs 0.64 (R@1 0.63 / 0.67; --seed 1 0.62),
32 epochs 0.68 (the default; R@1 0.64 / 0.69, about 105 s; --seed 1 0.64, R@1 0.64 / 0.71), 36
epochs 0.77 (R@1 0.69 / 0.72, about 118 s); 96 wide for 24 epochs 0.55 (one thread). The shape words
are learned last: within a batch of 64 pairs the colours and places already tell most captions
apart, and the contrastive task asks only for what the negatives force; cutting the caption to the
main shape's words (see "Text length") makes the shape word needed sooner. Tried with the plain
patches (the same steps or time, zero-shot): a batch of 256 (lr 2e-3) learned the shapes more slowly
at equal epochs (0.25 vs 0.34 after 8 of 20 epochs): a quarter of the steps; 6000 training pairs for
6 epochs 0.46 (so it is not over-fitting 2000 pairs); lr 2e-3 0.42 (retrieval R@1 halves); towers 64
wide (3.5x the samples/s) for 30 epochs 0.42; context 4 ("a large red circle": the place cut too)
0.40.

    python flip.py                      # train tiny on synthetic captions, zero-shot + retrieval
    python flip.py --data DIR           # DIR/**/NAME.jpg with NAME.txt captions beside them
    python flip.py --smoke              # seconds: the loss is finite and falls
    python flip.py --bench              # time / FLOPs per sample at mask 0, 0.5, 0.75 (L/16; CPU: base)
    torchrun --nproc_per_node=2 flip.py # the InfoNCE loss contrasts the global batch of all ranks

Departures from the official code, and why
------------------------------------------
- Tokenizer. The official text tower reads BERT-uncased WordPiece ids (tf_text.BertTokenizer,
  30523 ids, padded with 0 to 32, no [CLS]). That needs TensorFlow-Text and the 30k-line vocab
  file, which this project does not ship. Here a dependency-free word tokenizer is used: lower-case
  words and punctuation marks (CJK characters one by one, as BERT's basic tokenizer does), ids
  from a vocabulary built from the training captions (plus the class names), 0 = [PAD],
  1 = [UNK], padded / truncated to 32 like the official code. The vocabulary is saved in the
  checkpoint. The model itself is unchanged: only `vocab_size` differs from the official 30523.
- Size. The default `tiny` preset (32-pixel images, patch 4, image ViT 64 wide x 4 blocks x 2 heads,
  text 64 x 2, embedding 64; 32 epochs of 2000 pairs, batch 64); `base`, `large`, `huge` carry the
  paper's numbers exactly (Table 9; vocab 30523, context 32). tiny's patch embedding reads
  overlapping 8x8 windows at stride 4 (`patch_kernel=8`, padding 2; still one token per 4x4 patch,
  as MViTv2's 7x7 / stride-4 stem), where the official one is a p x p conv: it took zero-shot from
  0.43 to 0.58 at the same recipe (towers 128 wide, "What to expect"). A visible token then also
  sees 2 pixels of each removed neighbour; FLIP reconstructs nothing, so nothing is given away, and
  the masked step still skips the removed tokens' whole encoder cost.
- Text length. The official context is 32 tokens (used with --data). On the synthetic captions
  the default --context_length is 8: the main shape's words, which the caption names first
  ("a large red circle at the top left"); the distractors' words after them are cut. With the
  whole caption, the colours and places of all the shapes tell the 64 pairs of a batch apart
  without the shape word; the main shape's words take 2 x 8 x 9 x 6 = 864 values (size, colour,
  place, kind), of which the shape word carries ln 6 / ln 864 = 0.26. The text tower is cheaper
  too: a masked step costs 0.51x the FLOPs of an unmasked one (3.26 vs 6.39 GFLOPs per batch of
  64, forward and backward), 0.58x with 32 tokens. What it buys: see "What to expect".
- Unmasked tuning is OFF by default (`--unmasked_tune_epochs 0`), as in the official config:
  there it is a second launch (mask_ratio 0, base lr 4e-8, from the pre-trained checkpoint),
  which the paper's final recipe adds (Table 1e: +0.5 / +1.3 zero-shot at 50% / 75% masking).
  `--unmasked_tune_epochs N` runs it here after the masked phase, in the same command.
- Text masking (`--txt_mask_ratio`, the official config key model_txt.mask_ratio, default 0). The
  paper ablates it (Sec. 3, Table 1c) and keeps the text whole; the official code raises
  NotImplementedError for it. Here it uses `random_masking` with the official `bias` argument set
  to 1 on the pads, so that the pads go before any word, and keeps the remaining tokens in caption
  order, so that the first kept token is pooled (our choice where the official code has none).
- Learning rate. The official recipe is base lr 4e-6 per 256 samples at a 64k batch (1.0e-3 in
  all). At the small batches used here that rule gives a learning rate too small to learn
  anything in a minute, so the default is an absolute --lr 1.5e-3 (the official absolute value
  is 1e-3; "What to expect" gives both);
  `--blr` applies the official per-256 rule instead. Unmasked tuning uses lr / 100 as the
  official 4e-8 vs 4e-6, with 20% of its epochs as warm-up (official 20 of 100).
- Zero-shot prompts: the official evaluation averages the text embeddings of CLIP's 7 short
  ImageNet templates (used here for --data). On the synthetic data the prompts are written the
  way its captions are ("a large red {} at the top left", every size, colour and place), and
  averaged the same way; a word the captions never use would be [UNK] to this tokenizer.
- The global batch is gathered with a small autograd all-gather (GatherGlobal) instead of pjit
  sharding; the loss and the gradient equal one process holding the whole batch (a test checks).
- Retrieval recall counts a retrieved caption as right when the text tower reads the same tokens
  as for the true caption (the synthetic world repeats captions; the official code reports
  zero-shot accuracy only).
- On the synthetic data there is no augmentation: its captions say "left" and "right", which a
  horizontal flip would make false. --data uses the official crop (area 0.5-1) and flip.
- Official weights are t5x checkpoints. `from_flax` maps the flattened flax parameter tree
  (`img_encoder/Transformer/encoderblock_00/...`, kernels transposed, q/k/v fused) onto this
  model with every key matched (a test checks it on a random tree with JAX's conv / dense
  semantics), and `--weights FILE.npz` reads such a tree saved with numpy. The released files'
  text tower reads BERT WordPiece ids, though, which this script's tokenizer does not produce,
  so loading one stops with that error: using them end to end needs the BERT tokenizer.

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `random_masking` (Sec. 3 "Image masking", step 3 of the reading map; the official
   `random_mask`): `random_masking(x, mask_ratio, noise=None, *, bias=None)`, x (B, L, D); use the
   given noise (B, L) or draw `noise = torch.rand(B, L)`, add `bias` if given, argsort it per
   sample, keep the first len_keep = int(L (1 - r)) tokens (smallest noise first), and return
   them with the mask (1 = removed) in the patch order and ids_restore.
   Grade: `python -m pytest tests/test_flip.py -k "masking"`
2. Re-implement `VisionTower.forward` (Sec. 3 and Fig. 2, steps 1-5): patchify, add each patch's
   sin-cos position BEFORE masking (so a kept token keeps its own), mask with `random_masking`
   and the given noise, prepend the cls token (no position), blocks, final LayerNorm, then
   the mean over all tokens, cls included.
   Grade: `python -m pytest tests/test_flip.py -k "vision_tower"`
3. Re-implement `flip_loss` and `FLIP.clipped_logit_scale` (Sec. 3, the official
   `compute_contrastive_loss`, step 8): the symmetric InfoNCE loss over the gathered global batch,
   logits e^s Z_img Z_txt^T, the positives on the diagonal, the mean of both directions; s the
   learnable log scale clipped to [0, ln 100] in the forward pass only (the parameter stays free).
   Grade: `python -m pytest tests/test_flip.py -k "infonce"`
4. Re-implement `TextTower.forward` (Sec. 3 "text encoder", step 6): token embeddings plus the
   first T learned positions, blocks with no causal and no padding mask, final LayerNorm, and
   the FIRST token's output (the official txt_avg_token=False, not CLIP's end-of-text token).
   Grade: `python -m pytest tests/test_flip.py -k "text_tower"`
5. Explore: mask 0 vs 0.5 at EQUAL COMPUTE (the paper's Fig. 1 and Table 1a: not equal epochs).
   At mask 0.5 the image tower gets 1 + 32 tokens instead of 1 + 64, and one training step of
   `tiny` costs 0.51x the FLOPs of an unmasked one (3.26 vs 6.39 GFLOPs per batch of 64, forward
   and backward; the 8-token text tower is not masked). So 16 masked epochs cost what 8 unmasked
   ones do (1.02x). Predict which wins, then run `python flip.py --mask_ratio 0 --epochs 8` and
   `python flip.py --epochs 16`, and read zeroshot_acc, i2t_r1 and t2i_r1 in metrics.json.
   Measured (seed 0), unmasked 8 epochs: zero-shot 0.49, R@1 i2t / t2i 0.24 / 0.30, R@5 0.62 /
   0.72; masked 16 epochs: zero-shot 0.52, R@1 0.35 / 0.36, R@5 0.76 / 0.87. At equal FLOPs
   masking wins every figure, zero-shot by 3 points (15 of 500 images), retrieval by more, as the
   paper's Figure 1 says: more images seen for the same FLOPs beat seeing every patch. On a CPU
   the FLOPs are not the time: the masked run took 1.2x as long (73 vs 61 s, one thread each),
   because the tiny model's half-size matrices run less efficiently; on an accelerator at the
   paper's sizes the time follows the FLOPs more closely (`--bench`).
   Grade: `python -m pytest tests/test_flip.py -k "vision_tower_sends or eval_sees"`
"""
import argparse
import math
import re
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common as C

# ============================================================ the ordinary building blocks: pre-norm ViT block (as MAE), flax GELU = tanh form


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # official: separate query/key/value kernels, fused here
        self.proj = nn.Linear(dim, dim)  # official: "out"

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every token
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")  # flax nn.gelu defaults to the tanh approximation
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2-D sine-cosine positions (MAE's function of this name; FLIP's posembed_util): the
    first half of the channels encodes the column, the second half the row, each half
    [sin(pos w_k)] ++ [cos(pos w_k)] with w_k = 1 / 10000^(k / (embed_dim / 4)); grid_size is an
    int or (grid_h, grid_w). -> float32 (grid_h * grid_w [+ 1 zero row first when cls_token], D)"""
    assert embed_dim % 4 == 0, "the sin-cos position embedding needs a width divisible by 4"
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def one_axis(pos):  # (h*w,) -> (h*w, D/2): [sin(pos*omega), cos(pos*omega)]
        out = pos.reshape(-1, 1) * omega[None]  # (h*w, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_axis(cols), one_axis(rows)], dim=1)  # (h*w, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb])  # (1+h*w, D)
    return emb.float()


# ============================================================ the paper's idea: drop a random subset of the image patches before the image tower
#
# One training step of FLIP (Sec. 3, Fig. 2; official models_flip.py), in the order of the code:
#   1. patchify: a conv with kernel = stride = p, (B, 3, H, W) -> (B, L, D), patches row by row
#   2. add the fixed 2-D sin-cos position of every patch BEFORE masking, so that each kept token
#      carries its own position (patch j gets row 1 + j of the table; row 0 is the cls slot)
#   3. random masking (the official `random_mask`): uniform noise per patch, argsort, keep the
#      len_keep = int(L (1 - r)) patches with the SMALLEST noise; mask 1 = removed, patch order
#   4. prepend the cls token (no position): only the 1 + len_keep tokens reach the blocks
#   5. pre-norm ViT blocks, final LayerNorm, mean over ALL output tokens (cls included)
#   6. text tower: token + learned 1-D positions, blocks with NO causal and no padding mask,
#      final LayerNorm, output of the FIRST token (official txt_avg_token=False)
#   7. bias-free linear projections, L2-normalised: z / (||z|| + 1e-8)
#   8. s = clip(logit_scale, 0, ln 100) (initialised to ln 1/0.07), logits = e^s Z_img Z_txt^T over
#      the global batch, symmetric cross entropy with the positives on the diagonal (loss section)


def random_masking(x, mask_ratio, noise=None, *, bias=None):
    """Keep a random subset of len_keep = int(L * (1 - mask_ratio)) tokens per sample (a floor,
    as the official `random_mask`). x (B, L, D) -> x_visible (B, len_keep, D), mask (B, L) with
    1 = removed, 0 = kept, in the original token order, and ids_restore (B, L). noise (B, L) is
    uniform in [0, 1), drawn here when None (as mae.py's random_masking). `bias` (B, L), as the
    official one, is added to the noise (small is keep, large is remove): the text masking
    ablation gives the pads +1 so that they go first."""
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L, device=x.device) if noise is None else noise  # step 3: (B, L) small = keep
    if bias is not None:
        noise = noise + bias  # (B, L)
    ids_shuffle = noise.argsort(dim=1)  # (B, L)
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, len_keep): the smallest noise
    x_visible = x.gather(1, ids_keep[:, :, None].expand(B, len_keep, D))  # (B, len_keep, D)
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = mask.gather(1, ids_restore)  # (B, L) back in the patch order
    return x_visible, mask, ids_restore


class VisionTower(nn.Module):
    """ViT image encoder: patch embedding (no LayerNorm after it, unlike CLIP), fixed 2-D sin-cos
    positions added to the patches, random masking AFTER the positions, then the cls token,
    pre-norm blocks, final LayerNorm, and the mean of ALL output tokens (cls included)."""

    def __init__(self, img_size, patch_size, width, depth, num_heads, patch_kernel=None):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = nn.Module()
        k = patch_kernel or patch_size  # k > p (tiny only): overlapping k x k windows at stride p
        self.patch_embed.proj = nn.Conv2d(3, width, k, stride=patch_size, padding=(k - patch_size) // 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # stored like a parameter (as the official "pos_embedding") but fixed: never trained
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(width, self.grid, cls_token=True)[None],
                                      requires_grad=False)  # (1, 1+L, D); row 0 (cls) is zero
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)  # official "encoder_norm"

    def forward(self, imgs, mask_ratio=0.0, noise=None):
        x = self.patch_embed.proj(imgs)  # step 1: (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, L, D), patch j = row j // w, column j % w
        x = x + self.pos_embed[:, 1:]  # step 2: positions first, so a kept patch knows where it was
        mask = None
        if mask_ratio > 0:
            x, mask, _ = random_masking(x, mask_ratio, noise)  # step 3: (B, L_keep, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D), no position (zero)
        x = torch.cat([cls, x], dim=1)  # step 4: (B, 1+L_keep, D)
        for blk in self.blocks:  # step 5
            x = blk(x)
        x = self.norm(x)
        return x.mean(dim=1), mask  # global average pooling over cls + visible tokens: (B, D)


# ============================================================ the full model and its presets: text tower, FLIP, presets


class TextTower(nn.Module):
    """Text encoder: token + learned 1-D position embeddings, pre-norm blocks with NO causal mask
    and no padding mask (as the official code), final LayerNorm, output of the FIRST token.
    mask_ratio > 0 is the paper's text-masking ablation (Sec. 3 "Text masking", Table 1c; the
    official config key model_txt.mask_ratio, whose code raises NotImplementedError): the pads are
    removed first (random_masking's bias), then random words; the kept tokens stay in caption
    order, so the first KEPT token is pooled."""

    def __init__(self, vocab_size, context_length, width, depth, num_heads):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, tokens, mask_ratio=0.0, noise=None):
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]  # step 6: (B, T, W)
        if mask_ratio > 0:  # training only: pads first (bias 1 > any noise), then random words
            _, mask, _ = random_masking(x, mask_ratio, noise, bias=(tokens == 0).float())  # (B, T)
            x = x[mask == 0].reshape(len(x), -1, x.shape[-1])  # (B, T_keep, W), in caption order
        for blk in self.blocks:  # no attention mask: every token sees every token, pads included
            x = blk(x)
        return self.norm(x)[:, 0]  # (B, W): first-token pooling (official txt_avg_token=False)


class FLIP(nn.Module):
    def __init__(self, img_size=224, patch_size=16, width=768, depth=12, heads=12,
                 text_width=512, text_depth=12, text_heads=8, embed_dim=512, vocab_size=30523,
                 context_length=32, mask_ratio=0.5, txt_mask_ratio=0.0, patch_kernel=None):
        super().__init__()
        self.mask_ratio = mask_ratio  # used in training only; evaluation always sees every patch
        self.txt_mask_ratio = txt_mask_ratio  # the text-masking ablation (official default 0)
        self.visual = VisionTower(img_size, patch_size, width, depth, heads, patch_kernel)
        self.text = TextTower(vocab_size, context_length, text_width, text_depth, text_heads)
        self.img_proj = nn.Linear(width, embed_dim, bias=False)  # official "img_mlp1"
        self.txt_proj = nn.Linear(text_width, embed_dim, bias=False)  # official "txt_mlp1"
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # ln(1/tau), tau=.07
        self.init_weights()

    def init_weights(self):  # the official "mae_jax_v2" init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # xavier on the fused [3D, D] qkv equals the official variance_scaling(0.5,
                # fan_avg) on each separate [D, D] q, k, v kernel
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.visual.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv seen as a Linear (D, 3*p*p)
        nn.init.zeros_(self.visual.patch_embed.proj.bias)
        for p in (self.visual.cls_token, self.text.token_embed.weight, self.text.pos_embed):
            nn.init.normal_(p, std=0.02)

    def encode_image(self, imgs, mask_ratio=0.0, noise=None):
        h, mask = self.visual(imgs, mask_ratio, noise)
        return l2_normalize(self.img_proj(h)), mask  # step 7: (B, E), (B, L) or None

    def encode_text(self, tokens, mask_ratio=0.0, noise=None):
        return l2_normalize(self.txt_proj(self.text(tokens, mask_ratio, noise)))  # step 7: (B, E)

    def clipped_logit_scale(self):
        # step 8: clipped in the forward pass only (the parameter itself is free): the gradient
        # is zero outside [0, ln 100], so the temperature 1/exp(s) never falls below 0.01
        return self.logit_scale.clamp(0, math.log(100))

    def forward(self, imgs, tokens, mask_ratio=None, txt_mask_ratio=None, noise=None):
        """-> z_img (B, E), z_txt (B, E) unit vectors and the clipped logit scale s (1,). noise
        (B, L), uniform: the image masking noise (drawn by random_masking when None)."""
        if mask_ratio is None:
            mask_ratio = self.mask_ratio if self.training else 0.0  # no masking at evaluation
        if txt_mask_ratio is None:
            txt_mask_ratio = self.txt_mask_ratio if self.training else 0.0
        z_img, _ = self.encode_image(imgs, mask_ratio, noise)
        return z_img, self.encode_text(tokens, txt_mask_ratio), self.clipped_logit_scale()


def l2_normalize(z):
    return z / (z.norm(dim=-1, keepdim=True) + 1e-8)  # official: divide by (||z|| + 1e-8)


PRESETS = {  # Table 9 of the paper (and configs/cfg_flip_*.py); tiny is ours, for a CPU
    "tiny": dict(img_size=32, patch_size=4, width=64, depth=4, heads=2,  # vocab: from the data
                 text_width=64, text_depth=2, text_heads=2, embed_dim=64, vocab_size=1000,
                 patch_kernel=8),  # overlapping 8x8 windows at stride 4 (docstring)
    "base": dict(img_size=224, patch_size=16, width=768, depth=12, heads=12,
                 text_width=512, text_depth=12, text_heads=8, embed_dim=512),  # 86M / 53M
    "large": dict(img_size=224, patch_size=16, width=1024, depth=24, heads=16,
                  text_width=768, text_depth=12, text_heads=12, embed_dim=768),  # 303M / 109M
    "huge": dict(img_size=224, patch_size=14, width=1280, depth=32, heads=16,
                 text_width=1024, text_depth=24, text_heads=16, embed_dim=1024),  # 631M / 334M
}


def create_model(name="tiny", **overrides):
    if name not in PRESETS:
        C.die(f"unknown model '{name}' (choose from {', '.join(PRESETS)})")
    return FLIP(**{**PRESETS[name], **overrides})


# ============================================================ the loss: symmetric InfoNCE over the GLOBAL batch (all DDP ranks)


class GatherGlobal(torch.autograd.Function):
    """(B_local, E) on every rank -> (B_global, E), differentiable. Every rank computes the same
    loss on the gathered batch, so the gradient of a row is the sum over ranks of the gradients
    that reach it (all-reduce), sliced back to the rank that computed it."""

    @staticmethod
    def forward(ctx, z):
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())  # equal local batches (the sampler drops the rest)
        return torch.cat(parts, dim=0)  # rank order = batch order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum of every rank's gradient, (B_global, E)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]  # (B_local, E)


def gather_global(z):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GatherGlobal.apply(z)
    return z


def flip_loss(z_img, z_txt, logit_scale):
    """L = 1/2 [ CE(e^s Zi Zt^T, diag) + CE(e^s Zt Zi^T, diag) ] over the global batch, each CE
    the mean over the N rows; z_img, z_txt (B, E) unit vectors, logit_scale s (1,) the clipped LOG
    of the scale (the temperature is e^-s). Every rank computes the same loss on the gathered
    batch; with DDP's gradient averaging this gives exactly the single-process gradient of the
    whole batch."""
    z_img, z_txt = gather_global(z_img), gather_global(z_txt)  # (N, E) each
    logits = logit_scale.exp() * z_img @ z_txt.t()  # step 8: (N, N), e^s cos(image_i, text_j)
    target = torch.arange(logits.shape[0], device=logits.device)  # the positives: the diagonal
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def flip_param_groups(model, weight_decay):
    """The official `exclude_wd` mask (t5x/train_state_initializer.py: filter_bias_and_norm and
    filter_posembed): no weight decay on biases, LayerNorm scales and the position embeddings;
    everything else is decayed, the cls token, the logit scale and the token embedding included
    (the config's comment says "bias, norm, cls, posembed", but the mask in use leaves cls in)."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = name.endswith(".bias") or id(p) in norms or name.endswith("pos_embed")
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


# ============================================================ data glue: a dependency-free tokenizer, captions -> token ids, zero-shot prompts

PAD, UNK = "[PAD]", "[UNK]"
WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+|[^\w\s]")


def words(text):
    """Lower-cased words and single punctuation marks; CJK characters one by one (as BERT)."""
    return WORD.findall(text.lower())


class Tokenizer:
    """Word-level ids: 0 = [PAD], 1 = [UNK], the rest a vocabulary built from the training text.
    Pads / truncates to `context_length` (official: 32, padded with 0, no [CLS] token)."""

    def __init__(self, vocab, context_length=32):
        self.vocab, self.context_length = list(vocab), context_length
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts, context_length=32, max_size=30523):
        counts = Counter(w for t in texts for w in words(t))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[: max_size - 2]  # deterministic
        return cls([PAD, UNK] + ranked, context_length)

    def __call__(self, texts):
        """list of str -> (N, context_length) long"""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # 0 = [PAD]
        for i, t in enumerate(texts):
            ids = [self.index.get(w, 1) for w in words(t)][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class TokenizedCaptions(torch.utils.data.Dataset):
    """(image, caption, label) -> (image, token ids (T,), label)"""

    def __init__(self, ds, tokenizer):
        self.ds, self.tokenizer = ds, tokenizer

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, caption, label = self.ds[i]
        return img, self.tokenizer([caption])[0], label


# zero-shot prompts: for the synthetic captions ("a large red circle at ...") prompts in their
# style; for real data the official short list (CLIP's 7 ImageNet templates)
N_TRAIN, N_VAL = 2000, 500  # synthetic pairs
CONTEXT_LENGTH = 32  # caption tokens, official (BERT ids padded / truncated to 32)
# on the synthetic captions: "a large red circle at the top left" (the main shape, named first) is
# 8 tokens; the distractors' words after it are cut, so that colour and place alone no longer tell
# a batch's captions apart and the shape word must be read (see "What to expect")
SYNTHETIC_CONTEXT = 8
SHAPE_TEMPLATES = tuple(f"a {size} {colour} {{}} at the {where}" for size in ("large", "medium")
                        for colour in C.COLORS for where in ("top left", "top", "top right", "left", "center",
                                                             "right", "bottom left", "bottom", "bottom right"))
CLIP_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def data(args):
    """(train_ds, val_ds, classes, templates) of (image, caption, label)."""
    if args.data is None:  # no flip: the captions say left and right
        train, val, classes = C.image_data(args, N_TRAIN, N_VAL, aug="none", captions=True)
        templates = SHAPE_TEMPLATES
    else:
        train, val, classes = C.caption_data(args, N_TRAIN, N_VAL)
        train.scale = (0.5, 1.0)  # official crop: area (0.5, 1), aspect (3/4, 4/3), then flip
        templates = CLIP_TEMPLATES
    if args.classes:  # names to prompt with: for the class folders, or to label a flat folder
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if classes and len(names) != len(classes):
            C.die(f"--classes: {len(names)} names given for the {len(classes)} class folders of {args.data}")
        if not classes:  # a flat folder: label = the first class name its caption mentions
            for ds in (train, val):
                ds.labels = [caption_label(c, names) for c in ds.captions]
        classes = names
    return train, val, list(classes), templates


def caption_label(caption, names):
    ws = words(caption)
    hits = [(ws.index(words(n)[0]), k) for k, n in enumerate(names) if words(n) and words(n)[0] in ws]
    return min(hits)[1] if hits else -1


# ============================================================ train, evaluate, bench, smoke


def loss_fn(model, batch):
    imgs, tokens, _ = batch
    z_img, z_txt, logit_scale = model(imgs, tokens)
    return flip_loss(z_img, z_txt, logit_scale)


@torch.no_grad()
def class_embeddings(model, tokenizer, classes, templates, device):
    """Text embedding of each class: the mean of its normalized prompt embeddings, renormalized
    (as the official evaluation). -> (K, E)"""
    prompts = [t.format(c) for c in classes for t in templates]
    z = model.encode_text(tokenizer(prompts).to(device))  # (K*P, E)
    z = z.reshape(len(classes), len(templates), -1).mean(1)  # (K, E)
    return l2_normalize(z)


class Column(torch.utils.data.Dataset):
    """(field k, label) of a TokenizedCaptions set: k = 0 the image, k = 1 the token ids."""

    def __init__(self, ds, k):
        self.ds, self.k = ds, k

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        return item[self.k], item[-1]


@torch.no_grad()
def evaluate(model, val_ds, tokenizer, classes, templates, args, run):
    """Zero-shot accuracy on held-out images (every patch visible) and retrieval recall@1/5 ->
    (figures, probs (N, K) or None). Under torchrun every rank extracts its share of the image and
    text embeddings and all receive the whole (C.extract_features), so every rank holds the same
    figures; printing and the picture are rank 0's."""
    model.eval()
    pairs = TokenizedCaptions(val_ds, tokenizer)
    whole = lambda ds: C.make_loader(ds, args, run, train=False, whole=True)  # every rank: all of val
    zi, labels = C.extract_features(lambda x: model.encode_image(x)[0], whole(Column(pairs, 0)), run, shared=True)
    # the text pass also hands back the token ids (exact as floats), to tell equal captions apart
    zt_ids, _ = C.extract_features(lambda t: torch.cat([model.encode_text(t), t.float()], 1),
                                   whole(Column(pairs, 1)), run, shared=True)
    zt, ids = zt_ids[:, : zi.shape[1]], zt_ids[:, zi.shape[1]:].long()  # (N, E), (N, T)
    out, probs = {}, None
    if classes and (labels >= 0).any():
        with C.autocast(run):
            zc = class_embeddings(model, tokenizer, classes, templates, run.device).float().cpu()
        probs = (model.clipped_logit_scale().exp().cpu() * zi @ zc.t()).softmax(1)  # (N, K)
        known = labels >= 0
        out["zeroshot_acc"] = (probs.argmax(1) == labels)[known].float().mean().item()
    # a retrieved caption counts as right when the text tower reads the same tokens as for the
    # image's own caption (the synthetic world repeats captions)
    cid = ids.unique(dim=0, return_inverse=True)[1]  # (N,) caption identity
    sim = zi @ zt.t()  # (N images, N texts)
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        top = s.topk(min(5, s.shape[1]), dim=1).indices  # (N, 5)
        hit = cid[top] == cid[:, None]  # (N, 5)
        out[f"{name}_r1"] = hit[:, 0].float().mean().item()
        out[f"{name}_r5"] = hit.any(1).float().mean().item()
    return out, probs


def masked_view(imgs, mask, patch):
    """What the image tower sees in training: removed patches painted grey. imgs (B, 3, H, W)."""
    B, _, H, W = imgs.shape
    m = mask.reshape(B, 1, H // patch, W // patch)  # (B, 1, h, w)
    m = m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (B, 1, H, W)
    return imgs * (1 - m) + 0.5 * m


@torch.no_grad()
def save_picture(model, val_ds, probs, classes, args, n=8):
    """Row 1: held-out images with their top-3 zero-shot labels; row 2: the masked view. The first n
    (or fewer) items of the set `evaluate` scored (its --eval_max subsample), so that probs row i is image i."""
    imgs, _, labels = C.first_items(C.eval_subset(val_ds, getattr(args, "eval_max", 0)), n)  # (n, 3, S, S), ..., (n,)
    n = len(imgs)
    shown = C.denormalize(imgs)
    texts = []
    if probs is not None:
        for p in probs[:n]:
            v, k = p.topk(min(3, len(classes)))
            texts.append("\n".join(f"{classes[j][:10]} {x:.2f}" for x, j in zip(v.tolist(), k.tolist())))
        texts = [t + (f"\n(true: {classes[y][:10]})" if y >= 0 else "") for t, y in zip(texts, labels.tolist())]
    ratio = model.mask_ratio if model.mask_ratio > 0 else 0.5
    _, mask = model.visual(imgs.to(next(model.parameters()).device), ratio, None)
    seen = int(model.visual.grid ** 2 * (1 - ratio))
    rows = [shown, masked_view(shown, mask.cpu(), model.visual.patch_size)]
    row_texts = [texts, [f"sees {seen}/{model.visual.grid ** 2}"] * n]
    return C.save_grid(f"{args.out}/flip_zeroshot.png", rows, row_texts)


def train(args, run):
    source = args.resume or (args.weights if args.weights and not args.weights.endswith(".npz") else None)
    ckpt = C.load_checkpoint(source) if source else None
    vocab = (ckpt.get("args") or {}).get("vocab") if isinstance(ckpt, dict) else None  # travels with it
    train_ds, val_ds, classes, templates = data(args)
    C.check_enough(train_ds, val_ds, args)  # too few to train and evaluate: one line, before any work
    if vocab is None:
        vocab = Tokenizer.build(list(train_ds.captions) + [t.format(c) for c in classes for t in templates]).vocab
    args.vocab = vocab  # saved in checkpoint.pt with the other args
    tokenizer = Tokenizer(vocab, args.context_length)
    model = create_model(args.model, img_size=args.input_size, vocab_size=len(vocab),
                         context_length=args.context_length, mask_ratio=args.mask_ratio,
                         txt_mask_ratio=args.txt_mask_ratio).to(run.device)
    if args.weights:
        load_weights(model, args.weights, run)
    C.check_resume(model, args)  # a --resume of another model ends here, before the evaluation at init
    if args.blr is not None:  # the official rule: lr = blr * global batch / 256
        args.lr = args.blr * args.batch_size * run.world_size / 256
    C.log(run, f"FLIP {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"{len(train_ds)} training pairs, vocabulary {len(vocab)}, mask ratio {args.mask_ratio}, "
               f"global batch {args.batch_size * run.world_size}")

    before, _ = evaluate(model, val_ds, tokenizer, classes, templates, args, run)
    loader = C.make_loader(TokenizedCaptions(train_ds, tokenizer), args, run, train=True)
    phase1_done = ckpt is not None and args.resume and (ckpt.get("args") or {}).get("phase") == "unmasked"
    history = dict(losses=[], steps=0, seconds=0.0, epoch=0)
    if not phase1_done:
        args.phase = "masked"
        model, history = C.fit(model, loss_fn, loader, args, run,
                               groups=flip_param_groups(model, args.weight_decay), betas=(0.9, 0.95))
    if args.unmasked_tune_epochs > 0:  # the paper's short final phase: mask 0, lr / 100
        tune = argparse.Namespace(**vars(args))
        tune.phase, tune.epochs, tune.lr = "unmasked", args.unmasked_tune_epochs, args.lr / 100
        tune.warmup_epochs = 0.2 * args.unmasked_tune_epochs  # official: 20 of 100 epochs
        tune.resume = args.resume if phase1_done else None
        model.mask_ratio = 0.0
        C.log(run, f"unmasked tuning: {tune.epochs} epoch(s) at lr {tune.lr:.2e}")
        model, h2 = C.fit(model, loss_fn, loader, tune, run,
                          groups=flip_param_groups(model, args.weight_decay), betas=(0.9, 0.95))
        history = dict(losses=history["losses"] + h2["losses"], steps=history["steps"] + h2["steps"],
                       seconds=history["seconds"] + h2["seconds"], epoch=history["epoch"] + h2["epoch"])
        model.mask_ratio = args.mask_ratio

    figures, probs = evaluate(model, val_ds, tokenizer, classes, templates, args, run)
    figures = dict(**{f: v for k, v in figures.items() for f, v in ((k, v), (f"{k}_init", before.get(k)))},
                   chance=1 / len(classes) if classes else None,
                   logit_scale=model.clipped_logit_scale().exp().item())
    if run.is_main:
        C.log(run, f"picture: {save_picture(model, val_ds, probs, classes, args)}")
    C.write_metrics(args, run, history, **figures)


def from_flax(flat, source):
    """The official t5x parameter tree, flattened to {"img_encoder/Transformer/...": array}, as our
    state_dict. Dense kernels are [in, out] (transposed here), the conv kernel [p, p, 3, D], and the
    separate query / key / value kernels are stacked into one qkv weight."""
    flat = {re.sub(r"^(state/)?(target/|params/)+", "", k): v for k, v in flat.items()}

    def get(key, transpose=False):
        if key not in flat:
            C.die(f"{source}: not a FLIP parameter tree: no '{key}'")
        x = torch.from_numpy(np.asarray(flat[key], dtype=np.float32))
        return x.reshape(x.shape[0], -1).t().contiguous() if transpose else x

    sd = {}

    def tower(src, dst):
        depth = len({k.split("/")[2] for k in flat if k.startswith(f"{src}/Transformer/encoderblock_")})
        for i in range(depth):
            b, o = f"{src}/Transformer/encoderblock_{i:02d}", f"{dst}.blocks.{i}"
            a = f"{b}/MultiHeadDotProductAttention_0"
            for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
                sd[f"{o}.{name}.weight"], sd[f"{o}.{name}.bias"] = get(f"{b}/{ln}/scale"), get(f"{b}/{ln}/bias")
            sd[f"{o}.attn.qkv.weight"] = torch.cat([get(f"{a}/{n}/kernel", True) for n in ("query", "key", "value")])
            sd[f"{o}.attn.qkv.bias"] = torch.cat([get(f"{a}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
            out = get(f"{a}/out/kernel")  # [D, D] or [H, Dh, D]
            sd[f"{o}.attn.proj.weight"] = out.reshape(-1, out.shape[-1]).t().contiguous()
            sd[f"{o}.attn.proj.bias"] = get(f"{a}/out/bias")
            for d, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                sd[f"{o}.mlp.{name}.weight"] = get(f"{b}/MlpBlock_0/{d}/kernel", True)
                sd[f"{o}.mlp.{name}.bias"] = get(f"{b}/MlpBlock_0/{d}/bias")
        sd[f"{dst}.norm.weight"] = get(f"{src}/Transformer/encoder_norm/scale")
        sd[f"{dst}.norm.bias"] = get(f"{src}/Transformer/encoder_norm/bias")

    tower("img_encoder", "visual")
    tower("txt_encoder", "text")
    sd["visual.patch_embed.proj.weight"] = get("img_encoder/embedding/kernel").permute(3, 2, 0, 1).contiguous()
    sd["visual.patch_embed.proj.bias"] = get("img_encoder/embedding/bias")
    sd["visual.cls_token"] = get("img_encoder/cls")
    sd["text.token_embed.weight"] = get("txt_encoder/token_embedding/embedding")
    sd["text.pos_embed"] = get("txt_encoder/posembed_encoder/pos_embedding")
    sd["img_proj.weight"] = get("img_mlp1/kernel", True)
    sd["txt_proj.weight"] = get("txt_mlp1/kernel", True)
    sd["logit_scale"] = get("logit_scale").reshape(1)
    # the image pos_embedding is fixed sin-cos (never trained): left out here and regenerated for the
    # model's size; the official loader (remove_pos_embed) drops it only when its shape differs and
    # otherwise loads the saved copy, which holds the same numbers
    return sd


def load_weights(model, path, run):
    """Our checkpoint.pt, or the official parameter tree saved as .npz (see from_flax)."""
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                sd = from_flax(dict(f.items()), path)
        except (OSError, ValueError) as e:
            C.die(f"{path}: cannot be read as a numpy .npz file ({e})")
    else:
        sd = dict(C.unwrap_state(C.load_checkpoint(path)))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        C.die(f"{path}: does not hold a state_dict")
    rows = sd.get("text.token_embed.weight", torch.zeros(0)).shape[0]
    if path.endswith(".npz") and rows != model.text.token_embed.num_embeddings:
        C.die(f"{path}: its text tower reads {rows} BERT WordPiece ids, which this script's word "
              f"tokenizer ({model.text.token_embed.num_embeddings} words) does not produce")
    sd.pop("visual.pos_embed", None)  # fixed sin-cos positions: always regenerated for this size
    C.load_state(model, sd, path, allow_missing=("visual.pos_embed",), run=run)


def bench(args, run):
    """The paper's Table 1a: time per sample of a training step (forward + backward, no data
    loading) at mask 0, 0.5 and 0.75, as a ratio to unmasked, with the FLOPs beside. The paper's
    model is L/16 (`--model large`, batch 64 on a GPU); on a CPU, where a large step takes too long
    for a bench of about a minute, the fallback is base (B/16) at batch 2, said in the table.
    The three settings are timed in interleaved rounds (C.time_ab), so that a shared machine slows
    them alike; the median of each is kept."""
    cpu = run.device.type == "cpu"
    name = args.model if args.model != "tiny" else ("base" if cpu else "large")
    B, rounds = (2, 3) if cpu else (64, 10)
    model = create_model(name).to(run.device).train()
    S, L = model.visual.grid * model.visual.patch_size, model.visual.grid ** 2
    imgs = torch.randn(B, 3, S, S, device=run.device)
    tokens = torch.randint(2, 1000, (B, model.text.context_length), device=run.device)

    def step(r):
        def fn():
            model.zero_grad(set_to_none=True)
            with C.autocast(run):
                loss = flip_loss(*model(imgs, tokens, mask_ratio=r))
            loss.backward()
        return fn

    ratios = (0.0, 0.5, 0.75)
    flops = {r: C.count_flops(step(r)) / B for r in ratios}  # also a first warm-up call
    t = C.time_ab({r: step(r) for r in ratios}, run, rounds=rounds, warmup=0 if cpu else 2)
    t = {r: v / B for r, v in t.items()}  # seconds per sample
    fallback = " (CPU fallback: base instead of the paper's L/16)" if cpu and args.model == "tiny" else ""
    C.log(run, f"FLIP {name}{fallback} ({S}px, patch {model.visual.patch_size}, {L} patches) on {run.device}, "
               f"{args.precision}, batch {B}, forward + backward, no data loading, median of {rounds} rounds")
    C.log(run, f"{'mask':>5} {'visible':>8} {'GFLOPs/sample':>14} {'ms/sample':>10} {'FLOPs':>7} {'time':>7}")
    for r in ratios:
        C.log(run, f"{r:5.2f} {int(L * (1 - r)):>8} {flops[r] / 1e9:14.1f} {t[r] * 1e3:10.1f} "
                   f"{flops[r] / flops[0.0]:6.2f}x {t[r] / t[0.0]:6.2f}x")
    C.log(run, f"bench: FLIP {name} time per sample at mask 0.5 = {t[0.5] / t[0.0]:.2f}x, at 0.75 = "
               f"{t[0.75] / t[0.0]:.2f}x of unmasked; FLOPs {flops[0.5] / flops[0.0]:.2f}x, "
               f"{flops[0.75] / flops[0.0]:.2f}x; paper L/16 on TPU: time 0.50x, 0.33x")
    return flops, t


def smoke(args, run):
    d = C.shapes_images(8, args.input_size, seed=3)
    tokenizer = Tokenizer.build(d["captions"], args.context_length)
    model = create_model(args.model, img_size=args.input_size, vocab_size=len(tokenizer.vocab),
                         context_length=args.context_length, mask_ratio=args.mask_ratio,
                         txt_mask_ratio=args.txt_mask_ratio)
    batch = (C.normalize(d["images"]), tokenizer(d["captions"]), d["labels"])
    C.smoke(model, loss_fn, batch, run, steps=20, lr=1e-3)


# ============================================================ command line


def main(argv=None):
    p = C.make_parser("flip", __doc__, presets=PRESETS, epochs=32, lr=1.5e-3, weight_decay=0.2, warmup_epochs=1, batch_size=64)
    p.add_argument("--mask_ratio", type=float, default=0.5, help="fraction of image patches removed in training")
    p.add_argument("--txt_mask_ratio", type=float, default=0.0,
                   help="fraction of caption tokens removed in training, pads first (the paper's ablation; "
                        "official model_txt.mask_ratio)")
    p.add_argument("--unmasked_tune_epochs", type=int, default=0,
                   help="then this many epochs with mask 0 at lr / 100 (the paper's unmasked tuning)")
    p.add_argument("--blr", type=float, default=None, help="base lr per 256 samples (official: 4e-6); sets --lr")
    p.add_argument("--classes", default=None, help="comma-separated class names to prompt for zero-shot")
    p.add_argument("--context_length", type=int, default=None,
                   help=f"caption tokens (default: the official {CONTEXT_LENGTH} with --data, {SYNTHETIC_CONTEXT} on the "
                        f"synthetic captions: the main shape's words)")
    args = p.parse_args(argv)
    if args.context_length is None:
        args.context_length = CONTEXT_LENGTH if args.data else SYNTHETIC_CONTEXT
    if not (0 <= args.txt_mask_ratio < 1 and int(args.context_length * (1 - args.txt_mask_ratio)) >= 1):
        C.die(f"--txt_mask_ratio {args.txt_mask_ratio}: must be in [0, 1) and keep at least one of the "
              f"{args.context_length} caption tokens")
    run = C.init_run(args, patch_size=None if args.bench else PRESETS[args.model]["patch_size"])
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    return train(args, run)


if __name__ == "__main__":
    main()
