"""The fuzz test of issue 18: every script, given bad input as a new user would (odd flag values, broken
checkpoint files, unreadable data, tiny data, Ctrl-C), ends with one line naming the flag or file and
the problem, or runs correctly; never a traceback. Each case runs the script's main([...]) in-process
on files made here, with a few tiny steps."""
import hashlib
import importlib
import json
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

import common as C

SCRIPTS = ("mae", "videomae", "mvit", "memvit", "vitdet", "tome", "revvit", "flip", "diffmae")
DATA = dict(mae="images", videomae="videos", mvit="images", memvit="videos", vitdet="coco", tome="images",
            revvit="images", flip="captions", diffmae="images")
QUICK = dict(  # a few tiny steps on the tiny folders
    mae=["--batch_size", "4", "--input_size", "16"],
    videomae=["--batch_size", "2", "--input_size", "16", "--num_frames", "4", "--sampling_rate", "1", "--repeat_aug", "1"],
    mvit=["--batch_size", "4", "--input_size", "32"],
    memvit=["--batch_size", "2", "--num_clips", "2", "--sampling_rate", "1"],
    vitdet=["--batch_size", "2", "--input_size", "32"],
    tome=["--batch_size", "4", "--input_size", "16", "--r_eval", "0,1"],
    revvit=["--batch_size", "4", "--input_size", "16"],
    flip=["--batch_size", "4", "--input_size", "16"],
    diffmae=["--batch_size", "4", "--input_size", "16", "--eval_images", "4", "--sample_steps", "2", "--T", "10"])
PATCH = dict(mae=4, videomae=8, vitdet=8, tome=4, revvit=4, flip=4, diffmae=4)  # scripts with a ViT patch
MASKED = ("mae", "videomae", "flip", "diffmae")                                # scripts with --mask_ratio


# ------------------------------------------------------------------ files made for the purpose

def image(path, k, mode="RGB", size=24):
    rng = np.random.default_rng(k)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (250, 30, 30) if k % 2 else (30, 30, 250)
    im = Image.fromarray(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        im = im.convert("P")
        im.info["transparency"] = 0
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, **({"transparency": 0} if mode == "P" else {}))
    return path


def video(path, k, frames=20, size=24):
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for t in range(frames):
            arr = np.full((size, size, 3), 40, dtype=np.uint8)
            x = (t if k % 2 else frames - t) % (size - 6)
            arr[8:14, x:x + 6] = 240
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


