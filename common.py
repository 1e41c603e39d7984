"""Shared plumbing for the nine paper scripts: nothing here is model code.

Sections: command line and run set-up / the synthetic "shapes" world / reading files / tensor
transforms / datasets and loaders / optimisation and the shared training loop / checkpoints /
evaluation, pictures and benchmarks. Each script imports this module as `C`.
"""
import argparse, copy, json, math, os, random, shlex, statistics, sys, tempfile, time, weakref
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

# ------------------------------------------------------------------ command line and run set-up

class DataError(Exception):
    """A bad input file; the datasets skip it and count, or `die` with its message."""

def die(msg):
    raise SystemExit(f"error: {msg}")

class Parser(argparse.ArgumentParser):
    def parse_args(self, argv=None, namespace=None):
        args = super().parse_args(argv, namespace)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for the --resume command after a Ctrl-C
        return args

def make_parser(script, doc, presets=None, **defaults):
    """The flags every script shares (DESIGN.md); `defaults` overrides any default; `presets` (the
    size names) become the choices of --model. `--help` shows every default."""
    p = Parser(prog=f"{script}.py", description=(doc or "").strip().split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default=None, help="a folder of your own data (None: the synthetic shapes)")
    a("--out", default=f"runs/{script}", help="where checkpoint.pt, metrics.json and pictures go")
    a("--model", default="tiny", choices=list(presets) if presets else None, help="size preset")
    a("--epochs", type=int, default=10, help="training epochs")
    a("--batch_size", type=int, default=64, help="per process")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min_lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    a("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    a("--warmup_epochs", type=float, default=1, help="linear warmup (fractional epochs)")
    a("--input_size", type=int, default=32, help="image side in pixels")
    a("--num_workers", type=int, default=None, help="default: 0 on synthetic data, else up to 8")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, default=0)
    a("--resume", default=None, metavar="PATH", help="continue a run from its checkpoint.pt")
    a("--weights", default=None, metavar="PATH", help="initial weights (ours or the official file)")
    a("--clip_grad", type=float, default=None, help="gradient-norm clipping")
    a("--eval_max", type=int, default=2000, help="evaluations (held-out figures, probe / kNN features) use at "
      "most this many items of each set: a fixed seeded subsample of larger sets; 0: all")
    a("--smoke", action="store_true", help="a few steps on a tiny batch: loss finite and falling")
    a("--bench", action="store_true", help="measure the paper's efficiency claim as a ratio")
    p.set_defaults(script=script, **defaults)
    return p

POSITIVE = ("batch_size", "input_size", "n_train", "n_val", "num_frames", "sampling_rate", "repeat_aug",
            "num_clips", "num_videos", "t_patch_size", "context_length", "eval_images", "T", "sample_steps")
AT_LEAST_0 = ("epochs", "min_lr", "weight_decay", "warmup_epochs", "num_workers", "eval_max", "smoothing",
              "drop_path", "drop_path_rate", "unmasked_tune_epochs")

def check_args(args, patch_size=None):
    """The command line, checked once before any work: one line naming the flag and what it allows."""
    get = lambda k: getattr(args, k, None)
    _cache.clear()
    for k in POSITIVE:
        if get(k) is not None and not get(k) > 0:
            die(f"--{k} {get(k)}: must be a positive number")
    for k in AT_LEAST_0:
        if get(k) is not None and not get(k) >= 0:
            die(f"--{k} {get(k)}: must be >= 0")
    for k in ("lr", "blr", "clip_grad"):
        if get(k) is not None and not (get(k) > 0 and math.isfinite(get(k))):
            die(f"--{k} {get(k)}: must be a positive number")
    if get("mask_ratio") is not None and not 0 <= args.mask_ratio < 1:
        die(f"--mask_ratio {args.mask_ratio}: must be in [0, 1) (1 would leave nothing visible)")
    if patch_size and get("input_size") and args.input_size % patch_size:
        die(f"--input_size {args.input_size}: must be a multiple of the patch size {patch_size}")
    for k in ("resume", "weights"):  # the files' own problems, at once (their fit to the model: check_resume)
        if get(k) and not Path(get(k)).expanduser().is_file():
            die(f"--{k} {get(k)}: no such file")
        if get(k) and not (get("smoke") or get("bench")):
            _cache[str(get(k))] = state = load_checkpoint(get(k), need=TRAINING if k == "resume" else ())
            if k == "weights":
                unwrap_state(state, get(k))
            elif isinstance(state.get("args"), dict) and state["args"].get("script") not in (None, args.script):
                die(f"{args.resume}: written by {state['args']['script']}.py, not {args.script}.py")

def prepare_out(args):
    """--out made and proven writable before any work; a warning when it holds an earlier run's checkpoint."""
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        die(f"--out {args.out}: cannot be written ({type(e).__name__}: {e.strerror or e})")
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not (args.smoke or args.bench) and not (
            args.resume and Path(args.resume).expanduser().resolve() == ckpt.resolve()):
        print(f"warning: {ckpt} holds an earlier run's checkpoint; this run replaces it after its first epoch "
              f"(to continue that run instead: --resume {ckpt}; to keep it: another --out)", flush=True)

def derived_out(args, suffix, source=None):
    """The --out of a run derived from a checkpoint (e.g. `mae.py --finetune --weights ...`): runs/<script>_<suffix>
    when --out was not given; never the folder holding `source` (default --weights), whose checkpoint would be lost."""
    if args.out == f"runs/{args.script}":
        args.out = f"runs/{args.script}_{suffix}"
    source = source or getattr(args, "weights", None)
    if source and Path(args.out).expanduser().resolve() == Path(source).expanduser().resolve().parent:
        die(f"--out {args.out}: holds {source}, the checkpoint this run starts from; choose another --out")
    return args.out

def init_run(args, patch_size=None):
    """Checks the command line (check_args, with the script's patch size when given), then device,
    precision, seeds, DistributedDataParallel when started by torchrun, and a writable --out."""
    check_args(args, patch_size)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda asked for, but no CUDA device is available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    random.seed(args.seed + rank); np.random.seed(args.seed + rank); torch.manual_seed(args.seed + rank)
    if args.num_workers is None:
        args.num_workers = 0 if args.data is None else min(8, max(0, (os.cpu_count() or 1) // max(world, 1) - 1))
    if rank == 0:
        prepare_out(args)
    if args.precision == "fp16" and not cuda and rank == 0:
        print("warning: --precision fp16 on a CPU is emulated and runs many times slower than fp32 "
              "(use fp32, or bf16 where the CPU supports it)", flush=True)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    return SimpleNamespace(device=device, rank=rank, world_size=world, local_rank=local,
                           distributed=world > 1, is_main=rank == 0, amp_dtype=amp)

def autocast(run):
    if run.amp_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.amp_dtype)

def log(run, *msg):
    if run is None or run.is_main:
        print(*msg, flush=True)

# ------------------------------------------------------------------ the synthetic "shapes" world

CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
          "magenta": (220, 50, 220), "cyan": (40, 220, 230), "orange": (250, 140, 20), "white": (245, 245, 245)}
DIRECTIONS = ("right", "left", "down", "up")

def _shape_mask(kind, cx, cy, r, yy, xx):
    """Boolean mask of one shape of radius r centred at (cx, cy) on the pixel grid (yy, xx)."""
    dx, dy = xx - cx, yy - cy
    d = np.sqrt(dx ** 2 + dy ** 2)
    if kind == "circle":   return d <= r
    if kind == "square":   return np.maximum(abs(dx), abs(dy)) <= 0.8 * r
    if kind == "triangle": return (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= 0.55 * (dy + r))
    if kind == "diamond":  return abs(dx) + abs(dy) <= r
    if kind == "cross":    return (np.minimum(abs(dx), abs(dy)) <= r / 3) & (np.maximum(abs(dx), abs(dy)) <= r)
    return (d <= r) & (d >= 0.55 * r)  # ring

