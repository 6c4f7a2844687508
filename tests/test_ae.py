"""ae.py: the tiny run learns, resume is exact, DDP = one process, eval latents are per image, the official
checkpoint converts and matches torchvision's ViT, encoder weight files load, bad input gets one clear line."""
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer

import ae
import data
from conftest import ROOT, run, script_error, torchrun

DINO = "vit_small_plus_patch16_dinov3_qkvb"
# 4 steps of global batch 2 as 2 micro-batches of 1 at 32 px; the GAN switches on at step 2; a checkpoint at step 2
SMALL = ("ae.py", "--size", "tiny", "--encoder-weights", "random", "--lpips-weights", "random", "--steps", "4",
         "--image-size", "32", "--batch-size", "2", "--device-batch", "1", "--disc-start", "2", "--eval-every", "2",
         "--eval-images", "2", "--stats-images", "2", "--num-workers", "0", "--log-every", "1", "--save-every", "2",
         "--lr-decay", "0.3", "--cache-features", "0")  # lr falling over the last 30% of the steps; every batch through
# the frozen encoder, as the full preset (conftest's run caches)


def images(n, size=64):
    return torch.stack([data.Shapes("val", size)[i][0] for i in range(n)])


def test_tiny_run_learns(tiny_ae_ckpt):
    ckpt = torch.load(tiny_ae_ckpt, weights_only=True)  # a plain dict
    psnr = [h["psnr"] for h in ckpt["history"]]
    assert ckpt["history"][0]["step"] == 0 and ckpt["history"][-1]["step"] == ckpt["step"] == 16
    assert psnr[-1] > psnr[0] + 0.5, f"held-out PSNR did not rise: {psnr}"
    log = open(os.path.join(os.path.dirname(tiny_ae_ckpt), "log.txt")).read()
    l1 = [float(v) for v in re.findall(r"^step \d+ \| l1 ([\d.]+)", log, re.M)]
    assert np.mean(l1[-2:]) < l1[0] - 0.03, f"reconstruction loss did not fall: {l1}"
    assert os.path.isfile(os.path.join(os.path.dirname(tiny_ae_ckpt), "recon_000016.png"))
    model = ae.load_autoencoder(tiny_ae_ckpt)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.latent_channels == 392 and model.patch_size == 16 and model.image_size == 64 and model.has_stats
    x = images(2)
    z = model.encode(x)
    assert z.shape == (2, 392, 4, 4) and model.decode(z).shape == (2, 3, 64, 64)
    zs = model.standardize(z)
    torch.testing.assert_close(model.unstandardize(zs), z, atol=1e-4, rtol=1e-5)
    assert abs(zs[:, :384].mean().item()) < 0.5  # standardised with statistics of the same data


def test_eval_latents_do_not_depend_on_batch_mates(tiny_ae_ckpt):
    model = ae.load_autoencoder(tiny_ae_ckpt)
    x = images(4)
    alone, batched = model.encode(x[:1]), model.encode(x)[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)
    model.config["batch_stats"] = True  # the official per-batch alignment does depend on them
    assert (model.encode(x[:1]) - model.encode(x)[:1])[:, 384:].abs().max() > 1e-3


def test_compute_stats_on_demand(tiny_ae_ckpt, tmp_path, monkeypatch):
    ckpt = torch.load(tiny_ae_ckpt, weights_only=True)
    ckpt["model"]["latent_mean"].zero_()
    ckpt["model"]["stats_ready"].fill_(False)
    data.save_checkpoint(ckpt, str(tmp_path / "ae.pt"))
    assert not ae.load_autoencoder(str(tmp_path / "ae.pt")).has_stats
    monkeypatch.setattr(sys, "argv", ["ae.py", "--compute-stats", str(tmp_path / "ae.pt"), "--stats-images", "16"])
    ae.main()
    model = ae.load_autoencoder(str(tmp_path / "ae.pt"))
    x = torch.stack([data.Shapes("train", 64)[i][0] for i in range(16)])  # the images the statistics came from
    z = model.standardize(model.encode(x)).transpose(0, 1).flatten(1)  # (C, 16 * 16 tokens)
    assert model.has_stats and z.mean(1).abs().max() < 1e-3 and (z.std(1) - 1).abs().max() < 1e-2


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae_ref")
    run(*SMALL, "--out-dir", str(out))
    return torch.load(out / "ae.pt", weights_only=True)


