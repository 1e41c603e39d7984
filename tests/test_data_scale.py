"""common.py at scale, on real files made here: listing thousands of files opens none of them and its
work is linear (counted, not timed); the held-out split is the one the old quadratic code made; a clip
of a long video decodes a few GOPs, not the video (counted frames), also for consecutive clips; files
that cannot seek or are broken; data errors inside DataLoader workers; bounded, seeded evaluations."""
import builtins
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common as C


def make_tree(root, classes, per_class, stray=0):
    for c in range(classes):
        d = root / f"n{c:04d}"
        d.mkdir(parents=True)
        for k in range(per_class + c % 3):                                # uneven classes
            (d / f"img_{(k * 7919) % 10007:05d}.JPEG").touch()           # zero-byte, names not in creation order
    for k in range(stray):
        (root / f"stray{k}.jpg").touch()
    return root


def count_lines(fn):
    """Python line events in common.py while fn() runs: a count of the work done, not a time."""
    n = [0]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == C.__file__:
            if event == "line":
                n[0] += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return n[0], out


def test_listing_opens_no_file_and_is_linear(tmp_path, monkeypatch):
    small, big = make_tree(tmp_path / "small", 20, 50), make_tree(tmp_path / "big", 40, 100)  # 1,020 and 4,040 files
    opened = []
    for mod, name in ((builtins, "open"), (Image, "open"), (Path, "open"), (Path, "read_bytes")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, **k: opened.append(a) or _real(*a, **k))
    work_small, (tr_s, va_s, cl_s) = count_lines(lambda: C.scan_folder(small, C.IMAGE_EXTS))
    work_big, (tr_b, va_b, cl_b) = count_lines(lambda: C.scan_folder(big, C.IMAGE_EXTS))
    monkeypatch.undo()
    assert opened == []                                                    # nothing opened at start-up
    assert len(tr_b) + len(va_b) == sum(100 + c % 3 for c in range(40)) and len(cl_b) == 40
    # 4x the files and 2x the classes: linear work grows ~4x; the old per-class loop grew 8x
    assert 3.5 < work_big / work_small < 4.6, (work_small, work_big)


def test_split_and_order_as_before(tmp_path):
    root = make_tree(tmp_path / "t", 7, 11)
    train, val, classes = C.scan_folder(root, C.IMAGE_EXTS)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in C.IMAGE_EXTS)  # the old listing
    items = [(str(p), classes.index(p.relative_to(root).parts[0])) for p in files]
    held = {id(it) for c in sorted({l for _, l in items}) for it in [x for x in items if x[1] == c][::5]}
    assert train == [it for it in items if id(it) not in held] and val == [it for it in items if id(it) in held]
    assert C.scan_folder(root, C.IMAGE_EXTS) == (train, val, classes)     # the same on every call and rank


def test_stray_files_val_only_classes_and_train_without_val(tmp_path, capsys):
    root = make_tree(tmp_path / "s", 3, 5, stray=2)
    train, val, classes = C.scan_folder(root, C.IMAGE_EXTS)
    out = capsys.readouterr().out
    assert classes == ["n0000", "n0001", "n0002"] and "left out 2 file(s)" in out and "at the top" in out
    assert all(len(Path(p).relative_to(root).parts) == 2 for p, _ in train + val)
    tv = tmp_path / "tv"
    for split, names in (("train", ("a", "b")), ("val", ("a", "b", "zebra"))):
        for c in names:
            (tv / split / c).mkdir(parents=True)
            for k in range(3):
                (tv / split / c / f"{k}.png").touch()
    train, val, classes = C.scan_folder(tv, C.IMAGE_EXTS)
    out = capsys.readouterr().out
    assert classes == ["a", "b"] and len(val) == 6 and {l for _, l in val} == {0, 1}   # zebra not scored
    assert "left out 3 file(s)" in out and "zebra" in out
    import shutil
    shutil.rmtree(tv / "val")
    train, val, _ = C.scan_folder(tv, C.IMAGE_EXTS)                       # train/ alone: held out, said so
    assert "no val/" in capsys.readouterr().out and len(val) == 2 and not set(val) & set(train)