def background(rng, s):
    """A muted colour with stripes at a random angle and frequency, plus pixel noise: (s, s, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:s, 0:s] / s
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
    stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
    base, tint = rng.uniform(0.15, 0.45, 3), rng.uniform(-0.12, 0.12, 3)
    return np.clip(base + stripes[..., None] * tint + rng.normal(0, 0.03, (s, s, 3)), 0, 1)

def _where(cx, cy, s):
    v = "top" if cy < s / 3 else "bottom" if cy > 2 * s / 3 else ""
    h = "left" if cx < s / 3 else "right" if cx > 2 * s / 3 else ""
    return f"the {v} {h}".replace("  ", " ").strip() if (v or h) else "the center"

def paint(canvas, kind, colour, cx, cy, r, ss):
    """Draws a shape, anti-aliased by ss x ss supersampling; returns its pixel box (x0, y0, x1, y1).
    Every shape lies within r of its centre in x and in y, so only the pixels of that square (and
    one more on each side) are sampled: outside it the coverage is 0 and the canvas is unchanged."""
    s = canvas.shape[0]
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)  # the window, in whole pixels
    x1, y1 = min(int(cx + r) + 2, s), min(int(cy + r) + 2, s)
    yy, xx = (np.mgrid[y0 * ss:y1 * ss, x0 * ss:x1 * ss] + 0.5) / ss  # sample points, canvas coordinates
    m = _shape_mask(kind, cx, cy, r, yy, xx)
    cover = m.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))[..., None]  # (h, w, 1) coverage of each pixel
    win = canvas[y0:y1, x0:x1]
    win[:] = win * (1 - cover) + cover * np.array(colour) / 255
    ys, xs = np.nonzero(m)
    xs, ys = xs + x0 * ss, ys + y0 * ss  # sample indices in the whole canvas
    return [xs.min() / ss, ys.min() / ss, (xs.max() + 1) / ss, (ys.max() + 1) / ss]

def shapes_images(n, size=32, seed=0):
    """n images: one main shape (its kind is the label) and 0-2 smaller distractors, with the box of
    every shape and a caption. Deterministic from the seed."""
    rng, s = np.random.default_rng(seed), size
    images, labels, boxes, box_labels, captions = [], [], [], [], []
    names = list(COLORS)
    for _ in range(n):
        canvas, objs = background(rng, s), []
        r = rng.uniform(0.18, 0.32) * s
        objs.append((rng.integers(len(CLASSES)), r, *rng.uniform(r, s - r, 2)))  # the main shape
        for j in range(rng.integers(0, 3)):  # 0-2 smaller distractors that overlap no other shape
            r = rng.uniform(0.08, 0.13) * s
            for _ in range(20):
                cx, cy = rng.uniform(r, s - r, 2)
                if all(math.hypot(cx - x, cy - y) > r + q + 1 for _, q, x, y in objs):
                    objs.insert(0, (rng.integers(len(CLASSES)), r, cx, cy)); break
        bx, words = [], []
        for k, r, cx, cy in objs:  # the main shape last
            colour = names[rng.integers(len(names))]
            bx.append(paint(canvas, CLASSES[k], COLORS[colour], cx, cy, r, 2))
            words.append(f"a {'large' if r > 0.25 * s else 'medium' if r > 0.15 * s else 'small'} "
                         f"{colour} {CLASSES[k]} at {_where(cx, cy, s)}")
        images.append(torch.from_numpy((canvas * 255).round().astype(np.uint8)).permute(2, 0, 1))
        labels.append(int(objs[-1][0]))
        boxes.append(torch.tensor(bx, dtype=torch.float32))
        box_labels.append(torch.tensor([int(o[0]) for o in objs]))
        captions.append(" and ".join([words[-1]] + words[:-1][::-1]))
    return dict(images=torch.stack(images), labels=torch.tensor(labels), boxes=boxes,
                box_labels=box_labels, captions=captions)

def shapes_videos(n, frames=8, size=32, seed=0):
    """n clips of a shape moving at constant speed over a still textured background with a still
    distractor; the label is the direction of motion, which no single frame shows."""
    rng, s = np.random.default_rng(seed), size
    videos, labels = [], []
    steps = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}  # right, left, down, up in (x, y)
    for _ in range(n):
        bg, label = background(rng, s), int(rng.integers(4))
        r = rng.uniform(0.12, 0.18) * s
        paint(bg, CLASSES[rng.integers(len(CLASSES))], COLORS["white"], *rng.uniform(0.1 * s, 0.9 * s, 2), 0.1 * s, 2)
        travel = rng.uniform(0.5, 0.9) * (s - 2 * r)
        start = rng.uniform(r, s - r, 2)
        (ux, uy), axis = steps[label], 0 if steps[label][0] else 1
        start[axis] = r + rng.uniform(0, s - 2 * r - travel) if (ux + uy) > 0 else s - r - rng.uniform(0, s - 2 * r - travel)
        kind, colour = CLASSES[rng.integers(len(CLASSES))], COLORS[list(COLORS)[rng.integers(7)]]
        clip = []
        for t in range(frames):
            f = bg.copy()
            paint(f, kind, colour, start[0] + ux * travel * t / max(frames - 1, 1),
                   start[1] + uy * travel * t / max(frames - 1, 1), r, 2)
            clip.append(torch.from_numpy((f * 255).round().astype(np.uint8)).permute(2, 0, 1))
        videos.append(torch.stack(clip)); labels.append(label)
    return dict(videos=torch.stack(videos), labels=torch.tensor(labels))

# ------------------------------------------------------------------ reading files

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")

def _rgb_array(im):
    """Any PIL mode as an 8-bit RGB array at the right scale: 16-bit images (I;16*) by 65535, 32-bit
    integer ones (I) by 65535 when their values fit in 16 bits (the usual case) else min-max, float
    ones (F) by 1 when in [0, 1] else min-max; palette transparency and alpha channels are dropped."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        lo, hi = a.min(), a.max()
        if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
            a = a / 65535
        elif not (im.mode == "F" and lo >= 0 and hi <= 1):
            a = (a - lo) / max(hi - lo, 1e-12)
        im = Image.fromarray((a * 255).round().astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))

