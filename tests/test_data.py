"""data.py: the built-in dataset, image folders with bad input, transforms, loader and checkpoints."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data


def test_shapes_deterministic_balanced_and_split():
    a, b = data.Shapes("train", size=48), data.Shapes("train", size=48)
    x0, y0 = a[7]
    x1, y1 = b[7]
    assert torch.equal(x0, x1) and y0 == y1 == 7  # a pure function of (seed, split, index)
    assert x0.shape == (3, 48, 48) and x0.min() >= -1 and x0.max() <= 1
    assert not torch.equal(data.Shapes("val", size=48)[7][0], x0)  # held-out split differs
    assert not torch.equal(data.Shapes("train", size=48, seed=1)[7][0], x0)
    assert sorted(a[i][1] for i in range(20)) == sorted(list(range(10)) * 2)
    assert data.Shapes("train", size=97)[3][0].shape == (3, 97, 97)  # any resolution


def test_shapes_classes_are_learnable():
    """A small CNN learns the classes in seconds and generalises to the held-out split: the classes differ
    in shape (whatever the colours, positions and backgrounds), so a bad generative model is visibly bad."""
    torch.manual_seed(0)
    nn = torch.nn
    train, val = data.Shapes("train", size=32, length=3000), data.Shapes("val", size=32, length=300)
    xs, ys = torch.stack([train[i][0] for i in range(3000)]), torch.arange(3000) % 10
    xv, yv = torch.stack([val[i][0] for i in range(300)]), torch.arange(300) % 10
    assert [train[i][1] for i in range(20)] == ys[:20].tolist()
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                        nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(400):
        idx = torch.randint(0, len(xs), (64,))
        loss = nn.functional.cross_entropy(net(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (net.eval()(xv).argmax(1) == yv).float().mean().item()
    print(f"held-out accuracy {acc:.2f}")  # 0.64 when written
    assert acc > 0.4, acc  # chance is 0.1
    assert xs.std() > 0.3  # varied colours


def _write(path, img, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, fmt)


def make_folder(root):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    _write(f"{root}/cat/rgb.png", rgb)
    _write(f"{root}/cat/gray.png", rgb.convert("L"))
    _write(f"{root}/cat/rgba.png", rgb.convert("RGBA"))
    _write(f"{root}/dog/palette.png", rgb.convert("P"))
    _write(f"{root}/dog/cmyk.jpg", rgb.convert("CMYK"))
    _write(f"{root}/dog/deep.png", Image.fromarray(rng.integers(0, 65536, (50, 50), dtype=np.uint16)))
    with open(f"{root}/dog/corrupt.jpg", "wb") as f:
        f.write(b"not an image at all")
    full = open(f"{root}/cat/rgb.png", "rb").read()
    with open(f"{root}/dog/truncated.png", "wb") as f:
        f.write(full[: len(full) // 2])
    with open(f"{root}/dog/notes.txt", "w") as f:
        f.write("a stray file")


def test_image_folder_modes_and_bad_files(tmp_path):
    root = str(tmp_path / "imgs")
    make_folder(root)
    ds = data.ImageFolder(root, size=32, stage="ae")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert int(ds.skipped) == 1  # notes.txt
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 for x, _ in items)
    assert int(ds.skipped) == 3  # + corrupt.jpg and truncated.png, served by their neighbours
    assert [y for _, y in items].count(0) >= 3
    # 16-bit grayscale is rescaled, not clipped to white
    deep = data.to_rgb(Image.open(f"{root}/dog/deep.png"))
    assert deep.mode == "RGB" and 100 < np.asarray(deep).mean() < 155


def test_image_folder_flat_and_transforms(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        _write(str(tmp_path / f"flat/{i}.png"), Image.fromarray(rng.integers(0, 256, (600, 520, 3), dtype=np.uint8)))
    ds = data.ImageFolder(str(tmp_path / "flat"), size=64, stage="diffusion", train=False)
    assert ds.num_classes == 1 and ds[0][1] == 0
    x, _ = ds[0]
    assert x.shape == (3, 64, 64)
    img = Image.open(tmp_path / "flat/0.png")
    assert data.adm_center_crop(img, 256).size == (256, 256)  # 520 -> box 260 -> bicubic 256
    assert data.resize_crop(img, 100, train=True).size == (100, 100)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_bad_folders_stop_at_start(tmp_path, case):
    root = tmp_path / "d"
    if case != "missing":
        (root / "a").mkdir(parents=True)
    if case == "unreadable":
        (root / "a" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="does not exist|no image files|can be read"):
        data.ImageFolder(str(root), size=32)


def test_run_order_resumes_across_epochs_and_splits_like_accumulation():
    """RunOrder: each epoch is a permutation, a stream started at position 6 (a resume inside epoch 1) gives what
    the whole stream gives there, flips included (seeded per position), and 2 processes x 2 get the chunks one
    process x 2 micro-batches gets. The caller's random generators are left as they were."""
    ds = data.Shapes("train", size=16, length=5, flip=True)  # labels 0..4: one per image
    whole = data.RunOrder(ds, seed=3, start=0, length=12, world_size=1, device_batch=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    items = [whole[p] for p in range(12)]
    assert torch.equal(torch.get_rng_state(), before)
    labels = [y for _, y in items]
    assert sorted(labels[:5]) == sorted(labels[5:10]) == list(range(5)) and labels[:5] != labels[5:10]
    resumed = data.RunOrder(ds, seed=3, start=6, length=6, world_size=1, device_batch=2)
    assert all(torch.equal(resumed[p][0], items[6 + p][0]) and resumed[p][1] == items[6 + p][1] for p in range(6))
    plain = data.Shapes("train", size=16, length=5)  # image y without flips
    flipped = [torch.equal(x, plain[y][0].flip(-1)) for x, y in items]
    assert any(flipped) and not all(flipped) and all(f or torch.equal(x, plain[y][0]) for f, (x, y) in zip(flipped, items))
    two = data.RunOrder(ds, seed=3, start=0, length=12, world_size=2, device_batch=2)
    for rank in range(2):
        mine = list(range(rank, 12, 2))  # what a DistributedSampler without shuffle hands this rank
        for k in range(3):
            chunk = [two[i] for i in mine[2 * k:2 * k + 2]]
            want = items[(2 * k + rank) * 2:(2 * k + rank) * 2 + 2]
            assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(chunk, want))


