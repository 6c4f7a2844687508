"""
The diffusion stage of SVG (SPEC 2): a DiT/SiT with patch size 1 trained by flow matching on the latents
of the frozen autoencoder from ae.py, plus the flow math (time warp, loss, time grid, sampler with CFG)
that sample.py and fid.py import from here.

CPU, tiny (minutes):     python diffusion.py --size tiny                      (needs out/ae/ae.pt)
one GPU:                 python diffusion.py --size XL --data /path/to/imagenet/train --ae out/ae/ae.pt
8 GPUs (the paper's):    torchrun --nproc_per_node=8 diffusion.py --size XL --data /path/to/imagenet/train
resume:                  python diffusion.py --size tiny --resume           (a killed run, the same --steps)
RAE's wide head:         python diffusion.py --size tiny --head dh             (DiT^DH, SPEC 8)
official weights:        python diffusion.py --convert-official V1-SVG-XL-7000K-256x256.pt --ae AE.pt --out svg_xl.pt
speed:                   python diffusion.py --size XL --benchmark            (synthetic latents; data.py)
"""
import argparse
import copy
import itertools
import math
import os
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import data

# DiT's sizes (depth, width, heads); tiny is ours, as wide as the 392-d token (RAE: narrower cannot fit)
SIZES = {
    "tiny": dict(depth=4, width=392, num_heads=7),
    "S": dict(depth=12, width=384, num_heads=6),
    "B": dict(depth=12, width=768, num_heads=12),
    "L": dict(depth=24, width=1024, num_heads=16),
    "XL": dict(depth=28, width=1152, num_heads=16),
}
# training defaults per preset (SPEC 2 recipe for the real sizes); explicit flags override
PRESETS = {
    # tiny: EMA 0.995, as at 0.9999 the average spans ~10k steps and a short run's EMA would still be mostly the
    # zero-initialised model; lr 1e-3 (10x the paper's), which lowered the loss at step 400 from 1.37 to 0.75 in our
    # CPU runs; latents of 4,000 images encoded once (the frozen encoder costs more than this DiT); batch 32: at the
    # same 44,800 images, batch 16 x 2,800 steps beat batch 64 x 700 (FID 378 vs 409, denoising error 9-20% lower at
    # every t), but on 2 CPU threads batch 16 trains at ~0.65x the images/s of 64, batch 32 at ~0.9x; 2,800 steps
    # fill the README run's 20-minute budget on a 2-core CPU with a margin (the latents reuse the frozen features that
    # ae.py saved, which paid for 200 of them): steps were what raised the class accuracy of samples (1,400 -> 2,000
    # -> 2,600 -> 2,800: 60% -> 69% -> 79% -> 80% at 25 Euler steps and CFG 4; 82% at the README's 5 steps and CFG 5),
    # where --pred x, RAE's noise-augmented decoder, logit-normal t, lr 2e-3 and depth 6 for the same time (63%) did
    # not; the lr falls linearly to 0 over the last 30% (--lr-decay 0.3): at 2,000 steps the final loss went
    # 0.433 -> 0.405 and the class accuracy of 500 samples (25 Euler steps, CFG 4) 69.0% -> 72.0%
    "tiny": dict(steps=2800, batch_size=32, device_batch=32, lr=1e-3, ema_decay=0.995, log_every=100, sample_every=1000,
                 ckpt_every=1000, shift=0.4, time_dist="uniform", pred="v", cache_latents=4_000, lr_decay=0.3),
    "full": dict(steps=400_000, batch_size=256, device_batch=32, lr=1e-4, ema_decay=0.9999, log_every=100, sample_every=10_000,
                 ckpt_every=10_000, shift=0.4, time_dist="uniform", pred="v", cache_latents=0, lr_decay=0.0),
}
# RAE's DDT head (--head dh): 2 blocks of width 2048, 16 heads, on every trunk size (its DiTDH-S and -XL configs:
# hidden_size [384 | 1152, 2048], depth [12 | 28, 2], num_heads [6 | 16, 16]); tiny's is ours, ~2x its 392-d token
DH_HEADS = {"tiny": dict(head_depth=2, head_width=768), "full": dict(head_depth=2, head_width=2048)}
DH_HEAD_DIM = 128  # RAE's 2048 / 16 heads; --head-width W gets W / 128 heads
PREVIEW_STEPS, PREVIEW_CFG = 25, 4.0  # official sampling steps; w=4 for pictures (SPEC 3)
SAMPLE_SHIFT = 0.15  # official sampling shift (SPEC 3), denser near noise than training's 0.4

# -----------------------------------------------------------------------------
# the model (SPEC 2)


def sincos_2d(width, grid):
    """MAE's fixed 2-D table [grid*grid, width] in raster order: the first half encodes the column, the
    second the row, each as [sin | cos] over width/4 frequencies 1/10000^(k/(width/4))."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (cols, rows):
        angle = pos.reshape(-1, 1) * omega
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def timestep_embedding(t, dim=256, max_period=10_000):
    """t in [0, 1] itself (not x1000, SPEC 2) -> [B, dim] as [cos | sin], DiT's frequencies."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    angle = t.float()[:, None] * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift  # shift, scale: (B, 1, D) per image or (B, T, D) per token


