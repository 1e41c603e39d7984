"""Tests for flip.py: each one checks a property of FLIP's mechanism (masking, pooling, temperature,
the contrastive loss, the text tower, the global-batch loss under DDP, the official-weight mapping)."""
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flip  # noqa: E402

SMALL = dict(img_size=16, patch_size=4, width=32, depth=2, heads=2, text_width=32, text_depth=2,
             text_heads=2, embed_dim=16, vocab_size=50, context_length=8)


def small_model(**kw):
    torch.manual_seed(0)
    return flip.create_model("tiny", **{**SMALL, **kw})


def batch(n=4, model=None):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(2, 50, (n, 8), generator=g)


# ------------------------------------------------------------------ masking


@pytest.mark.parametrize("ratio,keep", [(0.5, 98), (0.75, 49), (0.0, 196), (0.9, 19)])
def test_visible_patches_are_int_L_times_1_minus_r(ratio, keep):
    x = torch.randn(3, 196, 8)
    vis, mask, ids_restore = flip.random_masking(x, ratio)
    assert vis.shape == (3, keep, 8)
    assert int(196 * (1 - ratio)) == keep
    assert (mask.sum(1) == 196 - keep).all()  # 1 = removed
    for b in range(3):  # the kept tokens are exactly the unmasked rows, nothing invented
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept.sum(1)).values, torch.sort(vis[b].sum(1)).values)
    assert torch.equal(ids_restore.sort(1).values, torch.arange(196).expand(3, -1))


def test_pooled_image_feature_is_mean_of_cls_and_visible_tokens():
    m = small_model().visual
    imgs = batch()[0]
    g = torch.Generator().manual_seed(5)
    pooled, mask = m(imgs, 0.5, g)
    # slow reference: redo the tower by hand on the patches the mask kept
    x = m.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + m.pos_embed[:, 1:]
    for b in range(len(imgs)):
        t = torch.cat([m.cls_token[0], x[b][mask[b] == 0]])[None]  # (1, 1 + 8, D)
        for blk in m.blocks:
            t = blk(t)
        assert torch.allclose(m.norm(t).mean(1)[0], pooled[b], atol=1e-5)


def test_masking_is_off_in_eval_and_on_in_training():
    model = small_model()
    imgs, tokens = batch()
    model.eval()
    a, b = model(imgs, tokens)[0], model(imgs, tokens)[0]
    assert torch.equal(a, b)  # no randomness: every patch is seen
    assert torch.allclose(a, model.encode_image(imgs, 0.0)[0])
    model.train()
    c, d = model(imgs, tokens)[0], model(imgs, tokens)[0]
    assert not torch.allclose(c, d)  # a new random half of the patches each time


def test_embeddings_have_unit_norm():
    model = small_model().train()
    z_img, z_txt, _ = model(*batch())
    assert torch.allclose(z_img.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(z_txt.norm(dim=1), torch.ones(4), atol=1e-6)


def test_sincos_positions_first_half_encodes_the_column():
    pe = flip.sincos_pos_embed_2d(16, 3, 3)  # (1 + 9, 16)
    assert torch.equal(pe[0], torch.zeros(16))  # the cls slot
    row0 = torch.cat([torch.zeros(4), torch.ones(4)])  # [sin(0), cos(0)] of position 0
    assert torch.allclose(pe[1 + 0 * 3 + 2, 8:], row0)  # row 0, column 2: second half = row 0
    assert torch.allclose(pe[1 + 2 * 3 + 0, :8], row0)  # row 2, column 0: first half = column 0
    assert math.isclose(pe[1 + 0 * 3 + 1, 0].item(), math.sin(1.0), rel_tol=1e-6)  # column 1


def test_fused_qkv_init_matches_official_separate_kernels():
    D = 128
    model = flip.create_model("tiny", width=D, heads=4, depth=1, text_depth=1, vocab_size=10)
    w = model.visual.blocks[0].attn.qkv.weight
    # official: variance_scaling(0.5, "fan_avg", "uniform") on each [D, D] kernel -> var 0.5 / D
    assert abs(w.var().item() / (0.5 / D) - 1) < 0.03
    assert w.abs().max().item() <= math.sqrt(1.5 / D) + 1e-6


# ------------------------------------------------------------------ temperature and loss


def test_logit_scale_init_and_clipping():
    model = small_model()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(model.clipped_logit_scale().exp().item(), 1 / 0.07, rel_tol=1e-5)
    z_img, z_txt = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    for value, grad_is_zero in ((5.0, True), (3.0, False), (-1.0, True)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        model.logit_scale.grad = None
        s = model.clipped_logit_scale()
        assert 0 <= s.item() <= math.log(100) + 1e-6
        flip.flip_loss(z_img, z_txt, s).backward()
        assert (model.logit_scale.grad.abs().item() == 0) == grad_is_zero
        assert model.logit_scale.item() == value  # the parameter itself is never clamped


def slow_infonce(z_img, z_txt, s):  # the official hand-written log-softmax, one row at a time
    N = len(z_img)
    logits = [[math.exp(s) * float(z_img[i] @ z_txt[j]) for j in range(N)] for i in range(N)]
    rows = [-(logits[i][i] - math.log(sum(math.exp(v) for v in logits[i]))) for i in range(N)]
    cols = [-(logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(N)))) for i in range(N)]
    return (sum(rows) / N + sum(cols) / N) / 2


