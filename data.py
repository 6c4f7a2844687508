"""
Data and the run plumbing that every stage shares.

  - Shapes: the built-in dataset. Ten classes of procedurally drawn shapes on gradient backgrounds,
    deterministic from (seed, split, index), any resolution, no download. `--data shapes` everywhere.
  - ImageFolder: ImageNet layout (one sub-folder per class) or a flat folder of images (no labels).
  - The two transforms of the SPEC: the autoencoder's (short side resize, random crop, no flip) and
    the diffusion stage's (ADM centre crop, random flip). Pixels come out in [-1, 1].
  - setup()/cleanup(), make_loader(), RunOrder, save_checkpoint()/load_checkpoint(), the flag checks: device
    and DDP setup, the DDP-aware loader and its resumable order, atomic checkpoints and one-line errors for bad
    input, written once here and imported by ae.py, diffusion.py, sample.py and fid.py.

Look at the built-in data:  python data.py --out shapes.png
"""
import argparse
import errno
import gc
import math
import operator
import os
import pickle
import re
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "arrow", "heart")
SPLIT_IDS = {"train": 0, "val": 1}

# -----------------------------------------------------------------------------
# the built-in dataset


def _polygon(cx, cy, r, n, angle, inner=None):
    """Regular n-gon (or n-pointed star when inner is a radius ratio) centred at (cx, cy)."""
    k = 2 * n if inner else n
    return [(cx + r * (inner if inner and i % 2 else 1) * math.cos(angle + 2 * math.pi * i / k),
             cy + r * (inner if inner and i % 2 else 1) * math.sin(angle + 2 * math.pi * i / k)) for i in range(k)]


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)) for x, y in points]


POLYGONS = {"square": (4, None), "triangle": (3, None), "star": (5, 0.45), "hexagon": (6, None)}  # (n, inner)


def draw_shape(draw, label, cx, cy, r, angle, fill, back):
    """Draw class `label` of SHAPE_CLASSES, pointing along `angle` (a star's or triangle's first vertex, an arrow's
    tip, a crescent's bite, a heart's lobes); `back` is used to cut holes (ring, crescent)."""
    def disc(x, y, radius, color):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)

    def rotated(pts, turn=angle):
        draw.polygon(_rotate(pts, cx, cy, turn), fill=fill)

    name = SHAPE_CLASSES[label]
    if name in POLYGONS:
        draw.polygon(_polygon(cx, cy, r, POLYGONS[name][0], angle, inner=POLYGONS[name][1]), fill=fill)
    elif name in ("circle", "ring", "crescent"):
        disc(cx, cy, r, fill)
        if name == "ring":
            disc(cx, cy, 0.55 * r, back)
        elif name == "crescent":
            disc(cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle), 0.85 * r, back)
    elif name == "cross":
        w = r * 0.35
        for a, b in ((r, w), (w, r)):  # the horizontal bar, then the vertical one
            rotated([(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx - a, cy + b)])
    elif name == "arrow":
        rotated([(cx - r, cy - 0.25 * r), (cx + 0.1 * r, cy - 0.25 * r), (cx + 0.1 * r, cy - 0.7 * r), (cx + r, cy),
                 (cx + 0.1 * r, cy + 0.7 * r), (cx + 0.1 * r, cy + 0.25 * r), (cx - r, cy + 0.25 * r)])
    elif name == "heart":
        lobe, turn = 0.5 * r, angle + math.pi / 2  # drawn upright (lobes up, angle -pi/2), then turned
        rotated([(cx - r, cy - 0.1 * r), (cx, cy + r), (cx + r, cy - 0.1 * r), (cx, cy - 0.3 * r)], turn)
        for sx in (-1, 1):
            disc(*_rotate([(cx + sx * lobe, cy - 0.35 * r)], cx, cy, turn)[0], lobe * 1.05, fill)


