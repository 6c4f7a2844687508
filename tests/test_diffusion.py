"""diffusion.py: the model, the flow math, the official converter and the training loop (CPU, offline)."""
import argparse
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DIT_FLAGS, run, script_error, torchrun
from PIL import Image

import data
import diffusion
from diffusion import DiT, SIZES, convert_official, flow_loss, time_grid, update_ema

SMALL = dict(in_channels=32, grid=4, depth=2, width=64, num_heads=4, num_classes=10)
SMALL_DH = dict(SMALL, head="dh", head_depth=2, head_width=96, head_heads=4)  # a head wider than the trunk


def test_time_grid_values():
    """SPEC 3: the 5-step grid with the sampling shift 0.15."""
    grid = time_grid(5, 0.15)
    assert grid[0] == 0 and grid[-1] == 1
    assert np.allclose(grid.numpy(), [0, 0.036, 0.091, 0.184, 0.375, 1.0], atol=5e-4)
    assert torch.equal(time_grid(4, 0.0), torch.linspace(0, 1, 5, dtype=torch.float64))  # shift <= 0: no warp


def test_xl_parameter_count_on_meta():
    """Official 676,437,904 minus the unused output half (451,976) and the fixed position table (294,912)."""
    with torch.device("meta"):
        model = DiT(**SIZES["XL"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 675_691_016
    assert "pos_embed" not in model.state_dict()


def test_zero_init_and_shapes():
    model = DiT(**SMALL)
    x = torch.randn(3, 16, 32)
    v = model(x, torch.rand(3), torch.tensor([0, 9, 10]))  # 10 = the null class
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # adaLN-Zero and zero output layer


def test_overfits_a_single_latent():
    """One latent, fresh noise every step: v = (x1 - x_t)/(1 - t) is a function of (x_t, t), so a model
    as wide as the token must drive the loss from ~2 (= E|x1 - x0|^2) towards zero."""
    torch.manual_seed(0)
    model = DiT(**SMALL)
    x1 = torch.randn(1, 16, 32).expand(32, -1, -1)
    y = torch.zeros(32, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small: thread hand-offs cost ~9x on a shared 2-core CPU
    try:
        for _ in range(400):
            loss = flow_loss(model, x1, y, 0.4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[:5]) > 1.5
    assert np.mean(losses[-25:]) < 0.1, losses[-25:]


def test_ema_decay_zero_equals_model():
    model, ema = DiT(**SMALL), DiT(**SMALL)
    for p in model.parameters():
        p.data.normal_()
    update_ema(ema, model, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values()))
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, DiT(**SMALL), 0.9)
    assert not torch.equal(before[0], next(ema.parameters()))

# -----------------------------------------------------------------------------
# RAE's wide head (--head dh, DiT^DH)


def test_xl_dh_parameter_count_and_macs_on_meta():
    """XL + RAE's head (2 blocks, width 2048, 16 heads) by hand: the SVG-XL count (above) without its final
    layer, plus the head. forward_macs against torch's own matmul counter (meta tensors count attention too)."""
    from torch.utils.flop_counter import FlopCounterMode
    C, D, Dh, H = 392, 1152, 2048, 16
    block = 3 * Dh * Dh + 3 * Dh + 2 * 2 * (Dh // H) + Dh * Dh + Dh + 4 * Dh * Dh + 4 * Dh + 4 * Dh * Dh + Dh \
        + 6 * Dh * Dh + 6 * Dh  # qkv, q/k norms, proj, fc1, fc2, adaLN
    head = (C * Dh + Dh) + (D * Dh + Dh) + 2 * block + (2 * Dh * Dh + 2 * Dh) + (Dh * C + C)  # embed, cond, final
    svg_final_layer = (D * C + C) + (2 * D * D + 2 * D)
    config = dict(in_channels=C, grid=16, num_classes=1000, mlp_ratio=4.0, **SIZES["XL"], head="dh", head_depth=2,
                  head_width=Dh, head_heads=H)
    assert diffusion.head_config(argparse.Namespace(head="dh", size="XL", head_depth=None, head_width=None)) == \
        {k: config[k] for k in ("head", "head_depth", "head_width", "head_heads")}  # the flags' defaults are RAE's
    for cfg, params in ((dict(config, head="none"), 675_691_016), (config, 675_691_016 - svg_final_layer + head)):
        with torch.device("meta"):
            model = DiT(**cfg)
            with FlopCounterMode(display=False) as counter:
                model(torch.empty(1, 256, C), torch.empty(1), torch.zeros(1, dtype=torch.long))
        assert sum(p.numel() for p in model.parameters()) == params
        assert 2 * diffusion.forward_macs(cfg) == counter.get_total_flops()
    assert params == 836_002_056 and "final_layer.linear.weight" not in model.state_dict()  # as README says


def test_dh_zero_init_and_shapes():
    model = DiT(**SMALL_DH)
    assert model.config == SMALL_DH | dict(class_dropout=0.1, mlp_ratio=4.0, pred="v")  # recorded for load_model
    x = torch.randn(3, 16, 32)
    v = model(x, torch.rand(3), torch.tensor([0, 9, 10]))
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # adaLN-Zero head and zero output layer
    for p in model.parameters():
        p.data.normal_(std=0.1)
    v = model(x, torch.rand(3), torch.tensor([0, 9, 10]))
    assert v.shape == x.shape and torch.count_nonzero(v) == v.numel()


def test_dh_checkpoint_round_trip_and_sampling(tmp_path):
    torch.manual_seed(0)
    model = DiT(**SMALL_DH)
    for p in model.parameters():
        p.data.normal_(std=0.05)
    sd = model.state_dict()
    ckpt = dict(model=sd, ema=sd, opt=None, step=3, config=model.config, args={}, ae={})
    data.save_checkpoint(ckpt, tmp_path / "dh.pt")
    loaded = diffusion.load_model(str(tmp_path / "dh.pt"))
    assert loaded.head is not None and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sd.values()))
    noise, y = torch.randn(2, 16, 32), torch.tensor([1, 4])
    runs = [diffusion.sample(m, noise, y, steps=4, cfg=2.0) for m in (model.eval(), loaded, loaded)]
    assert runs[0].shape == noise.shape and torch.isfinite(runs[0]).all() and not torch.equal(runs[0], noise)
    assert torch.equal(runs[1], runs[2]) and torch.equal(runs[0], runs[1])