MODES = ("RGB", "L", "I;16", "RGBA", "P", "CMYK", "LA")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    for c in ("cat", "dog"):
        for k in range(6):
            mode = MODES[k % len(MODES)]
            ext = "jpg" if mode in ("L", "CMYK") else "png"
            image(root / "images" / c / f"{c}{k}.{ext}", k + (c == "dog"), mode)
            (root / "broken_images" / c).mkdir(parents=True, exist_ok=True)
            (root / "broken_images" / c / f"{k}.png").write_bytes(b"")
            video(root / "videos" / c / f"{c}{k}.mp4", k + (c == "dog"))
            (root / "broken_videos" / c).mkdir(parents=True, exist_ok=True)
            (root / "broken_videos" / c / f"{k}.mp4").write_bytes(b"")
        for k in range(12):                                               # 24 pairs, as the issue's
            for name in ("captions", "broken_captions"):
                p = root / name / c / f"{k}.jpg"
                image(p, k, "RGB") if name == "captions" else (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(b""))
                enc = "utf-16" if k == 3 else "latin-1" if k == 5 else "utf-8"
                p.with_suffix(".txt").write_bytes(f"a {'red' if c == 'cat' else 'blue'} square, café".encode(enc))
    for name in ("coco", "broken_coco"):
        d = root / name
        d.mkdir()
        imgs, anns = [], []
        for k in range(10):
            (image(d / f"{k}.png", k, size=32) if name == "coco" else (d / f"{k}.png").write_bytes(b""))
            imgs.append(dict(id=k, file_name=f"{k}.png", width=32, height=32))
            anns.append(dict(id=k, image_id=k, bbox=[8, 8, 16, 16], category_id=1 + k % 2))
        (d / "annotations.json").write_text(json.dumps(dict(images=imgs, annotations=anns, categories=[
            dict(id=1, name="blue"), dict(id=2, name="red")])))
    files = root / "files"
    files.mkdir()
    (files / "empty.pt").write_bytes(b"")
    torch.save({"weights": {"w": torch.zeros(2)}, "epoch": 3}, files / "other_program.pt")
    torch.save(torch.zeros(3, 4), files / "tensor.pt")
    torch.save({"model": {"w": torch.zeros(2)}}, files / "whole.pt")
    (files / "truncated.pt").write_bytes((files / "whole.pt").read_bytes()[:60])
    torch.save({"model": {"pos_embed": torch.zeros(1, 5, 7), "blocks.0.norm1.weight": torch.zeros(3)}},
               files / "other_size.pt")
    for s in SCRIPTS:
        torch.save(dict(model={"pos_embed": torch.zeros(1, 5, 7)}, optimizer={}, scaler={},
                        history=dict(losses=[], steps=0, seconds=0.0, epoch=1), args=dict(script=s, model="huge")),
                   files / f"{s}_huge.pt")
    torch.save(dict(model={"w": torch.zeros(2)}, optimizer={}, scaler={}, history={}, args=dict(script="otherscript")),
               files / "otherscript.pt")
    (files / "a_file").write_text("not a folder")
    return root


def run_main(script, argv, capsys):
    """(exit message or None, captured output): the script's main in-process; a traceback fails the test."""
    mod = importlib.import_module(script)
    try:
        mod.main(argv)
        code = None
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # anything but a clean exit is the bug this test looks for
        pytest.fail(f"{script}.py {' '.join(argv)}: a traceback instead of a message:\n"
                    + "".join(traceback.format_exception(e))[-3000:])
    out = capsys.readouterr()
    text = out.out + out.err
    if code == 2:  # argparse: usage, then "error: ..."
        return out.err.strip().splitlines()[-1], text
    return (None if code in (None, 0) else str(code)), text


def expect_message(script, argv, capsys, *words):
    msg, text = run_main(script, argv, capsys)
    assert msg is not None, f"{script}.py {' '.join(argv)}: no error at all\n{text[-1500:]}"
    assert "\n" not in msg.strip() and "Traceback" not in text, msg
    for w in words:
        assert w in msg, f"{script}.py: {w!r} not in the message {msg!r}"
    return msg


def base(script, folders, tmp_path, data=True):
    argv = ["--epochs", "1", "--out", str(tmp_path / "out"), "--num_workers", "0"] + QUICK[script]
    return argv + (["--data", str(folders / DATA[script])] if data else [])


# ------------------------------------------------------------------ flags

@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--lr", "-1"), ("--epochs", "-2")])
def test_nonsense_flag_values(script, flag, value, folders, tmp_path, capsys):
    expect_message(script, base(script, folders, tmp_path) + [flag, value], capsys, flag)


@pytest.mark.parametrize("script", sorted(PATCH))
def test_input_size_the_patch_does_not_divide(script, folders, tmp_path, capsys):
    size = str(PATCH[script] * 4 + 2)
    expect_message(script, base(script, folders, tmp_path) + ["--input_size", size], capsys, "--input_size", size)


