"""Shared plumbing for the nine paper scripts: nothing here is model code.

Sections: command line and run set-up / the synthetic "shapes" world / reading files / tensor
transforms / datasets and loaders / optimisation and the shared training loop / checkpoints /
evaluation, pictures and benchmarks. Each script imports this module as `C`.
"""
import argparse, json, math, os, random, statistics, time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

# ------------------------------------------------------------------ command line and run set-up

class DataError(Exception):
    """A bad input file; the datasets skip it and count, or `die` with its message."""

def die(msg):
    raise SystemExit(f"error: {msg}")

def make_parser(script, doc, **defaults):
    """The flags every script shares (DESIGN.md); `defaults` overrides any default."""
    p = argparse.ArgumentParser(prog=f"{script}.py", description=(doc or "").strip().split("\n\n")[0])
    a = p.add_argument
    a("--data", default=None, help="a folder of your own data (default: the synthetic shapes)")
    a("--out", default=f"runs/{script}", help="where checkpoint.pt, metrics.json and pictures go")
    a("--model", default="tiny", help="size preset")
    a("--epochs", type=int, default=10)
    a("--batch_size", type=int, default=64, help="per process")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min_lr", type=float, default=0.0)
    a("--weight_decay", type=float, default=0.05)
    a("--warmup_epochs", type=float, default=1)
    a("--input_size", type=int, default=32)
    a("--num_workers", type=int, default=None, help="default: 0 on synthetic data, else up to 8")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, default=0)
    a("--resume", default=None, metavar="PATH", help="continue a run from its checkpoint.pt")
    a("--weights", default=None, metavar="PATH", help="initial weights (ours or the official file)")
    a("--clip_grad", type=float, default=None)
    a("--smoke", action="store_true", help="a few steps on a tiny batch: loss finite and falling")
    a("--bench", action="store_true", help="measure the paper's efficiency claim as a ratio")
    p.set_defaults(script=script, **defaults)
    return p

def init_run(args):
    """Device, precision, seeds, and DistributedDataParallel when started by torchrun."""
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
        os.makedirs(args.out, exist_ok=True)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    return SimpleNamespace(device=device, rank=rank, world_size=world, local_rank=local,
                           distributed=world > 1, is_main=rank == 0, amp_dtype=amp)

def autocast(run):
    if run.amp_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.amp_dtype)

def log(run, *msg):
    if run.is_main:
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

def _background(rng, s):
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

def _paint(canvas, kind, colour, cx, cy, r, ss):
    """Draws a shape, anti-aliased by 2x supersampling; returns its pixel box (x0, y0, x1, y1)."""
    s = canvas.shape[0]
    yy, xx = (np.mgrid[0:s * ss, 0:s * ss] + 0.5) / ss
    m = _shape_mask(kind, cx, cy, r, yy, xx)
    cover = m.reshape(s, ss, s, ss).mean((1, 3))[..., None]  # (s, s, 1) coverage of each pixel
    canvas[:] = canvas * (1 - cover) + cover * np.array(colour) / 255
    ys, xs = np.nonzero(m)
    return [xs.min() / ss, ys.min() / ss, (xs.max() + 1) / ss, (ys.max() + 1) / ss]

def shapes_images(n, size=32, seed=0):
    """n images: one main shape (its kind is the label) and 0-2 smaller distractors, with the box of
    every shape and a caption. Deterministic from the seed."""
    rng, s = np.random.default_rng(seed), size
    images, labels, boxes, box_labels, captions = [], [], [], [], []
    names = list(COLORS)
    for _ in range(n):
        canvas, objs = _background(rng, s), []
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
            bx.append(_paint(canvas, CLASSES[k], COLORS[colour], cx, cy, r, 2))
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
        bg, label = _background(rng, s), int(rng.integers(4))
        r = rng.uniform(0.12, 0.18) * s
        _paint(bg, CLASSES[rng.integers(len(CLASSES))], COLORS["white"], *rng.uniform(0.1 * s, 0.9 * s, 2), 0.1 * s, 2)
        travel = rng.uniform(0.5, 0.9) * (s - 2 * r)
        start = rng.uniform(r, s - r, 2)
        (ux, uy), axis = steps[label], 0 if steps[label][0] else 1
        start[axis] = r + rng.uniform(0, s - 2 * r - travel) if (ux + uy) > 0 else s - r - rng.uniform(0, s - 2 * r - travel)
        kind, colour = CLASSES[rng.integers(len(CLASSES))], COLORS[list(COLORS)[rng.integers(7)]]
        clip = []
        for t in range(frames):
            f = bg.copy()
            _paint(f, kind, colour, start[0] + ux * travel * t / max(frames - 1, 1),
                   start[1] + uy * travel * t / max(frames - 1, 1), r, 2)
            clip.append(torch.from_numpy((f * 255).round().astype(np.uint8)).permute(2, 0, 1))
        videos.append(torch.stack(clip)); labels.append(label)
    return dict(videos=torch.stack(videos), labels=torch.tensor(labels))

