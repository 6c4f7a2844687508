"""
The SVG autoencoder (SPEC 1): a frozen DINOv3 encoder, a small residual ViT trained from scratch, the
distribution aligner and the LDM convolutional decoder, trained with L1 + LPIPS + a hinge PatchGAN.

  CPU, tiny (minutes, offline):  python ae.py --size tiny --encoder-weights random --lpips-weights random
  one GPU, ImageNet:             python ae.py --size full --data /path/to/imagenet/train
  8 GPUs:                        torchrun --standalone --nproc_per_node=8 ae.py --size full --data /path/to/train
  resume a killed run:           python ae.py --size tiny ... --resume
  latent statistics again:       python ae.py --compute-stats out/ae/ae.pt [--data shapes]
  the authors' weights:          python ae.py --convert-official svg_autoencoder_dinov3s16p_vit-s_epoch40.ckpt
                                     --stats dinov3_sp_stats.pt --out out/ae/official.pt
  speed (synthetic images):      python ae.py --size full --benchmark     (data.py; torchrun times the DDP step)

Later stages import: load_autoencoder(path) -> model with encode / decode / standardize / unstandardize.
"""
import argparse
import itertools
import math
import os
import re
import time
from contextlib import nullcontext
from collections import OrderedDict

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data

# model sizes; a preset may also set the run's batch, steps and cadences (explicit flags override)
SIZES = {
    # a laptop CPU in minutes (issue 8): 64 px (4x4 latent), 2-block residual ViT, and
    # - RAE's ViT decoder (2 blocks, width 256): on the cached frozen features it reached 21.7 dB and a 36% shape
    #   classifier after 8,000 images, where the conv decoder (32 channels, one ResBlock per level; --decoder conv)
    #   had 18.8 dB and 20% after 4,000 and cost 7x the time per image;
    # - the frozen encoder's features of 6,000 images computed once (--cache-features): the encoder is then paid once
    #   per image, not once per step, and the run sees ~10 epochs of them;
    # - L1 only (perceptual_weight 0, the GAN never starts): at 64 px VGG-LPIPS makes a step 3.2x slower and the GAN
    #   2.2x (measured on our CPU); batch 32 at lr 5e-4 (24.4 dB, 68% after 40k images; batch 8 at 2e-4: 66% after 30k);
    #   a linear lr decay over the last 30% (--lr-decay 0.3) lowered the training L1 but not the held-out PSNR (23.5 dB
    #   against 23.95) nor the class accuracy of the DiT's samples on its latents (70.4% against 72.0%), so lr is constant.
    # The full preset keeps the paper's conv decoder, L1 + LPIPS + GAN at lr 1e-4, and encodes every batch.
    "tiny": dict(image_size=64, depth=2, width=96, num_heads=4, decoder="vit", decoder_depth=2, decoder_width=256,
                 decoder_heads=4, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=0, cache_features=6_000,
                 batch_size=32, device_batch=32, steps=2000, disc_start=2000, perceptual_weight=0.0, lr=5e-4,
                 log_every=100, eval_every=500, sample_every=500, save_every=500, eval_images=64, stats_images=1024),
    # the paper's (SPEC 1): residual ViT 6 x 384, 8 heads; decoder ch 128 x (1,1,2,2,4), 2 (+1) ResBlocks per level
    # --decoder vit: RAE's ViT-XL decoder (its default for ImageNet 256: width 1152, 28 blocks, 16 heads)
    "full": dict(image_size=256, depth=6, width=384, num_heads=8, decoder="conv", decoder_depth=28, decoder_width=1152,
                 decoder_heads=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, cache_features=0,
                 batch_size=512, device_batch=32, steps=100_000, disc_start=2_500, perceptual_weight=1.0, lr=1e-4,
                 log_every=50, eval_every=5_000, sample_every=1_000, save_every=2_000, eval_images=1_000, stats_images=0),
}
RESIDUAL_DIM = 8  # channels of the residual branch (official extra_vit output_dim)
ALIGN_MOMENTUM = 0.1  # running alignment statistics, updated once per optimizer step (BatchNorm's default)
DISC_WEIGHT = 0.5  # adaptive GAN weight multiplier (SPEC 1, taming's disc_weight)
GROUP_CHANNELS = 4  # decoder GroupNorm: at least 4 channels per group (Normalize); the full decoder stays GroupNorm(32, c)
FEATURES_FILE = "features.pt"  # beside ae.pt: the frozen features of --cache-features, reused by diffusion.py
CKPT_PARTS = dict(model="raw", disc="disc_raw", opt="opt", opt_disc="opt_d")  # checkpoint key -> its net in build()


# -----------------------------------------------------------------------------
# the frozen encoder


def build_encoder(name, weights, img_size):
    """A timm ViT; weights: 'hub' (timm download), a file (timm state dict or Meta's original .pth, converted by
    timm's checkpoint filter), 'random' (announced), or None (silent: a checkpoint fills it)."""
    kwargs = dict(img_size=img_size, num_classes=0)
    if weights == "hub":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise SystemExit(f"encoder: cannot get pretrained '{name}' from the hub ({type(e).__name__}; offline?): "
                             f"pass --encoder-weights PATH to a local timm or Meta .pth file, or --encoder-weights random")
    if weights in (None, "random"):
        if weights == "random":
            print("!" * 100 + f"\n!!! encoder: RANDOM weights for '{name}' (--encoder-weights random): "
                  "for tests and offline runs only, the latent has no semantics\n" + "!" * 100, flush=True)
        return timm.create_model(name, pretrained=False, **kwargs)
    if not os.path.isfile(weights):
        raise SystemExit(f"encoder: weights file '{weights}' not found; pass hub, random or an existing .pth")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **kwargs)
    except Exception as e:  # wrong architecture, not a state dict, truncated file
        raise SystemExit(f"encoder: '{weights}' does not fit '{name}' ({str(e).splitlines()[0][:200]})")


