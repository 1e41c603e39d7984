"""Reversible Vision Transformers: activation memory that does not grow with depth.

Paper: Karttikeya Mangalam, Haoqi Fan, Yanghao Li, Chao-Yuan Wu, Bo Xiong, Christoph Feichtenhofer,
Jitendra Malik, "Reversible Vision Transformers", CVPR 2022, arXiv 2302.04869.
Official code: facebookresearch/SlowFast (slowfast/models/reversible_mvit.py, MViT with
MVIT.REV.ENABLE); minimal version: karttikeya/minREV (rev.py).

The idea. Ordinary backprop keeps every block's activations from the forward pass until the
backward pass uses them, so activation memory grows linearly with depth. A reversible block keeps
two residual streams X1, X2 (the patch tokens duplicated at the start) and updates them in turn,
    Y1 = X1 + F(X2)        F = LayerNorm + attention
    Y2 = X2 + G(Y1)        G = LayerNorm + MLP
which can be undone exactly:
    X2 = Y2 - G(Y1)
    X1 = Y1 - F(X2).
Training therefore keeps only the LAST block's outputs. The backward pass walks the blocks in
reverse: it rebuilds each block's inputs from its outputs, recomputing F and G with autograd on to
get their gradients, then throws that block's graph away. Activation memory is constant in depth
(paper: up to 15.5x less at the same FLOPs, parameters and accuracy) for the price of one extra
forward computation of every block. Anything random in F or G (here drop path) must be replayed
exactly in the recomputation, or the inverse and the gradients are wrong.

What this file reproduces in miniature: Rev-ViT with the official parameter names, the custom
autograd Function with the reversible backward pass, trained with cross-entropy (label smoothing
0.1) on the synthetic shapes (6 classes, 32x32; the summary prints held-out top-1 against chance
and before training).
`--vanilla_bp` runs the same blocks with ordinary autograd and follows the same loss curve until
rounding differences grow (measured, default run: the same first epoch loss to 4 digits, then
apart by at most 0.03 an epoch; the two land within a point of each other: README).
`--bench` measures the paper's claim as the paper states it, in training memory: the peak memory
of a whole training step (forward, backward, optimizer step), reversible vs vanilla backprop, at
depth 6, 12 and 24. The peak of reversible backprop hardly grows with depth (one block's
recomputation graph, the weights' gradients and AdamW's moments), the vanilla peak grows by every
block's activations. Beside it, the bytes autograd stores for backward: flat for reversible
backprop, linear for vanilla; they are most but not all of the difference, which is why the peak
ratio is the smaller of the two.

Commands:
    python revvit.py                    # train tiny on synthetic shapes, evaluate, save a picture
    python revvit.py --smoke            # seconds; the exit status says pass/fail
    python revvit.py --bench            # peak memory of a training step and its time, rev vs vanilla
    python revvit.py --data DIR         # your images: DIR/<class>/*.jpg (or DIR/train, DIR/val)
    python revvit.py --vanilla_bp       # same model, plain autograd backward (for comparison)
    torchrun --nproc_per_node=2 revvit.py --data DIR
    python revvit.py --model base --input_size 224 --weights REV_VIT_B.pyth --data IMAGENET --epochs 0
        (evaluates the official SlowFast checkpoint REV_VIT_B.pyth / REV_VIT_S.pyth, whose
        `model_state` names and shapes this model follows (199 tensors for B); on data with other
        classes the 1000-class head is replaced and --epochs N fine-tunes)

Departures from the official code (SlowFast), and why:
- Randomness. SlowFast draws a fresh seed (torch.seed() / the CUDA generator) before F, before the
  drop path and before G, and calls torch.manual_seed with it, which reseeds the global RNG of
  every device. Here each block draws one seed per step from the global generator (so a run is
  reproducible from --seed) and the drop-path mask comes from a private torch.Generator seeded
  with it. F and G have no other randomness (dropout is 0 in every official config), so one seed
  per block is all that must be replayed. As in SlowFast, F and G share one drop-path mask.
- Parameter gradients. SlowFast calls .backward() inside the Function's backward, so the
  parameter grads are accumulated into .grad behind the outer autograd graph's back. Here the
  parameters are extra inputs of the Function, and its backward returns their gradients (from
  torch.autograd.grad). The numbers are the same; DistributedDataParallel (including
  find_unused_parameters), gradient hooks and gradcheck then see an ordinary autograd node. The
  price, measured: autograd copies the returned weight gradients into .grad after the Function's
  backward, so for a moment the weight gradients exist twice (each block adds at most twice its
  parameters' bytes to the peak, never its activations: tests/test_revvit.py -k peak_memory).
- Mixed precision. SlowFast recomputes outside autocast (users saw noisier losses, SlowFast#641).
  Here the Function records the autocast state of the forward pass and re-enters it for the
  recomputation, so the backward recomputes in the precision the forward used (minREV does the
  same by putting autocast inside F and G).
- The head returns logits in eval mode too (SlowFast's TransformerBasicHead applies softmax).
- Loss and recipe: cross-entropy with label smoothing 0.1 (`--smoothing`), no mixup / cutmix /
  RandAugment / random erasing (the official DeiT-style recipe is for 300 ImageNet epochs; the
  synthetic data has 2000 images). Defaults (measured figures: README): 12 epochs, batch 16
  (on one CPU thread it costs no more per epoch than 32 and gives twice the steps), AdamW lr
  1e-3 (a tiny model and few steps; official 5e-4 per 512 images), weight decay 0.05 (Rev-ViT-S), 1 warmup
  epoch, no gradient clipping (official: 2.0 for Rev-ViT-B; `--clip_grad 2`), no drop path for
  `tiny` (official 0.1 for S, 0.2 for B; a short run is what limits the tiny model: 16 epochs
  with drop path 0.1 and 24 without had the same train loss at epoch 7).
- The tiny patch embedding reads overlapping 8x8 windows at stride 4 (`patch_kernel=8`, padding 2;
  SlowFast's PATCH_KERNEL / PATCH_STRIDE / PATCH_PADDING, which its MViT configs set to 7 / 4 / 3):
  still one token per 4x4 patch. With the plain 4x4 conv the tiny model sat near chance for epochs
  and its end followed from when it left (held-out accuracy after 6 epochs on one CPU thread, --seed
  1 / --seed 2: 0.48 / 0.44 with plain patches, 0.77 / 0.81 overlapping; the default with --seed 1
  on 2 threads: 0.892, --vanilla_bp 0.888; old default of 20 epochs with plain patches 0.776,
  --vanilla_bp 0.826: the two runs part by rounding and the recipe amplified it). Tried before that,
  with plain patches (1 thread): batch 32 18 epochs 0.70, batch 16 20 epochs 0.788 (over-fits, hence
  the smoothing), 4 heads instead of 2, lr 2e-3 with betas (0.9, 0.95) (near chance for 6 epochs),
  patch 8 at width 128 (0.51 after 115 s), lr 5e-4, 40 px images. MAE's xavier init on top of the
  overlap learns faster still (0.94 / 0.96 after 6 epochs) but departs from SlowFast's init below;
  not taken.
- pos_embed is not interpolated to other input sizes: the model is built for --input_size.
- Rev-MViT (non-reversible stage-transition blocks, stream fusion) is not included: Rev-ViT only.
- The `tiny` preset is ours (32x32 images, patch 4 with 8x8 windows, width 64, depth 4, 2 heads); `small` and `base` are
  the paper's Rev-ViT-S and Rev-ViT-B.
- Initialisation follows SlowFast's quirks: trunc-normal(0.02) weights, Linear and LayerNorm
  biases set to 0.02.

Exercises (set one by blanking the function's body; the command grades it):
1. Re-implement `ReversibleBlock.forward` (Sec. 3, Eq. for the reversible block, step 2 of the
   reading map: draw the block's seed, Y1 = X1 + F(X2), Y2 = X2 + G(Y1), one drop-path mask for
   both). Grade: `python -m pytest tests/test_revvit.py -k "block_forward"`
2. Re-implement `ReversibleBlock.inverse` (Sec. 3, the inverse: X2 = Y2 - G(Y1), then
   X1 = Y1 - F(X2), with the forward's masks). Grade: `python -m pytest tests/test_revvit.py -k "inverse"`
3. Re-implement `ReversibleBlock.backward_pass` (Sec. 3 "learning without caching activations",
   steps 4-5: rebuild the inputs from the outputs while recomputing G(Y1) and F(X2) with a graph;
   dX1 = dY1 + (dG/dY1)^T dY2, dX2 = dY2 + (dF/dX2)^T dX1; the parameters' gradients, F's then G's).
   Grade: `python -m pytest tests/test_revvit.py -k "backward_pass"`
4. Re-implement `RevBackProp.forward` and `RevBackProp.backward` (steps 3 and 6: run the blocks
   keeping only the last outputs; walk the blocks in reverse, collect every parameter's gradient
   in order, recompute in the forward's autocast). Grade: `python -m pytest tests/test_revvit.py -k "revbackprop"`
5. Explore: the drop-path seed replay. In `ReversibleBlock.backward_pass` make the line that
   picks the seed (the forward's, unless replay_seeds is off) read `seed = new_seed()`: the
   recomputation draws fresh masks. Predict: do the gradients still equal vanilla backprop's, and does training
   still follow `--vanilla_bp`? Run the grading command (which test says so, and by how much?),
   then `python revvit.py --epochs 2 --drop_path_rate 0.1` and the same with `--vanilla_bp` (the
   tiny default has no drop path, so nothing to replay) and compare
   loss_last in metrics.json. You should see the gradient test fail: reversible and vanilla
   gradients now differ by 3.1 (relative norm, drop path 0.5, depth 4) instead of < 1e-12, and the
   one-block test's rebuilt X1, X2 are wrong; training no longer follows vanilla backprop, quietly
   (measured with OMP_NUM_THREADS=1, 2 epochs: loss_last 1.8017 for both reversible and --vanilla_bp with the replay,
   1.7869 without it; accuracy 0.238 -> 0.260): nothing crashes, which is why a test must say so.
   Grade: `python -m pytest tests/test_revvit.py -k "seed_replay"`
"""
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.nn.functional import cross_entropy, scaled_dot_product_attention