def read_image(path):
    """An image file as uint8 (3, H, W) RGB; every PIL mode is converted at its scale (_rgb_array)."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(_rgb_array(im).copy()).permute(2, 0, 1)
    except Exception as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None

class VideoReader:
    """One video opened with PyAV, read in frame ranges: `read(start, stop)` returns frames start ..
    stop-1 (fewer where the video ends) as uint8 (T, 3, H, W). It seeks (by timestamp, to the keyframe
    at or before `start`) only when the range is not just ahead of the previous one, and decodes no
    further than frame stop-1, so consecutive ranges of a long video cost one pass in total and memory
    holds one range. A file that cannot seek, or whose frames have no timestamps, is decoded from its
    start, counting frames. `num_frames` is the header's frame count (None when it has none);
    `decoded` counts the frames decoded so far."""

    def __init__(self, path, short_side=None):
        self.path, self.short_side, self.decoded, self.container = path, short_side, 0, None
        self._open()
        s = self.stream
        self.fps = float(s.average_rate or s.guessed_rate or 0) or None
        seconds = float(s.duration * s.time_base) if s.duration else (self.container.duration or 0) / 1e6
        self.num_frames = s.frames or (round(seconds * self.fps) if seconds and self.fps else None)
        self.seekable = self.fps is not None and self.num_frames is not None  # a raw stream has no timeline
        self._it, self._head, self._next = None, None, 0

    def _open(self):
        try:
            import av
            if self.container is not None:
                self.container.close()
            self.container = av.open(str(self.path))
            self.stream = self.container.streams.video[0]
            self.stream.thread_type = "AUTO"
        except Exception as e:
            raise DataError(f"{self.path}: not a readable video ({type(e).__name__}: {e})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def _numbered(self, counted):
        """(index, frame) in order: the index counted from the file's start, or read from the timestamp."""
        s, t0 = self.stream, self.stream.start_time or 0
        for k, f in enumerate(self.container.decode(s)):
            self.decoded += 1
            if not counted and f.pts is None:
                raise ValueError("a frame without a timestamp")
            yield (k if counted else round(float((f.pts - t0) * s.time_base) * self.fps)), f

    def _position(self, start):
        if self.seekable and start > 0:
            try:
                t0 = self.stream.start_time or 0
                self.container.seek(t0 + int(start / self.fps / self.stream.time_base), stream=self.stream,
                                    backward=True, any_frame=False)
                self._it, self._head = self._numbered(counted=False), None
                self._head = next(self._it, None)
                if self._head is not None and self._head[0] <= start:
                    return
            except Exception:
                pass
            self.seekable = False  # landed past the clip or failed: decode from the start from now on
        if self._it is not None:
            self._open()
        self._it, self._head = self._numbered(counted=True), None

    def read(self, start=0, stop=None, keep=None):
        """Frames start .. stop-1, or only those whose index is in the set `keep` (the others are
        decoded, not converted: memory then holds the kept frames alone, written in place)."""
        stop = math.inf if stop is None else stop
        if self._it is None or start < self._next or (self.seekable and start > self._next + 2 * self.fps):
            self._position(start)  # not just ahead (within ~2 s) of the last range: seek
        frames, out = [], None
        try:
            while True:
                item, self._head = self._head or next(self._it, None), None
                if item is None or item[0] >= stop:
                    self._head = item
                    break
                if item[0] >= start and (keep is None or item[0] in keep):
                    f = item[1]
                    if self.short_side:
                        k = self.short_side / min(f.width, f.height)
                        f = f.reformat(width=max(1, round(f.width * k)), height=max(1, round(f.height * k)))
                    rgb = torch.from_numpy(f.to_ndarray(format="rgb24"))  # (H, W, 3)
                    if keep is not None:
                        out = torch.empty(len(keep), *rgb.shape, dtype=torch.uint8) if out is None else out
                        out[len(frames)] = rgb
                    frames.append(rgb if keep is None else None)
        except Exception as e:  # a broken stream: what came before the break is the video
            self._it, self._head = iter(()), None
            if not frames:
                raise DataError(f"{self.path}: not a readable video ({type(e).__name__}: {e})") from None
        self._next = self._head[0] if self._head else stop
        if not frames:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        out = out[:len(frames)] if out is not None else torch.stack(frames)
        return out.permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)

def read_video(path, short_side=None, start=0, stop=None):
    """Frames start .. stop-1 (default: all) of a video as uint8 (T, 3, H, W), decoded with PyAV
    (VideoReader: a seek, then only the frames up to stop-1), optionally resized so that the short side
    is `short_side`."""
    with VideoReader(path, short_side) as r:
        frames = r.read(start, stop)
    if not len(frames):
        raise DataError(f"{path}: the video has no frames" + (f" from frame {start}" if start else ""))
    return frames

def list_files(root, exts):
    """[(path, top)] of every file under root whose name ends with one of `exts` (any case), in the
    order of their path components (the same on every call and rank); top is the file's first folder
    (None at the root). One walk over directory entries, sorted per folder: no file is opened or
    stat-ed, and paths stay strings (a Path per file would cost seconds at ImageNet scale)."""
    found, seen = [], set()

    def walk(folder, top):
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir():
                key = (e.stat().st_dev, e.stat().st_ino)  # a symbolic link looping back is walked once
                if key not in seen:
                    seen.add(key); walk(e.path, top or e.name)
            elif e.name.lower().endswith(exts) and e.is_file():
                found.append((e.path, top))
    walk(str(root), None)
    return found

def _scan(root, exts, classes=None):
    """[(path, label)] of the files under root, labelled by their first folder (-1 in a flat folder).
    A tree with two or more folders holding files is a class-folder tree (files lying at its root are
    then left out, with a warning); otherwise the folder is flat. Given `classes` (val/ with train/'s),
    files outside them are left out with a warning. No file is opened: unreadable ones are skipped when
    read."""
    if not root.is_dir():
        die(f"{root}: no such folder")
    files = list_files(root, exts)
    if not files:
        die(f"{root}: no files with extension {' '.join(exts)} found")
    if classes is None:
        tops = sorted({t for _, t in files if t is not None})
        classes = tops if len(tops) >= 2 else []
    if not classes:
        return [(p, -1) for p, _ in files], classes
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, index.get(t, -1)) for p, t in files]
    left = [(p, t) for (p, t), (_, l) in zip(files, items) if l < 0]
    if left:
        items = [it for it in items if it[1] >= 0]
        why = "at the top of a class-folder tree" if left[0][1] is None else "in a class folder that train/ does not have"
        print(f"warning: left out {len(left)} file(s) of {root} {why} (first: {left[0][0]})", flush=True)
        if not items:
            die(f"{root}: none of its files is in a class folder of {', '.join(classes[:5])}...")
    return items, classes

def scan_folder(root, exts):
    """(train_items, val_items, classes): DIR/train + DIR/val when present, else every 5th file of
    each class (a fixed held-out part, as before) for evaluation; train/ alone is split that way too.
    Linear in the number of files; no file is opened."""
    root = Path(root).expanduser()
    if (root / "train").is_dir():
        items, classes = _scan(root / "train", exts)
        if (root / "val").is_dir():
            return items, _scan(root / "val", exts, classes)[0], classes
        print(f"note: {root} has train/ but no val/: every 5th file of each class of train/ is held out "
              f"for evaluation", flush=True)
    else:
        items, classes = _scan(root, exts)
    count, train, val = {}, [], []
    for it in items:  # every 5th file of each class, in listing order
        count[it[1]] = count.get(it[1], -1) + 1
        (train if count[it[1]] % 5 else val).append(it)
    if not train:
        print(f"warning: {root}: too few files to hold any out (one per class): evaluation is on the "
              f"training files", flush=True)
        return items, items, classes
    return train, val, classes

def load_coco(root):
    """COCO detection: (records, categories) from DIR/annotations.json beside the images."""
    root = Path(root).expanduser()
    ann = root / "annotations.json"
    if not ann.is_file():
        die(f"{ann}: no such file (a COCO-format annotations.json is expected in {root})")
    try:
        js = json.loads(ann.read_text())
        cats = sorted(js["categories"], key=lambda c: c["id"])
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        per_image = {im["id"]: [] for im in js["images"]}
        for a in js["annotations"]:
            x, y, w, h = (float(v) for v in a["bbox"])
            if w > 0 and h > 0:
                per_image[a["image_id"]].append(([x, y, x + w, y + h], cat_index[a["category_id"]]))
        records, missing = [], 0
        for im in js["images"]:
            path = root / im["file_name"]
            if not path.is_file():
                missing += 1; continue
            objs = per_image[im["id"]]
            records.append(dict(file=path, image_id=im["id"],
                                boxes=torch.tensor([b for b, _ in objs], dtype=torch.float32).reshape(-1, 4),
                                labels=torch.tensor([c for _, c in objs], dtype=torch.long)))
    except (ValueError, KeyError, TypeError) as e:
        die(f"{ann}: malformed COCO annotations ({type(e).__name__}: {e})")
    if missing:
        print(f"warning: {missing} image file(s) named in {ann} are missing; skipped", flush=True)
    if not records:
        die(f"{ann}: none of its images were found in {root}")
    return records, [c["name"] for c in cats]

