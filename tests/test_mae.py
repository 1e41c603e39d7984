"""MAE's mechanism: patch order, masking, un-shuffling, sin-cos table, loss, official names and counts."""
import json
import math

import pytest
import torch

import common as C
import mae


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mae.create_model("tiny")


def test_patchify_roundtrip_and_patch_order():
    x = torch.randn(2, 3, 32, 32)
    p = 4
    t = mae.patchify(x, p)
    assert t.shape == (2, 64, 48)
    assert torch.equal(mae.unpatchify(t, p), x)
    # token i*W+j is patch (row i, column j), flattened with the channel fastest, then column, then row
    i, j = 2, 5
    patch = x[1, :, i * p:(i + 1) * p, j * p:(j + 1) * p]                # (c, p, q)
    assert torch.equal(t[1, i * 8 + j], patch.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("L,ratio", [(196, 0.75), (64, 0.75), (50, 0.9), (49, 0.5)])
def test_masking_keeps_floor_of_visible_tokens(L, ratio):
    x = torch.randn(4, L, 8)
    kept, mask, ids_restore = mae.random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert kept.shape == (4, keep, 8)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == L - keep).all()
    # the kept tokens are exactly the tokens whose mask is 0, in the order the noise sorted them
    for n in range(4):
        visible = x[n][mask[n] == 0]
        assert torch.equal(kept[n].sort(0).values, visible.sort(0).values)


def test_ids_restore_unshuffles():
    x = torch.randn(3, 20, 5)
    noise = torch.rand(3, 20)
    kept, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    ids_shuffle = torch.argsort(noise, 1)
    removed = torch.gather(x, 1, ids_shuffle[:, kept.shape[1]:, None].expand(-1, -1, 5))
    shuffled = torch.cat([kept, removed], 1)                              # what the decoder builds
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, 5)), x)