def render_shape(label, size, rng):
    """One image: one light, upright shape of the class, near the centre, on a dark two-colour gradient.

    The class is most of what varies between images (27% of the pixel variance is between classes); with
    random colours, positions, rotations and striped backgrounds it was 0.4%, and a tiny DiT trained on CPU
    for minutes spent itself on the backgrounds (README, Results)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 90, 3), rng.uniform(0, 90, 3)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(theta) * xx + np.sin(theta) * yy + 1.5) / 3)[..., None]
    back = c0 * ramp + c1 * (1 - ramp)
    img = Image.fromarray(np.clip(back, 0, 255).astype(np.uint8))
    r = size * rng.uniform(0.28, 0.36)
    cx, cy = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    fill = tuple(int(v) for v in rng.uniform(150, 255, 3))
    hole = tuple(int(v) for v in back[int(cy), int(cx)])  # the centre is inside the image
    draw_shape(ImageDraw.Draw(img), label, cx, cy, r, -math.pi / 2 + rng.uniform(-0.35, 0.35), fill, hole)
    return img


class Shapes(Dataset):
    """Built-in class-conditional data: image i of a split is a pure function of (seed, split, i)."""

    num_classes = len(SHAPE_CLASSES)

    def __init__(self, split="train", size=256, length=None, seed=0, flip=False):
        assert split in SPLIT_IDS, f"split must be one of {list(SPLIT_IDS)}"
        self.split, self.size, self.seed, self.flip = split, size, seed, flip
        self.length = length or (50_000 if split == "train" else 10_000)
        self.skipped = torch.zeros(1, dtype=torch.int64)  # same interface as ImageFolder

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        label = index % self.num_classes  # class-balanced
        img = to_tensor(render_shape(label, self.size, rng))
        if self.flip and torch.rand(()) < 0.5:  # draws from torch's per-worker seed, like any transform
            img = img.flip(-1)
        return img, label


# -----------------------------------------------------------------------------
# image folders


def to_tensor(img):
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1)


def to_uint8(x):
    """Images in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU (rounded, as the ADM suite saves them)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB. 16/32-bit grayscale is rescaled, not clipped (PIL's convert clips)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / (65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0) * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_crop(img, size, train):
    """Autoencoder transform (SPEC 1): resize the short side to `size`, random crop (centre when not
    training), no flip."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if train:
        left, top = np.random.randint(0, w - size + 1), np.random.randint(0, h - size + 1)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def adm_center_crop(img, size):
    """ADM's centre crop (SPEC 2): halve with a box filter while the short side >= 2*size, then bicubic
    resize of the short side to `size`, then centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def check_data(root):
    """--data: 'shapes' or an existing folder (checked before the models are built)."""
    if root != "shapes" and os.path.isfile(root):
        raise SystemExit(f"data: '{root}' is a file; pass a folder of images (ImageNet layout or flat) or shapes")
    if root != "shapes" and not os.path.isdir(root):
        raise SystemExit(f"data: folder '{root}' does not exist; pass --data shapes for the built-in data")


def _is_dir(entry):
    """A folder entry's kind without raising: a symlink to itself (ELOOP) or an unreadable entry counts as a file,
    which the loader then skips and counts."""
    try:
        return entry.is_dir()
    except OSError:
        return False


class ImageFolder(Dataset):
    """root/<class>/<image> (ImageNet layout, sorted class names -> ids) or root/<image> (label 0, unconditional).
    Unreadable files are skipped: the next index is served instead and the miss is counted in
    `self.skipped` (shared memory, so DataLoader workers add to the same counter)."""

    def __init__(self, root, size=256, stage="ae", train=True):
        check_data(root)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        is_dir = {e.path: _is_dir(e) for e in entries}
        classes = [e.name for e in entries if is_dir[e.path] and not e.name.startswith(".")]
        if classes:
            files = [(os.path.join(dp, f), i) for i, c in enumerate(classes)
                     for dp, _, fs in sorted(os.walk(os.path.join(root, c))) for f in sorted(fs)]
        else:  # every other entry is a candidate: one that cannot be read is skipped and counted
            files = [(e.path, 0) for e in entries if not is_dir[e.path]]
        self.classes = classes or ["(unlabelled)"]
        self.num_classes = len(self.classes)
        self.files = [(p, y) for p, y in files if p.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.files:
            raise SystemExit(f"data: no image files ({', '.join(IMAGE_EXTENSIONS)}) in '{root}'")
        self.size, self.stage, self.train = size, stage, train
        self.skipped = torch.tensor([len(files) - len(self.files)]).share_memory_()  # other extensions count as skipped
        if all(self._load(path) is None for path, _ in self.files):  # fail at start, not mid-run
            raise SystemExit(f"data: none of the {len(self.files)} image files in '{root}' can be read")

    def __len__(self):
        return len(self.files)

    def _load(self, path):
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    def __getitem__(self, index):
        for k in range(len(self.files)):
            path, label = self.files[(index + k) % len(self.files)]
            img = self._load(path)
            if img is not None:
                break
            self.skipped += 1
        if self.stage == "ae":
            img = resize_crop(img, self.size, self.train)
        else:
            img = adm_center_crop(img, self.size)
            if self.train and np.random.rand() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img), label


def build_dataset(data, size, stage, train=True, seed=0):
    """`data` is 'shapes' (built-in) or a folder. stage 'ae' = resize + random crop, no flip;
    stage 'diffusion' = ADM centre crop + random flip. train=False gives the held-out split for
    shapes and deterministic crops without flips for folders."""
    if data == "shapes":
        return Shapes("train" if train else "val", size=size, seed=seed, flip=(stage == "diffusion" and train))
    return ImageFolder(data, size=size, stage=stage, train=train)


# -----------------------------------------------------------------------------
# the run plumbing


def setup(seed=0):
    """DDP when torchrun launched us (NCCL on CUDA, gloo on CPU), else one process on cuda > mps > cpu.
    Returns a dict: ddp, rank, local_rank, world_size, device, master."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if not ddp:
        device = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+: what the paper's "fp32" runs used
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    return dict(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world, device=device, master=rank == 0)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX in /proc/cpuinfo: the CPU multiplies bf16 natively. Without them (AVX2 only) PyTorch
    emulates bf16 matmuls, 25-70x slower than fp32 (measured on an AMD EPYC, issue 8)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: assume no native bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_bf16(flag, device):
    """--bf16 / --no-bf16 force it (flag True/False); with neither (None) the hardware decides: bf16 on a CUDA
    device that supports it, on a CPU only with native bf16 matmuls. Returns (bf16, reason for the log)."""
    if flag is not None:
        return flag, "forced by --bf16" if flag else "forced by --no-bf16"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'does not support'} bf16"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return True, "the CPU has native bf16 matmuls: AVX512-BF16 or AMX"
        return False, "the CPU has no native bf16 (no AVX512-BF16/AMX): emulated bf16 is 25-70x slower than fp32"
    return False, f"no bf16 autocast on {device.type}"


def autocast(device, bf16):
    """bf16 autocast on CUDA and on CPU, nothing otherwise (choose_bf16 decides whether)."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_gib(device):
    """Peak allocated GPU memory, or the process's peak RSS on CPU (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only; imported here so that data.py stays importable elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def check_args(args, at_least=None, at_most=None, positive=()):
    """Bad flags stop in one line before any work: every float flag must be finite (argparse takes 'nan' and
    'inf'), `at_least` / `at_most` map flags to bounds, `positive` flags must be > 0. None (not set yet) passes."""
    def flag(name):
        return "--" + name.replace("_", "-")
    for name, value in vars(args).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise SystemExit(f"{flag(name)} must be a finite number (got {value})")
    for bounds, fails, rule in ((at_least, operator.lt, "at least {}"), (at_most, operator.gt, "at most {}"),
                                (dict.fromkeys(positive, 0), operator.le, "positive")):
        for name, bound in (bounds or {}).items():
            value = getattr(args, name)
            if value is not None and fails(value, bound):
                raise SystemExit(f"{flag(name)} must be {rule.format(bound)} (got {value})")


def check_out_dir(path, flag="--out-dir"):
    """Create the output folder now, so that a path under a file, in /proc or without permission fails in one
    line before any work rather than at the first save."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{flag} '{path}' cannot be created ({e.strerror}); pass a writable folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} '{path}' is not writable; pass a writable folder")