def use_stored_rope_periods(encoder):
    """Meta's DINOv3 checkpoints store the RoPE periods in bf16 and Meta's code, which the official SVG encoder
    runs, computes the angles from those stored values; timm drops the buffer and recomputes it in fp32 (its model
    cards note the difference). Rounding timm's periods to bf16 gives the features of the official encoder.
    Encoders without this buffer (DINOv2, SigLIP, MAE) are left alone."""
    rope = getattr(encoder, "rope", None)
    if rope is None or not torch.is_tensor(getattr(rope, "periods", None)):
        return
    with torch.no_grad():
        rope.periods.copy_(rope.periods.to(torch.bfloat16).float())  # the value stays fp32, so .to() keeps it
        if getattr(rope, "pos_embed_cached", None) is not None:  # only fixed-size models cache the table
            rope.pos_embed_cached.copy_(rope.get_embed(rope.feat_shape))


# -----------------------------------------------------------------------------
# the residual encoder: a small ViT, pre-LN, learned CLS and absolute positions (SPEC 1; torchvision's layout)


class Attention(nn.Module):
    def __init__(self, width, num_heads, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, width, num_heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1, self.attn, self.drop = nn.LayerNorm(width, eps=1e-6), Attention(width, num_heads, dropout), nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, mlp_ratio * width), act=nn.GELU(), drop1=nn.Dropout(dropout),
                                             fc2=nn.Linear(mlp_ratio * width, width), drop2=nn.Dropout(dropout)))

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class ResidualViT(nn.Module):
    """Patch-16 conv embedding, CLS + learned positions, pre-LN blocks, final LN, CLS dropped, per-token MLP head."""

    def __init__(self, image_size, depth, width, num_heads, mlp_ratio=4, dropout=0.1, out_dim=RESIDUAL_DIM):
        super().__init__()
        self.patch_embed, self.pos_drop = nn.Conv2d(3, width, 16, stride=16), nn.Dropout(dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // 16) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W) normalised
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), raster order
        x = self.pos_drop(torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 1:])  # (B, N, 8)


class ViTDecoder(nn.Module):
    """RAE's decoder (arXiv 2510.11690 §3, MAE's): linear embedding of each latent token + learned positions ->
    pre-LN blocks -> LN -> a linear map of each token to its own 16x16x3 pixels. The tiny preset uses it (issue 8): on
    the offline 4x4 latent, the conv decoder below learns slowly, since its nearest x2 upsamplings copy a token to
    all of its pixels and only neighbouring tokens break the symmetry (18.8 dB and a shape classifier at 20% on its
    reconstructions after 4,000 images), while a closed-form per-token linear map already reaches 23.8 dB and 93%."""

    def __init__(self, z_channels, grid, depth, width, num_heads, mlp_ratio=4):
        super().__init__()
        self.embed = nn.Linear(z_channels, width)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio, 0.0) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width, eps=1e-6), nn.Linear(width, 16 * 16 * 3)

    def forward(self, z):  # (B, C, h, w) -> (B, 3, 16h, 16w)
        B, _, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2)) + self.pos_embed  # (B, hw, width), raster order
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x)).view(B, h, w, 3, 16, 16)  # each token's own patch
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, 3, 16 * h, 16 * w)

    @property
    def last_weight(self):  # where the adaptive GAN weight is measured (SPEC 1)
        return self.head.weight


# -----------------------------------------------------------------------------
# the LDM decoder, with the official module names (official_keys.txt)