import common as C

# ============================================================ the ordinary building blocks


class Mlp(nn.Module):
    """fc1 (D -> 4D) -> GELU -> fc2 (4D -> D)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (SlowFast SEPARATE_QKV: True)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)  # (B, h, N, D/h)
        k = self.k(x).reshape(B, N, h, D // h).transpose(1, 2)  # (B, h, N, D/h)
        v = self.v(x).reshape(B, N, h, D // h).transpose(1, 2)  # (B, h, N, D/h)
        x = scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/h)) v, (B, h, N, D/h)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class AttentionSubBlock(nn.Module):
    """F = LayerNorm + attention (no residual: the reversible block adds it)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)

    def forward(self, x):
        return self.attn(self.norm(x))


class MLPSubblock(nn.Module):
    """G = LayerNorm + MLP (no residual: the reversible block adds it)."""

    def __init__(self, dim, mlp_ratio=4.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        return self.mlp(self.norm(x))


def drop_path(x, p, generator):
    """Stochastic depth: zero the branch x (B, N, D) for a random fraction p of the samples and scale
    the kept ones by 1 / (1 - p). The mask is drawn from `generator`, so it can be drawn again."""
    keep = 1.0 - p
    u = torch.rand(x.shape[0], 1, 1, generator=generator, device=x.device)  # (B, 1, 1), float32 always
    return x * (u < keep).to(x.dtype) / keep


def new_seed():
    """A seed for one block's drop-path mask, drawn from the global generator (reproducible)."""
    return int(torch.randint(0, 2 ** 62, ()).item())


# ============================================================ the paper's idea: reversible blocks
#
#   forward                                  inverse, used by the backward pass
#   Y1 = X1 + F(X2)                          X2 = Y2 - G(Y1)
#   Y2 = X2 + G(Y1)                          X1 = Y1 - F(X2)
#
# The backward pass never needs the stored X1, X2: it rebuilds them from Y1, Y2 and recomputes
# F(X2) and G(Y1) on the way, with the same drop-path masks (same seeds) as the forward pass.
#
# Reading map (Sec. 3 of the paper; SlowFast reversible_mvit.py, minREV rev.py), one training step:
#   1. duplicate the tokens into two streams, X1 = X2 = x, side by side (B, N, 2D)  (RevViT.blocks)
#   2. every block, with no graph kept: draw one drop-path seed, Y1 = X1 + F(X2), then
#      Y2 = X2 + G(Y1), one mask per sample shared by F and G          (ReversibleBlock.forward)
#   3. keep only the LAST block's outputs (Y1, Y2): activation memory flat in depth
#                                                                      (RevBackProp.forward)
#   4. backward, last block first, with the block's seed replayed: recompute G(Y1) with a graph,
#      X2 = Y2 - G(Y1), dX1 = dY1 + (dG/dY1)^T dY2                (ReversibleBlock.backward_pass)
#   5. recompute F(X2) with a graph, X1 = Y1 - F(X2), dX2 = dY2 + (dF/dX2)^T dX1; drop both graphs
#   6. the block's inputs and their gradients are the next block's outputs: walk down, collect
#      the parameter gradients in parameter order, hand them to autograd  (RevBackProp.backward)
#   The inverse alone, no gradients: X2 = Y2 - G(Y1), X1 = Y1 - F(X2)    (ReversibleBlock.inverse)


class ReversibleBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.F = AttentionSubBlock(dim, num_heads, qkv_bias)
        self.G = MLPSubblock(dim, mlp_ratio)
        self.drop_path_rate = drop_path_rate
        self.seed = None  # drawn at every training forward, replayed by inverse() and backward_pass()
        self.replay_seeds = True  # False only to see what goes wrong without the replay (tests)

    def dropped(self, branch, seed):
        """DropPath on a branch output; one seed gives one mask, shared by F and G (as SlowFast)."""
        if not self.training or self.drop_path_rate == 0.0:
            return branch
        return drop_path(branch, self.drop_path_rate, torch.Generator(device=branch.device).manual_seed(seed))

    def forward(self, X1, X2):  # (B, N, D) each
        self.seed = new_seed()
        Y1 = X1 + self.dropped(self.F(X2), self.seed)  # step 2: Y1 = X1 + F(X2)
        Y2 = X2 + self.dropped(self.G(Y1), self.seed)  # step 2: Y2 = X2 + G(Y1)
        return Y1, Y2

    @torch.no_grad()
    def inverse(self, Y1, Y2):
        """The block's inputs from its outputs (for the last forward's seed)."""
        X2 = Y2 - self.dropped(self.G(Y1), self.seed)  # X2 = Y2 - G(Y1)
        X1 = Y1 - self.dropped(self.F(X2), self.seed)  # X1 = Y1 - F(X2)
        return X1, X2

    def backward_pass(self, Y1, Y2, dY1, dY2):
        """Given the block's outputs Y1, Y2 and the loss gradients dY1, dY2 w.r.t. them, returns the
        inputs X1, X2, the gradients dX1, dX2 w.r.t. the inputs, and the gradients of this block's
        parameters (in self.parameters() order: F's, then G's).
        Chain rule through Y1 = X1 + F(X2), Y2 = X2 + G(Y1):
            dX1 = dY1 + (dG/dY1)^T dY2         (Y1 reaches the loss directly and through G)
            dX2 = dY2 + (dF/dX2)^T dX1         (X2 reaches the loss directly and through F)"""
        seed = self.seed if self.replay_seeds else new_seed()
        # step 4: recompute G(Y1) with a graph, backprop dY2 through it: G's grads and (dG/dY1)^T dY2
        with torch.enable_grad():
            Y1 = Y1.detach().requires_grad_(True)
            g = self.dropped(self.G(Y1), seed)  # G(Y1)
            dY1_via_G, *dG = grads_of(g, [Y1, *self.G.parameters()], dY2)
        with torch.no_grad():
            X2 = Y2 - g  # X2 = Y2 - G(Y1)
            dX1 = dY1 + dY1_via_G  # dX1 = dY1 + (dG/dY1)^T dY2
        del g
        # step 5: recompute F(X2) with a graph, backprop dX1 through it: F's grads and (dF/dX2)^T dX1
        with torch.enable_grad():
            X2 = X2.detach().requires_grad_(True)
            f = self.dropped(self.F(X2), seed)  # F(X2)
            dX2_via_F, *dF = grads_of(f, [X2, *self.F.parameters()], dX1)
        with torch.no_grad():
            X1 = Y1.detach() - f  # X1 = Y1 - F(X2)
            dX2 = dY2 + dX2_via_F  # dX2 = dY2 + (dF/dX2)^T dX1
        return X1, X2.detach(), dX1, dX2, dF + dG


def grads_of(output, inputs, grad_output):
    """torch.autograd.grad of `output` (weighted by grad_output) w.r.t. those `inputs` that require
    grad; None for the others (frozen parameters)."""
    need = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(output, need, grad_output))
    return [next(got) if t.requires_grad else None for t in inputs]