def check_out_file(path, extensions, flag="--out"):
    """An output file path, checked before the work that fills it: not a folder, a known extension, a writable
    folder around it."""
    if os.path.isdir(path):
        raise SystemExit(f"{flag} '{path}' is a folder; pass a file name such as "
                         f"{os.path.join(path, 'out' + extensions[0])}")
    if not path.lower().endswith(tuple(extensions)):
        raise SystemExit(f"{flag} '{path}' must end in {' or '.join(extensions)}; pass {flag} NAME{extensions[0]}")
    check_out_dir(os.path.dirname(os.path.abspath(path)), f"the folder of {flag}")


def derive_device_batch(global_batch, world_size, cap):
    """--device-batch when it is not given: the largest micro-batch up to the preset's `cap` (what fits in memory)
    that splits each process's share of the global batch evenly, so a preset runs on any process count."""
    if global_batch % world_size:
        raise SystemExit(f"--batch-size {global_batch} does not split over {world_size} processes; pass a multiple of "
                         f"{world_size}")
    share = global_batch // world_size
    return max(d for d in range(1, min(cap, share) + 1) if share % d == 0)


def grad_accum_steps(global_batch, device_batch, world_size):
    """The global batch is the hyper-parameter: the same flags give the same run on 1 or 8 processes."""
    per_step = device_batch * world_size
    if global_batch % per_step:
        raise SystemExit(f"--batch-size {global_batch} is not a multiple of --device-batch {device_batch} x "
                         f"{world_size} processes; change one of them")
    return global_batch // per_step