def read_text(path):
    """(text, ok) of a caption file: UTF-8 (with or without a BOM) or UTF-16/32 with a BOM; anything
    else is read as Latin-1 with ok False (so that the caller can count it)."""
    raw = path.read_bytes()
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                     (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"), (b"", "utf-8")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc), True
            except UnicodeDecodeError:
                break
    return raw.decode("latin-1"), False

def load_captions(root):
    """[(image path, caption)] for every image with a non-empty same-stem .txt beside it."""
    items, no_txt, empty, latin = [], 0, 0, []
    for path, _ in _scan(Path(root).expanduser(), IMAGE_EXTS)[0]:
        path = Path(path)
        txt = path.with_suffix(".txt")
        text, ok = read_text(txt) if txt.is_file() else (None, True)
        text = text.replace("\x00", "").strip() if text is not None else None
        no_txt, empty = no_txt + (text is None), empty + (text == "")
        latin += [] if ok else [txt]
        if text:
            items.append((path, " ".join(text.split())))
    if no_txt or empty:
        print(f"warning: skipped {no_txt} image(s) with no caption file and {empty} with an empty one in {root}", flush=True)
    if latin:
        print(f"warning: {len(latin)} caption file(s) are neither UTF-8 nor UTF-16/32 with a BOM; read as Latin-1 "
              f"(first: {latin[0]})", flush=True)
    if not items:
        die(f"{root}: no image has a non-empty caption file (NAME.txt beside NAME.jpg)")
    return items

# ------------------------------------------------------------------ tensor transforms

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])

def normalize(x):
    return (x.float() / 255 - MEAN[:, None, None]) / STD[:, None, None]

def denormalize(x):
    return (x.float().cpu() * STD[:, None, None] + MEAN[:, None, None]).clamp(0, 1)

def resize(x, size):
    """(C, H, W) or (T, C, H, W) to an exact (h, w), bilinear with antialiasing; keeps the dtype."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.dtype == torch.uint8 and x.device.type == "cpu":  # torch's uint8 kernel: 5-10x the float path, within 1 level
        y = F.interpolate(x.reshape(-1, *x.shape[-3:]).contiguous(memory_format=torch.channels_last), size=size,
                          mode="bilinear", antialias=True, align_corners=False).contiguous()
        return y.reshape(*x.shape[:-2], *size)
    y = F.interpolate(x.float().reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", antialias=True, align_corners=False)
    y = y.reshape(*x.shape[:-2], *size)
    return y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y

def random_resized_crop(x, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random area fraction in `scale` and aspect ratio in `ratio`, resized to size x size (the
    same crop for every frame of a clip)."""
    H, W = x.shape[-2:]
    for _ in range(10):
        area = H * W * torch.empty(1).uniform_(*scale).item()
        ar = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        w, h = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
        if 0 < w <= W and 0 < h <= H:
            i, j = torch.randint(0, H - h + 1, (1,)).item(), torch.randint(0, W - w + 1, (1,)).item()
            return resize(x[..., i:i + h, j:j + w], size)
    return resize_center_crop(x, size)

def resize_center_crop(x, size):
    H, W = x.shape[-2:]
    k = size / min(H, W)
    x = resize(x, (max(size, round(H * k)), max(size, round(W * k))))
    i, j = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., i:i + size, j:j + size]

def hflip(x):
    return x.flip(-1)

# ------------------------------------------------------------------ datasets and loaders

class FileOrTensorDataset(Dataset):
    """Items from memory (a uint8 tensor) or from files, with unreadable files skipped and counted
    (per process: each DataLoader worker counts its own). When none is readable the run ends with one
    line, also from inside a worker (a DataError there, turned into the same line by make_loader)."""

    def __init__(self, source, reader):
        self.source, self.reader, self.bad = source, reader, set()

    def __len__(self):
        return len(self.source)

    def load(self, i):
        while True:
            if isinstance(self.source, torch.Tensor):
                return i, self.source[i]
            try:
                return i, self.reader(self.source[i])
            except DataError as e:
                if i not in self.bad:
                    self.bad.add(i)
                    print(f"warning: skipped ({len(self.bad)} so far): {e}", flush=True)
                if len(self.bad) >= len(self.source):
                    msg = f"none of the {len(self.source)} files could be read (the last: {e})"
                    if torch.utils.data.get_worker_info() is not None:
                        raise DataError(msg)  # SystemExit cannot leave a worker process cleanly
                    die(msg)
                i = (i + 1) % len(self.source)

class ImageDataset(FileOrTensorDataset):
    """(image (3, S, S) normalized, label), or (image, caption, label) when captions are given."""

    def __init__(self, source, labels, size, train, aug="crop", captions=None, scale=(0.2, 1.0)):
        super().__init__(source, read_image)
        self.labels, self.size, self.train, self.aug, self.captions, self.scale = labels, size, train, aug, captions, scale

    def __getitem__(self, i):
        i, img = self.load(i)
        if self.train and self.aug == "crop":
            img = random_resized_crop(img, self.size, self.scale)
        else:
            img = resize_center_crop(img, self.size)
        if self.train and self.aug != "none" and torch.rand(1).item() < 0.5:
            img = hflip(img)
        label = torch.tensor(int(self.labels[i]))
        return (normalize(img), self.captions[i], label) if self.captions else (normalize(img), label)

def image_data(args, n_train=2000, n_val=500, aug=None, captions=False):
    """(train_ds, val_ds, classes): the synthetic shapes (flip augmentation only, since the label is
    the shape's kind) or --data DIR (random resized crop + flip, as MAE)."""
    if args.data is None:
        tr, va = shapes_images(n_train, args.input_size, seed=1), shapes_images(n_val, args.input_size, seed=2)
        flip = "none" if captions else "flip"  # a flip would make "left" / "right" in a caption false
        make = lambda d, train: ImageDataset(d["images"], d["labels"], args.input_size, train, aug or flip,
                                             d["captions"] if captions else None)
        return make(tr, True), make(va, False), list(CLASSES)
    if captions:
        pairs = load_captions(args.data)
        root = Path(args.data).expanduser()
        tops = sorted({p.relative_to(root).parts[0] for p, _ in pairs if len(p.relative_to(root).parts) > 1})
        classes = tops if len(tops) >= 2 else []  # _scan's rule: class folders, files at the root left out
        items = [(p, classes.index(p.relative_to(root).parts[0]) if classes else -1, c) for p, c in pairs]
        val = items[::5] if len(items) >= 5 else items
        train = [it for k, it in enumerate(items) if k % 5] if len(items) >= 5 else items
        make = lambda its, t: ImageDataset([p for p, _, _ in its], [l for _, l, _ in its], args.input_size, t,
                                           aug or "crop", [c for _, _, c in its])
        return make(train, True), make(val, False), classes
    train, val, classes = scan_folder(args.data, IMAGE_EXTS)
    make = lambda its, t: ImageDataset([p for p, _ in its], [l for _, l in its], args.input_size, t, aug or "crop")
    return make(train, True), make(val, False), classes