class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(width // num_heads)  # qk-norm over each head's dim; affine, eps 1e-5 as official
        self.k_norm = nn.LayerNorm(width // num_heads)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D/H)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # autocast keeps LayerNorm in fp32
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """adaLN-Zero block: c -> shift/scale/gate for attention and MLP; zero gates make it the identity at init.
    c is (B, 1, D), one condition per image, or (B, T, D), one per token (DDTHead); FinalLayer takes the same."""

    def __init__(self, width, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (B, 1|T, D)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, T, D)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)  # 392, not the official 2x392 (DiT's unused sigma half)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DDTHead(nn.Module):
    """RAE's wide, shallow "DDT head" of DiT^DH (arXiv 2510.11690 sec. 5; bytetriper/RAE, DiTwDDTHead in
    src/stage2/models/DDT.py). head(x, h, t_emb): noisy tokens x (B, T, C), trunk output h (B, T, D) and
    timestep embedding t_emb (B, D) -> the model's output (B, T, C). As in RAE: the trunk has no final layer; the head
    re-embeds the noisy input x_t itself at its own width, and its blocks and final layer are modulated token
    by token (adaLN-Zero) by the trunk's tokens fused with t, silu(h + t_emb), projected to the head's width."""

    def __init__(self, in_channels, grid, width, head_depth, head_width, head_heads, mlp_ratio):
        super().__init__()
        self.embed = nn.Linear(in_channels, head_width)  # RAE's x_embedder
        # RAE's head attends with RoPE; our trunk uses the fixed 2-D sin-cos table instead, so the head does too
        self.register_buffer("pos_embed", sincos_2d(head_width, grid)[None], persistent=False)  # (1, T, Dh)
        self.cond = nn.Linear(width, head_width) if width != head_width else nn.Identity()  # RAE's s_projector
        # RAE's block in both trunk and head is LightningDiT's (RMSNorm, SwiGLU of the same size, RoPE, no qk-norm);
        # we keep SVG's block for both, so the head differs from the trunk only in width, heads and conditioning
        self.blocks = nn.ModuleList([Block(head_width, head_heads, mlp_ratio) for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, in_channels)

    def forward(self, x, h, t_emb):
        s = self.cond(F.silu(h + t_emb[:, None]))  # (B, T, Dh): RAE adds t only, the class is already in h
        x = self.embed(x) + self.pos_embed  # (B, T, Dh)
        for block in self.blocks:
            x = block(x, s)  # (B, T, Dh)
        return self.final_layer(x, s)  # (B, T, C)


class DiT(nn.Module):
    """model(x, t, y): tokens x (B, T, C), t (B,) in [0, 1], labels y (B,) with id num_classes = null
    -> velocity (B, T, C), or the clean sample when config pred == 'x' (`velocity` converts). Parameter names
    follow the official checkpoint (official_keys.txt). head="dh" replaces the final layer by RAE's DDTHead
    (DiT^DH); config records the head only when it is on, so the SVG model's config, and checkpoints from
    before the head existed, mean head="none"."""

    def __init__(self, in_channels=392, grid=16, depth=28, width=1152, num_heads=16, num_classes=1000,
                 class_dropout=0.1, mlp_ratio=4.0, pred="v", head="none", head_depth=2, head_width=2048,
                 head_heads=16):
        super().__init__()
        assert width % num_heads == 0 and width % 4 == 0, "width must divide by num_heads and by 4 (2-D sin-cos)"
        assert head in ("none", "dh") and head_width % head_heads == 0 and head_width % 4 == 0, f"bad head {head}"
        if (max(width, head_width) if head == "dh" else width) < in_channels:  # RAE: a wide head is enough
            warnings.warn(f"DiT width {width} < token dimension {in_channels}: RAE finds such a model cannot even "
                          "overfit one image (SPEC 2); use a size at least as wide as the latent")
        self.config = dict(in_channels=in_channels, grid=grid, depth=depth, width=width, num_heads=num_heads,
                           num_classes=num_classes, class_dropout=class_dropout, mlp_ratio=mlp_ratio, pred=pred)
        assert pred in ("v", "x"), f"pred must be 'v' (velocity, SVG) or 'x' (clean sample, JiT), got {pred}"
        if head == "dh":
            self.config.update(head=head, head_depth=head_depth, head_width=head_width, head_heads=head_heads)
        self.ln1 = nn.Linear(in_channels, width)  # the input projection; "ln1" is the official name
        self.register_buffer("pos_embed", sincos_2d(width, grid)[None], persistent=False)  # (1, T, D), fixed
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, width)  # last row: the null class (CFG)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        if head == "dh":
            self.head = DDTHead(in_channels, grid, width, head_depth, head_width, head_heads, mlp_ratio)
        else:
            self.head, self.final_layer = None, FinalLayer(width, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init (SPEC 2): xavier linears with zero bias, N(0, 0.02) class table and t-MLP, adaLN and
        output zero, so the untrained model predicts v = 0. The head gets the same: RAE zeroes its adaLN and
        final layer alike (its other linears keep PyTorch's default init; ours are xavier as the trunk's)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for w in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight):
            nn.init.normal_(w, std=0.02)
        blocks, final = (self.blocks, self.final_layer) if self.head is None else (
            [*self.blocks, *self.head.blocks], self.head.final_layer)
        for layer in [b.adaLN_modulation[-1] for b in blocks] + [final.adaLN_modulation[-1], final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        h = self.ln1(x) + self.pos_embed  # (B, T, D)
        t_emb = self.t_embedder.mlp(timestep_embedding(t))  # (B, D)
        c = (t_emb + self.y_embedder.embedding_table(y))[:, None]  # (B, 1, D)
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        if self.head is not None:
            return self.head(x, h, t_emb)  # (B, T, C)
        return self.final_layer(h, c)  # (B, T, C)


def forward_macs(config):
    """Analytic multiply-accumulates of one forward per image, DiT's convention (every matmul including
    attention's two, nothing else). Training costs 3 forwards; FLOPs = 2 x MACs."""
    T, C, D, L = config["grid"] ** 2, config["in_channels"], config["width"], config["depth"]
    block = (4 + 2 * config["mlp_ratio"]) * T * D * D + 2 * T * T * D + 6 * D * D  # qkv+proj+MLP, QK^T and AV, adaLN
    trunk = L * block + T * C * D + 256 * D + D * D  # blocks, input projection, t-MLP
    if config.get("head", "none") == "none":
        return trunk + T * C * D + 2 * D * D  # output projection, final adaLN
    Dh, Lh = config["head_width"], config["head_depth"]
    head_block = (4 + 2 * config["mlp_ratio"]) * T * Dh * Dh + 2 * T * T * Dh + 6 * T * Dh * Dh  # adaLN per token
    cond = T * D * Dh if D != Dh else 0  # the condition's projection
    return trunk + Lh * head_block + T * C * Dh + cond + 2 * T * Dh * Dh + T * Dh * C  # embed, final adaLN, output


def load_model(path, ema=True):
    """A DiT from our checkpoint, EMA weights by default, in eval mode; model.ae / model.step from the file."""
    ckpt = data.load_checkpoint(path, "diffusion checkpoint", kind="dit")
    model = DiT(**ckpt["config"])
    model.load_state_dict(ckpt["ema" if ema else "model"])
    model.ae, model.step = ckpt["ae"], ckpt["step"]
    return model.eval()

# -----------------------------------------------------------------------------
# flow matching (SPEC 2-3): t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, v = x1 - x0
X_PRED_MIN_GAP = 0.05  # x-prediction's v = (x1_hat - x_t) / (1 - t) clips 1 - t to at least this (JiT's t_eps)
LOGIT_NORMAL = (0.0, 1.0)  # mean and std of logit(u) for --time-dist logit-normal (SD3's default, as RAE)
SHIFT_BASE_DIM = 4096  # RAE's base dimension n in its shift a = sqrt(m / n), m = the latent's H x W x C


def auto_shift(grid, channels):
    """RAE's dimension-dependent shift, in our convention. RAE (t = 1 noise) warps t_n -> a t_n / (1 + (a - 1) t_n)
    with a = sqrt(H W C / 4096); substituting t = 1 - t_n gives exactly time_warp with s = 1 / a. For SVG's 16x16x392
    latent a = 4.95, s = 0.202 (SVG itself trains at s = 0.4 and samples at 0.15); RAE's 16x16x768: a = 6.93."""
    return math.sqrt(SHIFT_BASE_DIM / (grid * grid * channels))


def resolve_shift(shift, config):
    """A --shift value (a number or 'auto') -> the number, for the DiT `config` (its grid and token channels)."""
    return auto_shift(config["grid"], config["in_channels"]) if shift == "auto" else float(shift)


def shift_arg(text):
    """argparse type of --shift / --sample-shift: a finite number or 'auto'."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number or 'auto'")
    return value


def draw_u(n, time_dist, generator=None, device="cpu"):
    """u in (0, 1) per sample, before the time warp: 'uniform' (SVG) or 'logit-normal' (SD3, RAE). Warping by s
    adds ln s to logit(u), so a logit-normal u under shift s gives logit(t) ~ N(mean + ln s, std)."""
    if time_dist == "logit-normal":
        return torch.sigmoid(LOGIT_NORMAL[0] + LOGIT_NORMAL[1] * torch.randn(n, generator=generator, device=device))
    assert time_dist == "uniform", f"unknown time distribution {time_dist}"
    return torch.rand(n, generator=generator, device=device)


def time_warp(u, shift):
    """t = s u / (1 + (s - 1) u), written as s u / (s u + (1 - u)) so that u = 1 maps to exactly 1;
    s < 1 spends more time near the noise end, s <= 0 means no warp."""
    return u if shift <= 0 else shift * u / (shift * u + (1 - u))


def velocity(model, x, t, y, pred="v"):
    """The network's velocity at (x, t). pred 'v' (SVG): its output. pred 'x' (JiT, SPEC 8): it outputs the clean
    sample x1_hat, and v = (x1_hat - x_t) / (1 - t); on a narrow network with high-dimensional tokens the clean
    sample (on the data's low-dimensional manifold) is far easier to output than noise-carrying v."""
    out = model(x, t, y)  # (B, T, C)
    if pred == "x":
        return (out.float() - x.float()) / (1 - t.float()).clamp_min(X_PRED_MIN_GAP)[:, None, None]
    return out


def flow_loss(model, x1, y, shift, x0=None, u=None, pred="v"):
    """Velocity MSE at t = warp(u), u ~ U(0, 1) per sample, no time weighting, for either prediction target
    (x-prediction keeps the velocity loss, as JiT). x0 and u may be given (the training loop draws them per
    global batch so that runs are reproducible across world sizes)."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    u = torch.rand(len(x1), device=x1.device) if u is None else u
    t = time_warp(u, shift)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1  # (B, T, C)
    return F.mse_loss(velocity(model, xt, t, y, pred).float(), (x1 - x0).float())


def time_grid(steps, shift):
    """[steps + 1] times from 0 (noise) to 1 (data): warp(k / steps) with the sampling shift (0.15)."""
    return time_warp(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift)


@torch.no_grad()
def sample(model, noise, y, steps=25, shift=0.15, cfg=1.0, solver="euler", interval=(0.0, 1.0)):
    """Integrate dx/dt = v from t=0 (noise [B, T, C]) to t=1; returns the final tokens in standardised
    latent space. CFG on all channels: v_u + w (v_c - v_u), both halves in one batch of 2B, only for t
    inside `interval`; cfg == 1 runs the conditional pass alone. Euler: 1 evaluation/step, Heun: 2.
    `shift` may be 'auto' (RAE's, from the model's latent size). x-prediction models are converted to v."""
    y_null = torch.full_like(y, model.config["num_classes"])
    pred = model.config.get("pred", "v")

    def guided(x, t):
        tt = torch.full((len(x),), t, device=x.device, dtype=x.dtype)
        if cfg == 1.0 or not interval[0] <= t <= interval[1]:
            return velocity(model, x, tt, y, pred)
        v_c, v_u = velocity(model, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, y_null]), pred).chunk(2)
        return v_u + cfg * (v_c - v_u)  # for x-prediction the same as guiding x1_hat: v is affine in it

    assert solver in ("euler", "heun"), f"unknown solver {solver}"
    ts = time_grid(steps, resolve_shift(shift, model.config)).tolist()
    x = noise
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v = guided(x, t0)
        if solver == "heun":  # trapezoid with the Euler guess's velocity at t1
            v = (v + guided(x + (t1 - t0) * v, t1)) / 2
        x = x + (t1 - t0) * v
    return x


def to_tokens(z):
    """Latent [B, C, h, w] -> tokens [B, h*w, C] in raster order (patch size 1)."""
    return z.flatten(2).transpose(1, 2)


def from_tokens(x, grid):
    """Tokens [B, grid*grid, C] -> latent [B, C, grid, grid]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model; decay 0 copies exactly (DiT syncs with it at start)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)

# -----------------------------------------------------------------------------
# the official checkpoint


def convert_official(sd):
    """Official DiT state dict (official_keys.txt) -> (our state dict, config). Same names; the fixed
    pos_embed is dropped (ours is a buffer, checked equal) and only the first C rows of the 2C-wide
    output layer are kept (the other half is DiT's unused learned-sigma output, SPEC 2)."""
    sd = dict(sd)
    pos = sd.pop("pos_embed")
    width, in_channels = sd["ln1.weight"].shape
    grid = math.isqrt(pos.shape[1])
    config = dict(in_channels=in_channels, grid=grid, depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                  width=width, num_heads=width // sd["blocks.0.attn.q_norm.weight"].shape[0],
                  num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, class_dropout=0.1, mlp_ratio=4.0)
    if pos.device.type != "meta" and (pos[0].float() - sincos_2d(width, grid)).abs().max() > 1e-4:
        raise SystemExit("official pos_embed is not the fixed 2-D sin-cos table this model uses; cannot convert")
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[key] = sd[key][:in_channels]
    return sd, config


def convert_official_cli(args):
    """--convert-official: the authors' file (EMA and/or raw weights, or a bare state dict) -> our checkpoint."""
    if not args.out:
        raise SystemExit("--convert-official needs --out PATH (and --ae AE_CKPT)")
    data.check_out_file(args.out, (".pt", ".pth"))
    official = data.load_foreign(args.convert_official, "official DiT checkpoint", args.trust_checkpoint)
    info = ae_info(load_frozen_ae(args.ae, "cpu"), args.ae)
    sds = {k: official[k] for k in ("ema", "model") if k in official} or {"ema": official}  # or a bare state dict
    out = {}
    for name, sd in sds.items():
        if "ln1.weight" not in sd:
            raise SystemExit(f"'{args.convert_official}' holds no DiT state dict (no ln1.weight under '{name}')")
        out[name], config = convert_official(sd)
    if (config["in_channels"], config["grid"]) != (info["latent_channels"], info["grid"]):
        raise SystemExit(f"official DiT expects {config['in_channels']} channels on a {config['grid']}^2 grid, the AE "
                         f"'{args.ae}' gives {info['latent_channels']} on {info['grid']}^2: pass the matching AE")
    model = DiT(**config)
    for name, sd in out.items():
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise SystemExit(f"official '{name}' does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ckpt = dict(model=out.get("model", out["ema"]), ema=out["ema"], opt=None, step=0, config=config,
                args=dict(converted_from=os.path.abspath(args.convert_official)), ae=info)
    data.save_checkpoint(ckpt, args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, config {config}")

# -----------------------------------------------------------------------------
# training


def load_frozen_ae(path, device):
    if not path or not os.path.isfile(path):
        raise SystemExit(f"AE checkpoint '{path}' not found; train one with `python ae.py --size tiny` or pass --ae PATH")
    from ae import load_autoencoder  # here, so that importing diffusion.py does not import timm
    ae = load_autoencoder(path, device=device)
    if not ae.has_stats:
        raise SystemExit(f"AE checkpoint '{path}' has no latent statistics; run `python ae.py --compute-stats {path}`")
    return ae


def ae_info(ae, path):
    """What a diffusion checkpoint records about its AE (sample.py rebuilds the pipeline from it)."""
    return dict(path=os.path.abspath(path), latent_mean=ae.latent_mean.detach().float().cpu().clone(),
                latent_std=ae.latent_std.detach().float().cpu().clone(), latent_channels=int(ae.latent_channels),
                grid=int(ae.image_size // ae.patch_size), image_size=int(ae.image_size))


@torch.no_grad()
def encode_tokens(ae, images, features=None):
    """Images (b, 3, H, W) -> the frozen AE's per-channel standardised latent tokens (b, T, C) (SPEC 1). In fp32 (TF32
    on GPU), never under autocast: the latent statistics were computed in fp32, the official code encodes in
    fp32/TF32, and official channels with std 0.16 around mean 3.5 show bf16's rounding once standardised.
    `features`: the frozen encoder's tokens of these images, when ae.py saved them (saved_features)."""
    return to_tokens(ae.standardize(ae.encode(images, features).float()))


def saved_features(ae, ae_path, dataset, num, device):
    """The frozen encoder's features of the first `num` training images that ae.py --cache-features saved beside its
    checkpoint, or None (announced) when there are none or they are not of these images and this encoder: checked
    on the first and last 8 images, whose features are computed again. With them the latents cost only the residual
    branch (the tiny run: 51 s of its 19 minutes were the frozen encoder on images that ae.py had encoded)."""
    from ae import FEATURES_FILE
    path = os.path.join(os.path.dirname(os.path.abspath(ae_path)), FEATURES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        feats = data.load_checkpoint(path, "frozen features")["features"]
    except SystemExit as e:  # an unreadable file is not worth stopping the run for: the images are encoded instead
        data.print0(f"{e}: encoding the images")
        return None
    num = min(num, len(data.no_augment(dataset)))
    check = [*range(min(8, num)), *range(max(8, num - 8), num)]
    if len(feats) < num:
        why = f"it holds {len(feats)} images, --cache-latents asks for {num}"
    else:
        images = torch.stack([dataset[i][0] for i in check]).to(device)
        diff = (ae.frozen_features(images).cpu() - feats[check]).abs().max().item()
        why = f"not the features of these images by this encoder: they differ by up to {diff:.2g}" if diff > 1e-3 else ""
    if why:
        data.print0(f"not using {path} ({why}): encoding the images")
        return None
    data.print0(f"frozen features of the first {num} images from {path} (the first and last 8 checked: within {diff:.1g})")
    return feats[:num]


def cache_latents(ae, ae_path, dataset, num, batch, device, run):
    """--cache-latents: the standardised latent tokens of the first `num` training images, computed once."""
    feats = saved_features(ae, ae_path, dataset, num, device)
    fn = lambda x, i: (encode_tokens(ae, x, None if feats is None else feats[i].to(device)),)  # noqa: E731
    return data.encode_once(fn, dataset, num, batch, device, run,
                            "encoding latents" if feats is None else "residual branch of the latents")


def latent_batches(loader, ae, device):
    """Micro-batches (x1 tokens (b, T, C), labels (b,)) from the data loader: images encoded online by the frozen AE
    as the official code does, or (ae None) tokens that data.encode_once cached."""
    for batch, labels in loader:
        batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        yield (batch if ae is None else encode_tokens(ae, batch)), labels


def build(config, args, device):
    """The model, its EMA (a frozen copy, DiT's) and AdamW (fused on CUDA)."""
    raw = DiT(**config).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    return raw, ema, opt


def wrap(raw, compile, run):
    """torch.compile before the DDP wrap; raw stays the module for state dicts, EMA and sampling (no _orig_mod. keys)."""
    model = torch.compile(raw) if compile else raw
    if run["ddp"]:
        model = DDP(model, device_ids=[run["local_rank"]] if run["device"].type == "cuda" else None)
    return model


def train_step(model, raw, ema, opt, batches, step, args, run):
    """One optimizer step over the micro-batches (x1, labels) that `batches` yields, gradient sync on the last only,
    then the EMA. The training loop and --benchmark both call this. Returns the step's mean loss on this process."""
    device, world, rank = run["device"], run["world_size"], run["rank"]
    accum = args.batch_size // (args.device_batch * world)
    (T, C), num_classes = (raw.config["grid"] ** 2, raw.config["in_channels"]), raw.config["num_classes"]
    shift = resolve_shift(args.shift, raw.config)  # args keep 'auto' for the record
    # noise, times and label drops of the whole global batch from (seed, step): the same numbers on
    # 1 or N processes and after a resume; each process takes the rows of its samples in RunOrder's
    # layout (micro-step m on rank r is chunk m*world + r of the global batch)
    g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
    x0_all = torch.randn(args.batch_size, T, C, generator=g, device=device)
    u_all = draw_u(args.batch_size, args.time_dist, g, device)
    drop_all = torch.rand(args.batch_size, generator=g, device=device) < raw.config["class_dropout"]
    for group in opt.param_groups:
        group["lr"] = data.lr_at(step, args)
    mean_loss = torch.zeros((), device=device)
    for m in range(accum):
        x1, labels = next(batches)
        rows = torch.arange(len(labels), device=device) + (m * world + rank) * args.device_batch
        y = torch.where(drop_all[rows], num_classes, labels)  # label dropout -> null class
        sync = model.no_sync() if run["ddp"] and m < accum - 1 else nullcontext()  # all-reduce once per step
        with sync:
            with data.autocast(device, args.bf16):
                loss = flow_loss(model, x1, y, shift, x0=x0_all[rows], u=u_all[rows], pred=raw.config["pred"])
            (loss / accum).backward()
        mean_loss += loss.detach() / accum
    norm = torch.nn.utils.get_total_norm([p.grad for p in raw.parameters() if p.grad is not None])
    data.stop_if_nonfinite(step + 1, {"loss": mean_loss, "grad norm": norm},  # one sync per step
                           os.path.join(args.out_dir, "dit.pt"))
    if args.clip_grad > 0:
        torch.nn.utils.clip_grads_with_norm_(raw.parameters(), args.clip_grad, norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, raw, args.ema_decay)
    return mean_loss


def benchmark(args, run):
    """--benchmark: train_step on synthetic latents (no data, no AE) in every mode this machine runs, then the
    sampler as sample.py runs it at 5 and 25 Euler steps with and without CFG, then the decoder on its own."""
    device, world = run["device"], run["world_size"]
    accum = data.bench_plan(args, world)
    config = dict(in_channels=args.latent_channels, grid=args.grid, num_classes=1000, class_dropout=args.class_dropout,
                  mlp_ratio=4.0, pred=args.pred, **SIZES[args.size], **head_config(args))
    (T, C), heads, macs = (args.grid ** 2, args.latent_channels), config["num_heads"], forward_macs(config)
    x1, labels = torch.randn(args.device_batch, T, C, device=device), torch.arange(args.device_batch, device=device) % 1000
    batches = itertools.repeat((x1, labels))  # one synthetic micro-batch, every time: no loader, no encoder
    modes, note = data.modes(args.bf16, args.compile, device)
    rows, peaks = [], {}
    for bf16, compile in modes:
        args.bf16 = bf16
        torch.manual_seed(args.seed)
        raw, ema, opt = build(config, args, device)
        model = wrap(raw, compile, run)
        if not rows:
            data.bench_header(f"DiT-{args.size} {config}, {sum(p.numel() for p in raw.parameters()):,} parameters, "
                              f"{macs / 1e9:.2f} GMACs/image forward; synthetic latents {C} x {args.grid}x{args.grid} (the AE "
                              f"encode and data loading are not timed)", args, accum, device, opt, run, note)
        peaks[bf16] = peaks.get(bf16) or data.peak_tflops(device, bf16)
        data.reset_peak_memory(device)
        warm, sec = data.time_steps(lambda i: train_step(model, raw, ema, opt, batches, i, args, run),
                                     args.bench_warmup, args.bench_steps, device)
        flash = data.flash_attention(device, torch.bfloat16 if bf16 else torch.float32, heads, T, config["width"] // heads)
        flops = 6 * macs * args.batch_size / world  # per step of one process: training = 3 forwards of 2 FLOPs per MAC
        rows.append(data.bench_row(bf16, compile, [flash], sec, flops, peaks[bf16][0], warm, args, device, world))
        del raw, ema, opt, model
    data.table(data.BENCH_COLUMNS, rows)
    data.print0("MFU = 6 x forward MACs x images/s per process / peak (training = 3 forwards); peak: "
                + "; ".join(f"{data.precision_name(k, device)} {data.fmt(v[0])} TFLOP/s ({v[1]})" for k, v in peaks.items()))

    # the sampler as sample.py runs it: fp32 without TF32 (RAE: sample in fp32), eager, CFG as one batch of 2B
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    net = DiT(**config).to(device).eval()
    noise = torch.randn(args.device_batch, T, C, device=device)
    sample(net, noise, labels, steps=1)  # warm-up
    rows = []
    for steps in (5, 25):
        for cfg in (1.0, PREVIEW_CFG):
            sec = data.time_steps(lambda i: sample(net, noise, labels, steps, SAMPLE_SHIFT, cfg), 0, 1, device)[1]
            rows.append([steps, "off" if cfg == 1 else f"{cfg:g}", args.device_batch * (1 if cfg == 1 else 2),
                         data.fmt(args.device_batch / sec), data.fmt(args.device_batch * world / sec)])
    data.print0(f"sampler (network only, fp32, batch {args.device_batch} per process, shift {SAMPLE_SHIFT}):")
    data.table(["Euler steps", "CFG", "batch per forward", "images/s per process", "images/s total"], rows)
    from ae import GROUP_CHANNELS, SIZES as AE_SIZES, build_decoder  # here, so that importing diffusion.py does not import timm
    preset = "tiny" if args.size == "tiny" else "full"
    d = dict(AE_SIZES[preset], image_size=16 * args.grid, group_channels=GROUP_CHANNELS)
    decoder = build_decoder(d, C).to(device).eval()
    with torch.no_grad():
        sec = data.time_steps(lambda i: decoder(from_tokens(noise, args.grid)), 1, args.bench_steps, device)[1]
    data.print0(f"decode (ae.py's {preset} {d['decoder']} decoder, random weights, fp32, {args.grid}x{args.grid} -> {16 * args.grid} px): "
                f"{data.fmt(args.device_batch / sec)} images/s per process, {data.fmt(args.device_batch * world / sec)} total")
    data.cleanup()


@torch.no_grad()
def save_preview(ema, ae, path, seed, shift):
    """8 EMA samples (labels 0, 1, ...) with the same sampler as sample.py, decoded, in one row."""
    device = next(ema.parameters()).device
    n, C, grid = 8, ema.config["in_channels"], ema.config["grid"]
    noise = torch.randn(n, grid * grid, C, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.arange(n, device=device) % ema.config["num_classes"]
    x = sample(ema, noise, y, steps=PREVIEW_STEPS, shift=shift, cfg=PREVIEW_CFG)
    images = ae.decode(ae.unstandardize(from_tokens(x, grid))).clamp(-1, 1)  # (n, 3, H, W)
    row = torch.cat(list(data.to_uint8(images)), dim=1)  # (H, n*W, 3)
    Image.fromarray(row.numpy()).save(path)


def head_config(args):
    """The config keys of --head: none for SVG's model (absent keys mean no head), else the DDT head's."""
    if args.head == "none":
        if args.head_depth is not None or args.head_width is not None:
            raise SystemExit("--head-depth and --head-width shape the DDT head: add --head dh")
        return {}
    preset = DH_HEADS["tiny" if args.size == "tiny" else "full"]
    depth = preset["head_depth"] if args.head_depth is None else args.head_depth
    width = preset["head_width"] if args.head_width is None else args.head_width
    if width <= 0 or width % DH_HEAD_DIM or depth < 0:
        raise SystemExit(f"--head-width must be a positive multiple of {DH_HEAD_DIM} (RAE's head dim), "
                         "--head-depth >= 0")
    return dict(head="dh", head_depth=depth, head_width=width, head_heads=width // DH_HEAD_DIM)


def preset_help(key):
    """'preset: tiny X, else Y' read from PRESETS, so that a flag's help cannot drift from the presets."""
    return f"preset: tiny {PRESETS['tiny'][key]:,}, else {PRESETS['full'][key]:,}"


def parse_args():
    p = argparse.ArgumentParser(description="Train the SVG diffusion transformer on a frozen AE's latents (SPEC 2).")
    p.add_argument("--size", default="tiny", choices=list(SIZES), help="model size (DiT's S/B/L/XL, or tiny for CPU)")
    p.add_argument("--ae", default="out/ae/ae.pt", help="trained AE checkpoint (with latent statistics) from ae.py")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in) or an image folder (ImageNet layout)")
    p.add_argument("--out-dir", default="out/dit", help="where dit.pt and the preview grids go")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps ({preset_help('steps')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch ({preset_help('batch_size')})")
    p.add_argument("--device-batch", type=int, default=None, help="per-process micro-batch; accumulation is derived")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate ({preset_help('lr')}); see --lr-decay")
    p.add_argument("--lr-decay", type=float, default=None, metavar="FRAC", help="fraction of --steps at the end over "
                   f"which the lr falls linearly to 0 ({preset_help('lr_decay')}: SPEC 2 is constant; a --resume "
                   "with a larger --steps moves the decay to the new end)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (SPEC 2: 0)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off, as the paper)")
    p.add_argument("--shift", type=shift_arg, default=None, help="training time-warp shift (SPEC 2: 0.4; <= 0: no "
                   "warp; 'auto': RAE's, from the latent size)")
    p.add_argument("--sample-shift", type=shift_arg, default=None, help="sampling shift of the previews, recorded "
                   "for sample.py and fid.py (default: 'auto' if --shift auto, else SVG's 0.15)")
    p.add_argument("--time-dist", default=None, choices=["uniform", "logit-normal"],
                   help="u before the time warp: uniform (SVG) or logit-normal (SD3, RAE)")
    p.add_argument("--pred", default=None, choices=["v", "x"], help="network output: velocity (SVG) or clean x (JiT)")
    p.add_argument("--cache-latents", type=int, default=None, metavar="N",
                   help="encode N training images once and train on them (0: encode online, as official); the "
                   "frozen features that ae.py --cache-features saved beside --ae are reused when they are of these images")
    p.add_argument("--head", default="none", choices=["none", "dh"], help="none: SVG's final layer; dh: RAE's DDT head")
    p.add_argument("--head-depth", type=int, default=None, help="DDT head blocks (RAE: 2)")
    p.add_argument("--head-width", type=int, default=None, help=f"DDT head width, a multiple of {DH_HEAD_DIM} "
                   f"(RAE: 2048; tiny: {DH_HEADS['tiny']['head_width']})")
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout to the null class (for CFG)")
    p.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay per step ({preset_help('ema_decay')})")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on or off (default: on where the GPU or CPU runs bf16 natively)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (before the DDP wrap); --benchmark times both unless given")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (SPEC 2); --no-flip makes runs comparable sample for sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, the noise and the data order")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: from the CPU count)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    p.add_argument("--sample-every", type=int, default=None, help="steps between EMA preview grids (0: never)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (and one at the end)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: datasheet/measured)")
    p.add_argument("--resume", action="store_true", help="continue OUT_DIR/dit.pt (model, EMA, optimizer, step)")
    p.add_argument("--overwrite", action="store_true", help="start a new run even though OUT_DIR/dit.pt exists")
    p.add_argument("--convert-official", default=None, metavar="OFFICIAL.pt", help="convert the authors' DiT, then exit")
    p.add_argument("--out", default=None, help="output path of --convert-official")
    data.add_args(p)
    p.add_argument("--latent-channels", type=int, default=392, help="--benchmark: latent channels (SPEC 1: 384 + 8)")
    p.add_argument("--grid", type=int, default=16, help="--benchmark: latent grid side (SPEC 1: 256 px / 16)")
    p.add_argument("--trust-checkpoint", action="store_true", help="--convert-official: unpickle anything (runs code)")
    args = p.parse_args()
    data.check_args(args, at_least=dict(steps=1, batch_size=1, device_batch=1, log_every=1, ckpt_every=1, sample_every=0,
                                        num_workers=0, weight_decay=0, clip_grad=0, class_dropout=0, ema_decay=0,
                                        cache_latents=0, lr_decay=0),
                    at_most=dict(class_dropout=1, ema_decay=1, lr_decay=1), positive=("lr", "peak_tflops"))
    return args


def resume(ckpt, raw, ema, opt, lr):
    """Model, EMA and optimizer from a checkpoint, at --lr (the log says so), and the checkpoint's step."""
    for obj, key in ((raw, "model"), (ema, "ema"), (opt, "opt")):
        obj.load_state_dict(ckpt[key])
    for group in opt.param_groups:
        group["lr"] = lr
    return ckpt["step"]


def main():
    args = parse_args()
    if args.convert_official:
        return convert_official_cli(args)
    if args.benchmark and args.batch_size is None:
        args.batch_size = 0  # the benchmark's default: one micro-batch per process per step
    preset = PRESETS["tiny" if args.size == "tiny" else "full"]
    for key, value in preset.items():  # --device-batch, when not given, is derived from the world size below
        if getattr(args, key) is None and (key != "device_batch" or args.benchmark):
            setattr(args, key, value)
    if args.benchmark:  # synthetic data: no --data, no AE, nothing written
        return benchmark(args, data.setup(args.seed))
    del args.grid, args.latent_channels  # --benchmark's synthetic latent: a run's comes from its AE (config below)
    head = head_config(args)
    data.check_data(args.data)
    data.check_out_dir(args.out_dir)
    ckpt_path = os.path.join(args.out_dir, "dit.pt")
    ckpt = data.start_or_resume(ckpt_path, args.resume, args.overwrite, "dit", args.steps)
    run = data.setup(args.seed)
    device, world = run["device"], run["world_size"]
    if args.device_batch is None:
        args.device_batch = data.derive_device_batch(args.batch_size, world, preset["device_batch"])
    args.bf16, why = data.choose_bf16(args.bf16, device)
    data.print0(f"precision: {'bf16 autocast' if args.bf16 else 'fp32'} on {device} ({why})")
    accum = data.grad_accum_steps(args.batch_size, args.device_batch, world)
    ae = load_frozen_ae(args.ae, device)
    info = ae_info(ae, args.ae)
    dataset = data.build_dataset(args.data, info["image_size"], "diffusion", seed=args.seed)
    if not args.flip:  # Shapes flips when .flip, folders when .train (diffusion stage)
        dataset.flip = dataset.train = False

    config = dict(in_channels=info["latent_channels"], grid=info["grid"], num_classes=dataset.num_classes,
                  class_dropout=args.class_dropout, mlp_ratio=4.0, pred=args.pred, **SIZES[args.size], **head)
    if args.sample_shift is None:
        args.sample_shift = "auto" if args.shift == "auto" else SAMPLE_SHIFT
    if ckpt is not None and ckpt["config"] != config:
        raise SystemExit(f"--resume: {ckpt_path} has config {ckpt['config']}, these flags and AE give {config}: "
                         f"pass the same --size, --head, --data and --ae (it was trained on {ckpt['ae']['path']})")
    raw, ema, opt = build(config, args, device)
    step = 0 if ckpt is None else resume(ckpt, raw, ema, opt, args.lr)
    del ckpt
    model = wrap(raw, args.compile, run)
    if args.cache_latents:
        # the first N training images encoded once: on a CPU the frozen encoder costs more than a tiny DiT, so this is
        # several times faster; the price is a fixed set of N images
        dataset = cache_latents(ae, args.ae, dataset, args.cache_latents, args.device_batch, device, run)
    # the data order is a function of (seed, position): a resume continues it exactly, 1 or N processes see the same
    stream = data.RunOrder(dataset, args.seed, step * args.batch_size, (args.steps - step) * args.batch_size, world,
                           args.device_batch)
    loader = iter(data.make_loader(stream, args.device_batch, shuffle=False, seed=args.seed,
                                   num_workers=0 if args.cache_latents else args.num_workers))
    batches = latent_batches(loader, None if args.cache_latents else ae, device)

    macs = forward_macs(config)
    peak = args.peak_tflops or data.peak_tflops(device, args.bf16)[0]
    data.print0(f"config: {vars(args)}\nmodel {args.size}: {config}, {sum(p.numel() for p in raw.parameters()):,} "
                f"parameters, {macs / 1e9:.2f} GMACs/image forward; {world} process(es) x {args.device_batch} x {accum} "
                f"accumulation = {args.batch_size}; peak {data.fmt(peak)} TFLOPs for MFU")
    raw.train()
    t_log, step_log, loss_log = time.time(), step, torch.zeros((), device=device)
    while step < args.steps:
        loss_log += train_step(model, raw, ema, opt, batches, step, args, run)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            if run["ddp"]:
                dist.all_reduce(loss_log, op=dist.ReduceOp.AVG)
            data.sync(device)
            img_s = (step - step_log) * args.batch_size / (time.time() - t_log)
            mfu = 6 * macs * img_s / world / (peak * 1e12)  # train = 3 forwards, 2 FLOPs per MAC
            skipped = int(stream.skipped.item())
            data.print0(f"step {step} | loss {loss_log.item() / (step - step_log):.6f} | "
                        f"lr {opt.param_groups[0]['lr']:.2e} | {img_s:.2f} images/s | MFU {100 * mfu:.2f}% | peak mem {data.peak_memory_gib(device):.2f} GiB"
                        + (f" | skipped files {skipped}" if skipped else ""))
            t_log, step_log, loss_log = time.time(), step, torch.zeros((), device=device)
        if run["master"] and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            save_preview(ema, ae, os.path.join(args.out_dir, f"preview_{step:07d}.png"), args.seed, args.sample_shift)
        if run["master"] and (step % args.ckpt_every == 0 or step == args.steps):
            data.save_checkpoint(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                                      config=config, args=vars(args), ae=info), ckpt_path)
    data.print0(f"done: {step} steps, checkpoint {ckpt_path}")
    data.cleanup()


if __name__ == "__main__":
    main()