class RevBackProp(torch.autograd.Function):
    """Runs a stack of reversible blocks without keeping their activations, and backpropagates
    through it by reconstructing them block by block in reverse.
    apply(x, blocks, *params): x (B, N, 2D) = cat(X1, X2); params = blocks.parameters(), passed in
    so that autograd (and DDP) receive their gradients as this node's output."""

    @staticmethod
    def forward(ctx, x, blocks, *params):  # runs with grad disabled: no graph is built
        X1, X2 = x.detach().chunk(2, dim=-1)  # (B, N, D) each
        for blk in blocks:
            X1, X2 = blk(X1, X2)
        Y = torch.cat([X1, X2], dim=-1)  # (B, N, 2D)
        ctx.save_for_backward(Y)  # step 3: the ONLY activation kept: the last block's outputs
        ctx.blocks = blocks
        dev = x.device.type  # the recomputation must run in the forward's precision
        ctx.amp = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        return Y

    @staticmethod
    def backward(ctx, dY):  # (B, N, 2D)
        (Y,) = ctx.saved_tensors
        Y1, Y2 = Y.detach().chunk(2, dim=-1)  # (B, N, D) each
        dY1, dY2 = dY.chunk(2, dim=-1)  # (B, N, D) each
        param_grads = []
        dev, dtype, enabled = ctx.amp
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for blk in reversed(ctx.blocks):
                Y1, Y2, dY1, dY2, grads = blk.backward_pass(Y1, Y2, dY1, dY2)  # step 6: now its inputs
                param_grads = grads + param_grads
        return torch.cat([dY1, dY2], dim=-1), None, *param_grads