# ------------------------------------------------------------------ reading files

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")

def read_image(path):
    """An image file as uint8 (3, H, W) RGB; grey, RGBA and palette images are converted."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except Exception as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None

def read_video(path, short_side=None):
    """All frames of a video as uint8 (T, 3, H, W), decoded with PyAV (optionally resized so that
    the short side is `short_side`)."""
    try:
        import av
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = []
            for f in container.decode(stream):
                if short_side:
                    k = short_side / min(f.width, f.height)
                    f = f.reformat(width=max(1, round(f.width * k)), height=max(1, round(f.height * k)))
                frames.append(torch.from_numpy(f.to_ndarray(format="rgb24")))
    except Exception as e:
        raise DataError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise DataError(f"{path}: the video has no frames")
    return torch.stack(frames).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)

def _readable(path, video):
    try:
        if video:
            import av
            with av.open(str(path)) as c:
                return len(c.streams.video) > 0
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False

def _scan(root, exts, classes=None):
    """Files under root (recursively) with a label from their first folder, or -1 for a flat folder."""
    if not root.is_dir():
        die(f"{root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
    if not files:
        die(f"{root}: no files with extension {' '.join(exts)} found")
    good = [p for p in files if _readable(p, exts == VIDEO_EXTS)]
    if len(good) < len(files):
        print(f"warning: skipped {len(files) - len(good)} unreadable file(s) in {root} "
              f"(first: {next(p for p in files if p not in set(good))})", flush=True)
    if not good:
        die(f"{root}: none of the {len(files)} files could be read")
    if classes is None:
        tops = sorted({p.relative_to(root).parts[0] for p in good if len(p.relative_to(root).parts) > 1})
        flat = any(len(p.relative_to(root).parts) == 1 for p in good) or len(tops) < 2
        classes = [] if flat else tops
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index.get(p.relative_to(root).parts[0], -1) if classes else -1) for p in good], classes

def scan_folder(root, exts):
    """(train_items, val_items, classes): DIR/train + DIR/val when present, else every 5th file of
    each class (a fixed held-out part) for evaluation."""
    root = Path(root).expanduser()
    if (root / "train").is_dir():
        train, classes = _scan(root / "train", exts)
        val = _scan(root / "val", exts, classes)[0] if (root / "val").is_dir() else []
        return train, val, classes
    items, classes = _scan(root, exts)
    held = {id(it) for c in sorted({l for _, l in items}) for it in [x for x in items if x[1] == c][::5]}
    if len(held) == len(items):  # too few files to hold any out: evaluate on what we train on
        return items, items, classes
    return [it for it in items if id(it) not in held], [it for it in items if id(it) in held], classes

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

def load_captions(root):
    """[(image path, caption)] for every image with a non-empty same-stem .txt beside it."""
    items, no_txt, empty = [], 0, 0
    for path, _ in _scan(Path(root).expanduser(), IMAGE_EXTS)[0]:
        txt = path.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        no_txt, empty = no_txt + (text is None), empty + (text == "")
        if text:
            items.append((path, " ".join(text.split())))
    if no_txt or empty:
        print(f"warning: skipped {no_txt} image(s) with no caption file and {empty} with an empty one in {root}", flush=True)
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
    """Items from memory (a uint8 tensor) or from files, with unreadable files skipped and counted."""

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
                    die(f"no readable file left ({e})")
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
        classes = tops if len(tops) >= 2 and all(len(p.relative_to(root).parts) > 1 for p, _ in pairs) else []
        items = [(p, classes.index(p.relative_to(root).parts[0]) if classes else -1, c) for p, c in pairs]
        val = items[::5] if len(items) >= 5 else items
        train = [it for k, it in enumerate(items) if k % 5] if len(items) >= 5 else items
        make = lambda its, t: ImageDataset([p for p, _, _ in its], [l for _, l, _ in its], args.input_size, t,
                                           aug or "crop", [c for _, _, c in its])
        return make(train, True), make(val, False), classes
    train, val, classes = scan_folder(args.data, IMAGE_EXTS)
    make = lambda its, t: ImageDataset([p for p, _ in its], [l for _, l in its], args.input_size, t, aug or "crop")
    return make(train, True), make(val or train, False), classes

class VideoDataset(FileOrTensorDataset):
    """(clip (T, 3, S, S) normalized, label); with repeat_aug R > 1 in training, R clips of one
    decoded video: (clips (R, T, 3, S, S), labels (R,)). Videos shorter than a clip are looped."""

    def __init__(self, source, labels, num_frames, sampling_rate, size, train, repeat_aug=1):
        super().__init__(source, lambda p: read_video(p, short_side=round(size * 1.25)))
        self.labels, self.T, self.rate, self.size, self.train = labels, num_frames, sampling_rate, size, train
        self.repeat = repeat_aug if train else 1

    def __getitem__(self, i):
        i, frames = self.load(i)
        clips, span = [], (self.T - 1) * self.rate + 1
        for _ in range(self.repeat):
            room = max(len(frames) - span, 0)
            start = torch.randint(0, room + 1, (1,)).item() if self.train else room // 2
            clip = frames[(start + torch.arange(self.T) * self.rate) % len(frames)]  # (T, 3, H, W)
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
    return make(train, True), make(val or train, False), classes

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

def make_loader(ds, args, run, train, collate_fn=None, batch_size=None, whole=False):
    """Under torchrun each process gets its share of ds, unless whole=True (evaluation on one rank)."""
    bs = batch_size or args.batch_size
    drop = train and len(ds) > bs * run.world_size
    sampler = DistributedSampler(ds, shuffle=train, drop_last=drop) if run.distributed and not whole else None
    return DataLoader(ds, bs, shuffle=train and sampler is None, sampler=sampler, drop_last=drop,
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
    opt = torch.optim.AdamW(groups or param_groups(model, args.weight_decay), lr=args.lr, betas=betas)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    history, ckpt = dict(losses=[], steps=0, seconds=0.0, epoch=0), Path(args.out) / "checkpoint.pt"
    if args.resume:
        state = load_checkpoint(args.resume)
        load_state(model, state["model"], args.resume)
        opt.load_state_dict(state["optimizer"]); scaler.load_state_dict(state["scaler"]); history = state["history"]
        log(run, f"resumed from {args.resume} after epoch {history['epoch']}")
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused) if run.distributed else model
    net = torch.compile(net) if args.compile else net
    n = len(loader)
    if n == 0:
        die(f"no training batch: fewer examples than one batch of {args.batch_size}")
    for epoch in range(history["epoch"], args.epochs):
        torch.manual_seed(args.seed + 1000 * epoch + run.rank)  # a resumed epoch replays exactly
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(epoch)
        net.train()
        t0, seen = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not run.is_main, leave=False)
        for i, batch in enumerate(bar):
            lr = lr_at(args, epoch + i / n)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
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
        history["seconds"] += time.time() - t0
        history["epoch"] = epoch + 1
        log(run, f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(history['losses'][-n:]):.4f}  "
                 f"{seen / (time.time() - t0):.0f} samples/s")
        if run.is_main:
            save_checkpoint(ckpt, dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                                       history=history, args={k: v for k, v in vars(args).items()}))
        if on_epoch:
            on_epoch(epoch)
    return model, history

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
    """Atomic: write a temporary file beside the target, then rename it over the target."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)