def test_killed_run_resumes_exactly(reference_run, tmp_path):
    cmd = [sys.executable, *SMALL, "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for line in proc.stdout:
        if line.startswith("saved step 2"):
            proc.send_signal(signal.SIGKILL)  # a hard kill, no chance to clean up
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = torch.load(tmp_path / "ae.pt", weights_only=True)["step"]
    assert saved == 2
    log = run(*SMALL, "--out-dir", str(tmp_path), "--resume")
    assert f"resumed from step {saved}" in log
    resumed = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert resumed["step"] == 4
    for part in ("model", "disc"):
        for k, v in reference_run[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k} differs after resume"
    for a, b in zip(reference_run["opt"]["state"].values(), resumed["opt"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # the lr decay (last 30% of 4 steps: from step 2.8) reached the resumed run's last step too
    lr = ae.SIZES["tiny"]["lr"] * (4 - 3) / (4 * 0.3)
    assert reference_run["opt"]["param_groups"][0]["lr"] == resumed["opt"]["param_groups"][0]["lr"] == pytest.approx(lr)


def test_cached_features_run_resumes_exactly(tmp_path):
    """The tiny preset's path (--cache-features): stopping at step 2 and resuming to 4 gives the uninterrupted run."""
    cached = (*SMALL[:-2], "--cache-features", "6")  # fewer images than the run draws: it cycles through them
    run(*cached, "--out-dir", str(tmp_path / "straight"))
    run(*cached, "--out-dir", str(tmp_path / "stopped"), "--steps", "2")
    log = run(*cached, "--out-dir", str(tmp_path / "stopped"), "--resume")
    assert "resumed from step 2" in log
    a, b = (torch.load(tmp_path / d / "ae.pt", weights_only=True) for d in ("straight", "stopped"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "disc"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"


def test_ddp_two_processes_match_one(reference_run, tmp_path):
    torchrun(2, *SMALL, "--out-dir", str(tmp_path))
    two = torch.load(tmp_path / "ae.pt", weights_only=True)
    # Adam's first steps move every weight by about +-lr whatever the gradient's size, so parameters whose
    # gradient is zero in exact arithmetic (a bias before a one-channel GroupNorm, attention key biases) follow
    # the sign of float noise; everything else must agree. Different images would move most weights differently.
    differ, total = 0, 0
    for part in ("model", "disc"):
        for k, v in reference_run[part].items():
            if v.is_floating_point() and not k.startswith("encoder.") and "running" not in k and "latent" not in k:
                differ += ((v - two[part][k]).abs() > 5e-5).sum().item()
                total += v.numel()
    assert differ < 0.01 * total, f"{differ} of {total} weights differ by more than lr/2"
    torch.testing.assert_close(two["model"]["align_stats"], reference_run["model"]["align_stats"], atol=1e-4, rtol=1e-4)
    for a, b in zip(reference_run["history"], two["history"]):
        assert abs(a["psnr"] - b["psnr"]) < 0.05


# -----------------------------------------------------------------------------
# the authors' checkpoint


def official_shapes():
    """Key -> shape of the official decoder, residual encoder and mask token, read from official_keys.txt."""
    text = open(os.path.join(ROOT, "..", "shared", "official_keys.txt")).read().split("## Official SVG decoder")[1]
    shapes = {m[0]: tuple(int(d) for d in m[1].split(",") if d.strip())
              for m in re.findall(r"^((?:decoder|extra_vit|mask_token)\S*) \(([\d, ]+)\)", text, re.M)}
    for k, v in list(shapes.items()):  # "(encoder.layers.encoder_layer_1 .. _5 repeat encoder_layer_0)"
        if "encoder_layer_0." in k:
            for i in range(1, 6):
                shapes[k.replace("encoder_layer_0.", f"encoder_layer_{i}.")] = v
    return shapes


def meta_periods(head_dim=64, base=100.0):
    """Meta's DINOv3 RoPE periods (dinov3/layers/rope_position_encoding.py: base^(2k / (D/2)) for k < D/4, D the
    head dim) as its released checkpoints store them: in bf16."""
    return (base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))).to(torch.bfloat16)


def meta_rope(periods, H, W):
    """Meta's RopePositionEmbedding in eval mode ("separate" coordinates), from its arithmetic: the centres of an
    H x W grid mapped to [-1, 1], angles 2 pi c / period per axis and period, tiled twice -> [sin | cos] (HW, 2D),
    the layout timm's get_embed returns. `periods` as Meta loads them: the stored values in an fp32 buffer."""
    c = torch.stack(torch.meshgrid(torch.arange(0.5, H) / H, torch.arange(0.5, W) / W, indexing="ij"), -1)
    angles = (2 * math.pi * (2 * c.flatten(0, 1) - 1)[:, :, None] / periods.float()).flatten(1).tile(2)  # (HW, D)
    return torch.cat([angles.sin(), angles.cos()], -1)


def to_meta(timm_sd):
    """A timm DINOv3 state dict in Meta's original format (what the official checkpoint's encoder.* holds)."""
    meta = {"rope_embed.periods": meta_periods(), "mask_token": torch.zeros(1, 384)}
    for k, v in timm_sd.items():
        if k.endswith("attn.q_bias"):
            v_bias = timm_sd[k.replace("q_bias", "v_bias")]
            meta[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            meta[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * len(v))
            continue
        if k.endswith("attn.v_bias"):
            continue
        for a, b in (("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"),
                     ("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3")):
            k = k.replace(a, b)
        meta[k] = v
    return meta


def official_residual(vit, x):
    """The official extra_vit forward (torchvision ViT, CLS dropped, per-token head) -> (B, 8, N)."""
    x = vit._process_input(x)
    x = vit.encoder(torch.cat([vit.class_token.expand(len(x), -1, -1), x], 1))[:, 1:]
    return vit.heads(x).transpose(1, 2)


def test_convert_official_maps_every_key_and_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    shapes = official_shapes()
    dino = timm.create_model(DINO, pretrained=False, num_classes=0, img_size=256).eval()
    dino.rope.periods.copy_(meta_periods())  # Meta's model as the official code loads it: the stored bf16 periods
    vit = VisionTransformer(image_size=256, patch_size=16, num_layers=6, num_heads=8, hidden_dim=384, mlp_dim=1536,
                            dropout=0.1, attention_dropout=0.1)
    vit.heads = nn.Sequential(nn.Linear(384, 384), nn.GELU(), nn.Linear(384, 8))
    vit.eval()
    sd = {"extra_vit." + k: v for k, v in vit.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: v for k, v in shapes.items() if k.startswith("extra_vit.")}
    sd.update({k: torch.randn(v) * 0.02 for k, v in shapes.items() if not k.startswith("extra_vit.")})
    sd.update({"encoder." + k: v for k, v in to_meta(dino.state_dict()).items()})
    sd.update({"loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4), "loss.logvar": torch.zeros(()),
               "norm_vit.weight": torch.ones(392), "norm_vit.bias": torch.zeros(392)})
    torch.save({"state_dict": sd, "epoch": 40, "global_step": 1}, tmp_path / "official.ckpt")
    stats = {"dinov3_sp_mean": torch.randn(1, 1, 392), "dinov3_sp_std": torch.rand(1, 1, 392) + 0.5}
    torch.save(stats, tmp_path / "stats.pt")

    ae.convert_official(str(tmp_path / "official.ckpt"), str(tmp_path / "stats.pt"), str(tmp_path / "ours.pt"))
    model = ae.load_autoencoder(str(tmp_path / "ours.pt"))
    ours = model.state_dict()
    for k, v in shapes.items():
        if k.startswith("decoder."):
            assert torch.equal(ours[k], sd[k]), k
    torch.testing.assert_close(ours["mask_token"], sd["mask_token"].flatten())
    torch.testing.assert_close(model.latent_std, stats["dinov3_sp_std"].flatten())
    assert model.has_stats and model.config["batch_stats"]

    x = torch.rand(2, 3, 256, 256) * 2 - 1
    xn = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h = dino.forward_features(xn)[:, 5:].transpose(1, 2)  # (B, 384, N), Meta's x_norm_patchtokens
        r = official_residual(vit, xn)  # (B, 8, N)
        mh, sh = h.mean((0, 2)).mean(), h.std((0, 2)).mean()  # the official per-batch alignment
        mr, sr = r.mean((0, 2)).mean(), r.std((0, 2)).mean()
        ref = torch.cat([h, (r - mr) / (sr + 1e-6) * sh + mh], 1).view(2, 392, 16, 16)
        torch.testing.assert_close(model.residual_vit(xn).transpose(1, 2), r, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode(x), ref, atol=1e-4, rtol=1e-4)
    sd["model_ema.decoder.conv_in.bias"] = torch.zeros(512)  # a key the converter does not know is an error
    torch.save({"state_dict": sd}, tmp_path / "odd.ckpt")
    with pytest.raises(SystemExit, match="unexpected key"):
        ae.convert_official(str(tmp_path / "odd.ckpt"), str(tmp_path / "stats.pt"), str(tmp_path / "x.pt"))


# -----------------------------------------------------------------------------
# encoders and their weights


def test_encoder_weight_files_load(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model(DINO, pretrained=False, num_classes=0, img_size=64).eval()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    torch.save(to_meta(ref.state_dict()), tmp_path / "meta.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.forward_features(x)
        for f in ("timm.pth", "meta.pth"):
            enc = ae.build_encoder(DINO, str(tmp_path / f), 64).eval()
            torch.testing.assert_close(enc.forward_features(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="--encoder-weights random"):
        ae.build_encoder(DINO, "hub", 64)  # offline in tests
    with pytest.raises(SystemExit, match="not found"):
        ae.build_encoder(DINO, str(tmp_path / "nope.pth"), 64)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="does not fit"):
        ae.build_encoder(DINO, str(tmp_path / "junk.pth"), 64)


@pytest.mark.parametrize("name,prefix,mean", [("vit_small_patch14_reg4_dinov2.lvd142m", 5, 0.485),
                                              ("vit_base_patch16_siglip_256.v2_webli", 0, 0.5)])
def test_other_encoders(name, prefix, mean):
    config = dict(encoder=name, image_size=64, residual=True, depth=1, width=64, num_heads=2, dropout=0.0,
                  mask_ratio=0.1, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=0, batch_stats=False, decoder_noise=0.0)
    model = ae.SVGAutoencoder(config).eval()
    assert model.encoder.num_prefix_tokens == prefix and math.isclose(model.in_mean[0, 0].item(), mean, rel_tol=1e-3)
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
        assert z.shape == (2, model.encoder.num_features + 8, 4, 4)  # 4x4 tokens whatever the encoder's patch
        assert model.decode(z).shape == (2, 3, 64, 64)
    assert timm.models.get_pretrained_cfg("vit_base_patch16_224.mae").mean == (0.485, 0.456, 0.406)  # MAE's


def test_no_residual_and_decoder_noise():
    config = dict(encoder=DINO, image_size=32, residual=False, depth=1, width=64, num_heads=2, dropout=0.0,
                  mask_ratio=0.1, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=0, batch_stats=False, decoder_noise=0.8)
    model = ae.SVGAutoencoder(config)
    assert model.latent_channels == 384 and not hasattr(model, "residual_vit")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.train()
    torch.manual_seed(0)
    a = model(x)
    model.eval()
    with torch.no_grad():
        b, c = model(x), model.decode(model.encode(x))
    assert not torch.allclose(a, b) and torch.equal(b, c)  # noise in training only


# -----------------------------------------------------------------------------
# bad input


def main_error(monkeypatch, *argv):
    return script_error(ae, monkeypatch, *argv)


def test_bad_cli_input_is_one_clear_line(monkeypatch, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "does not exist" in main_error(monkeypatch, "--data", str(tmp_path / "missing"))
    assert "no image files" in main_error(monkeypatch, "--data", str(tmp_path / "empty"))
    assert "--encoder-weights random" in main_error(monkeypatch, "--encoder-weights", "hub")
    assert "not found" in main_error(monkeypatch, "--resume", "--out-dir", str(tmp_path / "empty"))
    assert "multiple of 16" in main_error(monkeypatch, "--image-size", "70")
    assert "multiple of" in main_error(monkeypatch, "--batch-size", "5", "--device-batch", "2")
    assert "--lpips-weights random" in main_error(monkeypatch, "--encoder-weights", "random",  # offline VGG16
                                                  "--perceptual-weight", "1")  # the tiny preset trains with L1 alone
    assert "RANDOM weights" in capsys.readouterr().out  # announced loudly
    assert "not found" in main_error(monkeypatch, "--compute-stats", str(tmp_path / "nope.pt"))


def write_bad_folder(root):
    """Every kind of image the loader must convert, plus files it must skip."""
    os.makedirs(root / "a")
    os.makedirs(root / "b")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "rgb.png")
    Image.fromarray(rgb).convert("L").save(root / "a" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "a" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "b" / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "b" / "cmyk.jpg")
    Image.fromarray(np.full((70, 70), 40000, dtype=np.uint16)).save(root / "b" / "gray16.png")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    full = (root / "a" / "rgb.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "b" / "notes.txt").write_text("not an image")


def test_bad_images_are_converted_or_skipped(tmp_path):
    write_bad_folder(tmp_path / "data")
    ds = data.build_dataset(str(tmp_path / "data"), 64, "ae")
    assert ds.num_classes == 2
    seen = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1 for x, _ in seen)
    gray16 = data.to_tensor(data.to_rgb(Image.open(tmp_path / "data" / "b" / "gray16.png")))
    assert abs(gray16.mean().item() - (40000 / 65535 * 2 - 1)) < 0.01  # rescaled, not clipped to white
    assert ds.skipped.item() >= 3  # corrupt, truncated, notes.txt
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="can be read"):
        data.build_dataset(str(tmp_path / "junk"), 64, "ae")


def test_training_on_a_bad_folder_skips_and_counts(monkeypatch, tmp_path, capsys):
    write_bad_folder(tmp_path / "data")
    monkeypatch.setattr(sys, "argv", ["ae.py", "--data", str(tmp_path / "data"), "--encoder-weights", "random",
                                      "--perceptual-weight", "0", "--steps", "2", "--batch-size", "4", "--device-batch", "4",
                                      "--eval-images", "2", "--stats-images", "4", "--num-workers", "0", "--log-every", "1",
                                      "--out-dir", str(tmp_path / "out")])
    ae.main()
    out = capsys.readouterr().out
    assert "skipped files" in out and "final: step 2" in out


@pytest.mark.parametrize("argv,expected", [
    (["--eval-every", "0"], "--eval-every must be at least 1"), (["--save-every", "0"], "--save-every must be"),
    (["--log-every", "0"], "--log-every must be"), (["--steps", "-3"], "--steps must be at least 1"),
    (["--image-size", "0"], "--image-size must be at least 16"), (["--device-batch", "0"], "--device-batch must be"),
    (["--lr", "0"], "--lr must be positive"), (["--lr", "nan"], "--lr must be a finite"),
    (["--mask-ratio", "2"], "--mask-ratio must be at most 1"), (["--out-dir", "{file}/run"], "cannot be created"),
    (["--convert-official", "x.ckpt", "--stats", "s.pt", "--out", "{tmp}"], "is a folder")])
def test_bad_flags_are_one_line_before_any_work(monkeypatch, tmp_path, argv, expected):
    (tmp_path / "file").write_text("not a folder")
    argv = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in argv]
    base = ["--encoder-weights", "random", "--perceptual-weight", "0", "--steps", "2", "--stats-images", "2",
            "--eval-images", "2", "--out-dir", str(tmp_path / "o")]  # a short valid run, spoiled by one bad flag
    assert expected in main_error(monkeypatch, *base, *argv)


def test_divergence_stops_overwrite_and_lr_on_resume(monkeypatch, tmp_path, capsys):
    """A new run never replaces ae.pt silently; --lr 1e30 stops in one line naming the step and the loss terms
    with ae.pt untouched; --lr on --resume reaches both optimizers; --device-batch is derived when not given."""
    flags = ["ae.py", *SMALL[1:], "--out-dir", str(tmp_path), "--perceptual-weight", "0", "--eval-every", "100",
             "--sample-every", "100"]
    flags = [f for i, f in enumerate(flags) if "--device-batch" not in flags[i - 1:i + 1]]  # derived: 2 (preset cap 8)
    monkeypatch.setattr(sys, "argv", [*flags, "--steps", "1"])
    ae.main()
    assert "1 process(es) x 2 x 1 accumulation" in capsys.readouterr().out
    good = (tmp_path / "ae.pt").read_bytes()
    msg = main_error(monkeypatch, *flags[1:])
    assert "already holds a checkpoint" in msg and all(f in msg for f in ("--resume", "--out-dir", "--overwrite"))
    msg = main_error(monkeypatch, *flags[1:], "--overwrite", "--lr", "1e30", "--save-every", "100")
    assert re.match(r"step \d+: non-finite training values \(l1 \S+, lpips \S+, g \S+, w \S+, grad norm \S+\); "
                    r"stopped before the optimizer step, .*ae.pt keeps the last good checkpoint", msg), msg
    assert (tmp_path / "ae.pt").read_bytes() == good
    monkeypatch.setattr(sys, "argv", [*flags, "--resume", "--steps", "2", "--lr", "3e-4"])
    ae.main()
    assert "resumed from step 1" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["opt"]["param_groups"][0]["lr"] == ckpt["opt_disc"]["param_groups"][0]["lr"] == 3e-4


def test_rope_periods_match_meta(capsys):
    """With pretrained DINOv3 weights our encoder uses Meta's stored bf16 periods, as the official SVG encoder does
    (timm recomputes them in fp32): the RoPE table then equals Meta's arithmetic and the features equal those of
    the same network with Meta's RoPE. Random weights; the periods path is the pretrained one."""
    config = dict(encoder=DINO, image_size=64, residual=False, depth=1, width=64, num_heads=2, dropout=0.0,
                  mask_ratio=0.0, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=0, batch_stats=False, decoder_noise=0.0)
    torch.manual_seed(0)
    timm_only = ae.SVGAutoencoder(dict(config, rope_bf16_periods=False)).encoder
    ours = ae.SVGAutoencoder(dict(config, rope_bf16_periods=True)).encoder
    with torch.no_grad():  # layer scales of 1, not timm's init of 1e-5, which would hide attention (and RoPE) entirely
        for name, p in timm_only.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(1.0)
    ours.load_state_dict(timm_only.state_dict())  # the same network; the periods are not in the state dict
    meta = timm.create_model(DINO, pretrained=False, num_classes=0, img_size=64).eval()
    meta.load_state_dict(timm_only.state_dict())
    meta.rope.get_embed = lambda shape=None, dtype=None: meta_rope(meta_periods(), *shape)  # Meta's RoPE
    assert torch.equal(ours.rope.periods, meta_periods().float())
    table = {name: (enc.rope.get_embed(shape=(4, 4)) - meta_rope(meta_periods(), 4, 4)).abs().max().item()
             for name, enc in (("before", timm_only), ("after", ours))}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = meta.forward_features(x)
        feats = {name: (enc.forward_features(x) - want).abs().max().item() for name, enc in (("before", timm_only),
                                                                                           ("after", ours))}
    print(f"RoPE table max |diff| vs Meta: {table}; encoder features max |diff|: {feats}")
    assert table["after"] < 1e-6 and feats["after"] < 1e-5
    assert table["before"] > 1e-4 and feats["before"] > 10 * max(feats["after"], 1e-6)


class Payload:
    """Unpickling this runs `touch PATH`: what a crafted checkpoint can do to a loader that trusts it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_convert_never_runs_code_from_a_checkpoint(monkeypatch, tmp_path, capsys):
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}, "hyper_parameters": Payload(marker)},
               tmp_path / "evil.ckpt")
    msg = main_error(monkeypatch, "--convert-official", str(tmp_path / "evil.ckpt"), "--stats", str(tmp_path / "s.pt"),
                     "--out", str(tmp_path / "out.pt"))
    assert "pickles posix.system" in msg and "--trust-checkpoint" in msg and not marker.exists()
    assert not os.path.exists(tmp_path / "out.pt")


def test_foreign_checkpoints_load_as_data(monkeypatch, tmp_path, capsys):
    """What a Lightning checkpoint may pickle as hyper-parameters (an argparse Namespace, Lightning's AttributeDict,
    omegaconf containers, pickled here from stand-ins with the same module names and state layout) loads without
    those packages and without running their code; any other class needs --trust-checkpoint, which warns."""
    import argparse
    import fractions
    import types
    import typing
    from collections import defaultdict

    def fake(module, name, base=object):
        cls = type(name, (base,), {"__module__": module, "__qualname__": name})
        for m in (module.split(".")[0], module):
            monkeypatch.setitem(sys.modules, m, sys.modules.get(m) or types.ModuleType(m))
        setattr(sys.modules[module], name, cls)
        return cls
    AttributeDict = fake("lightning.fabric.utilities.data", "AttributeDict", dict)
    DictConfig, ContainerMetadata = fake("omegaconf.dictconfig", "DictConfig"), fake("omegaconf.base", "ContainerMetadata")
    AnyNode, Metadata = fake("omegaconf.nodes", "AnyNode"), fake("omegaconf.base", "Metadata")
    meta = ContainerMetadata()
    meta.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={}, flags_root=False,
                         resolver_cache=defaultdict(dict), key_type=typing.Any, element_type=typing.Any)
    node, node_meta = AnyNode(), Metadata()
    node_meta.__dict__.update(ref_type=typing.Any, object_type=None, optional=True, key="lr", flags={})
    node.__dict__.update(_val=1e-4, _metadata=node_meta, _parent=None)
    cfg = DictConfig()
    cfg.__dict__.update(_metadata=meta, _parent=None, _content={"lr": node})
    sd = {"decoder.conv_out.weight": torch.ones(3, 8, 3, 3)}
    torch.save({"state_dict": sd, "hyper_parameters": AttributeDict(ddconfig=cfg, lr=1e-4), "epoch": 40,
                "args": argparse.Namespace(model="SVG"),
                "callbacks": {"ModelCheckpoint": {"best_model_score": torch.ones(())}}}, tmp_path / "lightning.ckpt")
    torch.save({"state_dict": sd, "hyper_parameters": {"ratio": fractions.Fraction(1, 3)}}, tmp_path / "other.ckpt")
    for m in [m for m in sys.modules if m.split(".")[0] in ("lightning", "omegaconf")]:
        monkeypatch.delitem(sys.modules, m)  # as on a machine without these packages
    ckpt = data.load_foreign(str(tmp_path / "lightning.ckpt"), "official checkpoint")
    assert torch.equal(ckpt["state_dict"]["decoder.conv_out.weight"], sd["decoder.conv_out.weight"])
    assert type(ckpt["hyper_parameters"]) is dict and ckpt["args"].model == "SVG"
    assert ckpt["hyper_parameters"]["ddconfig"].state["_content"]["lr"].state["_val"] == 1e-4  # kept as inert data
    with pytest.raises(SystemExit, match="pickles fractions.Fraction .* pass --trust-checkpoint"):
        data.load_foreign(str(tmp_path / "other.ckpt"), "official checkpoint")
    trusted = data.load_foreign(str(tmp_path / "other.ckpt"), "official checkpoint", trust=True)
    assert trusted["hyper_parameters"]["ratio"] == fractions.Fraction(1, 3)
    assert "runs any code the file holds" in capsys.readouterr().out


def test_decoders_by_config():
    """The tiny preset's ViT decoder (RAE's) maps each 4x4 latent to 64 px; a config without `decoder` (checkpoints from
    before issue 8, the converted official model) builds the conv decoder, official GroupNorm(32, c) included."""
    vit = ae.build_decoder(dict(decoder="vit", image_size=64, decoder_depth=1, decoder_width=64, decoder_heads=4), 392)
    assert isinstance(vit, ae.ViTDecoder) and vit(torch.randn(2, 392, 4, 4)).shape == (2, 3, 64, 64)
    z = torch.zeros(1, 392, 4, 4)
    z[0, :, 1, 2] = 1  # tokens enter in raster order and leave as their own patch: with no blocks, only patch (1, 2) moves
    vit0 = ae.build_decoder(dict(decoder="vit", image_size=64, decoder_depth=0, decoder_width=64, decoder_heads=4), 392)
    moved = (vit0(z) - vit0(torch.zeros_like(z))).abs().sum((0, 1)) > 0
    assert moved[16:32, 32:48].all() and moved.sum() == 256
    old = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=0)
    conv = ae.build_decoder(old, 392)
    assert isinstance(conv, ae.Decoder) and conv.norm_out.num_groups == 32  # 32 channels: one per group, as official
    assert ae.build_decoder(dict(old, decoder="conv", group_channels=4), 392).norm_out.num_groups == 8


def test_cached_frozen_features_encode_the_same():
    """--cache-features hands encode() the frozen encoder's tokens computed once; the latent must not change."""
    torch.manual_seed(0)
    cfg = dict(encoder=DINO, image_size=32, residual=True, depth=1, width=32, num_heads=2, dropout=0.0, mask_ratio=0.0,
               decoder="vit", decoder_depth=1, decoder_width=32, decoder_heads=2, batch_stats=False, decoder_noise=0.0)
    model = ae.SVGAutoencoder(cfg, "random").eval()
    x = images(3, 32)
    h = model.frozen_features(x)
    assert h.shape == (3, 4, 384)
    torch.testing.assert_close(model.encode(x, h), model.encode(x), rtol=0, atol=0)
    assert not torch.equal(model.encode(x, h.roll(1, 0)), model.encode(x))  # the cached tokens are what it uses