# ============================================================ the full model and its presets


class RevViT(nn.Module):
    """patch embedding + abs. position -> duplicate into two streams -> reversible blocks ->
    LayerNorm over 2D -> mean over tokens -> linear. Attribute names follow SlowFast's MViT with
    MVIT.REV.ENABLE, so its Rev-ViT checkpoints (`model_state`) load key for key."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.2, patch_kernel=None):
        super().__init__()
        self.patch_embed = nn.Module()  # plain containers: they exist for SlowFast's parameter names
        k = patch_kernel or patch_size  # SlowFast PATCH_KERNEL; PATCH_STRIDE = patch_size, PATCH_PADDING (k - p) / 2
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, k, stride=patch_size, padding=(k - patch_size) // 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.rev_backbone = nn.Module()
        self.rev_backbone.layers = nn.ModuleList(
            ReversibleBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(2 * embed_dim, eps=1e-6)
        self.head = nn.Module()
        self.head.projection = nn.Linear(2 * embed_dim, num_classes)
        self.no_custom_backward = False  # True: plain autograd through the same blocks (--vanilla_bp)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def blocks(self, x):  # (B, N, D) -> (B, N, 2D)
        x = torch.cat([x, x], dim=-1)  # step 1: X1 = X2 = x, (B, N, 2D)
        layers = self.rev_backbone.layers
        if self.training and not self.no_custom_backward:
            return RevBackProp.apply(x, layers, *layers.parameters())
        X1, X2 = x.chunk(2, dim=-1)  # vanilla: autograd stores every block's activations
        for blk in layers:
            X1, X2 = blk(X1, X2)
        return torch.cat([X1, X2], dim=-1)  # (B, N, 2D)

    def forward(self, img):  # (B, 3, H, W) -> logits (B, classes)
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + self.pos_embed  # (B, N, D)
        x = self.blocks(x)  # (B, N, 2D) = cat(Y1, Y2) of the last block
        x = self.norm(x).mean(1)  # LN over 2D, then "concat" fusion (identity) and mean, (B, 2D)
        return self.head.projection(x)  # (B, classes)


def init_weights(m):
    """SlowFast MViT._init_weights: trunc-normal(0.02) weights; Linear and LayerNorm biases 0.02."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.weight, 1.0)
        nn.init.constant_(m.bias, 0.02)