def load_checkpoint(path):
    if not Path(path).expanduser().is_file():
        die(f"{path}: no such checkpoint file")
    try:
        return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

def unwrap_state(ckpt):
    for key in ("model", "model_state", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt

def load_state(model, state_dict, source, allow_missing=()):
    """Strict load; every missing, unexpected or wrongly shaped key is named in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(tuple(allow_missing) or ("\0",))]
    extra = [k for k in state_dict if k not in own]
    shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or extra or shape:
        show = lambda ks: ", ".join(ks[:6]) + (f" (+{len(ks) - 6} more)" if len(ks) > 6 else "")
        die(f"{source}: does not fit this model: " + "; ".join(
            f"{what} {show(ks)}" for what, ks in (("missing", missing), ("unexpected", extra), ("wrong shape", shape)) if ks))
    model.load_state_dict(state_dict, strict=False)

# ------------------------------------------------------------------ evaluation, pictures, benchmarks

@torch.no_grad()
def extract_features(fn, loader, run):
    """(X (N, D), y (N,)) on the CPU: fn(inputs) -> (B, D) for every batch (inputs = batch[0])."""
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
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(Xtr), (min(batch, len(Xtr)),), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(); F.cross_entropy(head(Xtr[idx]), ytr[idx]).backward(); opt.step()
    with torch.no_grad():
        return (head(Xva).argmax(1) == yva).float().mean().item()

def knn_accuracy(Xtr, ytr, Xva, yva, k=20, T=0.07):
    """Weighted k-nearest-neighbour vote on cosine similarity (weights exp(sim / T))."""
    Xtr, Xva, C = F.normalize(Xtr, dim=1), F.normalize(Xva, dim=1), int(max(ytr.max(), yva.max())) + 1
    correct = 0
    for xv, yv in zip(Xva.split(1024), yva.split(1024)):
        sim, idx = (xv @ Xtr.T).topk(min(k, len(Xtr)), dim=1)  # (b, k)
        votes = torch.zeros(len(xv), C).scatter_add_(1, ytr[idx], (sim / T).exp())
        correct += (votes.argmax(1) == yv).sum().item()
    return correct / len(yva)

def save_grid(path, rows, texts=None, scale=None):
    """One row of cells per tensor (N, 3, H, W) in [0, 1]; optional text under each cell."""
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

def benchmark(fn, run, warmup=3, reps=10):
    """Median wall time of fn() in seconds, after warm-up, with CUDA synchronized."""
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(); t = time.perf_counter(); fn(); sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
