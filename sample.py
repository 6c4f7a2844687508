"""
Sampling: noise -> the DiT's flow (diffusion.sample) -> un-standardise -> decode -> images (SPEC 3).

A labelled grid (one row per class), after the tiny ae.py and diffusion.py runs:
  python sample.py --steps 5                                   # out/dit/dit.pt, AE from the checkpoint
  python sample.py --steps 25 --solver heun --cfg 4 --cfg-interval 0 0.7 --classes 1 3 --seed 7
Noise interpolation between two seeds (rows: linear and spherical, per class):
  python sample.py --steps 5 --interpolate 1 --classes 3
Samples for fid.py (uint8 NHWC `arr_0`, `labels`, and the sampler settings), class-balanced:
  python sample.py --num 50000 --steps 25 --cfg 1.5 --out samples.npz                    # one GPU
  torchrun --standalone --nproc_per_node=8 sample.py --num-samples 50000 --steps 25 --out samples.npz
The released weights, once converted (README): python sample.py --ae svg_ae.pt --ckpt svg_xl.pt --steps 5
"""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
from ae import load_autoencoder
from diffusion import SAMPLE_SHIFT, from_tokens, load_model, resolve_shift, sample, shift_arg

# DiT's showcase classes (golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox)
IMAGENET_SHOWCASE = [207, 360, 387, 974, 88, 979, 417, 279]


def noise_for(seed, indices, tokens, channels):
    """Sample i's noise is a pure function of (seed, i), so batch size and process count never change
    an image (same seeding scheme as data.Shapes)."""
    rngs = (np.random.default_rng([seed, int(i)]) for i in indices)
    return torch.from_numpy(np.stack([rng.standard_normal((tokens, channels), dtype=np.float32) for rng in rngs]))


def slerp(z0, z1, alpha):
    """Spherical interpolation: keeps the norm of Gaussian noise, which the linear path shrinks mid-way."""
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm())).clamp(min=1e-6)
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def generate(model, ae, labels, seed, steps, shift, cfg, solver, interval, batch_size, index_offset=0,
             noise=None, progress=False):
    """Images for `labels` (sample i uses noise (seed, index_offset + i)), uint8 NHWC numpy.
    `noise` [N,T,C] replaces the seeded noise (interpolation)."""
    device = next(model.parameters()).device
    tokens, channels = model.ae["grid"] ** 2, model.ae["latent_channels"]
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = []
    for start in tqdm(range(0, len(labels), batch_size), disable=not progress, desc="sampling"):
        stop = min(start + batch_size, len(labels))
        x0 = noise[start:stop] if noise is not None else noise_for(seed, range(index_offset + start, index_offset + stop),
                                                                   tokens, channels)
        x1 = sample(model, x0.to(device), labels[start:stop].to(device), steps=steps, shift=shift, cfg=cfg,
                    solver=solver, interval=tuple(interval))  # (b, T, C), standardised latent tokens
        images = ae.decode(ae.unstandardize(from_tokens(x1.float(), model.ae["grid"]))).clamp(-1, 1)  # (b, 3, H, W)
        out.append(data.to_uint8(images).numpy())
    return np.concatenate(out) if out else np.zeros((0, ae.image_size, ae.image_size, 3), np.uint8)