PRESETS = {
    # ours: 32x32 images, 8x8 = 64 tokens, 0.21M parameters
    "tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0, num_classes=6,
                 patch_kernel=8),  # overlapping 8x8 windows at stride 4 (docstring)
    # Rev-ViT-S (SlowFast configs/ImageNet/REV_VIT_S.yaml): 22M params, 4.6 GFLOPs, 79.9% IN-1K
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
                  num_classes=1000),
    # Rev-ViT-B (configs/ImageNet/REV_VIT_B.yaml): 87M params, 17.6 GFLOPs, 81.8% IN-1K
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.2,
                 num_classes=1000),
}


def create_model(name="tiny", **overrides):
    if name not in PRESETS:
        C.die(f"unknown --model {name!r}; choose one of {', '.join(PRESETS)}")
    return RevViT(**{**PRESETS[name], **overrides})


# ============================================================ the loss


def loss_fn(model, batch, smoothing=0.0):
    images, labels = batch  # (B, 3, S, S), (B,)
    return cross_entropy(model(images), labels, label_smoothing=smoothing)


def make_loss_fn(args):
    """The function handed to C.fit: cross-entropy with the run's label smoothing (--smoothing)."""
    return lambda model, batch: loss_fn(model, batch, args.smoothing)


# ============================================================ data glue