class VideoDataset(FileOrTensorDataset):
    """(clip (T, 3, S, S) normalized, label); with repeat_aug R > 1 in training, R clips of one
    decoded video: (clips (R, T, 3, S, S), labels (R,)). Videos shorter than a clip are looped."""

    def __init__(self, source, labels, num_frames, sampling_rate, size, train, repeat_aug=1):
        super().__init__(source, self.read_span)
        self.labels, self.T, self.rate, self.size, self.train = labels, num_frames, sampling_rate, size, train
        self.repeat = repeat_aug if train else 1

    def starts(self, n):
        """The first frame of each of the item's clips in a video of n frames (random in training)."""
        room = max(n - (self.T - 1) * self.rate - 1, 0)
        return [torch.randint(0, room + 1, (1,)).item() if self.train else room // 2 for _ in range(self.repeat)]

    def read_span(self, path):
        """(frames, index): only the span that covers the item's clips is decoded (one seek), and only
        their frames kept; index (R, T) points into frames. The whole video, looped, when it is shorter
        than a clip, its header has no frame count, or the header's count was wrong."""
        with VideoReader(path, short_side=round(self.size * 1.25)) as r:
            span, n = (self.T - 1) * self.rate + 1, r.num_frames
            if n and n >= span:
                want = torch.tensor(self.starts(n))[:, None] + torch.arange(self.T) * self.rate  # (R, T)
                keep = sorted(set(want.flatten().tolist()))
                frames = r.read(keep[0], keep[-1] + 1, set(keep))
                if len(frames) == len(keep):
                    return frames, torch.searchsorted(torch.tensor(keep), want)
            frames = r.read(0)
        if not len(frames):
            raise DataError(f"{path}: the video has no frames")
        return frames, self.index(len(frames))

    def index(self, n):
        """(R, T) frame indices of the item's clips in a video of n frames, looped when it is short."""
        return (torch.tensor(self.starts(n))[:, None] + torch.arange(self.T) * self.rate) % n

    def __getitem__(self, i):
        i, frames = self.load(i)
        frames, index = (frames, self.index(len(frames))) if isinstance(self.source, torch.Tensor) else frames
        clips = []
        for idx in index:
            clip = frames[idx]  # (T, 3, H, W)
            if self.train and isinstance(self.source, list):  # files: crop + flip, as MAE-ST
                clip = random_resized_crop(clip, self.size, (0.3, 1.0))
                clip = hflip(clip) if torch.rand(1).item() < 0.5 else clip
            elif self.train:  # synthetic: a flip would turn "left" into "right"
                clip = resize(clip, self.size)
            else:
                clip = resize_center_crop(clip, self.size)
            clips.append(normalize(clip))
        label = torch.tensor(int(self.labels[i]))
        if self.repeat == 1:
            return clips[0], label
        return torch.stack(clips), label.repeat(self.repeat)

def video_data(args, num_frames, sampling_rate=1, repeat_aug=1, n_train=800, n_val=200):
    """(train_ds, val_ds, classes): moving shapes (label: direction) or --data DIR/<class>/*.mp4."""
    if args.data is None:
        n = num_frames * sampling_rate
        tr, va = shapes_videos(n_train, n, args.input_size, seed=1), shapes_videos(n_val, n, args.input_size, seed=2)
        return (VideoDataset(tr["videos"], tr["labels"], num_frames, sampling_rate, args.input_size, True, repeat_aug),
                VideoDataset(va["videos"], va["labels"], num_frames, sampling_rate, args.input_size, False),
                list(DIRECTIONS))
    train, val, classes = scan_folder(args.data, VIDEO_EXTS)
    make = lambda its, t: VideoDataset([p for p, _ in its], [l for _, l in its], num_frames, sampling_rate,
                                       args.input_size, t, repeat_aug)
    return make(train, True), make(val, False), classes

class DetectionDataset(FileOrTensorDataset):
    """(image (3, S, S) normalized, target) with the boxes scaled to S x S and flipped with the image."""

    def __init__(self, source, records, size, train):
        super().__init__(source, read_image)
        self.records, self.size, self.train = records, size, train

    def __getitem__(self, i):
        i, img = self.load(i)
        rec, (H, W), S = self.records[i], img.shape[-2:], self.size
        img, boxes = resize(img, S), rec["boxes"] * torch.tensor([S / W, S / H, S / W, S / H])
        if self.train and torch.rand(1).item() < 0.5:
            img, boxes = hflip(img), torch.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
        return normalize(img), dict(boxes=boxes, labels=rec["labels"], image_id=rec["image_id"], orig_size=torch.tensor([H, W]))

def detection_data(args, n_train=2000, n_val=300):
    """(train_ds, val_ds, classes): shapes with a box on every shape, or a COCO folder (resized to S x S)."""
    if args.data is None:
        out = []
        for n, seed, train in ((n_train, 1, True), (n_val, 2, False)):
            d = shapes_images(n, args.input_size, seed)
            recs = [dict(boxes=b, labels=l, image_id=k) for k, (b, l) in enumerate(zip(d["boxes"], d["box_labels"]))]
            out.append(DetectionDataset(d["images"], recs, args.input_size, train))
        return out[0], out[1], list(CLASSES)
    records, classes = load_coco(args.data)
    val = records[::5] if len(records) >= 5 else records
    train = [r for k, r in enumerate(records) if k % 5] if len(records) >= 5 else records
    return (DetectionDataset([r["file"] for r in train], train, args.input_size, True),
            DetectionDataset([r["file"] for r in val], val, args.input_size, False), classes)

def collate_detection(batch):
    return torch.stack([img for img, _ in batch]), [t for _, t in batch]

def caption_data(args, n_train=2000, n_val=500):
    """(train_ds, val_ds, classes) of (image, caption, label): synthetic captions or NAME.jpg + NAME.txt."""
    return image_data(args, n_train, n_val, captions=True)

def eval_view(ds):
    """ds read as evaluation reads it: the same items without augmentation (train False: centre
    crop, no flip; one centred clip per video), so that evaluating the training set draws nothing.
    A Subset keeps its indices; a dataset without a `train` flag is returned as it is."""
    if isinstance(ds, torch.utils.data.Subset):
        return torch.utils.data.Subset(eval_view(ds.dataset), ds.indices)
    if not getattr(ds, "train", False):
        return ds
    ds = copy.copy(ds)
    ds.train = False
    if hasattr(ds, "repeat"):  # VideoDataset: --repeat_aug clips are for training only
        ds.repeat = 1
    return ds

def eval_subset(ds, most):
    """ds itself when it has at most `most` items (0: no bound), else a fixed subsample of `most` items
    (seed 0, in their order): the same items before and after training, on every rank."""
    if not most or len(ds) <= most:
        return ds
    keep = np.sort(np.random.default_rng(0).choice(len(ds), most, replace=False))
    return torch.utils.data.Subset(ds, keep.tolist())

class Loader(DataLoader):
    """A DataLoader whose data errors in worker processes end the run with their one-line message."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except DataError as e:  # re-raised from a worker with its traceback: keep its last line
            die(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1])

def make_loader(ds, args, run, train, collate_fn=None, batch_size=None, whole=False):
    """Under torchrun each process gets its share of ds, unless whole=True (evaluation on one rank).
    Evaluation loaders (train=False) read ds without augmentation (eval_view: a probe on the
    training images sees the same features before and after training) and see at most --eval_max
    items (eval_subset)."""
    bs = batch_size or args.batch_size
    ds = ds if train else eval_subset(eval_view(ds), getattr(args, "eval_max", 0))
    drop = train and len(ds) > bs * run.world_size
    sampler = DistributedSampler(ds, shuffle=train, drop_last=drop) if run.distributed and not whole else None
    return Loader(ds, bs, shuffle=train and sampler is None, sampler=sampler, drop_last=drop,
                  num_workers=args.num_workers or 0, collate_fn=collate_fn,
                  pin_memory=run.device.type == "cuda")  # fresh workers each epoch: exact --resume

def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x

# ------------------------------------------------------------------ optimisation and the training loop

def param_groups(model, weight_decay, lr_scale=None, skip=()):
    """AdamW groups: no weight decay for 1-D parameters, biases and names in `skip`; lr_scale(name)
    multiplies a parameter's learning rate (layer-wise decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        scale = lr_scale(name) if lr_scale else 1.0
        g = groups.setdefault((no_decay, scale), dict(params=[], weight_decay=0.0 if no_decay else weight_decay, lr_scale=scale))
        g["params"].append(p)
    return list(groups.values())

def lr_at(args, epoch):
    """Linear warmup for warmup_epochs, then half-cosine from lr down to min_lr (epoch is fractional)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

def fit(model, loss_fn, loader, args, run, groups=None, betas=(0.9, 0.999), on_epoch=None, find_unused=False):
    """The loop every script shares; loss_fn(wrapped_model, batch_on_device) -> scalar loss.
    Returns (model, history) with history = dict(losses, steps, seconds, epoch)."""
    model.to(run.device)
    # foreach: the same update with one op per parameter group, not per tensor (CUDA's default; on a
    # CPU, where the default is the per-tensor loop, bit-identical and up to ~8% faster a step)
    opt = torch.optim.AdamW(groups or param_groups(model, args.weight_decay), lr=args.lr, betas=betas, foreach=True)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    history, ckpt = dict(losses=[], steps=0, seconds=0.0, epoch=0), Path(args.out) / "checkpoint.pt"
    if args.resume:
        state = check_resume(model, args, keep=False)
        load_state(model, state["model"], args.resume)
        try:
            opt.load_state_dict(state["optimizer"]); scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError) as e:
            die(f"{args.resume}: its optimizer state does not fit this run's parameter groups ({e})")
        history = state["history"]
        log(run, f"resumed from {args.resume} after epoch {history['epoch']}")
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused) if run.distributed else model
    net = torch.compile(net) if args.compile else net
    n = len(loader)
    if n == 0:
        die(f"no training batch: fewer examples than one batch of {args.batch_size}")
    try:
        _epochs(net, model, opt, scaler, loss_fn, loader, args, run, history, ckpt, on_epoch)
    except KeyboardInterrupt:
        if not run.is_main:
            raise SystemExit(130)
        done = f"{ckpt} holds epoch {history['epoch']}" if history["epoch"] and ckpt.exists() else "no epoch finished: nothing saved"
        given = getattr(args, "argv", sys.argv[1:])
        argv = [a for k, a in enumerate(given) if a != "--resume" and not a.startswith("--resume=")
                and (k == 0 or given[k - 1] != "--resume")]
        again = " ".join(shlex.quote(a) for a in [f"{args.script}.py"] + argv + ["--resume", str(ckpt)])
        die(f"interrupted (Ctrl-C) during epoch {history['epoch'] + 1}: {done}" +
            (f"; to continue: python {again}" if history["epoch"] and ckpt.exists() else ""))
    return model, history

def _epochs(net, model, opt, scaler, loss_fn, loader, args, run, history, ckpt, on_epoch):
    n = len(loader)
    for epoch in range(history["epoch"], args.epochs):
        torch.manual_seed(args.seed + 1000 * epoch + run.rank)  # a resumed epoch replays exactly
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(epoch)
        net.train()
        t0, seen, said = time.time(), 0, time.time()
        tty = sys.stderr.isatty()  # in a log file (a cluster job) a line a minute instead of a bar
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not run.is_main or not tty, leave=False)
        for i, batch in enumerate(bar):
            lr = lr_at(args, epoch + (i / n if n > 1 else 0.5))  # one batch an epoch: its middle, not lr 0
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            if history["steps"] == 0 and isinstance(batch[0], torch.Tensor) and batch[0].is_floating_point() \
                    and batch[0].numel() > 1 and batch[0].min() == batch[0].max():
                print(f"warning: the first training batch is constant (every value {batch[0].flatten()[0].item():.4g}): "
                      f"the inputs carry nothing to learn; check the data files", flush=True)
            batch = to_device(batch, run.device)
            with autocast(run):
                loss = loss_fn(net, batch)
            value = loss.detach().float().clone()
            if run.distributed:
                dist.all_reduce(value); value /= run.world_size
            if not math.isfinite(value.item()):
                die(f"the loss became {value.item()} at epoch {epoch + 1}, step {i}: training stopped; "
                    f"the last good checkpoint is {ckpt}" + (" (none yet)" if not ckpt.exists() else ""))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(opt); scaler.update()
            history["losses"].append(value.item()); history["steps"] += 1
            seen += len(batch[0]) * run.world_size
            bar.set_postfix(loss=f"{value.item():.4f}", lr=f"{lr:.2e}", samples_per_s=f"{seen / (time.time() - t0):.0f}")
            if not tty and time.time() - said > 60:
                said = time.time()
                log(run, f"epoch {epoch + 1}/{args.epochs}  step {i + 1}/{n}  loss {value.item():.4f}  lr {lr:.2e}  "
                         f"{seen / (said - t0):.0f} samples/s")
        history["seconds"] += time.time() - t0
        history["epoch"] = epoch + 1
        log(run, f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(history['losses'][-n:]):.4f}  "
                 f"{seen / (time.time() - t0):.0f} samples/s")
        if run.is_main:
            save_checkpoint(ckpt, dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                                       history=history, args={k: v for k, v in vars(args).items()}))
        if on_epoch:
            on_epoch(epoch)

def smoke(model, loss_fn, batch, run, steps=30, lr=1e-3):
    """A few AdamW steps on one tiny batch: passes when every loss is finite and the last ones fall
    below the first. Raises SystemExit(1) otherwise."""
    model.to(run.device).train()
    opt, batch, losses = torch.optim.AdamW(model.parameters(), lr=lr), to_device(batch, run.device), []
    for _ in range(steps):
        with autocast(run):
            loss = loss_fn(model, batch)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(); loss.backward(); opt.step()
    ok = all(map(math.isfinite, losses)) and np.mean(losses[-3:]) < losses[0]
    print(f"smoke: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps: {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        raise SystemExit(1)

# ------------------------------------------------------------------ checkpoints

def save_checkpoint(path, state):
    """Atomic: write a temporary file of its own (a unique name, so that two writers never share one)
    beside the target, then rename it over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

_loaded = ["the checkpoint"]  # the file load_checkpoint read last, for unwrap_state's message
_cache = {}  # path -> what check_args read, handed to the next load_checkpoint of that path
TRAINING = ("model", "optimizer", "scaler", "history")  # what a checkpoint.pt of C.fit holds

def _what(x):
    if isinstance(x, torch.Tensor):
        return f"a bare tensor of shape {tuple(x.shape)}"
    if isinstance(x, dict):
        return f"a dict of {', '.join(map(str, list(x)[:4])) or 'nothing'}" + (" ..." if len(x) > 4 else "")
    return f"a {type(x).__name__}"

def load_checkpoint(path, need=()):
    """torch.load(weights_only=True) of a file; any problem (no file, empty, truncated, not torch's,
    not a dict holding the keys in `need`) ends the run with one line naming the file."""
    ckpt = _cache.pop(str(path)) if str(path) in _cache else _read(path)  # read once already by check_args
    _loaded[0] = path
    if need and not (isinstance(ckpt, dict) and all(k in ckpt for k in need)):
        die(f"{path}: not a training checkpoint of this project (it holds {_what(ckpt)}; one holds "
            f"{', '.join(need)}); --resume takes the checkpoint.pt of a run, --weights initial weights")
    return ckpt

def _read(path):
    file = Path(path).expanduser()
    if not file.is_file():
        die(f"{path}: no such checkpoint file")
    if file.stat().st_size == 0:
        die(f"{path}: the file is empty (0 bytes): not a checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or ["no message"])[0][:200]
        die(f"{path}: cannot be read as a PyTorch checkpoint (truncated, or not written by torch.save: "
            f"{type(e).__name__}: {first})")

def check_resume(model, args, keep=True):
    """--resume checked against the model at once, before any evaluation: one line naming the file and
    the problem (another script's, another --model, not a training checkpoint). Returns its state
    (kept for C.fit, which calls this again with keep=False, so that the file is read once)."""
    if not args.resume:
        return None
    state = load_checkpoint(args.resume, need=TRAINING)
    if keep:
        _cache[str(args.resume)] = state
    made = state.get("args") if isinstance(state.get("args"), dict) else {}
    if made.get("script") not in (None, args.script):
        die(f"{args.resume}: written by {made['script']}.py, not {args.script}.py")
    msg = state_mismatch(model, state["model"])
    if msg:
        die(f"{args.resume}: does not fit this model (written with --model {made.get('model', '?')}, this run "
            f"--model {args.model}): {msg}")
    return state

def unwrap_state(ckpt, source=None):
    """The state dict inside a checkpoint (under model / model_state / state_dict, or the file itself);
    one line naming the file (default: the last one loaded) when it is not a dict of tensors."""
    for key in ("model", "model_state", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        die(f"{source or _loaded[0]}: holds {_what(ckpt)}, not model weights (a dict of parameter tensors)")
    return ckpt

def state_mismatch(model, state_dict, allow_missing=()):
    """'' when state_dict fits model, else one line naming the missing, unexpected and wrongly shaped keys."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return f"it holds {_what(state_dict)}, not a state dict (parameter names -> tensors)"
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(tuple(allow_missing) or ("\0",))]
    extra = [k for k in state_dict if k not in own]
    shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    show = lambda ks: ", ".join(ks[:6]) + (f" (+{len(ks) - 6} more)" if len(ks) > 6 else "")
    return "; ".join(f"{what} {show(ks)}" for what, ks in (("missing", missing), ("unexpected", extra),
                                                            ("wrong shape", shape)) if ks)

def load_state(model, state_dict, source, allow_missing=(), new_head=None, run=None):
    """Strict load; every missing, unexpected or wrongly shaped key is named in one line. With
    new_head="head." a classification head for another class count (the keys under that prefix) is
    left out and the model's freshly initialised one kept, saying so: fine-tuning on new classes."""
    if new_head:
        own = {k: v.shape for k, v in model.state_dict().items() if k.startswith(new_head) and v.ndim == 2}
        if any(k in state_dict and state_dict[k].shape[0] != s[0] for k, s in own.items()):
            k = next(iter(own))
            log(run, f"{source}: its head has {state_dict[k].shape[0]} classes, this model {own[k][0]}: "
                     f"the head ({new_head}*) starts from scratch")
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(new_head)}
            allow_missing = tuple(allow_missing) + (new_head,)
    msg = state_mismatch(model, state_dict, allow_missing)
    if msg:
        die(f"{source}: does not fit this model: {msg}")
    model.load_state_dict(state_dict, strict=False)

# ------------------------------------------------------------------ evaluation, pictures, benchmarks

@torch.no_grad()
def extract_features(fn, loader, run, shared=False):
    """(X (N, D), y (N,)) on the CPU: fn(inputs) -> (B, D) for every batch (inputs = batch[0]).
    shared=True under torchrun (called by every rank, on a whole=True loader): each rank extracts
    every world_size-th item and all receive the whole (X, y), in the loader's order."""
    if shared and run.distributed:
        ds, w = loader.dataset, run.world_size
        mine = DataLoader(torch.utils.data.Subset(ds, range(run.rank, len(ds), w)), loader.batch_size,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)
        parts = [None] * w
        dist.all_gather_object(parts, extract_features(fn, mine, run) if len(ds) > run.rank else None)
        parts = [p for p in parts if p is not None]
        X = torch.empty(len(ds), parts[0][0].shape[1]); y = torch.empty(len(ds), dtype=parts[0][1].dtype)
        for r, (Xr, yr) in enumerate(parts):
            X[r::w], y[r::w] = Xr, yr  # rank r extracted items r, r + w, r + 2w, ...
        return X, y
    xs, ys = [], []
    for batch in loader:
        with autocast(run):
            xs.append(fn(batch[0].to(run.device)).float().cpu())
        ys.append(batch[-1])
    return torch.cat(xs), torch.cat(ys)

def linear_probe(Xtr, ytr, Xva, yva, steps=1000, lr=1e-2, batch=1024, seed=0):
    """MAE's linear probe: BatchNorm without affine (here: standardise with the training statistics)
    then a linear classifier, trained with Adam (cosine lr) on frozen features. Returns held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xva = (Xtr - mu) / sd, (Xva - mu) / sd
    head = torch.nn.Linear(Xtr.shape[1], int(max(ytr.max(), yva.max())) + 1)
    with torch.no_grad():  # the head's init from the probe's own seed, not the global random state
        bound = 1 / math.sqrt(Xtr.shape[1])  # nn.Linear's default U(-1/sqrt(d), 1/sqrt(d))
        head.weight.uniform_(-bound, bound, generator=g); head.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(Xtr), (min(batch, len(Xtr)),), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(); F.cross_entropy(head(Xtr[idx]), ytr[idx]).backward(); opt.step()
    with torch.no_grad():
        return (head(Xva).argmax(1) == yva).float().mean().item()

def knn_accuracy(Xtr, ytr, Xva, yva, k=20, T=0.07):
    """Weighted k-nearest-neighbour vote on cosine similarity (weights exp(sim / T)); k adapts to a
    small training set (at most all of its items)."""
    Xtr, Xva, C = F.normalize(Xtr, dim=1), F.normalize(Xva, dim=1), int(max(ytr.max(), yva.max())) + 1
    correct = 0
    for xv, yv in zip(Xva.split(1024), yva.split(1024)):
        sim, idx = (xv @ Xtr.T).topk(min(k, len(Xtr)), dim=1)  # (b, k)
        votes = torch.zeros(len(xv), C).scatter_add_(1, ytr[idx], (sim / T).exp())
        correct += (votes.argmax(1) == yv).sum().item()
    return correct / len(yva)

def check_enough(train_ds, val_ds, args, classes=None, need_classes=False):
    """Before training: one line when the data are too few to train on or to evaluate (no training or
    held-out item, fewer than 2 classes where labels are needed); a warning when the held-out set is
    smaller than a batch (the figures then rest on a few items)."""
    where = args.data or "the synthetic data"
    if len(train_ds) == 0 or len(val_ds) == 0:
        die(f"{where}: {len(train_ds)} training and {len(val_ds)} held-out items: too few to train and evaluate")
    if need_classes and len(classes or []) < 2:
        die(f"{where}: {len(classes or [])} class(es): a classifier needs at least 2 class folders (DIR/<class>/...)")
    if len(val_ds) < min(args.batch_size, 8):
        print(f"warning: {where}: only {len(val_ds)} held-out item(s): the evaluation figures are rough", flush=True)

def first_items(ds, n):
    """The first min(n, len(ds)) items of ds, each field stacked (tensors) or listed: for pictures."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return [torch.stack(f) if isinstance(f[0], torch.Tensor) else list(f) for f in zip(*items)] if items else []

def save_grid(path, rows, texts=None, scale=None):
    """One row of cells per tensor (N, 3, H, W) in [0, 1]; optional text under each cell. Rows may
    hold however few items there are (empty rows are dropped); None when there is nothing to draw."""
    keep = [r for r, row in enumerate(rows) if len(row)]
    rows, texts = [rows[r] for r in keep], [texts[r] for r in keep if r < len(texts)] if texts else texts
    if not rows:
        return None
    H, W = rows[0].shape[-2:]
    scale = scale or max(1, math.ceil(96 / H))
    lines = max([t.count("\n") + 1 for row in (texts or []) for t in row] or [0])
    cw, ch, pad = W * scale, H * scale + 12 * lines, 4
    grid = Image.new("RGB", (pad + max(len(r) for r in rows) * (cw + pad), pad + len(rows) * (ch + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            arr = (img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            x, y = pad + c * (cw + pad), pad + r * (ch + pad)
            grid.paste(Image.fromarray(arr).resize((cw, H * scale), Image.NEAREST), (x, y))
            if texts and r < len(texts) and c < len(texts[r]):
                draw.multiline_text((x + 1, y + H * scale + 1), texts[r][c], fill=(0, 0, 0), spacing=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path

def write_metrics(args, run, history, **figures):
    losses = history.get("losses", [])
    m = dict(script=args.script, model=args.model, device=str(run.device), epochs=history.get("epoch", args.epochs),
             steps=history.get("steps", 0), seconds=round(history.get("seconds", 0.0), 2),
             loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None, **figures)
    if run.is_main:
        (Path(args.out) / "metrics.json").write_text(json.dumps(m, indent=2))
        log(run, "metrics: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in m.items() if not isinstance(v, (list, dict))))
    return m

def count_flops(fn):
    """FLOPs (2 per multiply-add) of calling fn(), counted by torch.utils.flop_counter."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten  # the CPU kernels of scaled_dot_product_attention are not counted by default
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(g, q, k, v)}
    with fc.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()

def time_ab(fns, run, rounds=5, warmup=1):
    """{name: median seconds of one call} for the callables in the dict `fns`, timed in interleaved
    rounds (A, B, A, B, ...) after `warmup` calls of each, so that a shared machine's drift hits every
    candidate alike; compare candidates by their ratio."""
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(); t = time.perf_counter(); fn(); sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}

def saved_bytes(fn, params=()):
    """(bytes, fn()): the distinct storages autograd saves for backward while fn() runs (the
    activation memory of backprop), the storages of `params` excluded. Storages, not tensors, so that
    a tensor saved by several ops counts once. Keyed by the storage itself (torch's `_cdata`), not its
    address, so that it counts on the "meta" device too (shapes only), where every address is 0."""
    skip, seen = {p.untyped_storage()._cdata for p in params}, {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = (s.nbytes(), t)  # t kept alive meanwhile: its key cannot be reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for n, _ in seen.values()), out

class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage made while active until it is freed, and the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = weakref.WeakKeyDictionary()

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                s = t.untyped_storage()
                if s not in self.storages and s.nbytes() > 0:
                    self.storages[s] = weakref.finalize(s, self._free, s.nbytes())
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
        return out

def peak_memory(fn, run):
    """(bytes, fn()): the peak of tensor memory, above what was held before, while fn() runs (a
    whole training step: forward, backward, optimizer step). On CUDA the allocator's peak; on a CPU,
    which has no allocator to ask, every storage made while fn() runs is counted until it is freed."""
    if run.device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn(); torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    with _LiveBytes() as mode:
        out = fn()
    return mode.peak, out

@torch.no_grad()
def top1(predict, loader, run, keep=16):
    """(accuracy, shown): held-out top-1 of predict(inputs on the device) -> logits over the loader's
    (inputs, labels) batches, and the first `keep` (input, prediction, label) for a picture. Under
    torchrun each rank scores its shard of a sharded loader and the counts are summed."""
    correct = total = 0
    shown = []
    for x, y in loader:
        with autocast(run):
            pred = predict(to_device(x, run.device)).argmax(-1).cpu()
        correct += (pred == y).sum().item()
        total += len(y)
        if len(shown) < keep:
            shown += list(zip(x, pred, y))[:keep - len(shown)]
    if run.distributed:
        counts = torch.tensor([correct, total], dtype=torch.float64, device=run.device)
        dist.all_reduce(counts)
        correct, total = counts.tolist()
    return correct / max(total, 1), shown

def benchmark(fn, run, warmup=3, reps=10):
    """Median wall time of fn() in seconds, after warm-up, with CUDA synchronized."""
    return time_ab({"fn": fn}, run, rounds=reps, warmup=warmup)["fn"]

def bench_data(root, video=False, input_size=224, batch_size=32, items=512, num_frames=16, sampling_rate=4,
               workers=None):
    """The data pipeline on a folder: start-up (listing) time, the raw decode rate of `items` of its
    training files (PIL open + convert alone; PyAV decode of the clip span alone) and samples/s of the
    training loader on the same files with 0, 1 and all workers after its first batch (the time to
    that batch, worker start-up included, is printed apart); loader / raw is its overhead."""
    t = time.perf_counter()
    train, _, _ = scan_folder(root, VIDEO_EXTS if video else IMAGE_EXTS)
    listing = time.perf_counter() - t
    pick = np.sort(np.random.default_rng(0).choice(len(train), min(items, len(train)), replace=False))
    files, labels = [train[k][0] for k in pick], [max(train[k][1], 0) for k in pick]
    span = (num_frames - 1) * sampling_rate + 1
    t = time.perf_counter()
    for p in files:  # raw decode, nothing else
        try:
            if video:
                with VideoReader(p) as r:
                    r.read(max((r.num_frames or span) - span, 0) // 2, max((r.num_frames or span) - span, 0) // 2 + span)
            else:
                with Image.open(p) as im:
                    _rgb_array(im)
        except Exception:
            pass
    raw = len(files) / (time.perf_counter() - t)
    ds = (VideoDataset(files, labels, num_frames, sampling_rate, input_size, True) if video else
          ImageDataset(files, labels, input_size, True))
    rows, first = dict(raw_decode=raw), {}
    for w in sorted({0, 1, workers or os.cpu_count() or 1}):
        t, n = time.perf_counter(), 0
        for k, batch in enumerate(Loader(ds, batch_size, shuffle=True, num_workers=w)):
            if k == 0:  # the workers' start-up and the first batch, apart: an epoch pays them once
                first[f"loader_{w}_workers"], t = time.perf_counter() - t, time.perf_counter()
            else:
                n += len(batch[0])
        rows[f"loader_{w}_workers"] = n / max(time.perf_counter() - t, 1e-9)
    print(f"{root}: {len(train)} training files listed in {listing:.2f} s; {len(files)} of them read:")
    for k, v in rows.items():
        print(f"  {k:18s} {v:9.1f} samples/s   {v / raw:5.2f} x raw decode" +
              (f"   (first batch after {first[k]:.2f} s)" if k in first else ""))
    best = max(v for k, v in rows.items() if k != "raw_decode")
    print(f"bench_data: listing {listing:.2f} s, raw decode {raw:.1f}/s, best loader {best:.1f}/s = {best / raw:.2f} x raw")
    return dict(listing_s=listing, files=len(train), **rows)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="python common.py --bench_data DIR: the data pipeline's speed on DIR",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bench_data", required=True, metavar="DIR", help="an image or video folder (--data layout)")
    p.add_argument("--video", action="store_true", help="the folder holds videos")
    p.add_argument("--input_size", type=int, default=224, help="training crop side")
    p.add_argument("--batch_size", type=int, default=32, help="loader batch")
    p.add_argument("--items", type=int, default=512, help="files read (a seeded sample of the training split)")
    p.add_argument("--num_frames", type=int, default=16, help="video: frames per clip")
    p.add_argument("--sampling_rate", type=int, default=4, help="video: frame stride")
    p.add_argument("--workers", type=int, default=None, help="'all workers' (default: the CPU count)")
    a = p.parse_args()
    bench_data(Path(a.bench_data).expanduser(), a.video, a.input_size, a.batch_size, a.items, a.num_frames,
               a.sampling_rate, a.workers)
