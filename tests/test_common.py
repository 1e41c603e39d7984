"""The shared plumbing on real files: folders of images and videos, COCO, captions, transforms, the
schedule, checkpoints, exact resume, and a 2-process torchrun run on the CPU."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C

ROOT = Path(__file__).resolve().parents[1]


def write_image(path, mode="RGB", size=(40, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    img.save(path, format=fmt)
    return path


def write_video(path, frames=12, size=(48, 32)):
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for t in range(frames):
            arr = np.full((size[1], size[0], 3), 20 * t % 255, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def args_for(data, **kw):
    base = dict(data=str(data) if data else None, input_size=16, batch_size=4, num_workers=0, seed=0)
    return SimpleNamespace(**{**base, **kw})


# ------------------------------------------------------------------ synthetic data


def test_shapes_are_deterministic_and_consistent():
    a, b = C.shapes_images(20, 32, seed=3), C.shapes_images(20, 32, seed=3)
    assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    assert not torch.equal(a["images"], C.shapes_images(20, 32, seed=4)["images"])
    for lab, boxes, bl, cap in zip(a["labels"], a["boxes"], a["box_labels"], a["captions"]):
        assert bl[-1] == lab                                              # the main shape is the label ...
        assert cap.split(" at ")[0].endswith(C.CLASSES[lab])              # ... and the caption's first words
        assert ((boxes >= 0) & (boxes <= 32)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        assert area[-1] == area.max()                                     # the main shape is the largest
    assert len(set(C.shapes_images(300, 32, 0)["labels"].tolist())) == len(C.CLASSES)



def test_paint_samples_only_the_shapes_square_and_changes_nothing_else():
    # paint supersamples a window around the shape; the obvious way samples the whole canvas
    def paint_whole(canvas, kind, colour, cx, cy, r, ss):
        s = canvas.shape[0]
        yy, xx = (np.mgrid[0:s * ss, 0:s * ss] + 0.5) / ss
        m = C._shape_mask(kind, cx, cy, r, yy, xx)
        cover = m.reshape(s, ss, s, ss).mean((1, 3))[..., None]
        canvas[:] = canvas * (1 - cover) + cover * np.array(colour) / 255
        ys, xs = np.nonzero(m)
        return [xs.min() / ss, ys.min() / ss, (xs.max() + 1) / ss, (ys.max() + 1) / ss]

    rng = np.random.default_rng(0)
    for kind in C.CLASSES:
        for cx, cy, r in ((16.3, 15.7, 9.9), (3.2, 28.9, 3.1), (9.99, 10.0, 9.99), (30.5, 1.4, 2.6), (0.5, 0.5, 6.0)):
            bg = rng.uniform(0, 1, (32, 32, 3))
            a, b = bg.copy(), bg.copy()
            box_a = C.paint(a, kind, (200, 40, 90), cx, cy, r, 2)
            box_b = paint_whole(b, kind, (200, 40, 90), cx, cy, r, 2)
            assert np.array_equal(a, b) and box_a == box_b, (kind, cx, cy, r)

def test_video_label_is_the_direction_of_motion():
    d = C.shapes_videos(24, frames=8, size=32, seed=0)
    assert d["videos"].shape == (24, 8, 3, 32, 32)
    for clip, label in zip(d["videos"].float(), d["labels"]):
        change = (clip[1:] - clip[:-1]).abs().sum(1)                      # (T-1, H, W): where the shape moved
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        w = change.flatten(1) / change.flatten(1).sum(1, keepdim=True)
        cx, cy = (w * xx.flatten()).sum(1), (w * yy.flatten()).sum(1)     # centre of the change per step
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        expect = {"right": dx > 2, "left": dx < -2, "down": dy > 2, "up": dy < -2}
        assert expect[C.DIRECTIONS[label]], (C.DIRECTIONS[label], dx, dy)


# ------------------------------------------------------------------ folders of real files


def test_class_folder_with_mixed_files_and_a_corrupt_one(tmp_path, capsys):
    for c in ("cat", "dog"):
        for k in range(5):
            write_image(tmp_path / c / f"{k}.png")
        write_image(tmp_path / c / "grey.jpg", mode="L")
        write_image(tmp_path / c / "alpha.png", mode="RGBA")
        write_image(tmp_path / c / "pal.png", mode="P")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    train, val, classes = C.scan_folder(tmp_path, C.IMAGE_EXTS)
    assert classes == ["cat", "dog"]
    assert len(train) + len(val) == 17 and {l for _, l in val} == {0, 1}   # listed, not opened
    files = [p for p, _ in train + val]
    ds = C.ImageDataset(files, [l for _, l in train + val], 16, train=False)
    broken = files.index(str(tmp_path / "dog" / "broken.jpg"))
    img, label = ds[broken]                                               # read: skipped, the next one served
    assert "skipped (1 so far)" in capsys.readouterr().out and ds.bad == {broken}
    assert torch.equal(img, ds[(broken + 1) % len(ds)][0])
    tr, va, cl = C.image_data(args_for(tmp_path))
    img, label = tr[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label in (0, 1)
    grey = C.read_image(tmp_path / "cat" / "grey.jpg")
    assert grey.shape == (3, 30, 40) and torch.equal(grey[0], grey[1])   # grey -> RGB


def test_flat_folder_and_train_val_layout(tmp_path):
    for k in range(6):
        write_image(tmp_path / "flat" / "sub" / f"{k}.jpg", fmt="JPEG")
    write_image(tmp_path / "flat" / "top.bmp")
    train, val, classes = C.scan_folder(tmp_path / "flat", C.IMAGE_EXTS)
    assert classes == [] and all(l == -1 for _, l in train + val) and len(train + val) == 7
    for split in ("train", "val"):
        for c in ("a", "b"):
            write_image(tmp_path / "tv" / split / c / "x.png")
    train, val, classes = C.scan_folder(tmp_path / "tv", C.IMAGE_EXTS)
    assert classes == ["a", "b"] and len(train) == 2 and len(val) == 2 and "val" in str(val[0][0])


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*nowhere: no such folder"):
        C.scan_folder(tmp_path / "nowhere", C.IMAGE_EXTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no files with extension"):
        C.scan_folder(tmp_path / "empty", C.IMAGE_EXTS)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"\x89PNG broken")
    train, _, _ = C.scan_folder(tmp_path / "junk", C.IMAGE_EXTS)          # listing opens nothing ...
    with pytest.raises(SystemExit, match="none of the 1 files could be read .*a.png: not a readable image"):
        C.ImageDataset([p for p, _ in train], [-1], 16, train=False)[0]   # ... reading says so


def test_videos_decode_and_short_videos_loop(tmp_path):
    write_video(tmp_path / "left" / "a.mp4", frames=12)
    write_video(tmp_path / "right" / "b.mp4", frames=3)                  # shorter than a clip
    (tmp_path / "right" / "c.mp4").write_bytes(b"garbage")
    v = C.read_video(tmp_path / "left" / "a.mp4")
    assert v.shape == (12, 3, 32, 48) and v.dtype == torch.uint8
    assert C.read_video(tmp_path / "left" / "a.mp4", short_side=16).shape[-2:] == (16, 24)
    train, val, classes = C.scan_folder(tmp_path, C.VIDEO_EXTS)
    assert classes == ["left", "right"] and sorted(Path(p).name for p, _ in train + val) == ["a.mp4", "b.mp4", "c.mp4"]
    files = [tmp_path / "left" / "a.mp4", tmp_path / "right" / "b.mp4", tmp_path / "right" / "c.mp4"]
    ds = C.VideoDataset(files, [0, 1, 1], num_frames=4, sampling_rate=2, size=16, train=True, repeat_aug=2)
    clips, labels = ds[1]
    assert clips.shape == (2, 4, 3, 16, 16) and labels.tolist() == [1, 1]
    ev = C.VideoDataset(files, [0, 1, 1], num_frames=4, sampling_rate=2, size=16, train=False)
    grey = [C.read_video(files[1], short_side=20)[t, 0, 8, 8].item() for t in (0, 2, 1, 0)]  # b looped: 0 2 1 0
    assert torch.allclose(C.denormalize(ev[1][0])[:, 0, 8, 8] * 255, torch.tensor(grey, dtype=torch.float), atol=2)
    _, label = ev[2]                                                      # c is garbage: skipped to a
    assert label == 0 and 2 in ev.bad
    with pytest.raises(C.DataError, match="c.mp4: not a readable video"):
        C.read_video(tmp_path / "right" / "c.mp4")


def test_synthetic_video_data_item():
    tr, va, classes = C.video_data(args_for(None, input_size=32), num_frames=4, sampling_rate=2, n_train=4, n_val=2)
    clip, label = va[0]
    assert clip.shape == (4, 3, 32, 32) and classes == list(C.DIRECTIONS)


def test_evaluation_loader_reads_training_data_without_augmentation():
    # a probe on the training images must see the same inputs before and after training: an
    # evaluation loader (train=False) reads a training dataset as the held-out one is read
    run = SimpleNamespace(distributed=False, world_size=1, device=torch.device("cpu"))
    args = args_for(None, input_size=32, batch_size=8, eval_max=12)
    tr, va, _ = C.image_data(args, n_train=24, n_val=4)
    assert tr.train and not va.train
    plain = C.ImageDataset(tr.source, tr.labels, 32, train=False)   # the same images, read for evaluation
    keep = C.eval_subset(plain, 12).indices
    want = torch.stack([plain[i][0] for i in keep])
    for _ in range(2):  # twice: nothing drawn (random flips / crops would differ)
        got = torch.cat([x for x, _ in C.make_loader(tr, args, run, train=False)])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert tr.train  # the training loader still augments
    sub = C.make_loader(C.eval_subset(tr, 5), args, run, train=False).dataset   # a Subset keeps its items
    assert not sub.dataset.train and sub.indices == C.eval_subset(plain, 5).indices
    vt, _, _ = C.video_data(args_for(None, input_size=32), num_frames=4, repeat_aug=2, n_train=4, n_val=2)
    clips, _ = next(iter(C.make_loader(vt, args_for(None, input_size=32), run, train=False)))
    assert clips.shape == (4, 4, 3, 32, 32)  # one centred clip per video, not --repeat_aug of them
    assert vt.repeat == 2 and vt.train


def test_coco_and_captions(tmp_path):
    for k in range(3):
        write_image(tmp_path / f"im{k}.jpg", size=(64, 32), fmt="JPEG")
    js = {"images": [{"id": 7 + k, "file_name": f"im{k}.jpg", "width": 64, "height": 32} for k in range(3)],
          "annotations": [{"id": 1, "image_id": 7, "bbox": [8, 4, 16, 8], "category_id": 5}],
          "categories": [{"id": 5, "name": "box"}, {"id": 9, "name": "never"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(js))
    records, cats = C.load_coco(tmp_path)
    assert cats == ["box", "never"] and records[0]["boxes"].tolist() == [[8, 4, 24, 12]]
    assert records[1]["boxes"].shape == (0, 4)                            # an image with no boxes
    ds = C.DetectionDataset([r["file"] for r in records], records, 16, train=False)
    img, target = ds[0]
    assert img.shape == (3, 16, 16) and target["boxes"].tolist() == [[2, 2, 6, 6]]
    assert target["orig_size"].tolist() == [32, 64] and target["image_id"] == 7
    (tmp_path / "annotations.json").write_text('{"images": [], "annotations": [{"bbox": 3}]')
    with pytest.raises(SystemExit, match="annotations.json: malformed COCO"):
        C.load_coco(tmp_path)
    (tmp_path / "im0.txt").write_text("a red   box\n", encoding="utf-8")
    (tmp_path / "im1.txt").write_text("  ")
    assert C.load_captions(tmp_path) == [(tmp_path / "im0.jpg", "a red box")]


# ------------------------------------------------------------------ transforms


def test_crop_is_the_same_for_every_frame():
    base = torch.rand(3, 40, 50) * 100
    clip = torch.stack([base + 10 * t for t in range(4)])                 # frame t = frame 0 + 10 t
    torch.manual_seed(0)
    out = C.random_resized_crop(clip, 16)
    assert out.shape == (4, 3, 16, 16)
    for t in range(4):
        assert torch.allclose(out[t] - out[0], torch.full_like(out[0], 10.0 * t), atol=1e-3)
    assert C.resize_center_crop(torch.zeros(3, 20, 60, dtype=torch.uint8), 10).shape == (3, 10, 10)
    x = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(C.denormalize(C.normalize(x)), x.float() / 255, atol=1e-6)


# ------------------------------------------------------------------ schedule, groups, checkpoints


def test_warmup_then_cosine():
    a = SimpleNamespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert C.lr_at(a, 0) == 0 and C.lr_at(a, 1) == 0.5 and C.lr_at(a, 2) == 1.0
    assert math.isclose(C.lr_at(a, 6), 0.1 + 0.9 * 0.5) and math.isclose(C.lr_at(a, 10), 0.1)


def test_param_groups_skip_decay_for_biases_and_norms():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = C.param_groups(m, 0.05, lr_scale=lambda n: 0.5 if n.startswith("0") else 1.0)
    by = {(g["weight_decay"], g["lr_scale"]): len(g["params"]) for g in groups}
    assert by == {(0.05, 0.5): 1, (0.0, 0.5): 1, (0.0, 1.0): 2}


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    C.save_checkpoint(path, {"x": torch.ones(2)})

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        C.save_checkpoint(path, {"x": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(C.load_checkpoint(path)["x"], torch.ones(2))       # the old checkpoint survived
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(SystemExit, match="bad.pt: cannot be read as a PyTorch checkpoint"):
        C.load_checkpoint(tmp_path / "bad.pt")


def test_load_state_names_the_keys(tmp_path):
    m = torch.nn.Linear(3, 2)
    with pytest.raises(SystemExit, match=r"f.pt: does not fit this model: missing bias; unexpected extra"):
        C.load_state(m, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "f.pt")
    with pytest.raises(SystemExit, match=r"wrong shape weight \(3, 3\) vs \(2, 3\)"):
        C.load_state(m, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "f.pt")


def _toy_run(out, epochs, resume=None):
    args = C.make_parser("toy", "", epochs=2, lr=1e-2, input_size=16, batch_size=32).parse_args(
        ["--out", str(out), "--epochs", str(epochs)] + (["--resume", str(resume)] if resume else []))
    run = C.init_run(args)
    train, _, _ = C.image_data(args, n_train=96, n_val=8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(3 * 16 * 16, 6))
    return C.fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), C.make_loader(train, args, run, True), args, run)


def test_resume_continues_exactly(tmp_path):
    full, h_full = _toy_run(tmp_path / "a", 2)
    _toy_run(tmp_path / "b", 1)
    resumed, h_res = _toy_run(tmp_path / "b", 2, resume=tmp_path / "b" / "checkpoint.pt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert h_full["losses"] == h_res["losses"] and h_res["epoch"] == 2


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    args = C.make_parser("toy", "", epochs=1).parse_args(["--out", str(tmp_path)])
    run = C.init_run(args)
    loader = [(torch.ones(2, 3),)] * 3
    with pytest.raises(SystemExit, match="the loss became nan at epoch 1, step 0"):
        C.fit(torch.nn.Linear(3, 1), lambda m, b: m(b[0]).sum() * float("nan"), loader, args, run)


def test_probe_and_knn():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    X = torch.randn(300, 8, generator=g) + 4 * F.one_hot(y, 8).float()
    assert C.linear_probe(X[:200], y[:200], X[200:], y[200:], steps=200) > 0.95
    assert C.knn_accuracy(X[:200], y[:200], X[200:], y[200:]) > 0.95
    noise = torch.randn(300, 8, generator=g)
    assert C.knn_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


def test_grid_picture(tmp_path):
    path = C.save_grid(tmp_path / "g.png", [torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8)], texts=[["a", "b\nc"]])
    w, h = Image.open(path).size
    assert w == 4 + 3 * (96 + 4) and h > 4 + 2 * (96 + 4)


def test_flops_count_attention_on_cpu():
    q = torch.randn(2, 4, 16, 8)
    assert C.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * 2 * 4 * 16 * 16 * 8)


# ------------------------------------------------------------------ torchrun, 2 processes, gloo


def test_torchrun_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.nn.functional as F, torch.distributed as dist
        sys.path.insert(0, {str(ROOT)!r})
        import common as C
        args = C.make_parser("ddp", "", epochs=1, lr=1e-2, input_size=8, batch_size=16).parse_args(["--out", {str(tmp_path)!r}])
        run = C.init_run(args)
        train, _, _ = C.image_data(args, n_train=64, n_val=4)
        loader = C.make_loader(train, args, run, True)
        assert run.distributed and run.world_size == 2 and len(loader) == 2   # each rank sees half
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
        model, h = C.fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), loader, args, run)
        w = model[1].weight.detach().clone()
        other = [torch.zeros_like(w) for _ in range(2)]
        dist.all_gather(other, w)
        assert torch.equal(other[0], other[1])                            # DDP kept the replicas equal
        ds = torch.utils.data.TensorDataset(torch.arange(10.).reshape(5, 2), torch.arange(5))
        done = []
        f = lambda x: done.append(len(x)) or x * 2
        X, y = C.extract_features(f, C.make_loader(ds, args, run, False, batch_size=2, whole=True), run, shared=True)
        assert torch.equal(X, torch.arange(10.).reshape(5, 2) * 2) and torch.equal(y, torch.arange(5))
        assert sum(done) == (3, 2)[run.rank]                              # each rank extracted its share
        open({str(tmp_path)!r} + f"/rank{{run.rank}}.ok", "w").write(str(h["steps"]))
        dist.destroy_process_group()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.ok").read_text() for r in (0, 1)] == ["2", "2"]
    assert (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------------------ issue 18: robust plumbing


def test_every_image_mode_at_its_scale(tmp_path):
    grey = np.linspace(10, 240, 24 * 16).reshape(16, 24).astype(np.uint8)   # the expected 8-bit picture
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")           # I;16: 0..65535
    Image.fromarray(grey.astype(np.int32) * 257, "I").save(tmp_path / "g32.tif")        # I with 16-bit values
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "f.tif")        # F in [0, 1]
    Image.fromarray(grey, "L").convert("LA").save(tmp_path / "la.png")
    for name in ("g16.png", "g32.tif", "f.tif", "la.png"):
        img = C.read_image(tmp_path / name)
        assert img.shape == (3, 16, 24) and (img.int() - torch.from_numpy(grey).int()).abs().max() <= 1, name
    rgb = np.zeros((8, 8, 3), np.uint8); rgb[..., 0] = 200; rgb[:4, :, 2] = 90
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert (C.read_image(tmp_path / "c.jpg").permute(1, 2, 0).int() - torch.from_numpy(rgb).int()).abs().max() <= 6
    pal = Image.fromarray(rgb).convert("P")
    pal.save(tmp_path / "p.png", transparency=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # no "palette with transparency" warning
        img = C.read_image(tmp_path / "p.png")
    assert torch.equal(img, torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1))


def test_captions_in_utf16_and_latin1(tmp_path, capsys):
    for k, (text, enc) in enumerate([("un café", "utf-16"), ("un café", "utf-8-sig"), ("un café", "latin-1"),
                                     ("un café", "utf-8")]):
        write_image(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_bytes(text.encode(enc))
    assert [c for _, c in C.load_captions(tmp_path)] == ["un café"] * 4
    assert "1 caption file(s) are neither UTF-8" in capsys.readouterr().out


def test_flags_are_checked_up_front(tmp_path, capsys):
    p = C.make_parser("toy", "", presets=("tiny", "base"))
    p.add_argument("--mask_ratio", type=float, default=0.75)
    ok = ["--out", str(tmp_path / "o")]
    for argv, words in ((["--batch_size", "0"], "--batch_size 0: must be a positive"), (["--lr", "-1"], "--lr -1.0"),
                        (["--lr", "nan"], "--lr nan"), (["--epochs", "-1"], "--epochs -1: must be >= 0"),
                        (["--mask_ratio", "1"], "--mask_ratio 1.0: must be in [0, 1)"),
                        (["--input_size", "30"], "--input_size 30: must be a multiple of the patch size 4"),
                        (["--weights", str(tmp_path / "no.pt")], "no.pt: no such file"),
                        (["--out", str(tmp_path / "f" / "x")], "cannot be written")):
        (tmp_path / "f").write_text("a file, not a folder")
        with pytest.raises(SystemExit, match=re_escape(words)):
            C.init_run(p.parse_args(ok + argv), patch_size=4)
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert "(default: 64)" in p.format_help() and "{tiny,base}" in p.format_help()
    C.init_run(p.parse_args(ok + ["--precision", "fp16"]))
    assert "fp16 on a CPU" in capsys.readouterr().out


def re_escape(s):
    import re
    return re.escape(s)


def test_checkpoint_files_of_any_shape(tmp_path):
    m = torch.nn.Linear(3, 2)
    (tmp_path / "zero.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    torch.save({"model": m.state_dict()}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:100])
    for name, words in (("zero.pt", "zero.pt: the file is empty"), ("cut.pt", "cut.pt: cannot be read")):
        with pytest.raises(SystemExit, match=words):
            C.load_checkpoint(tmp_path / name)
    with pytest.raises(SystemExit, match=r"tensor.pt: holds a bare tensor of shape \(3,\)"):
        C.unwrap_state(C.load_checkpoint(tmp_path / "tensor.pt"))
    with pytest.raises(SystemExit, match="other.pt: not a training checkpoint .*a dict of weights"):
        C.load_checkpoint(tmp_path / "other.pt", need=C.TRAINING)
    with pytest.raises(SystemExit, match="f.pt: does not fit this model: it holds a dict of x"):
        C.load_state(m, {"x": 3}, "f.pt")
    assert C.unwrap_state(C.load_checkpoint(tmp_path / "whole.pt")).keys() == m.state_dict().keys()


def test_resume_is_checked_against_the_model(tmp_path):
    _toy_run(tmp_path / "a", 1)
    ckpt = tmp_path / "a" / "checkpoint.pt"
    args = C.make_parser("toy", "").parse_args(["--resume", str(ckpt), "--out", str(tmp_path / "a")])
    C.check_args(args)                                                    # the file itself is fine
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(3 * 16 * 16, 6))
    assert C.check_resume(model, args)["history"]["epoch"] == 1
    with pytest.raises(SystemExit, match=r"checkpoint.pt: does not fit this model \(written with --model tiny.*"
                                         r"wrong shape 2.weight \(6, 768\) vs \(5, 768\)"):
        C.check_resume(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(768, 5)), args)
    args.script = "other"
    with pytest.raises(SystemExit, match="checkpoint.pt: written by toy.py, not other.py"):
        C.check_args(args)


def test_two_writers_never_share_a_temporary_file(tmp_path, monkeypatch, capsys):
    names, real = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: names.append(str(f)) or real(obj, f))
    for k in range(3):
        C.save_checkpoint(tmp_path / "checkpoint.pt", {"k": k})
    assert len(set(names)) == 3 and all(n.endswith(".tmp") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]    # no temporary file left
    args = C.make_parser("toy", "").parse_args(["--out", str(tmp_path)])
    C.init_run(args)
    assert "holds an earlier run's checkpoint" in capsys.readouterr().out


def test_derived_runs_get_their_own_out(tmp_path):
    args = C.make_parser("mae", "").parse_args(["--weights", "runs/mae/checkpoint.pt"])
    assert C.derived_out(args, "finetune") == "runs/mae_finetune"
    args = C.make_parser("mae", "").parse_args(["--weights", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds .*checkpoint.pt, the checkpoint this run starts from"):
        C.derived_out(args, "finetune")


def test_one_batch_epochs_learn_and_ctrl_c_says_how_to_resume(tmp_path, monkeypatch):
    args = C.make_parser("toy", "", epochs=3, lr=0.1).parse_args(["--out", str(tmp_path), "--warmup_epochs", "1"])
    run = C.init_run(args)
    seen = []
    model = torch.nn.Linear(3, 1)
    w0 = model.weight.detach().clone()
    loss = lambda m, b: seen.append(m.weight.detach().clone()) or (m(b[0]) - 1).pow(2).mean()
    C.fit(model, loss, [(torch.randn(4, 3),)], args, run)
    assert not torch.equal(seen[1], w0)                                   # the first step moved the weights
    assert C.lr_at(args, 0.5) > 0
    lr_at, calls = C.lr_at, []
    monkeypatch.setattr(C, "lr_at", lambda a, e: calls.append(e) or (_ for _ in ()).throw(KeyboardInterrupt)
                        if e >= 1 else lr_at(a, e))
    args = C.make_parser("toy", "", epochs=3).parse_args(["--out", str(tmp_path / "b"), "--seed", "3"])
    with pytest.raises(SystemExit, match=r"interrupted \(Ctrl-C\) during epoch 2: .*b/checkpoint.pt holds epoch 1; "
                                         r"to continue: python toy.py --out .*/b --seed 3 --resume .*b/checkpoint.pt"):
        C.fit(torch.nn.Linear(3, 1), loss, [(torch.randn(4, 3),)] * 2, args, C.init_run(args))


def test_a_constant_batch_is_reported(tmp_path, capsys):
    args = C.make_parser("toy", "", epochs=1).parse_args(["--out", str(tmp_path)])
    C.fit(torch.nn.Linear(3, 1), lambda m, b: m(b[0]).pow(2).mean(), [(torch.full((4, 3), 0.5),)], args, C.init_run(args))
    assert "the first training batch is constant (every value 0.5)" in capsys.readouterr().out


def test_small_data_helpers(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.rand(3, 3, 8, 8), torch.arange(3))
    imgs, labels = C.first_items(ds, 8)                                   # 3, not 8
    assert imgs.shape == (3, 3, 8, 8) and labels.tolist() == [0, 1, 2] and C.first_items(ds, 0) == []
    path = C.save_grid(tmp_path / "g.png", [imgs, imgs[:0], imgs[:1]], texts=[["a", "b", "c"], [], ["d"]])
    assert Image.open(path).size[1] < 4 + 3 * (96 + 4) and C.save_grid(tmp_path / "h.png", [imgs[:0]]) is None
    X, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    assert 0 <= C.knn_accuracy(X, y, X, y, k=20) <= 1                    # k > 5 training items
    args = SimpleNamespace(data="D", batch_size=64)
    with pytest.raises(SystemExit, match="D: 3 training and 0 held-out items"):
        C.check_enough(ds, [], args)
    with pytest.raises(SystemExit, match="D: 1 class"):
        C.check_enough(ds, ds, args, ["a"], need_classes=True)


def test_linear_probe_is_seeded_by_its_own_seed_not_the_global_state():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 8, generator=g), torch.randint(0, 3, (120,), generator=g)
    W = torch.randn(8, 3, generator=g)
    y = (X @ W).argmax(1)  # a learnable labelling, so the head's init matters for 20 steps
    figures = []
    for global_seed in (1, 2, 3):
        torch.manual_seed(global_seed)
        figures.append(C.linear_probe(X[:80], y[:80], X[80:], y[80:], steps=3, lr=1e-3, seed=0))
    assert len(set(figures)) == 1, figures