def test_loss_equals_slow_reference_and_is_symmetric():
    torch.manual_seed(0)
    z_img, z_txt = torch.nn.functional.normalize(torch.randn(2, 6, 8, dtype=torch.float64), dim=-1)
    s = torch.tensor([2.3], dtype=torch.float64)
    loss = flip.flip_loss(z_img, z_txt, s).item()
    assert math.isclose(loss, slow_infonce(z_img, z_txt, 2.3), rel_tol=1e-9)
    assert math.isclose(loss, flip.flip_loss(z_txt, z_img, s).item(), rel_tol=1e-12)


def test_loss_is_ln_batch_for_identical_embeddings_and_zero_for_matched_pairs():
    z = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1).expand(16, 8)
    for s in (0.0, 2.0, math.log(100)):
        assert math.isclose(flip.flip_loss(z, z, torch.tensor([s])).item(), math.log(16), rel_tol=1e-5)
    eye = torch.eye(16)  # matched pairs, every other pair orthogonal
    assert flip.flip_loss(eye, eye, torch.tensor([math.log(100)])).item() < 1e-6  # ~15 exp(-100)
    assert flip.flip_loss(eye, eye.roll(1, 0), torch.tensor([math.log(100)])).item() > 50  # mismatched


# ------------------------------------------------------------------ text tower


def test_text_attention_is_not_causal():
    model = small_model().eval()
    tokens = batch()[1]
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50  # only the LAST token changes
    a, b = model.text(tokens), model.text(changed)  # first-token pooled outputs
    assert (a - b).abs().amax(1).min() > 1e-4  # a causal mask would keep them equal


def test_tokenizer_pads_truncates_and_marks_unknown_words():
    tok = flip.Tokenizer.build(["a red circle", "a blue square."], context_length=5)
    ids = tok(["A red, circle", "a green square at the top left"])
    assert ids.shape == (2, 5)
    v = tok.index
    assert ids[0].tolist() == [v["a"], v["red"], 1, v["circle"], 0]  # "," unseen -> [UNK]=1, pad 0
    assert ids[1].tolist() == [v["a"], 1, v["square"], 1, 1]  # truncated to 5
    assert flip.words("一只猫 cat") == ["一", "只", "猫", "cat"]


# ------------------------------------------------------------------ the global batch under DDP