def peek(path):
    """A checkpoint's dict without reading its tensors (memory-mapped); None when it is no such file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated or foreign: data.load_checkpoint reports it in one line
        return None


def load(ckpt, ae_path=None, ema=True, device="cpu"):
    """The DiT and the AE it was trained on, checked to agree. fid.py uses this too."""
    meta = peek(ckpt)
    if isinstance(meta, dict) and "ae" not in meta:
        raise SystemExit(f"sample: '{ckpt}' is not a diffusion.py checkpoint (an AE's?); pass the DiT as --ckpt, "
                         "or convert the official one with diffusion.py --convert-official")
    model = load_model(ckpt, ema=ema).to(device)
    model.args = (meta or {}).get("args") or {}  # class names of the grid
    ae_path = ae_path or model.ae["path"]
    if not os.path.isfile(ae_path):
        raise SystemExit(f"sample: AE checkpoint '{ae_path}' (recorded in '{ckpt}') not found; pass --ae PATH")
    if "ae" in (peek(ae_path) or {}):
        raise SystemExit(f"sample: --ae '{ae_path}' is a diffusion checkpoint; pass the AE (ae.py) checkpoint")
    ae = load_autoencoder(ae_path, device=device)
    want = (model.ae["latent_channels"], model.ae["grid"])
    have = (ae.latent_channels, ae.image_size // ae.patch_size)
    if want != have:
        raise SystemExit(f"sample: DiT '{ckpt}' was trained on {want[0]}-channel {want[1]}x{want[1]} latents but AE "
                         f"'{ae_path}' makes {have[0]}-channel {have[1]}x{have[1]} ones; pass the AE it was trained on")
    # The DiT's latent space is defined by the statistics it was trained with (SPEC 1, "recompute whenever
    # the AE changes"): if the AE's were recomputed since, un-standardise with the DiT's.
    mean, std = (torch.as_tensor(model.ae[k], dtype=torch.float32).reshape(-1) for k in ("latent_mean", "latent_std"))
    if not (torch.allclose(ae.latent_mean.cpu(), mean) and torch.allclose(ae.latent_std.cpu(), std)):
        data.print0(f"sample: AE '{ae_path}' statistics differ from those the DiT was trained with; using the DiT's")
        ae.latent_mean.copy_(mean)
        ae.latent_std.copy_(std)
    return model, ae


def resolve_sampler_shift(args, model):
    """--shift: the number to sample with. By default the sampling shift diffusion.py recorded for this DiT
    (SVG's 0.15, or 'auto' for a DiT trained with --shift auto); 'auto' becomes RAE's value for its latent."""
    shift = (model.args.get("sample_shift") or SAMPLE_SHIFT) if args.shift is None else args.shift
    args.shift = resolve_shift(shift, model.config)


def save_grid(images, rows, row_names, path):
    """uint8 [rows*cols,H,W,3] -> one PNG with each row's name in a strip on the left."""
    n, h, w, _ = images.shape
    cols = n // rows
    grid = images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    margin = 8 + int(max(ImageFont.load_default().getlength(s) for s in row_names))
    canvas = Image.new("RGB", (margin + cols * w, rows * h), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(row_names):
        draw.text((4, r * h + h // 2 - 5), name, fill="black")
    canvas.save(path)


def write_npz(args, model, ae, run):
    """--num N: each rank makes its share of the N samples; rank 0 joins the shares in index order."""
    classes = args.classes or list(range(model.config["num_classes"]))
    labels = np.array([classes[i % len(classes)] for i in range(args.num)])  # class-balanced (SPEC 4: 50 per class)
    start, stop = data.shard(args.num, args.batch_size, run["rank"], run["world_size"])
    images = generate(model, ae, labels[start:stop], args.seed, args.steps, args.shift, args.cfg, args.solver,
                      args.cfg_interval, args.batch_size, index_offset=start, progress=run["master"])
    np.save(f"{args.out}.part{run['rank']}.npy", images)  # through the disk: 50k images are too big for gloo/NCCL
    if run["ddp"]:
        dist.barrier()
    if run["master"]:
        parts = [f"{args.out}.part{r}.npy" for r in range(run["world_size"])]
        arr = np.concatenate([np.load(p) for p in parts])
        # The protocol travels with the samples so fid.py can print what it is scoring.
        np.savez(args.out, arr_0=arr, labels=labels, steps=args.steps, shift=args.shift, solver=args.solver,
                 cfg=args.cfg, interval=np.array(args.cfg_interval), ckpt=os.path.abspath(args.ckpt), seed=args.seed,
                 ema=not args.no_ema)
        for p in parts:
            os.remove(p)
        print(f"wrote {args.out}: {arr.shape[0]} images {arr.shape[1]}x{arr.shape[2]}, {len(classes)} classes")
    if run["ddp"]:
        dist.barrier()


def add_sampler_args(parser):
    """The sampler's flags, shared with fid.py --ckpt so the two never drift (SPEC 3 defaults)."""
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--steps", type=int, default=25, help="solver steps (SPEC 3: 25; SVG's headline is 5)")
    parser.add_argument("--shift", type=shift_arg, default=None, help="sampling time shift, a number or 'auto' (RAE's, "
                        "from the latent size); default: the one the checkpoint records (SVG recipe: 0.15, SPEC 3)")
    parser.add_argument("--solver", default="euler", choices=["euler", "heun"], help="Euler: 1 eval/step, Heun: 2")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale; 1 = off (no unconditional pass)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                        help="apply guidance only for t in [LO, HI] (t=0 noise, t=1 data)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses noise (seed, i)")


def parse_args():
    parser = argparse.ArgumentParser(description="Sample images from a trained SVG diffusion model.")
    parser.add_argument("--ckpt", default="out/dit/dit.pt", help="diffusion checkpoint (diffusion.py)")
    parser.add_argument("--ae", default=None, help="AE checkpoint; default: the path recorded in --ckpt")
    add_sampler_args(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: all for --num; "
                        "the grid: the first 10, or DiT's 8 showcase classes for ImageNet)")
    parser.add_argument("--per-class", type=int, default=4, help="grid: samples per class (one row per class)")
    parser.add_argument("--interpolate", type=int, default=None, metavar="SEED2",
                        help="grid of linear and spherical noise interpolations from --seed to SEED2")
    parser.add_argument("--frames", type=int, default=8, help="--interpolate: images per row")
    parser.add_argument("--num", "--num-samples", dest="num", type=int, default=0,
                        help="write N samples to an .npz for fid.py instead of a grid (--num-samples under torchrun, "
                             "which reads --num as its --numa-binding)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (per process)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA: faster, not fp32")
    parser.add_argument("--out", default=None, help="output: samples.png (grid) or samples.npz (--num)")
    args = parser.parse_args()
    args.out = args.out or ("samples.npz" if args.num else "samples.png")
    if args.steps < 1:
        raise SystemExit(f"sample: --steps must be at least 1 (got {args.steps})")
    if not 0 <= args.cfg_interval[0] <= args.cfg_interval[1] <= 1:
        raise SystemExit(f"sample: --cfg-interval needs 0 <= LO <= HI <= 1 (got {args.cfg_interval})")
    if args.num and not args.out.endswith(".npz"):
        raise SystemExit(f"sample: --num writes an .npz; pass --out NAME.npz (got '{args.out}')")
    if min(args.batch_size, args.per_class, args.frames) < 1 or args.num < 0:
        raise SystemExit("sample: --batch-size, --per-class and --frames must be >= 1, --num >= 0")
    data.check_args(args)  # --cfg, --shift, --cfg-interval finite: NaN would give black images
    data.check_out_file(args.out, (".npz",) if args.num else data.IMAGE_EXTENSIONS)  # before the sampling, not after
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"sample: diffusion checkpoint '{args.ckpt}' not found; train one with diffusion.py or pass --ckpt")
    return args


def grid_rows(args, model):
    """The grid's (row names, labels, noise): rows per class (noise None: seeded per sample), or with --interpolate a
    linear and a spherical path per class from --seed's noise to SEED2's. Built-in data's rows carry shape names."""
    num_classes = model.config["num_classes"]
    shapes = model.args.get("data") == "shapes" and num_classes == len(data.SHAPE_CLASSES)
    names = list(data.SHAPE_CLASSES) if shapes else [str(c) for c in range(num_classes)]  # ImageNet, converted: ids
    if args.interpolate is None:
        classes = args.classes or (IMAGENET_SHOWCASE if num_classes == 1000 else list(range(min(num_classes, 10))))
        return [names[c] for c in classes], [c for c in classes for _ in range(args.per_class)], None
    tokens, channels = model.ae["grid"] ** 2, model.ae["latent_channels"]
    z0, z1 = noise_for(args.seed, [0], tokens, channels)[0], noise_for(args.interpolate, [0], tokens, channels)[0]
    alphas = torch.linspace(0, 1, args.frames)
    path = {"linear": torch.stack([(1 - a) * z0 + a * z1 for a in alphas]),
            "slerp": torch.stack([slerp(z0, z1, a) for a in alphas])}
    rows = [(kind, c) for c in args.classes or [0] for kind in path]
    return ([f"{kind}: {names[c]}" for kind, c in rows], [c for _, c in rows for _ in alphas],
            torch.cat([path[kind] for kind, _ in rows]))


def main():
    args = parse_args()
    run = data.setup(args.seed)
    # fp32 by default: sampling precision moves FID (SPEC 2, RAE's note); data.setup turned TF32 on for training
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if run["ddp"] and not args.num:
        raise SystemExit("sample: torchrun is only for --num N; run grids with plain python")
    model, ae = load(args.ckpt, args.ae, ema=not args.no_ema, device=run["device"])
    resolve_sampler_shift(args, model)
    num_classes = model.config["num_classes"]
    bad = [c for c in args.classes or [] if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f"sample: class id(s) {bad} out of range; this model has classes 0..{num_classes - 1}")
    data.print0(f"sample: {args.ckpt} (step {model.step}, {'raw' if args.no_ema else 'EMA'}), AE {args.ae or model.ae['path']}, "
                f"{args.steps} {args.solver} steps, shift {args.shift}, cfg {args.cfg} on t in {args.cfg_interval}")
    if args.num:
        write_npz(args, model, ae, run)
        return data.cleanup()
    row_names, labels, noise = grid_rows(args, model)
    images = generate(model, ae, labels, args.seed, args.steps, args.shift, args.cfg, args.solver, args.cfg_interval,
                      args.batch_size, noise=noise)
    save_grid(images, len(row_names), row_names, args.out)
    print(f"wrote {args.out}: {len(images)} images {images.shape[1]}x{images.shape[2]}")


if __name__ == "__main__":
    main()
