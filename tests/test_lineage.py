"""The papers hand weights to each other (DESIGN.md, "Papers that build on each other"): a REAL
checkpoint written by one script's main initializes the next script's model, as in the papers.
- ViTDet starts from MAE's pre-trained encoder: mae.py `tiny` -> vitdet.py `--model mae_tiny --weights`.
- ToMe runs on MAE fine-tuned models: `mae.py --finetune` output -> tome.py `--model mae_tiny --weights`.
- DiffMAE starts from MAE's encoder: mae.py `tiny` -> diffmae.py (see the placeholder at the end).
Each hand-off is checked twice: the other script's main runs on the file (the command a user types),
and its own loader puts every encoder tensor of the file into the model, unchanged."""
import json
from types import SimpleNamespace

import pytest
import torch

import common as C
import mae
import tome
import vitdet

QUICK = ["--epochs", "1", "--n_train", "64", "--n_val", "32", "--batch_size", "16", "--num_workers", "0"]
RUN = SimpleNamespace(is_main=True)  # what the loaders' log lines need of C.init_run's run


@pytest.fixture(scope="module")
def mae_runs(tmp_path_factory):
    """(pre-training checkpoint, fine-tuning checkpoint) of very short real mae.py runs."""
    root = tmp_path_factory.mktemp("lineage")
    mae.main(QUICK + ["--out", str(root / "pretrain")])
    pre = root / "pretrain" / "checkpoint.pt"
    mae.main(QUICK + ["--finetune", "--weights", str(pre), "--out", str(root / "finetune")])
    return pre, root / "finetune" / "checkpoint.pt"


def model_state(path):
    return C.load_checkpoint(path)["model"]


def test_presets_that_pair_up_agree_in_shape():
    enc = {k: mae.PRESETS["tiny"][k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    assert {k: vitdet.PRESETS["mae_tiny"][k] for k in enc} == enc
    assert {k: tome.PRESETS["mae_tiny"][k] for k in enc} == enc
    assert vitdet.PRESETS["mae_tiny"]["pretrain_img_size"] == enc["img_size"]  # pos_embed of MAE's grid
    assert tome.PRESETS["mae_tiny"]["global_pool"]  # mae.py's fine-tuning head: global pool + fc_norm


def test_mae_checkpoint_initializes_the_vitdet_backbone(mae_runs, tmp_path, capsys):
    pre, _ = mae_runs
    state = model_state(pre)
    assert any(k.startswith("decoder") for k in state)  # the whole pre-training model, as mae.py writes it
    # vitdet's own loader: every encoder tensor (patch_embed, pos_embed, blocks) lands in backbone.net unchanged
    model = vitdet.create_model("mae_tiny", num_classes=len(C.CLASSES))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    vitdet.load_weights(model, str(pre), RUN)
    net = model.backbone.net.state_dict()
    encoder = [k for k in state if k.startswith(("patch_embed.", "pos_embed", "blocks."))]
    assert len(encoder) == 2 + 1 + 12 * mae.PRESETS["tiny"]["depth"]
    for k in encoder:
        torch.testing.assert_close(net[k], state[k], rtol=0, atol=0, msg=f"backbone.net.{k} is not the checkpoint's")
    assert all(not torch.equal(net[k], init["backbone.net." + k]) for k in encoder if k.endswith("qkv.weight"))
    # what is not the encoder's is dropped, as in the paper (no class token, no final norm, no decoder)
    dropped = {k for k in state if k not in net}
    assert dropped == {k for k in state if k.startswith(("decoder", "mask_token", "cls_token", "norm."))}
    # and the command of the README, on that file: one short training run from the MAE encoder
    capsys.readouterr()
    vitdet.main(["--model", "mae_tiny", "--weights", str(pre), "--out", str(tmp_path / "det"), "--epochs", "1",
                 "--n_train", "32", "--n_val", "16", "--batch_size", "8", "--num_workers", "0"])
    out = capsys.readouterr().out
    assert f"{len(encoder)} encoder tensors -> backbone.net" in out
    m = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert m["model"] == "mae_tiny" and m["steps"] == 4 and 0 <= m["ap"] <= 1


def test_mae_finetuned_checkpoint_runs_in_tome(mae_runs, tmp_path, capsys):
    _, ft = mae_runs
    state = model_state(ft)
    # tome's own loader, strict: every key of mae.py's fine-tuned classifier, unchanged
    args = SimpleNamespace(drop_path=0.0, r=0, inflect=0.0, no_prop_attn=False)  # tome.py's defaults
    model = tome.model_from_weights(args, "mae_tiny", 32, str(ft)).eval()
    own = model.state_dict()
    assert set(own) == set(state)
    for k in state:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=0, msg=f"{k} is not the checkpoint's")
    # at r = 0 it is mae.py's classifier: the same logits (global pool of the patch tokens, fc_norm, head)
    ref = mae.create_classifier("tiny", len(C.CLASSES)).eval()
    ref.load_state_dict(state)
    x = C.normalize(C.shapes_images(8, 32, seed=3)["images"])
    with torch.no_grad():
        torch.testing.assert_close(model(x, r=0), ref(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, r=12), ref(x), atol=1e-5)  # merging changes the computation
    # and tome.py's command on that file: the off-the-shelf r sweep of the MAE fine-tuned model
    capsys.readouterr()
    tome.main(["--model", "mae_tiny", "--weights", str(ft), "--out", str(tmp_path / "tome"), "--r_eval", "0,12",
               "--eval_max", "64", "--batch_size", "32", "--num_workers", "0"])
    m = json.loads((tmp_path / "tome" / "metrics.json").read_text())
    assert m["model"] == "mae_tiny" and m["epochs"] == 0 and [row["r"] for row in m["tome"]] == [0, 12]
    assert m["tome"][1]["tokens"] == 17 < m["tome"][0]["tokens"] == 65


# ------------------------------------------------------------------ diffmae
# PLACEHOLDER (the coordinator adds it): mae.py `tiny` checkpoint -> diffmae.py's encoder. Hand the
# fixture's pre-training checkpoint (mae_runs[0]) to diffmae.py's loader and main, and assert, as
# above, that every encoder tensor is loaded and equals the checkpoint's.
