"""The tiny run end to end, as the README tells a user to do it: ae.py -> diffusion.py -> sample.py (the
first two are the conftest fixtures); sample.py finds the AE through the path the DiT checkpoint recorded."""
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

import ae
import data
import diffusion
import sample


def test_tiny_run_produces_a_labelled_grid(tiny_dit_ckpt, tmp_path):
    out = tmp_path / "grid.png"
    log = run("sample.py", "--ckpt", tiny_dit_ckpt, "--steps", "5", "--cfg", "4", "--per-class", "3", "--out", str(out))
    assert f"wrote {out}: 30 images 64x64" in log
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    size = torch.load(tiny_dit_ckpt, weights_only=True)["ae"]["image_size"]
    assert grid.shape[0] == len(data.SHAPE_CLASSES) * size and (grid.shape[1] - 3 * size) > 0  # strip of names
    images = grid[:, -3 * size:].reshape(10, size, 3, size, 3).transpose(0, 2, 1, 3, 4).reshape(30, size, size, 3)
    assert all(img.std() > 1 for img in images)  # decoded pictures, not a constant fill
    assert len({img.tobytes() for img in images}) == 30  # every sample has its own noise
    strip = grid[:, :grid.shape[1] - 3 * size]
    assert (strip < 128).any() and (strip == 255).mean() > 0.5  # dark text on white: the class names


def test_a_checkpoint_of_the_wrong_kind_is_one_line_in_every_slot(tiny_ae_ckpt, tiny_dit_ckpt, tmp_path, monkeypatch):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    for kind in ("ae", "dit"):
        (tmp_path / kind).mkdir()
    shutil.copy(tiny_dit_ckpt, tmp_path / "ae" / "ae.pt")  # a DiT where ae.py resumes
    shutil.copy(tiny_ae_ckpt, tmp_path / "dit" / "dit.pt")  # an AE where diffusion.py resumes
    cases = [(diffusion, ["--ae", tiny_dit_ckpt], "is a diffusion checkpoint (diffusion.py); pass an autoencoder"),
             (diffusion, ["--ae", tiny_ae_ckpt, "--out-dir", str(tmp_path / "dit"), "--resume"], "is an autoencoder"),
             (ae, ["--out-dir", str(tmp_path / "ae"), "--resume"], "is a diffusion checkpoint"),
             (ae, ["--compute-stats", tiny_dit_ckpt], "is a diffusion checkpoint"),
             (sample, ["--ckpt", str(tmp_path / "list.pt")], "is not a checkpoint of this project"),
             (sample, ["--ckpt", tiny_ae_ckpt], "not a diffusion.py checkpoint")]
    for module, argv, expected in cases:
        monkeypatch.setattr(sys, "argv", ["x.py", *argv])
        with pytest.raises(SystemExit) as e:
            module.main()
        assert expected in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