def write_video(path, frames, size=(64, 48), fmt=None, codec="mpeg4", gop=12):
    """Frame t has red = t % 256, green = 60 * (t // 256): every frame is told apart."""
    import av
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt, s.gop_size = size[0], size[1], "yuv420p", gop
        for t in range(frames):
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[..., 0], arr[..., 1] = t % 256, 60 * (t // 256)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


@pytest.mark.parametrize("name", ["long.mp4", "long.mkv", "long.webm"])
def test_a_clip_of_a_long_video_decodes_a_few_gops(tmp_path, name):
    path = write_video(tmp_path / name, 600, codec="libvpx" if name.endswith("webm") else "mpeg4")
    full = C.read_video(path)
    assert len(full) == 600
    with C.VideoReader(path) as r:
        assert r.num_frames == 600 and r.seekable
        clip = r.read(400, 416)
        assert torch.equal(clip, full[400:416]) and r.decoded <= 16 + 2 * 12   # a GOP or two, not 416 frames
        first = r.decoded
        nxt = r.read(416, 432)                                             # the consecutive clip: no new seek
        assert torch.equal(nxt, full[416:432]) and r.decoded - first == 16
        back = r.read(100, 116)                                            # backwards: one more seek
        assert torch.equal(back, full[100:116]) and r.decoded - first - 16 <= 16 + 2 * 12
    assert torch.equal(C.read_video(path, start=590, stop=700), full[590:])  # past the end: what there is


def test_a_video_item_decodes_only_its_span(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", 300)
    readers = []

    class Counting(C.VideoReader):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            readers.append(self)

    monkeypatch.setattr(C, "VideoReader", Counting)
    ds = C.VideoDataset([path], [0], num_frames=4, sampling_rate=2, size=16, train=True, repeat_aug=3)
    torch.manual_seed(0)
    clips, _ = ds[0]
    torch.manual_seed(0)
    starts = ds.starts(300)                                                # the same draws
    assert clips.shape == (3, 4, 3, 16, 16) and len(readers) == 1         # one decode for the 3 clips
    assert readers[0].decoded <= max(starts) - min(starts) + 7 + 2 * 12   # the span that covers them
    full = C.read_video(path, short_side=20)
    torch.manual_seed(0)
    ds.train = False
    ev = C.VideoDataset([path], [0], num_frames=4, sampling_rate=2, size=16, train=False)
    mid = (300 - 7) // 2
    want = C.normalize(C.resize_center_crop(full[mid + torch.arange(4) * 2], 16))
    assert torch.allclose(ev[0][0], want, atol=1e-6)                      # the centred clip, exactly


def test_a_raw_stream_that_cannot_seek_and_a_broken_file(tmp_path):
    raw = write_video(tmp_path / "raw.mp4", 120, fmt="m4v")               # an elementary stream: no timeline
    full = C.read_video(raw)
    with C.VideoReader(raw) as r:
        assert not r.seekable and r.num_frames is None
        assert torch.equal(r.read(60, 70), full[60:70]) and torch.equal(r.read(70, 80), full[70:80])
        assert torch.equal(r.read(10, 20), full[10:20])                   # backwards: from the start again
    good = write_video(tmp_path / "good.mp4", 120)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])            # truncated
    (tmp_path / "empty.mp4").write_bytes(b"")
    for bad in ("cut.mp4", "empty.mp4"):
        with pytest.raises(C.DataError, match=f"{bad}: "):
            C.read_video(tmp_path / bad, start=50, stop=60)
    ds = C.VideoDataset([raw, tmp_path / "cut.mp4"], [0, 1], num_frames=4, sampling_rate=2, size=16, train=False)
    clip, label = ds[1]                                                    # skipped: the raw one served
    assert label == 0 and ds.bad == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_nothing_readable_ends_in_one_line_also_from_workers(tmp_path, workers, capsys):
    for k in range(6):
        (tmp_path / "c" / str(k % 2)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / str(k % 2) / f"{k}.png").write_bytes(b"")
    args = SimpleNamespace(data=str(tmp_path / "c"), input_size=16, batch_size=2, num_workers=workers, eval_max=0)
    run = SimpleNamespace(distributed=False, world_size=1, rank=0, device=torch.device("cpu"))
    train, _, _ = C.image_data(args)
    with pytest.raises(SystemExit) as e:
        list(C.make_loader(train, args, run, train=True))
    msg = str(e.value)
    assert msg.startswith("error: none of the 4 files could be read") and "\n" not in msg and "Traceback" not in msg


def test_evaluation_is_bounded_and_seeded():
    ds = torch.utils.data.TensorDataset(torch.arange(10000))
    args = SimpleNamespace(batch_size=500, num_workers=0, eval_max=300)
    run = SimpleNamespace(distributed=False, world_size=1, rank=0, device=torch.device("cpu"))
    seen = torch.cat([b[0] for b in C.make_loader(ds, args, run, train=False)])
    again = torch.cat([b[0] for b in C.make_loader(ds, args, run, train=False)])
    assert len(seen) == 300 and torch.equal(seen, again) and (seen.diff() > 0).all()   # fixed, in order
    assert seen.max() > 9000 and seen.min() < 1000                        # spread over the set, not its head
    assert len(C.make_loader(ds, args, run, train=True)) == 20            # training sees everything
    args.eval_max = 0
    assert sum(len(b[0]) for b in C.make_loader(ds, args, run, train=False)) == 10000