@pytest.mark.parametrize("script", MASKED)
def test_mask_ratio_one(script, folders, tmp_path, capsys):
    expect_message(script, base(script, folders, tmp_path) + ["--mask_ratio", "1.0"], capsys, "--mask_ratio")


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_that_cannot_be_written(script, folders, tmp_path, capsys):
    argv = base(script, folders, tmp_path) + ["--out", str(folders / "files" / "a_file" / "run")]
    expect_message(script, argv, capsys, "--out", "a_file")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_defaults_and_model_choices(script, capsys):
    msg, text = run_main(script, ["--help"], capsys)
    assert msg is None and "(default: " in text and "--batch_size" in text
    presets = importlib.import_module(script).PRESETS
    assert "{" + ",".join(presets) + "}" in text, "--model choices not listed"


# ------------------------------------------------------------------ checkpoint and weights files

CKPT_CASES = [("--resume", "empty.pt", "empty"), ("--weights", "empty.pt", "empty"),
              ("--resume", "other_program.pt", "not a training checkpoint"),
              ("--resume", "tensor.pt", "bare tensor"), ("--weights", "tensor.pt", "bare tensor"),
              ("--weights", "truncated.pt", "cannot be read"), ("--resume", "truncated.pt", "cannot be read"),
              ("--resume", "otherscript.pt", "otherscript.py"), ("--weights", "other_size.pt", ""),
              ("--resume", "missing.pt", "no such file")]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag,name,problem", CKPT_CASES)
def test_checkpoint_files_of_any_shape(script, flag, name, problem, folders, tmp_path, capsys):
    path = str(folders / "files" / name)
    expect_message(script, base(script, folders, tmp_path) + [flag, path], capsys, name, problem)


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_another_size_is_refused_before_any_evaluation(script, folders, tmp_path, capsys, monkeypatch):
    calls = []  # every script's model runs nn.Linear layers (a name imported into a script is not seen)
    linear = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.append(1) or linear(self, x))
    path = str(folders / "files" / f"{script}_huge.pt")
    expect_message(script, base(script, folders, tmp_path) + ["--resume", path], capsys, f"{script}_huge.pt")
    assert not calls, f"{script}.py ran the model {len(calls)} time(s) before checking --resume"


# ------------------------------------------------------------------ data

@pytest.mark.parametrize("script", SCRIPTS)
def test_unreadable_data_with_workers(script, folders, tmp_path, capsys):
    argv = base(script, folders, tmp_path, data=False) + ["--data", str(folders / ("broken_" + DATA[script])),
                                                          "--num_workers", "1"]
    expect_message(script, argv, capsys, "could be read")


@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_data_runs_to_the_end(script, folders, tmp_path, capsys):
    msg, text = run_main(script, base(script, folders, tmp_path), capsys)
    assert msg is None, msg
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["script"] == script and m["steps"] >= 1 and "constant" not in text
    assert m["loss_first"] is not None and np.isfinite(m["loss_last"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_says_where_the_last_epoch_is(script, folders, tmp_path, capsys, monkeypatch):
    lr_at = C.lr_at

    def interrupted(args, epoch):
        if epoch >= 1:                                                    # in the second epoch
            raise KeyboardInterrupt
        return lr_at(args, epoch)

    monkeypatch.setattr(C, "lr_at", interrupted)
    argv = base(script, folders, tmp_path) + ["--epochs", "2"]
    msg = expect_message(script, argv, capsys, "interrupted", "epoch 1", "--resume")
    assert str(tmp_path / "out" / "checkpoint.pt") in msg
    assert C.load_checkpoint(tmp_path / "out" / "checkpoint.pt")["history"]["epoch"] == 1


def test_finetune_never_overwrites_the_checkpoint_it_starts_from(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                           # the default --out is relative
    quick = ["--epochs", "1", "--num_workers", "0", "--data", str(folders / "images")] + QUICK["mae"]
    assert run_main("mae", quick, capsys)[0] is None                      # pre-training into runs/mae
    ckpt = tmp_path / "runs" / "mae" / "checkpoint.pt"
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    msg, text = run_main("mae", quick + ["--finetune", "--weights", "runs/mae/checkpoint.pt"], capsys)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before, "the pre-training checkpoint was overwritten"