def load_data(args):
    sizes = dict(n_train=64, n_val=16) if args.smoke else {}  # the smoke test needs one small batch
    train_ds, val_ds, classes = C.image_data(args, **sizes)
    if not classes:
        C.die(f"{args.data}: revvit.py trains a classifier and needs class folders (DIR/<class>/*.jpg); "
              f"found a flat folder of images (or only one class)")
    return train_ds, val_ds, classes


def load_weights(model, path, run):
    """Our checkpoint.pt or an official SlowFast .pyth (weights under `model_state`). A head of
    another number of classes (e.g. the 1000 ImageNet classes) is dropped and kept freshly made."""
    state = C.unwrap_state(C.load_checkpoint(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        C.die(f"{path}: does not hold a state dict of tensors")
    C.load_state(model, state, path, new_head="head.", run=run)
    C.log(run, f"loaded {len(state)} tensors from {path}")


# ============================================================ train, evaluate, bench, smoke


def evaluate(model, loader, run):
    """Held-out top-1 accuracy (counts summed over the ranks under torchrun) and the first 12
    (image, prediction, label) for the picture."""
    model.eval()
    return C.top1(model, loader, run, keep=12)


def bench(args, run):
    """The paper's claim, training memory: the peak memory of one whole training step (forward,
    backward and the AdamW step; C.peak_memory: the CUDA allocator's peak on a GPU, every tensor
    storage made and not yet freed on a CPU), reversible vs vanilla backprop, at depth 6, 12 and 24,
    beside the bytes autograd stores for backward (C.saved_bytes: the part that grows with depth)
    and the step time (C.time_ab, interleaved).
    On a GPU: the paper's Rev-ViT-B (width 768, 12 heads, patch 16) at 224 px, batch --batch_size.
    On a CPU, the documented fallback (a ViT-B step at depth 24 takes many seconds there): the
    --model preset (tiny: width 64, patch 4) at --input_size, same batch."""
    cuda = run.device.type == "cuda"
    name = "base" if cuda and args.model == "tiny" else args.model
    S = PRESETS[name]["img_size"] if name != args.model else args.input_size
    B = args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(B, 3, S, S, generator=g).to(run.device)
    y = torch.randint(0, 6, (B,), generator=g).to(run.device)
    C.log(run, f"bench: Rev-ViT {name} (width {PRESETS[name]['embed_dim']}, patch {PRESETS[name]['patch_size']}), "
               f"batch {B}, {S}x{S} images, {run.device}{', ' + args.precision if run.amp_dtype else ''}"
               f"{'' if cuda else ' (CPU fallback: the tiny model)' if name == 'tiny' else ''}; "
               f"one training step = forward + backward + AdamW step")
    C.log(run, f"{'depth':>5} {'rev peak MB':>12} {'van peak MB':>12} {'peak ratio':>11} {'rev saved MB':>13} "
               f"{'van saved MB':>13} {'rev s/step':>11} {'van s/step':>11}")
    rows = []
    for depth in (6, 12, 24):
        torch.manual_seed(args.seed)
        model = create_model(name, depth=depth, img_size=S, num_classes=6).to(run.device).train()
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)  # any lr: only the memory and the time are measured

        def step():  # forward + backward + optimizer step; the gradients are made inside
            with C.autocast(run):
                loss = loss_fn(model, (x, y))
            loss.backward()
            opt.step()

        r = {}
        for mode in ("rev", "van"):
            model.no_custom_backward = mode == "van"
            model.zero_grad(set_to_none=True)
            step()  # warm-up: AdamW's moments exist from here on, held like the weights
            model.zero_grad(set_to_none=True)
            r[mode + "_peak"], _ = C.peak_memory(step, run)
            with C.autocast(run):
                r[mode + "_saved"], _ = C.saved_bytes(lambda: loss_fn(model, (x, y)), params)

        def timed(vanilla):
            def fn():
                model.no_custom_backward = vanilla
                model.zero_grad(set_to_none=True)
                step()
            return fn

        times = C.time_ab({"rev": timed(False), "van": timed(True)}, run, rounds=3, warmup=1)
        ratio = r["van_peak"] / r["rev_peak"]
        rows.append((depth, ratio, r, times))
        C.log(run, f"{depth:>5} {r['rev_peak'] / 2 ** 20:>12.1f} {r['van_peak'] / 2 ** 20:>12.1f} {ratio:>10.1f}x "
                   f"{r['rev_saved'] / 2 ** 20:>13.2f} {r['van_saved'] / 2 ** 20:>13.2f} "
                   f"{times['rev']:>11.3f} {times['van']:>11.3f}")
        del model, opt
    if not cuda:
        C.log(run, "(CPU: times on a shared machine are rough; the peak counts tensor storages, "
                   "as a GPU's allocator would)")
    depth, ratio, r, times = rows[-1]
    C.log(run, f"bench: at depth {depth} a reversible training step peaks at {r['rev_peak'] / 2 ** 20:.1f} MB vs "
               f"{r['van_peak'] / 2 ** 20:.1f} MB with vanilla backprop, {ratio:.1f}x less (depth {rows[0][0]}: "
               f"{rows[0][1]:.1f}x), for {times['rev'] / times['van']:.2f}x the step time; paper (abstract): "
               f"\"up to 15.5x\" less memory at the same FLOPs, parameters and accuracy, its largest Rev-ViT")
    return ratio


def memory_picture_row(depths=(2, 4, 8, 16)):
    """One cell per depth: bars of the peak memory of forward + backward, reversible (blue) vs
    vanilla (orange), for the tiny model and a batch of 8 images of 32x32 on the CPU (an
    illustration, whatever the trained model); texts under the cells."""
    x = torch.randn(8, 3, 32, 32)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    counts = []
    for d in depths:
        m = create_model("tiny", depth=d).train()
        pair = []
        for vanilla in (False, True):
            m.no_custom_backward = vanilla
            m.zero_grad(set_to_none=True)
            pair.append(C.peak_memory(lambda: m(x).sum().backward(), cpu)[0])
        counts.append(pair)
    top = max(v for pair in counts for v in pair)
    S = 32
    cells, texts = [], []
    for d, (rev, van) in zip(depths, counts):
        cell = torch.ones(3, S, S)
        for k, (v, colour) in enumerate(((rev, (0.2, 0.35, 0.95)), (van, (0.98, 0.55, 0.08)))):
            h = max(1, round(v / top * (S - 2)))
            cell[:, S - h:, 6 + k * 12:6 + k * 12 + 8] = torch.tensor(colour)[:, None, None]
        cells.append(cell)
        texts.append(f"depth {d}\nrev {rev / 2 ** 20:.2f}MB\nvan {van / 2 ** 20:.2f}MB")
    return torch.stack(cells), texts


def build(args, classes):
    """The model for this run: the preset at --input_size for the data's classes, --drop_path_rate,
    --vanilla_bp."""
    overrides = dict(img_size=args.input_size, num_classes=len(classes))
    if args.drop_path_rate is not None:
        overrides["drop_path_rate"] = args.drop_path_rate
    model = create_model(args.model, **overrides)
    model.no_custom_backward = args.vanilla_bp
    return model


def smoke(args, run):
    """A few steps on one small batch: the loss is finite and falls (exit status 1 otherwise)."""
    train_ds, _, classes = load_data(args)
    model = build(args, classes)
    if args.weights:
        load_weights(model, args.weights, run)
    images, labels = next(iter(C.make_loader(train_ds, args, run, train=True, batch_size=8)))
    return C.smoke(model, loss_fn, (images, labels), run, steps=20)


def train(args, run):
    """Train, evaluate (held-out top-1 before and after), save the picture and metrics.json."""
    train_ds, val_ds, classes = load_data(args)
    model = build(args, classes)
    C.check_resume(model, args)  # a --resume of another size: refused now, before the evaluation at init
    if args.weights:
        load_weights(model, args.weights, run)
    n_params = sum(p.numel() for p in model.parameters())
    C.log(run, f"Rev-ViT {args.model}: {n_params / 1e6:.2f}M parameters, depth {len(model.rev_backbone.layers)}, "
               f"{'vanilla' if args.vanilla_bp else 'reversible'} backprop, {len(train_ds)} train / {len(val_ds)} val images")
    val_loader = C.make_loader(val_ds, args, run, train=False)
    acc_init, _ = evaluate(model.to(run.device), val_loader, run)
    model, history = C.fit(model, make_loss_fn(args), C.make_loader(train_ds, args, run, train=True), args, run)
    acc, shown = evaluate(model, val_loader, run)
    C.log(run, f"held-out top-1 accuracy {acc:.3f} (before training {acc_init:.3f}, chance {1 / len(classes):.3f})")
    if run.is_main:
        name = lambda i: str(classes[i])[:10]
        images = torch.stack([im for im, _, _ in shown])
        bars, bar_texts = memory_picture_row()
        path = C.save_grid(Path(args.out) / "revvit.png", [C.denormalize(images), bars],
                           [[f"{name(p)}\n{'ok' if p == l else 'true: ' + name(l)}" for _, p, l in shown], bar_texts])
        C.log(run, f"saved {path}: held-out predictions; peak memory of forward + backward, reversible (blue) "
                   f"vs vanilla (orange)")
    C.write_metrics(args, run, history, acc=acc, acc_init=acc_init,
                    backprop="vanilla" if args.vanilla_bp else "reversible")


# ============================================================ command line


def main(argv=None):
    parser = C.make_parser("revvit", __doc__, presets=PRESETS, epochs=12, batch_size=16, lr=1e-3,
                           weight_decay=0.05, warmup_epochs=1, input_size=32)
    parser.add_argument("--drop_path_rate", type=float, default=None, help="default: the preset's")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--vanilla_bp", action="store_true",
                        help="plain autograd through the same reversible blocks (stores every activation)")
    args = parser.parse_args(argv)
    run = C.init_run(args, patch_size=PRESETS[args.model]["patch_size"])
    if args.smoke:
        return smoke(args, run)
    if args.bench:
        return bench(args, run)
    return train(args, run)

if __name__ == "__main__":
    main()