def test_batch_split():
    assert data.grad_accum_steps(256, 16, 8) == 2
    with pytest.raises(SystemExit, match="multiple"):
        data.grad_accum_steps(256, 24, 1)
    with pytest.raises(SystemExit, match="fewer than one batch"):
        data.make_loader(data.Shapes("train", size=16, length=20), batch_size=32)
    # --device-batch not given: the preset's size caps it, the global batch and the process count decide it
    assert [data.derive_device_batch(b, w, cap) for b, w, cap in ((32, 2, 32), (32, 1, 32), (512, 8, 32), (30, 1, 32),
                                                                   (8, 2, 8), (24, 2, 8))] == [16, 32, 32, 30, 4, 6]
    with pytest.raises(SystemExit, match="does not split over 4 processes"):
        data.derive_device_batch(6, 4, 8)


def test_lr_schedule():
    """Constant, then linear towards 0 over the last --lr-decay fraction of the steps; 0 keeps the papers' constant lr."""
    import argparse
    args = argparse.Namespace(lr=1.0, steps=10, lr_decay=0.4)
    assert [data.lr_at(s, args) for s in range(10)] == pytest.approx([1] * 6 + [1, 0.75, 0.5, 0.25])
    args.lr_decay = 0.0
    assert [data.lr_at(s, args) for s in range(10)] == [1.0] * 10
    args.lr_decay = 1.0
    assert [data.lr_at(s, args) for s in range(10)] == pytest.approx([1 - s / 10 for s in range(10)])