def Normalize(c, group_channels=1):
    """GroupNorm(32, c) as official, but with at least `group_channels` channels per group. With one channel per
    group (the tiny decoder's 32 channels) GroupNorm is instance norm, and the decoder learns to plant a bright
    local spike that controls the per-channel statistics: StyleGAN2's "droplet" artefact, which the tiny run showed
    in every image (issue 8). 4 is the full decoder's own ratio at its narrowest level (128 / 32)."""
    return nn.GroupNorm(min(32, c // group_channels), c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, dropout=0.0, gc=1):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in, gc), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.dropout, self.conv2 = Normalize(c_out, gc), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, c, gc=1):
        super().__init__()
        self.norm = Normalize(c, gc)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # (B, C, h, w)
        B, C, h, w = x.shape
        y = self.norm(x)
        q, k, v = (f(y).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))  # (B, 1, hw, C)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, h, w)
        return x + self.proj_out(y)


class Decoder(nn.Module):
    """conv_in -> mid (ResBlock, attention, ResBlock) -> levels coarse to fine (num_res_blocks+1 ResBlocks, attention
    at the coarsest level only, nearest x2 + conv between levels) -> GroupNorm, SiLU, conv_out (SPEC 1).
    `up.0` is the finest level, as in the official keys."""

    def __init__(self, z_channels, ch, ch_mult, num_res_blocks, dropout=0.0, gc=1):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.ModuleDict(dict(block_1=ResnetBlock(c, c, dropout, gc), attn_1=AttnBlock(c, gc),
                                      block_2=ResnetBlock(c, c, dropout, gc)))
        up = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            c_out = ch * ch_mult[level]
            stage.block = nn.ModuleList([ResnetBlock(c if i == 0 else c_out, c_out, dropout, gc) for i in range(num_res_blocks + 1)])
            # the official attn_resolutions=[16] at 256 px is the latent's own resolution, i.e. the coarsest level
            stage.attn = nn.ModuleList([AttnBlock(c_out, gc) for _ in range(num_res_blocks + 1)] if level == len(ch_mult) - 1 else [])
            if level != 0:
                stage.upsample = nn.ModuleDict(dict(conv=nn.Conv2d(c_out, c_out, 3, padding=1)))
            c = c_out
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = Normalize(c, gc), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):  # (B, C, h, w) -> (B, 3, 16h, 16w) with 5 levels
        x = self.mid["block_2"](self.mid["attn_1"](self.mid["block_1"](self.conv_in(z))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                x = block(x)
                if len(stage.attn):
                    x = stage.attn[i](x)
            if hasattr(stage, "upsample"):
                x = stage.upsample["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))  # no tanh: images in [-1, 1] by training, not clamped

    @property
    def last_weight(self):  # where the adaptive GAN weight is measured (SPEC 1)
        return self.conv_out.weight


def build_decoder(config, z_channels):
    """SVG's conv decoder (the official keys) or, with config decoder='vit', RAE's ViT decoder. Checkpoints from
    before issue 8 have neither `decoder` (conv) nor `group_channels` (official GroupNorm(32, c) everywhere)."""
    if config.get("decoder", "conv") == "vit":
        return ViTDecoder(z_channels, config["image_size"] // 16, config["decoder_depth"], config["decoder_width"],
                          config["decoder_heads"])
    return Decoder(z_channels, config["ch"], config["ch_mult"], config["num_res_blocks"], gc=config.get("group_channels", 1))


# -----------------------------------------------------------------------------
# the autoencoder


class SVGAutoencoder(nn.Module):
    def __init__(self, config, encoder_weights=None):
        super().__init__()
        self.config = dict(config)
        self.image_size, self.patch_size = config["image_size"], 16
        p = int(re.search(r"patch(\d+)", config["encoder"]).group(1))  # every timm ViT name carries its patch size
        self.encoder = build_encoder(config["encoder"], encoder_weights, config["image_size"] // 16 * p)
        self.encoder.eval().requires_grad_(False)  # frozen (SPEC 6: the official code forgets requires_grad_)
        if config.get("rope_bf16_periods"):  # pretrained DINOv3 weights (hub, Meta's file, the official AE)
            use_stored_rope_periods(self.encoder)
        cfg = self.encoder.pretrained_cfg  # input normalisation of the encoder (ImageNet for DINO/MAE, 0.5 for SigLIP)
        self.register_buffer("in_mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.residual = config["residual"]
        self.latent_channels = C = self.encoder.num_features + (RESIDUAL_DIM if self.residual else 0)
        if self.residual:
            self.residual_vit = ResidualViT(config["image_size"], config["depth"], config["width"], config["num_heads"],
                                            dropout=config["dropout"])
            self.mask_token = nn.Parameter(torch.randn(RESIDUAL_DIM) * 0.02)
        self.decoder = build_decoder(config, C)
        # running alignment statistics (mu_h, sigma_h, mu_r, sigma_r), used in eval mode (SPEC 1 "Do better")
        self.register_buffer("align_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("align_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("latent_mean", torch.zeros(C))
        self.register_buffer("latent_std", torch.ones(C))
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))
        self.batch_stats_log = []  # per-micro-batch statistics of the current optimizer step

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # always: DINOv3's RoPE has a train-mode augmentation (SPEC 6)
        return self

    @property
    def has_stats(self):
        return bool(self.stats_ready)

    def normalize(self, images):  # [-1, 1] -> the encoder's input normalisation
        return ((images + 1) / 2 - self.in_mean) / self.in_std

    def frozen_features(self, images):  # (B, 3, H, W) in [-1, 1] -> (B, N, D), the frozen encoder's final-normed tokens
        return self.encoder_tokens(self.normalize(images))

    @torch.no_grad()
    def encoder_tokens(self, x):  # normalised images -> (B, N, D)
        p, (H, W) = self.encoder.patch_embed.patch_size[0], x.shape[2:]
        if p != 16:  # e.g. DINOv2/14: same token grid as the decoder expects
            x = F.interpolate(x, size=(H // 16 * p, W // 16 * p), mode="bicubic", align_corners=False, antialias=True)
        return self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:].float()

    def encode(self, images, features=None):  # (B, 3, H, W) in [-1, 1] -> (B, C, H/16, W/16)
        """`features`: frozen_features(images) when already known (ae.py's --cache-features)."""
        B, _, H, W = images.shape
        x = self.normalize(images)
        h = self.encoder_tokens(x) if features is None else features.float()  # (B, N, D)
        if self.residual:
            r = self.residual_vit(x).float()  # (B, N, 8)
            if self.training and self.config["mask_ratio"] > 0:  # per-sample residual dropout (SPEC 1)
                drop = torch.rand(B, 1, 1, device=r.device) < self.config["mask_ratio"]
                r = torch.where(drop, self.mask_token.to(r.dtype).expand_as(r), r)
            r = self.align(h, r)
            h = torch.cat([h, r], -1)
        return h.transpose(1, 2).reshape(B, -1, H // 16, W // 16)  # (B, C, h, w)

    def align(self, h, r):
        """Rescale the residual to DINO's scale: r' = (r - mu_r) / (sigma_r + 1e-6) * sigma_h + mu_h (SPEC 1)."""
        if self.training or self.config["batch_stats"]:
            # scalars = channel-averages of per-channel mean / std over batch and tokens, detached (as official)
            stats = torch.stack([h.mean((0, 1)).mean(), h.std((0, 1)).mean(), r.mean((0, 1)).mean(), r.std((0, 1)).mean()]).detach()
            if self.training:
                self.batch_stats_log.append(stats)
        else:
            stats = self.align_stats
        mu_h, sigma_h, mu_r, sigma_r = stats
        return (r - mu_r) / (sigma_r + 1e-6) * sigma_h + mu_h

    @torch.no_grad()
    def update_align_stats(self, stats):
        """Once per optimizer step with the mean statistics of all its micro-batches (on all ranks)."""
        m = 1.0 if self.align_updates == 0 else ALIGN_MOMENTUM
        self.align_stats.lerp_(stats.to(self.align_stats), m)
        self.align_updates += 1

    def decode(self, latents):  # (B, C, h, w) -> (B, 3, 16h, 16w) in [-1, 1], not clamped
        return self.decoder(latents)

    def forward(self, images, features=None):
        z = self.encode(images, features)
        tau = self.config["decoder_noise"]
        if self.training and tau > 0:  # RAE's noise-augmented decoder: sigma ~ U(0, tau) per sample, relative to z's scale
            sigma = torch.rand(len(z), 1, 1, 1, device=z.device) * tau * z.detach().std()
            z = z + sigma * torch.randn_like(z)
        return self.decode(z)

    def standardize(self, z):  # per channel, (B, C, h, w)
        return (z - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def unstandardize(self, z):
        return z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)


def load_autoencoder(path, device="cpu"):
    """Rebuild a trained (or converted) autoencoder offline from its checkpoint: eval mode, frozen."""
    ckpt = data.load_checkpoint(path, "autoencoder checkpoint", kind="ae")
    model = SVGAutoencoder(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# the loss (SPEC 1): L1 + LPIPS, hinge PatchGAN with the adaptive weight


class PatchGAN(nn.Module):
    """pix2pix/taming NLayerDiscriminator: 3 strided layers, 64 base channels, BatchNorm, LeakyReLU 0.2."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if n < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, h', w') patch logits
        return self.main(x)


def build_lpips(weights):
    import lpips
    if weights == "random":
        print("!!! lpips: RANDOM VGG trunk (--lpips-weights random): for tests only, LPIPS values are meaningless", flush=True)
    try:
        return lpips.LPIPS(net="vgg", pnet_rand=weights == "random", verbose=False).eval().requires_grad_(False)
    except Exception as e:
        raise SystemExit(f"lpips: cannot get torchvision's VGG16 weights ({type(e).__name__}; offline?): put vgg16-397923af.pth "
                         f"in {torch.hub.get_dir()}/checkpoints or pass --lpips-weights random (tests only)")


def psnr(x, y):  # per image, images in [-1, 1]
    mse = ((x.clamp(-1, 1) - y) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# -----------------------------------------------------------------------------
# evaluation, statistics


@torch.no_grad()
def evaluate(nets, images, step, args, history):
    """In eval mode (running alignment statistics, no dropout): held-out PSNR and LPIPS every --eval-every steps, and
    a grid of the first 8 images above their reconstructions every --sample-every steps; both after the last step."""
    model, lpips_net = nets["raw"], nets["lpips"]
    eval_due, sample_due = (step % every == 0 or step == args.steps for every in (args.eval_every, args.sample_every))
    if not (eval_due or sample_due):
        return
    model.eval()
    if eval_due:
        p, l = [], []
        for x in images.split(args.device_batch):
            y = model(x)
            p.append(psnr(y, x))
            l.append(lpips_net(y.clamp(-1, 1), x).flatten() if lpips_net else torch.full((len(x),), float("nan")))
        p, l = torch.cat(p).mean().item(), torch.cat(l).mean().item()
        history.append(dict(step=step, psnr=p, lpips=l))
        shown = f"lpips {l:.4f}" if lpips_net else "no lpips (--perceptual-weight 0)"
        print(f"eval step {step} | held-out psnr {p:.2f} dB | {shown}", flush=True)
    if sample_due:
        x, y = images[:8].cpu(), model(images[:8]).float().cpu().clamp(-1, 1)
        grid = torch.cat([torch.cat(list(x), -1), torch.cat(list(y), -1)], -2)
        Image.fromarray(data.to_uint8(grid[None])[0].numpy()).save(os.path.join(args.out_dir, f"recon_{step:06d}.png"))
    model.train()


@torch.no_grad()
def compute_latent_stats(model, dataset, num_images, batch, ctx):
    """Per-channel mean and std of the latent over training images x tokens (float64 sums, sharded over ranks)."""
    n = len(dataset) if num_images <= 0 else min(num_images, len(dataset))
    idx = list(range(n))[ctx["rank"]::ctx["world_size"]]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch, num_workers=0)
    model.eval()
    s = torch.zeros(3, model.latent_channels, dtype=torch.float64, device=ctx["device"])
    for x, *features, _ in tqdm(loader, desc="latent statistics", disable=not ctx["master"]):  # features: if cached
        z = model.encode(x.to(ctx["device"]), *(f.to(ctx["device"]) for f in features))
        z = z.double().transpose(0, 1).flatten(1)  # (C, B*h*w)
        s += torch.stack([torch.full_like(z[:, 0], z.shape[1]), z.sum(1), z.pow(2).sum(1)])
    if ctx["ddp"]:
        torch.distributed.all_reduce(s)
    mean = s[1] / s[0]
    model.latent_mean.copy_(mean.float())
    model.latent_std.copy_((s[2] / s[0] - mean ** 2).clamp_min(0).sqrt().float())
    model.stats_ready.fill_(True)
    model.train()
    return n


# -----------------------------------------------------------------------------
# the authors' checkpoint


def convert_official(ckpt_path, stats_path, out_path, encoder="vit_small_plus_patch16_dinov3_qkvb", trust=False):
    """Lightning checkpoint of the official SVG AE -> our checkpoint. encoder.* is Meta-format DINOv3 (converted by
    timm's filter), extra_vit.* a torchvision ViT, decoder.* the LDM decoder; loss.* (discriminator, LPIPS) and
    norm_vit.* (created but never used by the official encode) are dropped."""
    raw = data.load_foreign(ckpt_path, "official checkpoint", trust)
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else {}
    if "extra_vit.encoder.pos_embedding" not in sd or "decoder.conv_out.weight" not in sd:
        raise SystemExit(f"'{ckpt_path}' is not the official SVG autoencoder (no extra_vit.* / decoder.* keys)")
    stats = data.load_checkpoint(stats_path, "official latent statistics")
    tv = {"class_token": "cls_token", "conv_proj": "patch_embed", "encoder.pos_embedding": "pos_embed",
          "encoder.ln.": "norm.", "self_attention.in_proj_weight": "attn.qkv.weight", "self_attention.in_proj_bias":
          "attn.qkv.bias", "self_attention.out_proj": "attn.proj", "ln_1": "norm1", "ln_2": "norm2", "mlp.0": "mlp.fc1",
          "mlp.3": "mlp.fc2", "encoder.layers.encoder_layer_": "blocks.", "heads.": "head."}  # torchvision -> ours
    ours = {}
    for k, v in sd.items():
        if k.startswith("extra_vit."):
            k = k[len("extra_vit."):]
            for a, b in tv.items():
                k = k.replace(a, b)
            ours["residual_vit." + k] = v
        elif k.startswith("decoder."):
            ours[k] = v
        elif k == "mask_token":
            ours[k] = v.flatten()  # official (1, 8, 1) -> (8,)
        elif not k.startswith(("encoder.", "loss.", "norm_vit.")):
            raise SystemExit(f"convert: unexpected key '{k}' in '{ckpt_path}'")
    grid = round(math.sqrt(sd["extra_vit.encoder.pos_embedding"].shape[1] - 1))
    config = dict(encoder=encoder, image_size=grid * 16, residual=True, width=sd["extra_vit.class_token"].shape[-1],
                  depth=len({k.split(".")[3] for k in sd if k.startswith("extra_vit.encoder.layers.")}), num_heads=8,
                  dropout=0.1, mask_ratio=0.1, ch=sd["decoder.conv_out.weight"].shape[1], ch_mult=(1, 1, 2, 2, 4),
                  num_res_blocks=2, batch_stats=True, decoder_noise=0.0,  # the official model aligns per batch
                  rope_bf16_periods=True)  # it runs Meta's DINOv3 code with the stored bf16 periods
    model = SVGAutoencoder(config)
    meta = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    ours.update({"encoder." + k: v for k, v in timm.models.eva.checkpoint_filter_fn(meta, model.encoder).items()})
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if k not in ("align_stats", "align_updates", "latent_mean", "latent_std", "stats_ready")]
    if missing or unexpected:
        raise SystemExit(f"convert: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    model.latent_mean.copy_(stats["dinov3_sp_mean"].flatten())
    model.latent_std.copy_(stats["dinov3_sp_std"].flatten())
    model.stats_ready.fill_(True)
    data.save_checkpoint({"model": model.state_dict(), "config": model.config, "step": 0,
                          "args": {"converted_from": os.path.abspath(ckpt_path)}}, out_path)
    print(f"wrote {out_path}: official AE ({sum(p.numel() for p in model.parameters()):,} params), per-batch alignment "
          f"as official (config batch_stats=True), latent statistics from {stats_path}")


# -----------------------------------------------------------------------------
# training


def model_config(args):
    """The autoencoder's config from the flags and the size preset (it travels in the checkpoint)."""
    size = SIZES[args.size]
    keys = (("decoder_depth", "decoder_width", "decoder_heads") if args.decoder == "vit" else
            ("ch", "ch_mult", "num_res_blocks"))
    return dict(encoder=args.encoder, image_size=args.image_size, residual=not args.no_residual, depth=size["depth"],
                width=size["width"], num_heads=size["num_heads"], dropout=args.dropout, mask_ratio=args.mask_ratio,
                decoder=args.decoder, **{k: size[k] for k in keys},
                batch_stats=args.batch_stats, decoder_noise=args.decoder_noise, group_channels=GROUP_CHANNELS,
                rope_bf16_periods=args.encoder_weights != "random")  # Meta's stored periods with pretrained DINOv3


def build(config, args, ctx, encoder_weights, lpips_weights, ckpt=None):
    """The nets of a run as a dict: raw (the autoencoder), ae (compiled before the DDP wrap), disc_raw / disc, their
    Adam optimizers opt / opt_d, and lpips (None for L1 only); restored from ckpt when given, at the current --lr."""
    device = ctx["device"]
    torch.manual_seed(args.seed)  # the same initial weights on every rank (random encoder and LPIPS trunk included)
    raw = SVGAutoencoder(config, encoder_weights).to(device)
    disc_raw = PatchGAN().to(device)
    if raw.residual and config["mask_ratio"] == 0:
        raw.mask_token.requires_grad_(False)  # unused: DDP must not wait for its gradient
    params = [p for p in raw.parameters() if p.requires_grad]  # residual ViT, mask token, decoder (not the encoder)
    # SPEC 1: Adam (0.5, 0.9), no weight decay; fused on CUDA: one kernel per step instead of one per parameter tensor
    adam = lambda ps: torch.optim.Adam(ps, lr=args.lr, betas=(0.5, 0.9), fused=device.type == "cuda")  # noqa: E731
    nets = dict(raw=raw, disc_raw=disc_raw, opt=adam(params), opt_d=adam(disc_raw.parameters()))
    if ckpt:
        for k, name in CKPT_PARTS.items():
            nets[name].load_state_dict(ckpt[k])
        for group in nets["opt"].param_groups + nets["opt_d"].param_groups:  # --lr applies to the resumed run
            group["lr"] = args.lr
    lpips_net = build_lpips(lpips_weights).to(device) if args.perceptual_weight > 0 else None  # None: L1 only
    model = torch.compile(raw) if args.compile else raw  # compiled before the DDP wrap; state dicts come from raw
    ddp = lambda m: torch.nn.parallel.DistributedDataParallel(  # noqa: E731
        m, device_ids=[ctx["local_rank"]] if device.type == "cuda" else None) if ctx["ddp"] else m
    return dict(nets, ae=ddp(model), disc=ddp(disc_raw), lpips=lpips_net)


def train_step(nets, batches, step, args, ctx):
    """One AE optimizer step over the micro-batches (images, labels) that `batches` yields, then one discriminator
    step once the GAN is on (SPEC 1). The training loop and --benchmark both call this. Returns the step's log."""
    raw, ae, disc_raw, disc, lpips_net = (nets[k] for k in ("raw", "ae", "disc_raw", "disc", "lpips"))
    device, world = ctx["device"], ctx["world_size"]
    accum = args.batch_size // (args.device_batch * world)
    autocast = lambda: data.autocast(device, args.bf16)  # noqa: E731
    no_sync = lambda m, micro: m.no_sync() if ctx["ddp"] and micro < accum - 1 else nullcontext()  # noqa: E731
    path = os.path.join(args.out_dir, "ae.pt")  # named in the stop message: it keeps the last good checkpoint

    def update(opt, module, terms, norm_name):  # a diverged run stops before the optimizer step
        norm = torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
        data.stop_if_nonfinite(step + 1, {**terms, norm_name: norm}, path)
        for group in opt.param_groups:
            group["lr"] = data.lr_at(step, args)
        opt.step()
        opt.zero_grad(set_to_none=True)

    last = raw.decoder.last_weight  # the adaptive GAN weight balances gradients at this layer (SPEC 1)
    gan = step >= args.disc_start
    disc_raw.requires_grad_(False)
    log, pairs = dict(l1=0.0, lpips=0.0, g=0.0, w=0.0, d=0.0, psnr=0.0), []
    for micro in range(accum):
        # randomness (dropout, residual mask, decoder noise) is a function of (seed, step, chunk of the global
        # batch): a resumed run, and 1 or N processes, draw the same numbers for the same images
        torch.manual_seed(args.seed + 1_000_003 * step + micro * world + ctx["rank"])
        batch = next(batches)  # (images, labels) or, with --cache-features, (images, frozen features, labels)
        x, h = batch[0].to(device), batch[1].to(device) if len(batch) == 3 else None
        with no_sync(ae, micro):  # gradients sync on the last micro-step
            with autocast():
                y = ae(x, h)
                l1 = (y.float() - x).abs()  # (B, 3, H, W)
                p_loss = lpips_net(y, x).float() if lpips_net else torch.zeros(len(x), 1, 1, 1, device=device)
                loss = rec = (l1 + args.perceptual_weight * p_loss).sum((1, 2, 3)).mean()  # summed over pixels (SPEC 1)
                if gan:
                    g = -disc_raw(y).float().mean()
                    gr, gg = (torch.autograd.grad(t, last, retain_graph=True)[0] for t in (rec, g))
                    w = (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach() * DISC_WEIGHT
                    loss = rec + w * g
                    log["g"] += g.item() / accum
                    log["w"] += w.item() / accum
            (loss / accum).backward()
        pairs.append((x, y.detach()))
        log["l1"] += l1.mean().item() / accum
        log["lpips"] += p_loss.mean().item() / accum
        log["psnr"] += psnr(y.detach().float(), x).mean().item() / accum
    update(nets["opt"], raw, {k: log[k] for k in ("l1", "lpips", "g", "w")}, "grad norm")
    if raw.batch_stats_log:  # running alignment statistics: mean over all micro-batches of all ranks
        s = torch.stack(raw.batch_stats_log).mean(0) / world
        raw.batch_stats_log.clear()
        if ctx["ddp"]:
            torch.distributed.all_reduce(s)
        raw.update_align_stats(s)
    if gan:  # discriminator: one hinge step on the same images after the AE step (SPEC 1)
        disc_raw.requires_grad_(True)
        for micro, (x, y) in enumerate(pairs):
            with no_sync(disc, micro):
                with autocast():
                    d = 0.5 * (F.relu(1 - disc(x).float()).mean() + F.relu(1 + disc(y).float()).mean())
                (d / accum).backward()
            log["d"] += d.item() / accum
        update(nets["opt_d"], disc_raw, {"d": log["d"]}, "discriminator grad norm")
    return log


def benchmark(args, ctx):
    """--benchmark: train_step with the GAN on, on synthetic images, in every mode this machine runs, then encode and
    decode. Encoder and LPIPS trunk get random weights (speed does not depend on them; no download needed)."""
    device, world = ctx["device"], ctx["world_size"]
    accum = data.bench_plan(args, world)
    config, args.disc_start = model_config(args), 0  # the GAN is on in every step, as in most of a run
    images = torch.rand(args.device_batch, 3, args.image_size, args.image_size, device=device) * 2 - 1
    batches = itertools.repeat((images, None))  # one synthetic micro-batch, every time: no loader
    modes, note = data.modes(args.bf16, args.compile, device)
    rows, peaks, flops, inference = [], {}, None, []
    for bf16, args.compile in modes:
        args.bf16 = bf16
        nets = build(config, args, ctx, None, "random")
        raw, N, D = nets["raw"], (args.image_size // 16) ** 2, config["width"]
        if flops is None:  # one eager step of one process, counted (the all-reduce adds no FLOPs)
            flops = data.count_flops(lambda: train_step(dict(nets, ae=raw, disc=nets["disc_raw"]), batches, 0, args,
                                                         dict(ctx, ddp=False)))
            data.bench_header(f"autoencoder {config} at {args.image_size} px, {sum(p.numel() for p in raw.parameters() if p.requires_grad):,} "
                              f"trained parameters, random encoder and LPIPS weights; {flops / 1e9 / args.batch_size * world:.1f} "
                              f"GFLOPs/image per training step (counted: AE, LPIPS, GAN and discriminator steps); synthetic "
                              f"images (data loading not timed)", args, accum, device, nets["opt"], ctx, note)
        peaks[bf16] = peaks.get(bf16) or data.peak_tflops(device, bf16)
        data.reset_peak_memory(device)
        warm, sec = data.time_steps(lambda i: train_step(nets, batches, i, args, ctx), args.bench_warmup, args.bench_steps, device)
        dtype = torch.bfloat16 if bf16 else torch.float32
        flash = [data.flash_attention(device, dtype, h, n, c // h) for h, n, c in
                 ((config["num_heads"], N + 1, D), (config["decoder_heads"], N, config["decoder_width"])
                                                    if config["decoder"] == "vit" else (1, N, config["ch"] * config["ch_mult"][-1]))]
        rows.append(data.bench_row(bf16, args.compile, flash, sec, flops, peaks[bf16][0], warm, args, device, world))
        if len(inference) < len(peaks):  # encode / decode once per precision, eager, eval mode
            raw.eval()
            with torch.no_grad(), data.autocast(device, bf16):
                z = raw.encode(images)
                speed = [args.device_batch / data.time_steps(lambda i: f(x), 1, args.bench_steps, device)[1]
                         for f, x in ((raw.encode, images), (raw.decode, z))]
            inference.append([data.precision_name(bf16, device), *map(data.fmt, speed)])
        del nets, raw
    data.table([c + " (ViTs / decoder)" if c == "flash attention" else c for c in data.BENCH_COLUMNS], rows)
    data.print0("MFU = counted FLOPs per step / seconds per step / peak; peak: "
                + "; ".join(f"{data.precision_name(k, device)} {data.fmt(v[0])} TFLOP/s ({v[1]})" for k, v in peaks.items())
                + f"\ninference (eval mode, batch {args.device_batch} per process):")
    data.table(["precision", "encode images/s per process", "decode images/s per process"], inference)
    data.cleanup()


def parse_args():
    p = argparse.ArgumentParser(description="Train (or convert, or measure) the SVG autoencoder.")
    p.add_argument("--size", default="tiny", choices=list(SIZES), help="model size and run preset")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in) or an image folder (ImageNet layout or flat)")
    p.add_argument("--out-dir", default="out/ae", help="checkpoint ae.pt, PNG grids and logs go here")
    p.add_argument("--encoder", default="vit_small_plus_patch16_dinov3_qkvb", help="frozen timm encoder, e.g. "
                   "vit_small_patch14_reg4_dinov2.lvd142m, vit_base_patch16_siglip_256.v2_webli, vit_base_patch16_224.mae")
    p.add_argument("--encoder-weights", default="hub", help="hub (timm download), a timm or Meta .pth file, or random")
    p.add_argument("--lpips-weights", default="pretrained", choices=["pretrained", "random"],
                   help="VGG trunk of LPIPS: pretrained (torchvision download) or random (tests only)")
    p.add_argument("--no-residual", action="store_true", help="DINO-only ablation: no residual encoder")
    p.add_argument("--batch-stats", action="store_true", help="align with per-batch statistics in eval too (official)")
    p.add_argument("--cache-features", type=int, default=None, metavar="N",
                   help="train on the first N training images with the frozen encoder's features computed once, "
                   "no flips, and save them beside ae.pt for diffusion.py (preset: tiny 6,000, full 0 = encode every batch)")
    p.add_argument("--decoder", default=None, choices=["conv", "vit"],
                   help="conv: SVG's LDM decoder (the paper's); vit: RAE's ViT decoder (preset: tiny vit, full conv)")
    p.add_argument("--decoder-noise", type=float, default=0.0, help="RAE noise augmentation: sigma ~ U(0, TAU) x std(z)")
    p.add_argument("--mask-ratio", type=float, default=0.1, help="per-sample probability of replacing the residual")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the residual ViT")
    p.add_argument("--perceptual-weight", type=float, default=None,
                   help="weight of LPIPS in the reconstruction loss (preset: full 1.0 as the paper, tiny 0)")
    p.add_argument("--disc-start", type=int, default=None, help="iteration at which the GAN loss switches on")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate, AE and discriminator (preset: full 1e-4 as the paper, tiny 5e-4)")
    p.add_argument("--lr-decay", type=float, default=0.0, metavar="FRAC", help="fraction of --steps at the end over "
                   "which the lr falls linearly to 0 (default 0: constant, the paper's)")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (multiple of 16)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=None, help="global batch; accumulation is derived")
    p.add_argument("--device-batch", type=int, default=None, help="images per process per micro-step")
    for name in ("log-every", "eval-every", "sample-every", "save-every"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{name.replace('-', ' ')} steps")
    p.add_argument("--eval-images", type=int, default=None, help="held-out images for PSNR / LPIPS")
    p.add_argument("--stats-images", type=int, default=None, help="training images for latent statistics (0 = all)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ae.pt")
    p.add_argument("--overwrite", action="store_true", help="start a new run even though OUT_DIR/ae.pt exists")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="force bf16 autocast on or off (default: on where the GPU or CPU runs bf16 natively)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the autoencoder (before the DDP wrap); --benchmark times both unless given")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: from the CPU count)")
    p.add_argument("--compute-stats", metavar="CKPT", help="recompute the latent statistics of a checkpoint and exit")
    p.add_argument("--convert-official", metavar="CKPT", help="convert the authors' Lightning checkpoint and exit")
    p.add_argument("--stats", help="with --convert-official: the official dinov3_sp_stats.pt")
    p.add_argument("--out", help="with --convert-official: output checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="with --convert-official: unpickle any object in the file (it can run code; trusted files only)")
    data.add_args(p)
    args = p.parse_args()
    if args.benchmark and args.batch_size is None:
        args.batch_size = 0  # the benchmark's default: one micro-batch per process per step
    for k, v in SIZES[args.size].items():  # --device-batch, when not given, is derived from the world size in main
        if k in vars(args) and getattr(args, k) is None and (k != "device_batch" or args.benchmark):
            setattr(args, k, v)
    data.check_args(args, at_least=dict(steps=1, batch_size=0 if args.benchmark else 1, device_batch=1, image_size=16,
                                        log_every=1, eval_every=1, sample_every=1, save_every=1, eval_images=1,
                                        stats_images=0, disc_start=0, num_workers=0, mask_ratio=0, dropout=0,
                                        decoder_noise=0, perceptual_weight=0, cache_features=0, lr_decay=0),
                    at_most=dict(mask_ratio=1, dropout=1, lr_decay=1), positive=("lr",))
    if args.image_size % 16:
        raise SystemExit(f"--image-size {args.image_size} must be a multiple of 16")
    return args


def recompute_stats(args, ctx):
    """--compute-stats: the latent statistics of a checkpoint again, written back into it."""
    ckpt = data.load_checkpoint(args.compute_stats, "autoencoder checkpoint", kind="ae")
    model = load_autoencoder(args.compute_stats, ctx["device"])
    n = ckpt.get("args", {}).get("stats_images", 0) if args.stats_images is None else args.stats_images
    n = compute_latent_stats(model, data.build_dataset(args.data, model.image_size, "ae"), n, args.device_batch, ctx)
    if ctx["master"]:
        ckpt["model"] = model.state_dict()
        data.save_checkpoint(ckpt, args.compute_stats)
        print(f"latent statistics over {n} images written to {args.compute_stats}")


def train(args, ckpt, ctx):
    """A new run (ckpt None) or a resumed one: build, train with eval, logs and checkpoints, then latent statistics."""
    device, master, world = ctx["device"], ctx["master"], ctx["world_size"]
    path = os.path.join(args.out_dir, "ae.pt")
    accum = data.grad_accum_steps(args.batch_size, args.device_batch, world)
    config = ckpt["config"] if ckpt else model_config(args)
    train_set = data.build_dataset(args.data, config["image_size"], "ae", train=True, seed=args.seed)
    val_set = data.build_dataset(args.data, config["image_size"], "ae", train=False, seed=args.seed)
    nets = build(config, args, ctx, None if ckpt else args.encoder_weights, args.lpips_weights, ckpt)
    raw = nets["raw"]
    start, history = (ckpt["step"], ckpt["history"]) if ckpt else (0, [])
    if ckpt:
        data.print0(f"resumed from step {start} of {path}, lr {args.lr:g}")
    data.print0(f"config {config}\nrun {vars(args)}\ntrainable {sum(p.numel() for p in raw.parameters() if p.requires_grad):,} params, encoder "
                f"{sum(p.numel() for p in raw.encoder.parameters()):,} frozen, latent {raw.latent_channels} x "
                f"{args.image_size // 16}^2, {world} process(es) x {args.device_batch} x {accum} accumulation on {device}")

    val_images = torch.stack([val_set[i][0] for i in range(min(args.eval_images, len(val_set)))]).to(device)
    stream_set = train_set
    if args.cache_features:  # the frozen encoder once per image instead of once per step (see the tiny preset)
        stream_set = data.encode_once(lambda x, _: (x, raw.frozen_features(x)), train_set, args.cache_features,
                                      args.device_batch, device, ctx, "frozen features")
    stream = data.RunOrder(stream_set, args.seed, start * args.batch_size, (args.steps - start) * args.batch_size, world,
                           args.device_batch)
    loader = iter(data.make_loader(stream, args.device_batch, shuffle=False, seed=args.seed,
                                   num_workers=0 if args.cache_features else args.num_workers))

    def checkpoint(step):
        data.save_checkpoint({**{k: nets[name].state_dict() for k, name in CKPT_PARTS.items()}, "step": step,
                              "config": config, "args": vars(args), "history": history}, path)

    t0, done = time.time(), 0
    for step in range(start, args.steps):
        if master:
            te = time.time()
            evaluate(nets, val_images, step, args, history)
            t0 += time.time() - te  # images/s counts training only
        log = train_step(nets, loader, step, args, ctx)
        done += 1
        if master and ((step + 1) % args.log_every == 0 or step == start):
            dt, t0 = time.time() - t0, time.time()
            mem = data.peak_memory_gib(device)
            skipped = int(train_set.skipped.item())
            print(f"step {step + 1} | l1 {log['l1']:.4f} | lpips {log['lpips']:.4f} | g {log['g']:.4f} | w {log['w']:.3g} | "
                  f"d {log['d']:.4f} | psnr {log['psnr']:.2f} | lr {nets['opt'].param_groups[0]['lr']:.2e} | {data.fmt(done * args.batch_size / dt)} img/s | peak mem {mem:.2f} GB"
                  + (f" | skipped files {skipped}" if skipped else ""), flush=True)
            done = 0
        if master and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)
            print(f"saved step {step + 1} to {path}", flush=True)

    if master:
        evaluate(nets, val_images, args.steps, args, history)
    # the statistics' images are the first of the training set, as are the cached ones: no need to encode them again
    cached = args.cache_features and len(stream_set) >= args.stats_images > 0
    n = compute_latent_stats(raw, stream_set if cached else train_set, args.stats_images, args.device_batch, ctx)
    if master:
        checkpoint(args.steps)
        print(f"final: step {args.steps}, latent statistics over {n} images, saved {path}", flush=True)
        if args.cache_features:  # diffusion.py --cache-latents reads them instead of running the frozen encoder again
            data.save_checkpoint(dict(features=stream_set.tensors[1]), os.path.join(args.out_dir, FEATURES_FILE))
            print(f"the frozen features of {len(stream_set)} images saved for diffusion.py: "
                  f"{os.path.join(args.out_dir, FEATURES_FILE)}", flush=True)


def main():
    args = parse_args()
    if args.convert_official:
        if not (args.stats and args.out):
            raise SystemExit("--convert-official needs --stats dinov3_sp_stats.pt and --out PATH")
        data.check_out_file(args.out, (".pt", ".pth"))
        return convert_official(args.convert_official, args.stats, args.out, args.encoder, args.trust_checkpoint)
    if args.benchmark:  # synthetic images: no data, nothing written
        return benchmark(args, data.setup(args.seed))
    if not args.compute_stats:  # before any process starts work
        data.check_out_dir(args.out_dir)
        ckpt = data.start_or_resume(os.path.join(args.out_dir, "ae.pt"), args.resume, args.overwrite, "ae", args.steps)
    ctx = data.setup(args.seed)
    if args.device_batch is None:
        args.device_batch = data.derive_device_batch(args.batch_size, ctx["world_size"], SIZES[args.size]["device_batch"])
    args.bf16, why = data.choose_bf16(args.bf16, ctx["device"])
    data.print0(f"precision: {'bf16 autocast' if args.bf16 else 'fp32'} on {ctx['device']} ({why})")
    if args.compute_stats:
        recompute_stats(args, ctx)
    else:
        train(args, ckpt, ctx)
    data.cleanup()


if __name__ == "__main__":
    main()