def test_dh_tiny_run_and_sample(tiny_ae_ckpt, tmp_path, monkeypatch):
    """diffusion.py --head dh as a user runs it (2 steps, tiny's head), then sample.py's loader and sampler."""
    import sample
    log = run("diffusion.py", "--size", "tiny", "--head", "dh", "--ae", tiny_ae_ckpt,
              "--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "2", "--device-batch", "2",
              "--log-every", "1", "--sample-every", "0", "--num-workers", "0", "--cache-latents", "0")
    assert sorted(losses(log)) == [1, 2] and "'head': 'dh'" in log
    ckpt = load(tmp_path / "dit.pt")
    assert {k: ckpt["config"][k] for k in ("head", "head_depth", "head_width", "head_heads")} == \
        dict(head="dh", head_depth=2, head_width=768, head_heads=6)
    assert f"{diffusion.forward_macs(ckpt['config']) / 1e9:.2f} GMACs" in log
    assert f"{sum(v.numel() for v in ckpt['model'].values()):,} parameters" in log
    model, ae = sample.load(str(tmp_path / "dit.pt"))
    images = sample.generate(model, ae, [0, 1], 0, 2, 0.15, 1.0, "euler", (0.0, 1.0), 2)
    assert images.shape == (2, 64, 64, 3)
    monkeypatch.setattr("sys.argv", ["diffusion.py", "--head-width", "256"])
    with pytest.raises(SystemExit, match="add --head dh"):
        diffusion.main()
    monkeypatch.setattr("sys.argv", ["diffusion.py", "--head", "dh", "--head-width", "200"])
    with pytest.raises(SystemExit, match="multiple of 128"):
        diffusion.main()

# -----------------------------------------------------------------------------
# the official checkpoint: names and shapes of official_keys.txt, forward written from the official code