def test_checkpoint_atomic_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "ck" / "a.pt")
    data.save_checkpoint({"model": {"w": torch.ones(2)}, "step": 3, "config": {"a": [1, 2]}}, path)
    assert os.listdir(tmp_path / "ck") == ["a.pt"]  # no temporary left behind
    ck = data.load_checkpoint(path)
    assert ck["step"] == 3 and torch.equal(ck["model"]["w"], torch.ones(2))
    with pytest.raises(SystemExit, match="not found"):
        data.load_checkpoint(str(tmp_path / "nope.pt"))
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(SystemExit, match="cannot be read"):
        data.load_checkpoint(path)


def test_precision_follows_the_hardware(monkeypatch):
    """bf16 by default only where it is native (issue 8): on a CPU without AVX512-BF16/AMX it is emulated and
    25-70x slower. The flags force it either way. The capability is faked both ways."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(data, "cpu_has_native_bf16", lambda: False)
    assert data.choose_bf16(None, cpu)[0] is False
    assert data.choose_bf16(True, cpu) == (True, "forced by --bf16")
    monkeypatch.setattr(data, "cpu_has_native_bf16", lambda: True)
    assert data.choose_bf16(None, cpu)[0] is True
    assert data.choose_bf16(False, cpu) == (False, "forced by --no-bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    assert data.choose_bf16(None, torch.device("cuda"))[0] is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert data.choose_bf16(None, torch.device("cuda"))[0] is True
    assert data.choose_bf16(None, torch.device("mps"))[0] is False


def test_cpu_capability_reads_cpuinfo(monkeypatch, tmp_path):
    """The flag detection itself, on fake /proc/cpuinfo contents."""
    import builtins
    real_open = builtins.open
    for flags, native in (("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
        assert data.cpu_has_native_bf16() is native
    monkeypatch.setattr(builtins, "open", real_open)


def test_failed_saves_leave_no_temporary_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "a.pt")
    data.save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1}, path)
    real_save = torch.save

    def failing(error):
        def save(obj, f):
            (open(f, "wb") if isinstance(f, str) else f).write(b"half a checkpoint")  # part of the file, then fail
            raise error
        return save
    monkeypatch.setattr(torch, "save", failing(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SystemExit) as e:
        data.save_checkpoint({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    assert str(e.value).startswith(f"disk full while writing {path}") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["a.pt"] and data.load_checkpoint(path)["step"] == 1
    monkeypatch.setattr(torch, "save", failing(RuntimeError("a crash while saving")))
    with pytest.raises(RuntimeError, match="a crash while saving"):
        data.save_checkpoint({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    assert os.listdir(tmp_path) == ["a.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    # a temporary left by a killed process goes at the next save; one of a live process (pid 1) stays
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, 1):
        (tmp_path / f"a.pt.tmp{pid}").write_bytes(b"x" * 100)
    data.save_checkpoint({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.pt.tmp1"]
    # NaN weights are never written: the file on disk stays the last good one
    with pytest.raises(SystemExit, match="not saving .* 1 tensors hold NaN or inf .first model.w"):
        data.save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 3}, path)
    assert data.load_checkpoint(path)["step"] == 2


def test_folder_edge_cases(tmp_path):
    """A file passed as the folder, and a flat folder holding a symlink to itself (skipped and counted)."""
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    os.symlink("loop.png", tmp_path / "flat" / "loop.png")
    ds = data.ImageFolder(str(tmp_path / "flat"), size=8)
    assert len(ds) == 2 and [ds[i][0].shape for i in range(2)] == [(3, 8, 8)] * 2 and int(ds.skipped) == 1
    with pytest.raises(SystemExit, match="is a file; pass a folder"):
        data.ImageFolder(str(tmp_path / "flat" / "a.png"), size=8)