def _ddp_worker(rank, world, port, imgs, tokens, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = small_model(mask_ratio=0.0)
    net = torch.nn.parallel.DistributedDataParallel(model)
    n = len(imgs) // world
    loss = flip.flip_loss(*net(imgs[rank * n:(rank + 1) * n], tokens[rank * n:(rank + 1) * n]))
    loss.backward()  # DDP averages the gradients of the ranks
    torch.save(dict(loss=loss.detach(), grads={k: p.grad for k, p in model.named_parameters() if p.grad is not None}),
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_global_batch_loss_equals_one_process_with_the_whole_batch(tmp_path):
    imgs, tokens = batch(8)
    model = small_model(mask_ratio=0.0)
    loss = flip.flip_loss(*model(imgs, tokens))
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, imgs, tokens, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)  # 8x8 logits, not two 4x4
        for k, p in model.named_parameters():
            if p.grad is not None:
                assert torch.allclose(got["grads"][k], p.grad, atol=1e-6, rtol=1e-4), k


# ------------------------------------------------------------------ official weights


def test_official_parameter_tree_converts_with_jax_semantics():
    model = small_model()
    D, W, p = 32, 32, 4
    rng = np.random.default_rng(0)
    shapes = {"img_encoder/embedding/kernel": (p, p, 3, D), "img_encoder/embedding/bias": (D,),
              "img_encoder/cls": (1, 1, D), "img_encoder/posembed_encoder/pos_embedding": (1, 17, D),
              "txt_encoder/token_embedding/embedding": (50, W),
              "txt_encoder/posembed_encoder/pos_embedding": (1, 8, W),
              "img_mlp1/kernel": (D, 16), "txt_mlp1/kernel": (W, 16), "logit_scale": (1,)}
    for enc, w in (("img_encoder", D), ("txt_encoder", W)):
        for i in range(2):
            b = f"{enc}/Transformer/encoderblock_{i:02d}"
            for ln in ("LayerNorm_0", "LayerNorm_1"):
                shapes[f"{b}/{ln}/scale"] = shapes[f"{b}/{ln}/bias"] = (w,)
            for n in ("query", "key", "value", "out"):
                shapes[f"{b}/MultiHeadDotProductAttention_0/{n}/kernel"] = (w, w)
                shapes[f"{b}/MultiHeadDotProductAttention_0/{n}/bias"] = (w,)
            shapes[f"{b}/MlpBlock_0/Dense_0/kernel"], shapes[f"{b}/MlpBlock_0/Dense_0/bias"] = (w, 4 * w), (4 * w,)
            shapes[f"{b}/MlpBlock_0/Dense_1/kernel"], shapes[f"{b}/MlpBlock_0/Dense_1/bias"] = (4 * w, w), (w,)
        shapes[f"{enc}/Transformer/encoder_norm/scale"] = shapes[f"{enc}/Transformer/encoder_norm/bias"] = (w,)
    tree = {"params/" + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    sd = flip.from_flax(tree, "test")
    sd.pop("visual.pos_embed", None)
    flip.C.load_state(model, sd, "test", allow_missing=("visual.pos_embed",))  # every key matched
    t = {k[len("params/"):]: torch.from_numpy(v) for k, v in tree.items()}
    img = torch.randn(1, 3, 16, 16)
    # JAX conv, NHWC with an HWIO kernel: out[i, j] = sum_{y, x, c} img[c, 4i + y, 4j + x] * k[y, x, c, :]
    patches = img[0].reshape(3, 4, p, 4, p).permute(1, 3, 2, 4, 0)  # (i, j, y, x, c)
    jax_out = torch.einsum("ijyxc,yxcd->ijd", patches, t["img_encoder/embedding/kernel"]) + t["img_encoder/embedding/bias"]
    ours = model.visual.patch_embed.proj(img)[0].permute(1, 2, 0)  # (i, j, D)
    assert torch.allclose(ours, jax_out, atol=1e-4)
    # JAX dense: y = x @ kernel + bias, for query / key / value and the projection head
    x = torch.randn(5, D)
    a = "img_encoder/Transformer/encoderblock_01/MultiHeadDotProductAttention_0"
    qkv = model.visual.blocks[1].attn.qkv(x)
    for k, n in enumerate(("query", "key", "value")):
        assert torch.allclose(qkv[:, k * D:(k + 1) * D], x @ t[f"{a}/{n}/kernel"] + t[f"{a}/{n}/bias"], atol=1e-4)
    assert torch.allclose(model.img_proj(x), x @ t["img_mlp1/kernel"], atol=1e-4)


# ------------------------------------------------------------------ the command line


def test_smoke_and_bad_weights(tmp_path):
    flip.main(["--smoke", "--out", str(tmp_path)])  # raises SystemExit(1) if the loss does not fall
    with pytest.raises(SystemExit, match="error: .*no_such.pt"):
        flip.main(["--weights", str(tmp_path / "no_such.pt"), "--out", str(tmp_path)])