def official_shapes(depth, width, num_heads, in_channels, tokens, num_classes, mlp_ratio=4):
    head = width // num_heads
    shapes = {"pos_embed": (1, tokens, width), "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
              "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
              "y_embedder.embedding_table.weight": (num_classes + 1, width)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                       b + "attn.q_norm.weight": (head,), b + "attn.q_norm.bias": (head,),
                       b + "attn.k_norm.weight": (head,), b + "attn.k_norm.bias": (head,),
                       b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                       b + "mlp.fc1.weight": (mlp_ratio * width, width), b + "mlp.fc1.bias": (mlp_ratio * width,),
                       b + "mlp.fc2.weight": (width, mlp_ratio * width), b + "mlp.fc2.bias": (width,),
                       b + "adaLN_modulation.1.weight": (6 * width, width), b + "adaLN_modulation.1.bias": (6 * width,)})
    shapes.update({"ln1.weight": (width, in_channels), "ln1.bias": (width,),
                   "final_layer.linear.weight": (2 * in_channels, width), "final_layer.linear.bias": (2 * in_channels,),
                   "final_layer.adaLN_modulation.1.weight": (2 * width, width),
                   "final_layer.adaLN_modulation.1.bias": (2 * width,)})
    return shapes


def mae_pos_embed(width, grid):
    """MAE's numpy recipe as in the official code: meshgrid with w first, half for each axis, [sin | cos]."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0)
    return np.concatenate([one_d(width // 2, g[0]), one_d(width // 2, g[1])], axis=1)


def official_forward(sd, x, t, y, depth, num_heads):
    """The official DiT forward with learn_sigma's 2C output, written from models_SVG.py with plain ops."""
    lin = lambda h, k: F.linear(h, sd[k + ".weight"], sd[k + ".bias"])  # noqa: E731
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    h = lin(x, "ln1") + sd["pos_embed"]
    B, T, D = h.shape
    for i in range(depth):
        b = f"blocks.{i}."
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = mod(F.layer_norm(h, (D,), eps=1e-6), s1, sc1)
        q, k, v = lin(a, b + "attn.qkv").reshape(B, T, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        q = F.layer_norm(q, (D // num_heads,), sd[b + "attn.q_norm.weight"], sd[b + "attn.q_norm.bias"])
        k = F.layer_norm(k, (D // num_heads,), sd[b + "attn.k_norm.weight"], sd[b + "attn.k_norm.bias"])
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // num_heads), -1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        m = mod(F.layer_norm(h, (D,), eps=1e-6), s2, sc2)
        h = h + g2[:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    return lin(mod(F.layer_norm(h, (D,), eps=1e-6), shift, scale), "final_layer.linear")


def test_official_converter_same_velocity():
    torch.manual_seed(0)
    depth, width, C, grid, classes = 2, 64, 24, 4, 10
    sd = {k: torch.randn(s) * 0.2 for k, s in official_shapes(depth, width, 4, C, grid * grid, classes).items()}
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(width, grid)).float()[None]
    ours, config = convert_official(sd)
    assert (config["depth"], config["width"], config["num_heads"], config["num_classes"]) == (depth, width, 4, classes)
    model = DiT(**config)
    assert model.load_state_dict(ours, strict=True)  # every official key mapped, none left over
    x, t, y = torch.randn(3, grid * grid, C), torch.rand(3), torch.tensor([1, 5, classes])
    with torch.no_grad():
        ref = official_forward(sd, x, t, y, depth, 4)[..., :C]  # the velocity half
        torch.testing.assert_close(model(x, t, y), ref, rtol=1e-4, atol=1e-4)


def test_official_converter_xl_keys_and_shapes():
    shapes = official_shapes(28, 1152, 16, 392, 256, 1000)
    assert sum(math.prod(s) for s in shapes.values()) == 676_437_904  # the listing matches official_keys.txt
    ours, config = convert_official({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        model = DiT(**config)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert config == dict(in_channels=392, grid=16, depth=28, width=1152, num_heads=16, num_classes=1000,
                          class_dropout=0.1, mlp_ratio=4.0)

# -----------------------------------------------------------------------------
# the training loop (subprocesses, as a user runs it)


def losses(log):
    return {int(s): float(v) for s, v in re.findall(r"step (\d+) \| loss ([\d.]+)", log)}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # plain dict: loads under weights_only


def test_tiny_run_checkpoint_and_preview(tiny_dit_ckpt):
    ckpt = load(tiny_dit_ckpt)
    assert set(ckpt) == {"model", "ema", "opt", "step", "config", "args", "ae"} and ckpt["step"] == 4
    assert ckpt["ae"]["latent_mean"].shape == (ckpt["ae"]["latent_channels"],) and ckpt["ae"]["grid"] ** 2 * 16 ** 2 == ckpt["ae"]["image_size"] ** 2
    model = diffusion.load_model(tiny_dit_ckpt)
    assert not model.training and model.step == 4 and model.ae["path"] == ckpt["ae"]["path"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt["ema"].values()))
    log = (tmp := os.path.dirname(tiny_dit_ckpt)) and open(os.path.join(tmp, "log.txt")).read()
    assert sorted(losses(log)) == [1, 2, 3, 4] and "images/s" in log and "MFU" in log
    assert os.path.isfile(os.path.join(tmp, "preview_0000004.png"))


def test_resume_gives_the_same_losses(tiny_ae_ckpt, tiny_dit_ckpt, tmp_path):
    """Stop the fixture's 4-step run after 2 steps, resume it: same losses, same final weights."""
    from conftest import TINY_DIT_FLAGS
    flags = [*TINY_DIT_FLAGS, "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path), "--sample-every", "0"]
    first = losses(run("diffusion.py", *flags, "--steps", "2"))
    second = losses(run("diffusion.py", *flags, "--steps", "4", "--resume"))
    reference = losses(open(os.path.join(os.path.dirname(tiny_dit_ckpt), "log.txt")).read())
    assert {**first, **second} == reference
    ours, ref = load(tmp_path / "dit.pt"), load(tiny_dit_ckpt)
    for key in ("model", "ema"):
        for name in ref[key]:
            torch.testing.assert_close(ours[key][name], ref[key][name], rtol=0, atol=0)


@pytest.mark.parametrize("cache", ["0", "6"])
def test_two_processes_match_one(tiny_ae_ckpt, tmp_path, cache):
    """Same global batch 4: 1 process x 2 micro-batches of 2 (accumulation) vs 2 gloo processes x 2, encoding
    online (the full-size path) and from cached latents (each process encodes a share, all get all).
    EMA decay 0 makes the EMA equal to the model."""
    flags = ["diffusion.py", "--size", "tiny", "--ae", tiny_ae_ckpt, "--steps", "3", "--batch-size", "4",
             "--log-every", "1", "--sample-every", "0", "--num-workers", "0", "--no-bf16", "--no-flip", "--ema-decay", "0",
             "--cache-latents", cache]
    one = losses(torchrun(1, *flags, "--device-batch", "2", "--out-dir", str(tmp_path / "one")))
    log = torchrun(2, *flags, "--out-dir", str(tmp_path / "two"))  # --device-batch derived: 4 / 2 processes
    assert "2 process(es) x 2 x 1 accumulation" in log
    two = losses(log)
    assert sorted(one) == [1, 2, 3] and np.allclose([two[k] for k in one], list(one.values()), rtol=1e-5, atol=1e-5)
    a, b = load(tmp_path / "one" / "dit.pt"), load(tmp_path / "two" / "dit.pt")
    for name in a["model"]:
        # Adam moves a weight by ~lr per step whatever its gradient's size: float noise on near-zero gradients
        # can show as ~1e-6 after 3 steps at lr 1e-4, so the tolerance is lr / 10
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-5, atol=1e-5)
        assert torch.equal(b["ema"][name], b["model"][name])


def test_compile_runs(tiny_ae_ckpt, tmp_path):
    log = run("diffusion.py", "--size", "tiny", "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path), "--compile",
              "--steps", "2", "--batch-size", "2", "--device-batch", "2", "--log-every", "1", "--sample-every", "0",
              "--num-workers", "0", "--cache-latents", "0")
    assert sorted(losses(log)) == [1, 2]
    assert not any(k.startswith("_orig_mod") for k in load(tmp_path / "dit.pt")["model"])


def test_clear_errors(tiny_ae_ckpt, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="AE checkpoint .* not found"):
        diffusion.load_frozen_ae(str(tmp_path / "missing.pt"), "cpu")
    ckpt = load(tiny_ae_ckpt)
    ckpt["model"]["stats_ready"] = torch.zeros((), dtype=torch.bool)  # ae.py's buffer behind has_stats
    torch.save(ckpt, tmp_path / "nostats.pt")
    with pytest.raises(SystemExit, match="no latent statistics"):
        diffusion.load_frozen_ae(str(tmp_path / "nostats.pt"), "cpu")
    # a checkpoint of another size cannot be resumed
    os.makedirs(tmp_path / "dit")
    torch.save({"config": dict(SMALL), "ae": {"path": "x"}, "opt": {}, "step": 1}, tmp_path / "dit" / "dit.pt")
    monkeypatch.setattr("sys.argv", ["diffusion.py", "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path / "dit"), "--resume"])
    with pytest.raises(SystemExit, match="pass the same --size"):
        diffusion.main()


def test_convert_official_cli(tiny_ae_ckpt, tmp_path, monkeypatch):
    """The CLI path: an official-format file (with a pickled Namespace, as DiT's scripts save) at the tiny AE's
    latent size -> our checkpoint -> load_model gives the official velocity."""
    torch.manual_seed(0)
    ae = load(tiny_ae_ckpt)["model"]
    C, grid = ae["latent_mean"].numel(), 4  # the tiny AE: 64 px -> 4x4 tokens
    sd = {k: torch.randn(s) * 0.2 for k, s in official_shapes(2, 64, 4, C, grid * grid, 10).items()}
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(64, grid)).float()[None]
    torch.save({"ema": sd, "args": argparse.Namespace(model="DiT")}, tmp_path / "official.pt")
    monkeypatch.setattr("sys.argv", ["diffusion.py", "--convert-official", str(tmp_path / "official.pt"),
                                     "--ae", tiny_ae_ckpt, "--out", str(tmp_path / "ours.pt")])
    with pytest.warns(UserWarning, match="width 64 < token dimension"):
        diffusion.main()
        model = diffusion.load_model(str(tmp_path / "ours.pt"))
    x, t, y = torch.randn(2, grid * grid, C), torch.rand(2), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), official_forward(sd, x, t, y, 2, 4)[..., :C], rtol=1e-4, atol=1e-4)
    assert model.ae["grid"] == grid and model.ae["latent_channels"] == C


def test_auto_shift_is_raes_in_our_convention():
    """RAE's shift a = sqrt(H W C / 4096) in its convention (t = 1 noise) equals time_warp with s = 1 / a in ours;
    RAE's published value for DINOv2-B latents (16x16x768) is a = 6.93."""
    assert 1 / diffusion.auto_shift(16, 768) == pytest.approx(6.93, abs=5e-3)
    assert diffusion.resolve_shift("auto", dict(grid=16, in_channels=392)) == pytest.approx(1 / math.sqrt(24.5))
    assert diffusion.resolve_shift(0.4, dict(grid=16, in_channels=392)) == 0.4
    a, tn = 6.93, torch.linspace(0, 1, 101, dtype=torch.float64)
    rae = a * tn / (1 + (a - 1) * tn)  # RAE's warp of its noise-time
    torch.testing.assert_close(1 - rae, diffusion.time_warp(1 - tn, 1 / a))
    with pytest.raises(argparse.ArgumentTypeError):
        diffusion.shift_arg("nan")


def test_time_distributions():
    """Uniform u: logit(u) is logistic (mean 0, std pi/sqrt(3)); logit-normal u warped by s: logit(t) ~ N(ln s, 1)."""
    g = torch.Generator().manual_seed(0)
    for dist, shift, mean, std in (("uniform", 0, 0.0, math.pi / math.sqrt(3)), ("logit-normal", 0, 0.0, 1.0),
                                   ("logit-normal", 0.4, math.log(0.4), 1.0)):
        t = diffusion.time_warp(diffusion.draw_u(200_000, dist, g).double(), shift)
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean().item() - mean) < 0.02 and abs(logit.std().item() - std) < 0.02, (dist, shift)


class _Oracle(torch.nn.Module):
    """Predicts the one data point x1 exactly (pred 'x'), or the exact velocity towards it from x_t (pred 'v')."""

    def __init__(self, x1, pred):
        super().__init__()
        self.x1, self.config, self.w = x1, dict(pred=pred, num_classes=1, grid=1, in_channels=x1.shape[-1]), torch.nn.Linear(1, 1)

    def forward(self, x, t, y):
        if self.config["pred"] == "x":
            return self.x1.expand_as(x)
        return (self.x1 - x) / (1 - t)[:, None, None]  # v = x1 - x0 = (x1 - x_t) / (1 - t)


def test_x_prediction_is_converted_to_velocity():
    """With a point-mass data distribution the exact clean-sample prediction gives the exact velocity (1 - t above
    the clip), zero loss, and Euler lands on the data from any noise, as the exact velocity does."""
    torch.manual_seed(0)
    x1, x0, y = torch.randn(1, 1, 6), torch.randn(3, 1, 6), torch.zeros(3, dtype=torch.long)
    u = torch.tensor([0.1, 0.5, 0.8])
    for pred in ("x", "v"):
        model = _Oracle(x1, pred)
        assert diffusion.flow_loss(model, x1.expand(3, 1, 6), y, 0.4, x0=x0, u=u, pred=pred) < 1e-10
        out = diffusion.sample(model, x0, y, steps=5, shift=0.15, cfg=2.0)
        torch.testing.assert_close(out, x1.expand(3, 1, 6), atol=1e-5, rtol=1e-5)
    t = torch.tensor([0.99])  # above 1 - X_PRED_MIN_GAP the divisor is clipped
    v = diffusion.velocity(_Oracle(x1, "x"), torch.zeros(1, 1, 6), t, y[:1], "x")
    torch.testing.assert_close(v, x1 / diffusion.X_PRED_MIN_GAP)


def test_rae_and_jit_options_through_the_cli(tiny_ae_ckpt, tmp_path):
    """--pred x --shift auto --time-dist logit-normal train, the checkpoint records them, and sample.py samples with
    the recorded shift ('auto' -> RAE's value for the tiny 4x4x392 latent) and the x-to-v conversion."""
    from conftest import TINY_DIT_FLAGS
    run("diffusion.py", *TINY_DIT_FLAGS, "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path), "--steps", "2",
        "--pred", "x", "--shift", "auto", "--time-dist", "logit-normal", "--sample-every", "0")
    ckpt = load(tmp_path / "dit.pt")
    assert ckpt["config"]["pred"] == "x" and ckpt["args"]["shift"] == "auto" and ckpt["args"]["sample_shift"] == "auto"
    assert diffusion.load_model(str(tmp_path / "dit.pt")).config["pred"] == "x"
    log = run("sample.py", "--ckpt", str(tmp_path / "dit.pt"), "--steps", "2", "--per-class", "1", "--out",
              str(tmp_path / "grid.png"))
    assert f"shift {math.sqrt(4096 / (16 * 392))}" in log and os.path.isfile(tmp_path / "grid.png")


# -----------------------------------------------------------------------------
# losing work, silent wrong results (issue 10): in-process main(), a few steps each


def main_run(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["diffusion.py", *argv])
    diffusion.main()
    return capsys.readouterr().out


def main_error(monkeypatch, *argv):
    return script_error(diffusion, monkeypatch, *argv)


@pytest.mark.parametrize("argv,expected", [
    (["--steps", "0"], "--steps must be at least 1"), (["--steps", "-5"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"), (["--device-batch", "0"], "--device-batch must be"),
    (["--ckpt-every", "0"], "--ckpt-every must be"), (["--log-every", "0"], "--log-every must be"),
    (["--lr", "0"], "--lr must be positive"), (["--lr=-1e-4"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite"), (["--lr", "inf"], "--lr must be a finite"),
    (["--ema-decay", "1.5"], "--ema-decay must be at most 1"),
    (["--out-dir", "/proc/svg_run"], "--out-dir '/proc/svg_run' cannot be created"),
    (["--out-dir", "{file}/run"], "cannot be created"), (["--data", "{file}"], "is a file; pass a folder"),
    (["--convert-official", "x.pt", "--out", "{tmp}"], "--out '{tmp}' is a folder")])
def test_bad_flags_are_one_line_before_any_work(monkeypatch, tmp_path, tiny_ae_ckpt, argv, expected):
    (tmp_path / "file").write_text("not a folder")
    fill = dict(file=str(tmp_path / "file"), tmp=str(tmp_path))
    argv = [a.format(**fill) for a in argv]
    base = ["--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
            "--cache-latents", "0", "--sample-every", "0", "--num-workers", "0"]  # a short valid run, but for argv
    msg = main_error(monkeypatch, *base, *argv)
    assert expected.format(**fill) in msg, msg


def test_divergence_stops_and_a_new_run_never_replaces_a_checkpoint(tiny_ae_ckpt, tiny_dit_ckpt, tmp_path, monkeypatch):
    """--lr 1e30: the loss turns non-finite within a few steps. The run stops in one line naming the step and the
    loss, before its optimizer step, and the good checkpoint on disk stays as it was; a new run into an out-dir
    holding a checkpoint stops unless --overwrite."""
    shutil.copy(tiny_dit_ckpt, tmp_path / "dit.pt")
    good = (tmp_path / "dit.pt").read_bytes()
    flags = [*TINY_DIT_FLAGS, "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path), "--sample-every", "0"]
    msg = main_error(monkeypatch, *flags)
    assert "already holds a checkpoint" in msg and all(f in msg for f in ("--resume", "--out-dir", "--overwrite"))
    msg = main_error(monkeypatch, *flags, "--overwrite", "--lr", "1e30", "--steps", "20", "--ckpt-every", "20")
    assert re.match(r"step \d+: non-finite training values \(loss (nan|inf), grad norm \S+\); stopped before the "
                    r"optimizer step, .*dit.pt keeps the last good checkpoint", msg), msg
    assert (tmp_path / "dit.pt").read_bytes() == good and os.listdir(tmp_path) == ["dit.pt"]


def test_lr_flag_applies_on_resume(tiny_ae_ckpt, tiny_dit_ckpt, tmp_path, monkeypatch, capsys):
    shutil.copy(tiny_dit_ckpt, tmp_path / "dit.pt")
    tiny = diffusion.PRESETS["tiny"]  # the fixture's 4 steps end inside the preset's lr decay
    assert load(tmp_path / "dit.pt")["opt"]["param_groups"][0]["lr"] == pytest.approx(tiny["lr"] / (4 * tiny["lr_decay"]))
    log = main_run(monkeypatch, capsys, *TINY_DIT_FLAGS, "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path),
                   "--sample-every", "0", "--resume", "--steps", "5", "--lr", "3e-4", "--lr-decay", "0")
    assert "step 5 | loss" in log and "lr 3.00e-04" in log
    assert load(tmp_path / "dit.pt")["opt"]["param_groups"][0]["lr"] == 3e-4
    assert "--resume: " in main_error(monkeypatch, *TINY_DIT_FLAGS, "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path),
                                      "--resume", "--steps", "5")  # already at step 5: nothing to do is an error


def test_lr_decay_schedule_and_a_killed_run_resumes_on_it(tiny_ae_ckpt, tmp_path, monkeypatch, capsys):
    """--lr-decay 0.5 of 4 steps: lr, lr, lr, lr / 2 (linear to 0 from step 2). A run killed after step 2 (an
    exception in step 3) and resumed gives the same losses, learning rates and weights as the uninterrupted run."""
    flags = ["--ae", tiny_ae_ckpt, "--steps", "4", "--batch-size", "2", "--lr-decay", "0.5", "--log-every", "1",
             "--ckpt-every", "2", "--sample-every", "0", "--num-workers", "0", "--cache-latents", "8"]
    lrs = lambda log: [float(v) for v in re.findall(r"\| lr ([\d.e+-]+) \|", log)]  # noqa: E731
    whole = main_run(monkeypatch, capsys, *flags, "--out-dir", str(tmp_path / "whole"))
    lr = diffusion.PRESETS["tiny"]["lr"]
    assert lrs(whole) == [lr, lr, lr, lr / 2]
    step = diffusion.train_step

    def killed_in_step_3(*args):
        if args[5] == 2:  # the 0-based step index
            raise KeyboardInterrupt
        return step(*args)
    monkeypatch.setattr(diffusion, "train_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        main_run(monkeypatch, capsys, *flags, "--out-dir", str(tmp_path / "cut"))
    first = capsys.readouterr().out
    assert load(tmp_path / "cut" / "dit.pt")["step"] == 2
    monkeypatch.setattr(diffusion, "train_step", step)
    second = main_run(monkeypatch, capsys, *flags, "--out-dir", str(tmp_path / "cut"), "--resume")
    assert {**losses(first), **losses(second)} == losses(whole) and lrs(first) + lrs(second) == lrs(whole)
    a, b = load(tmp_path / "whole" / "dit.pt"), load(tmp_path / "cut" / "dit.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]


def test_resume_across_an_epoch_boundary_is_exact(tiny_ae_ckpt, tmp_path, monkeypatch, capsys):
    """Plain python, 5 images, global batch 4 as 2 micro-batches: step 2 crosses into epoch 1 and step 3 into
    epoch 2. Stopping at step 2 and resuming gives the uninterrupted run's weights bit for bit (flips on)."""
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "data")
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "data" / f"{i}.png")
    flags = ["--ae", tiny_ae_ckpt, "--data", str(tmp_path / "data"), "--batch-size", "4", "--device-batch", "2",
             "--log-every", "1", "--sample-every", "0", "--num-workers", "0", "--ema-decay", "0.9", "--cache-latents", "0"]
    whole = losses(main_run(monkeypatch, capsys, *flags, "--steps", "3", "--out-dir", str(tmp_path / "whole")))
    first = losses(main_run(monkeypatch, capsys, *flags, "--steps", "2", "--out-dir", str(tmp_path / "cut")))
    second = losses(main_run(monkeypatch, capsys, *flags, "--steps", "3", "--out-dir", str(tmp_path / "cut"), "--resume"))
    assert {**first, **second} == whole and sorted(whole) == [1, 2, 3]
    a, b = load(tmp_path / "whole" / "dit.pt"), load(tmp_path / "cut" / "dit.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_training_images_are_encoded_in_fp32(tiny_ae_ckpt, tmp_path, monkeypatch, capsys):
    """Even with --bf16 (the DiT under autocast) the frozen AE encodes the training images online outside autocast
    (issue 10, item 12; --cache-latents encodes in fp32 too)."""
    import ae
    calls, encode = [], ae.SVGAutoencoder.encode

    def spy(self, images, features=None):
        calls.append(torch.is_autocast_enabled("cpu"))
        return encode(self, images, features)
    monkeypatch.setattr(ae.SVGAutoencoder, "encode", spy)
    main_run(monkeypatch, capsys, "--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path), "--bf16", "--steps", "1",
             "--batch-size", "1", "--device-batch", "1", "--sample-every", "0", "--num-workers", "0",
             "--cache-latents", "0")
    assert calls == [False]


def test_latents_from_the_features_ae_py_saved(tiny_ae_ckpt, tmp_path, capsys):
    """ae.py --cache-features saves the frozen features beside ae.pt (its latent statistics come from them too);
    --cache-latents then runs only the residual branch and gets the latents that encoding the images gives. Features
    of other images, or too few, are announced and not used."""
    import ae as ae_py
    folder, cpu = os.path.dirname(tiny_ae_ckpt), torch.device("cpu")
    assert "frozen features of 32 images saved" in open(os.path.join(folder, "log.txt")).read()
    model = diffusion.load_frozen_ae(tiny_ae_ckpt, cpu)
    mean, std = model.latent_mean.clone(), model.latent_std.clone()
    ae_py.compute_latent_stats(model, data.build_dataset("shapes", 64, "ae"), 32, 4, dict(rank=0, world_size=1,
                               ddp=False, master=True, device=cpu))  # the same images, encoded from the pixels
    model.eval()
    torch.testing.assert_close((model.latent_mean, model.latent_std), (mean, std), rtol=1e-5, atol=1e-6)

    def latents(ae_path, num=24):
        capsys.readouterr()
        cached = diffusion.cache_latents(model, ae_path, data.build_dataset("shapes", 64, "diffusion"), num, 8, cpu,
                                         dict(rank=0, world_size=1, ddp=False, master=True))
        return cached.tensors, capsys.readouterr().out
    (reused, labels), log = latents(tiny_ae_ckpt)
    assert "frozen features of the first 24 images from" in log
    bare = tmp_path / "ae.pt"  # no features beside it: the images go through the frozen encoder
    shutil.copy(tiny_ae_ckpt, bare)
    (encoded, labels2), log = latents(str(bare))
    assert "not using" not in log and "frozen features" not in log
    torch.testing.assert_close(reused, encoded, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, labels2) and reused.shape == (24, 16, model.latent_channels)

    saved = torch.load(os.path.join(folder, ae_py.FEATURES_FILE))
    torch.save(dict(saved, features=saved["features"].roll(1, 0)), tmp_path / ae_py.FEATURES_FILE)  # other images
    (z, _), log = latents(str(bare))
    assert "not the features of these images by this encoder" in log
    torch.testing.assert_close(z, encoded, rtol=1e-5, atol=1e-5)
    with open(tmp_path / ae_py.FEATURES_FILE, "wb") as f:  # a truncated file
        f.write(open(os.path.join(folder, ae_py.FEATURES_FILE), "rb").read()[:1000])
    (z, _), log = latents(str(bare))
    assert "cannot be read" in log and "encoding the images" in log
    torch.testing.assert_close(z, encoded, rtol=1e-5, atol=1e-5)
    (z, _), log = latents(tiny_ae_ckpt, num=40)
    assert "it holds 32 images, --cache-latents asks for 40" in log and len(z) == 40