def test_sincos_table_against_independent_formula():
    D, g = 16, 4
    table = mae.sincos_pos_embed(D, g, cls_token=True)
    assert table.shape == (1 + g * g, D)
    assert torch.equal(table[0], torch.zeros(D))                          # the cls row is zero
    for i in range(g):
        for j in range(g):
            ref = []
            for pos in (j, i):                                            # first half: column; second: row
                w = [1 / 10000 ** (k / (D / 4)) for k in range(D // 4)]
                ref += [math.sin(pos * wk) for wk in w] + [math.cos(pos * wk) for wk in w]
            assert torch.allclose(table[1 + i * g + j], torch.tensor(ref), atol=1e-6)
    # patch (0, 0): sines are 0, cosines are 1
    assert torch.equal(table[1, :D // 4], torch.zeros(D // 4)) and torch.equal(table[1, D // 4:D // 2], torch.ones(D // 4))


def test_loss_ignores_predictions_on_visible_patches(tiny):
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    _, pred, mask = tiny(imgs, 0.75, noise)
    pred = pred.detach().requires_grad_(True)
    loss = tiny.forward_loss(imgs, pred, mask)
    loss.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()
    changed = pred.detach().clone()
    changed[mask == 0] += 100.0                                           # change only visible predictions
    assert torch.equal(tiny.forward_loss(imgs, changed, mask), loss.detach())


def test_loss_is_mean_over_removed_patches(tiny):
    imgs = torch.randn(2, 3, 32, 32)
    _, pred, mask = tiny(imgs, 0.75)
    err = ((pred - mae.patchify(imgs, 4)) ** 2).mean(-1)
    assert torch.allclose(tiny.forward_loss(imgs, pred, mask), err[mask == 1].mean())


def test_norm_pix_targets_are_standardized_per_patch():
    model = mae.create_model("tiny", norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32) * 5 + 3
    target = mae.patchify(imgs, 4)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normed = (target - mean) / (var + 1e-6) ** 0.5
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(normed.var(-1), torch.ones(2, 64), atol=1e-3)  # unbiased variance, as the official
    mask = torch.ones(2, 64)
    assert torch.allclose(model.forward_loss(imgs, normed, mask), torch.tensor(0.0), atol=1e-10)


def test_encoder_sees_only_visible_tokens_and_decoder_predicts_all(tiny):
    imgs = torch.randn(3, 3, 32, 32)
    latent, mask, ids = tiny.forward_encoder(imgs, 0.75)
    assert latent.shape == (3, 1 + 16, 192)
    assert tiny.forward_decoder(latent, ids).shape == (3, 64, 48)


def test_visible_patches_do_not_change_with_hidden_content(tiny):
    """The encoder output depends on the visible patches only (no leak from the hidden ones)."""
    imgs = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 64)
    a, mask, _ = tiny.forward_encoder(imgs, 0.75, noise)
    hidden = mae.unpatchify(mask[:, :, None].expand(-1, -1, 48), 4)       # 1 on hidden pixels
    b, _, _ = tiny.forward_encoder(imgs + 10 * hidden * torch.randn_like(imgs), 0.75, noise)
    assert torch.allclose(a, b, atol=1e-5)


def test_official_names_shapes_and_counts_for_base():
    with torch.device("meta"):
        model = mae.create_model("base")
    sd = model.state_dict()
    D, P = 768, 16 * 16 * 3
    expect = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
              "blocks.11.attn.qkv.weight": (3 * D, D), "blocks.0.mlp.fc1.weight": (4 * D, D), "norm.weight": (D,),
              "decoder_embed.weight": (512, D), "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 197, 512),
              "decoder_blocks.7.attn.proj.weight": (512, 512), "decoder_norm.bias": (512,), "decoder_pred.weight": (P, 512)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    # cls, pos, patch w/b; 12 blocks x 12; norm; decoder_embed; mask_token; decoder_pos; 8 x 12; decoder norm, pred
    assert len(sd) == 4 + 12 * 12 + 2 + 2 + 1 + 1 + 8 * 12 + 2 + 2     # every tensor of models_mae.py, no more
    trainable = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for n, p in model.named_parameters()
                  if p.requires_grad and not n.startswith(("decoder", "mask_token")))
    assert round(total / 1e6, 2) == 111.66 and round(encoder / 1e6, 2) == 85.65
    assert round((total - encoder) / 1e6, 2) == 26.01
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert trainable("pos_embed") == 0


def test_official_init(tiny):
    assert torch.allclose(tiny.pos_embed[0], mae.sincos_pos_embed(192, 8, True))
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in tiny.modules() if isinstance(m, torch.nn.Linear))
    w = tiny.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))                      # xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_encoder_only_checkpoint_loads_with_just_the_decoder_missing(tmp_path, tiny):
    enc = {k: v for k, v in tiny.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    C.save_checkpoint(tmp_path / "enc.pth", {"model": enc})
    other = mae.create_model("tiny")
    mae.load_pretrained(other, tmp_path / "enc.pth")
    assert torch.equal(other.blocks[3].mlp.fc2.weight, tiny.blocks[3].mlp.fc2.weight)
    bad = dict(enc); bad.pop("norm.weight")
    C.save_checkpoint(tmp_path / "bad.pth", {"model": bad})
    with pytest.raises(SystemExit, match="missing norm.weight"):
        mae.load_pretrained(other, tmp_path / "bad.pth")


def test_layer_decay_ids():
    assert mae.layer_id("cls_token", 12) == 0 and mae.layer_id("patch_embed.proj.weight", 12) == 0
    assert mae.layer_id("blocks.0.norm1.weight", 12) == 1 and mae.layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert mae.layer_id("head.weight", 12) == 13 and mae.layer_id("fc_norm.bias", 12) == 13


def test_norm_pix_picture_uses_no_hidden_statistics():
    imgs = torch.randn(1, 3, 16, 16)
    mask = (torch.rand(1, 16) > 0.5).float()
    mask[0, 0] = 0
    pred = torch.randn(1, 16, 48)
    a = mae.visible_stat_denorm(pred, imgs, mask, 4)
    hidden = mae.unpatchify(mask[:, :, None].expand(-1, -1, 48), 4)
    b = mae.visible_stat_denorm(pred, imgs + 50 * hidden, mask, 4)       # change only hidden pixels
    assert torch.allclose(a, b)


def test_smoke_and_a_short_run(tmp_path):
    mae.main(["--smoke"])
    out = tmp_path / "run"
    mae.main(["--epochs", "1", "--out", str(out), "--n_train", "256", "--n_val", "64"])
    m = json.loads((out / "metrics.json").read_text())
    for k in ("val_loss", "val_loss_init", "probe_acc", "probe_acc_init", "knn_acc", "knn_acc_init", "loss_first", "loss_last"):
        assert k in m
    assert m["val_loss"] < m["val_loss_init"]
    assert (out / "reconstructions.png").exists() and (out / "checkpoint.pt").exists()