def shard(num, batch_size, rank, world_size):
    """Rank r's contiguous share [start, stop) of `num` items, cut at whole batches: every item is computed in
    the same batch whatever the process count, so N processes give what 1 gives bit for bit (batched kernels
    round differently for different batch compositions). Used by sample.py and fid.py."""
    num_batches = -(-num // batch_size)
    first, last = (num_batches * r // world_size for r in (rank, rank + 1))
    return min(num, first * batch_size), min(num, last * batch_size)


def no_augment(dataset):
    """The held-out transform on a training set: Shapes flips, folders in train mode crop and flip at random."""
    for attr in ("flip", "train"):
        if hasattr(dataset, attr):
            setattr(dataset, attr, False)
    return dataset


@torch.no_grad()
def encode_once(fn, dataset, num, batch, device, run, desc):
    """The first `num` training images through `fn` (images, their slice of indices -> a tuple of tensors) once, in
    the held-out transform (no flips), as a TensorDataset of fn's outputs and the labels: ae.py's --cache-features and
    diffusion.py's --cache-latents, so that a CPU run does not pay for the frozen encoder on every step. Each process
    encodes a share; all get the whole set in order."""
    num = min(num, len(no_augment(dataset)))
    start, stop = shard(num, batch, run["rank"], run["world_size"])
    loader = DataLoader(torch.utils.data.Subset(dataset, range(start, stop)), batch_size=batch,
                        num_workers=min(4, max(0, (os.cpu_count() or 1) - 1)))
    outs = [[*(t.float().cpu() for t in fn(images.to(device), slice(start + k * batch, start + k * batch + len(y)))), y]
            for k, (images, y) in enumerate(tqdm(loader, desc=desc, disable=not run["master"]))]
    outs = [torch.cat(parts) for parts in zip(*outs)]
    if run["ddp"]:  # shares are cut at whole batches: gathering the padded shares and trimming restores the order
        sizes = [shard(num, batch, r, run["world_size"]) for r in range(run["world_size"])]
        longest = max(b - a for a, b in sizes)
        for i, x in enumerate(outs):
            padded = torch.cat([x, x.new_zeros(longest - len(x), *x.shape[1:])]).to(device)
            parts = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(parts, padded)
            outs[i] = torch.cat([part[:b - a].cpu() for part, (a, b) in zip(parts, sizes)])
    cached = torch.utils.data.TensorDataset(*outs)
    cached.skipped = dataset.skipped  # the training log reports the encoded set's unreadable files
    return cached


def make_loader(dataset, batch_size, shuffle=True, drop_last=True, seed=0, num_workers=None):
    """DataLoader with a DistributedSampler under DDP."""
    if len(dataset) < batch_size and drop_last:
        raise SystemExit(f"data: {len(dataset)} images is fewer than one batch of {batch_size}")
    sampler = None
    if dist.is_available() and dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if num_workers is None:
        num_workers = min(8, max(0, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                      drop_last=drop_last, num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


class RunOrder(Dataset):
    """Position p of a run's data stream -> an item of `dataset` (any Dataset). The order is a pure function of
    (seed, position): a new permutation per epoch, so --resume skips the consumed items in O(1) and is exact
    across epoch boundaries. Rank r's k-th micro-batch is chunk k*W + r of the global order, i.e. the same
    micro-batches as one process with gradient accumulation (a DistributedSampler without shuffle hands rank r
    the positions r, r+W, ..., which __getitem__ undoes). The dataset's own random augmentation (crops, flips)
    draws from torch's and numpy's global generators, seeded here per position: it too is the same after a
    resume, with any number of workers or processes. Load it with make_loader(..., shuffle=False)."""

    def __init__(self, dataset, seed, start, length, world_size, device_batch):
        self.dataset, self.seed, self.start, self.length = dataset, seed, start, length
        self.world, self.db, self.epoch, self.perm = world_size, device_batch, None, None
        self.skipped = getattr(dataset, "skipped", torch.zeros(1, dtype=torch.int64))  # unreadable files so far

    def __len__(self):
        return self.length

    def __getitem__(self, p):
        i, r = divmod(p, self.world)
        k, j = divmod(i, self.db)
        position = self.start + (k * self.world + r) * self.db + j
        epoch, pos = divmod(position, len(self.dataset))
        if epoch != self.epoch:  # a new permutation per epoch
            self.perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            self.epoch = epoch
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
        torch.default_generator.manual_seed(self.seed * 1_000_003 + position)  # CPU only: CUDA's stream is untouched
        np.random.seed([self.seed % 2**32, position])
        try:
            return self.dataset[int(self.perm[pos])]
        finally:  # the caller's generators continue as if nothing was drawn
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)


def save_checkpoint(obj, path):
    """Atomic: write a temporary file then rename, so a crash never leaves half a checkpoint. The temporary is
    removed on any failure (and a dead process's leftover on the next save); a full disk is one line. Weights
    holding NaN or inf are never written: the checkpoint on disk stays the last good one."""
    bad = [f"{part}.{k}" for part in ("model", "ema") for k, v in (obj.get(part) or {}).items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"not saving {path}: {len(bad)} tensors hold NaN or inf (first {bad[0]}); the file on disk "
                         "is kept. Lower --lr or check the data")
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # leftovers of a killed process (SIGKILL, OOM) would fill the disk over time
        pid = f[len(name) + 4:] if f.startswith(name + ".tmp") else ""
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(folder, f))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a Python file: a full disk is OSError ENOSPC, not torch's cryptic RuntimeError
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SystemExit(f"disk full while writing {path}; free space there (the previous file is kept)") from None
        raise


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# what each stage's checkpoint holds (ae.py: model + config with the image size; diffusion.py: also `ae`)
KINDS = {"ae": "an autoencoder checkpoint (ae.py)", "dit": "a diffusion checkpoint (diffusion.py)",
         None: "not a checkpoint of this project (the authors' files need --convert-official first)"}


def checkpoint_kind(ckpt):
    if isinstance(ckpt, dict) and "ae" in ckpt and "config" in ckpt:
        return "dit"
    if isinstance(ckpt, dict) and "model" in ckpt and "image_size" in (ckpt.get("config") or {}):
        return "ae"
    return None


def load_checkpoint(path, what="checkpoint", kind=None):
    """Plain-dict checkpoints load with weights_only=True; a missing or corrupt file, or one of the wrong `kind`
    ('ae' or 'dit'), is one clear line."""
    if not path or not os.path.isfile(path):
        raise SystemExit(f"{what} '{path}' not found; train one first or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise SystemExit(f"{what} '{path}' cannot be read ({type(e).__name__}): is it a complete checkpoint?")
    if kind and checkpoint_kind(ckpt) != kind:
        raise SystemExit(f"{what} '{path}' is {KINDS[checkpoint_kind(ckpt)]}; pass {KINDS[kind]}")
    return ckpt


class Opaque:
    """Stands in for a pickled object of a foreign class: its state is kept as data, none of the class's code runs."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# What the authors' checkpoints pickle besides tensors and plain containers: DiT-style scripts save their
# argparse.Namespace; a Lightning checkpoint's `hyper_parameters` may be Lightning's AttributeDict (a dict) or
# omegaconf containers with their metadata, read here as inert data (the official SVG autoencoder does not even
# save hyper-parameters). Anything else needs --trust-checkpoint.
FOREIGN_GLOBALS = [
    argparse.Namespace, (dict, "builtins.dict"), (list, "builtins.list"),
    *[(dict, m + ".AttributeDict") for m in ("lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
                                             "pytorch_lightning.utilities.parsing")],
    *[(Opaque, "omegaconf." + n) for n in ("dictconfig.DictConfig", "listconfig.ListConfig", "base.Metadata",
                                           "base.ContainerMetadata", "nodes.AnyNode", "nodes.StringNode",
                                           "nodes.IntegerNode", "nodes.FloatNode", "nodes.BooleanNode")],
    *[(Opaque, n) for n in ("typing.Any", "typing.Dict", "typing.List", "collections.defaultdict")]]


def load_foreign(path, what, trust=False):
    """A checkpoint made by other code (the official ones), never silently unpickling arbitrary objects:
    weights_only with FOREIGN_GLOBALS, else one line naming what the file pickles. trust=True
    (--trust-checkpoint) unpickles anything, with a loud warning."""
    if not os.path.isfile(path):
        raise SystemExit(f"{what} '{path}' not found")
    if trust:
        print("!" * 100 + f"\n!!! --trust-checkpoint: unpickling '{path}' with weights_only=False runs any code the "
              "file holds; only for a file from a source you trust\n" + "!" * 100, flush=True)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(FOREIGN_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|function (.+?)(?:\.|$)", str(e), re.M)
        raise SystemExit(f"{what} '{path}' pickles {found and (found[1] or found[2]) or 'objects'} besides tensors and "
                         "plain containers, and unpickling that could run code: pass --trust-checkpoint only if you "
                         "trust where the file comes from")
    except Exception as e:  # truncated, not a torch file
        raise SystemExit(f"{what} '{path}' cannot be read ({type(e).__name__}): is it a complete checkpoint?")


def start_or_resume(path, resume, overwrite, kind, steps):
    """The checkpoint to continue (--resume) or None for a new run, which never replaces a checkpoint silently."""
    if not resume:
        if os.path.exists(path) and not overwrite:
            raise SystemExit(f"{path} already holds a checkpoint: pass --resume to continue it, another --out-dir for "
                             "a new run, or --overwrite to replace it")
        return None
    ckpt = load_checkpoint(path, "checkpoint to resume", kind)
    if ckpt.get("opt") is None:
        raise SystemExit(f"--resume: {path} holds no optimizer state (a converted checkpoint?); start a new run")
    if steps <= ckpt["step"]:
        raise SystemExit(f"--resume: {path} is at step {ckpt['step']} already; pass a larger --steps")
    return ckpt


def lr_at(step, args):
    """The lr of 0-based `step`: --lr, constant (the papers), except over the last --lr-decay fraction of --steps,
    where it falls linearly towards 0 (ours, for short runs: the last updates at a small lr average out the noise of
    the large ones). A function of the step and --steps only, so a resumed run follows the same schedule."""
    start = args.steps * (1 - args.lr_decay)
    return args.lr if step < start else args.lr * (args.steps - step) / (args.steps - start)


def stop_if_nonfinite(step, terms, path):
    """A diverged run (a loss term or the gradient norm NaN or inf) stops before its optimizer step, so the
    weights never turn non-finite and the checkpoint on disk stays the last good one. `terms` maps names to
    floats or 0-d tensors; the tensors are read with one device sync."""
    tensors = {k: v for k, v in terms.items() if torch.is_tensor(v)}
    if tensors:
        terms = {**terms, **dict(zip(tensors, torch.stack([v.detach().float() for v in tensors.values()]).tolist()))}
    if all(math.isfinite(v) for v in terms.values()):
        return
    kept = f"{path} keeps the last good checkpoint" if os.path.exists(path) else "no checkpoint was written"
    raise SystemExit(f"step {step}: non-finite training values ({', '.join(f'{k} {v:.4g}' for k, v in terms.items())})"
                     f"; stopped before the optimizer step, {kept}. Lower --lr or check the data")


# -----------------------------------------------------------------------------
# --benchmark (ae.py and diffusion.py): nanoGPT's bench.py, but timing each stage's own train_step, the function
# its training loop calls. Here: the modes a machine runs, the peak that MFU divides by, which fast paths are on,
# a timer that drops the warm-up (and compile) steps, a FLOP counter and the table.

# dense datasheet peaks in TFLOP/s (bf16, TF32); any other device gets a measured matmul instead
PEAK_TFLOPS = {"H100": (989.0, 494.7), "H200": (989.0, 494.7), "A100": (312.0, 156.0)}


def add_args(parser):
    """The benchmark's flags, the same in ae.py and diffusion.py."""
    parser.add_argument("--benchmark", action="store_true",
                        help="time the training step on synthetic data in every mode this machine runs, print a table, exit")
    parser.add_argument("--bench-steps", type=int, default=10, help="--benchmark: timed steps per mode")
    parser.add_argument("--bench-warmup", type=int, default=2, help="--benchmark: untimed first steps (compilation included)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_tflops(device, dtype=torch.float32):
    """The best of a few large square matmuls: what this device's BLAS reaches in practice."""
    n = 8192 if device.type == "cuda" else 1536
    g = torch.Generator().manual_seed(0)  # its own generator: the run's random stream stays untouched
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    a @ b  # warm-up
    best = min(time_steps(lambda i: a @ b, 0, 1, device)[1] for _ in range(2))
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device, bf16):
    """(TFLOP/s, its source) for MFU: the datasheet's dense peak of known GPUs; elsewhere a measured matmul in this
    process, since a CPU has no datasheet figure that its BLAS reaches (a shared CPU also measures its neighbours' load)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak_bf16, peak_tf32) in PEAK_TFLOPS.items():
            if key in name:
                return (peak_bf16 if bf16 else peak_tf32), f"{name} datasheet, dense {'bf16' if bf16 else 'TF32'}"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return matmul_tflops(device, dtype), f"measured {str(dtype)[6:]} matmul on this {device.type}"


def modes(bf16, compile, device):
    """(bf16, compile) pairs to time: both precisions where bf16 is native and both compile settings, unless
    --bf16/--no-bf16 or --compile/--no-compile pins one. Returns (modes, a note on what was skipped or '')."""
    precisions, note = [bf16], ""
    if bf16 is None:
        native, why = choose_bf16(None, device)
        precisions, note = ([False, True], "") if native else ([False], f"bf16 not timed: {why} (force it with --bf16)")
    return [(p, c) for p in precisions for c in ([False, True] if compile is None else [compile])], note


def precision_name(bf16, device):
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "bf16 autocast" if bf16 else "TF32" if tf32 else "fp32"


def flash_attention(device, dtype, num_heads, tokens, head_dim):
    """Whether scaled_dot_product_attention takes the flash kernel for this shape and dtype (it prefers flash
    whenever the kernel accepts the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.zeros(1, num_heads, tokens, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the refusal is the answer; CUDA also warns why
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def fast_paths(device, opt, run):
    """One line: the settings that decide speed besides precision and compile."""
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    backend = f"DDP over {dist.get_backend()}, {run['world_size']} processes" if run["ddp"] else "1 process, no DDP"
    fused = "on" if opt.defaults.get("fused") else "off"
    tf32 = ("on" if torch.backends.cuda.matmul.allow_tf32 else "off") if cuda else "n/a (not CUDA)"
    return (f"{device} ({where}) | {backend} | fused {type(opt).__name__} {fused} | TF32 matmuls {tf32} | "
            "torch.compile wraps the model before DDP")


def reset_peak_memory(device):
    """Start a mode's peak-memory count: CUDA's allocator peak, or on Linux the process's peak RSS (writing 5 to
    /proc/self/clear_refs resets it, and ru_maxrss with it, which peak_memory_gib reads). False where it cannot
    (then the peak is the process's so far)."""
    torch.compiler.reset()  # drop the previous mode's compiled graphs and what they hold
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_steps(step, warmup, steps, device):
    """Calls step(i) for i < warmup + steps; returns (seconds of the warm-up calls, where compilation happens, and
    mean seconds per timed call). Under DDP every call ends in the all-reduce, so ranks stay in step."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    t1 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync(device)
    return t1 - t0, (time.perf_counter() - t1) / steps


def count_flops(fn):
    """FLOPs of one call of fn, forward and backward, as torch's counter sees them (matmuls, convolutions, attention).
    Attention runs through the math kernel here: its matmuls are counted on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_plan(args, world):
    """--benchmark's flag checks and batch arithmetic (ae.py and diffusion.py): the global batch defaults to one
    micro-batch per process; returns the accumulation steps."""
    if min(args.bench_steps, args.device_batch) < 1 or args.bench_warmup < 0:
        raise SystemExit("--benchmark needs --bench-steps >= 1, --bench-warmup >= 0 and --device-batch >= 1")
    args.batch_size = args.batch_size or args.device_batch * world
    return grad_accum_steps(args.batch_size, args.device_batch, world)


def bench_header(what, args, accum, device, opt, run, note):
    """--benchmark's first lines: what is timed, the batch arithmetic, the fast paths and the mode note."""
    print0(f"benchmark: {what}; {run['world_size']} process(es) x {args.device_batch} x {accum} accumulation = "
           f"{args.batch_size} images/step; {args.bench_warmup} warm-up steps dropped, {args.bench_steps} timed\n"
           f"{fast_paths(device, opt, run)}" + (f"\n{note}" if note else ""))


def fmt(x):
    """A rate for people and the tests' parsers: three significant digits, never exponent form (`:.3g` prints
    1234 images/s as 1.23e+03)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def bench_row(bf16, compile, flash, sec, flops, peak, warm, args, device, world):
    """One --benchmark table row (BENCH_COLUMNS): `flops` per step of one process, `peak` in TFLOP/s."""
    img_s = args.batch_size / world / sec  # per process
    return [precision_name(bf16, device), "on" if compile else "off", " / ".join("yes" if f else "no" for f in flash),
            f"{1000 * sec:.1f}", fmt(img_s), fmt(img_s * world), f"{100 * flops / sec / (peak * 1e12):.1f}% of {fmt(peak)}",
            f"{peak_memory_gib(device):.2f}", f"{warm:.1f}"]


BENCH_COLUMNS = ["precision", "compile", "flash attention", "ms/step", "images/s per process", "images/s total",
                 "MFU of peak TFLOP/s", "peak memory GiB", "warm-up s"]


def table(header, rows):
    """A markdown table, printed by rank 0: it pastes into the README as it is."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print0("\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a grid of the built-in Shapes data.")
    parser.add_argument("--out", default="shapes.png", help="output PNG")
    parser.add_argument("--size", type=int, default=128, help="image resolution")
    parser.add_argument("--split", default="train", choices=list(SPLIT_IDS), help="which split")
    args = parser.parse_args()
    ds = Shapes(args.split, size=args.size)
    imgs = to_uint8(torch.stack([ds[i][0] for i in range(40)]))  # (40, H, W, 3): 4 rows of the 10 classes
    grid = imgs.view(4, 10, args.size, args.size, 3).permute(0, 2, 1, 3, 4).reshape(4 * args.size, 10 * args.size, 3)
    Image.fromarray(grid.numpy()).save(args.out)
    print(f"wrote {args.out}: columns are {', '.join(SHAPE_CLASSES)}")
