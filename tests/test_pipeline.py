"""The tiny run end to end, as the README tells a user to do it: ae.py -> diffusion.py -> sample.py (the
first two are the conftest fixtures); sample.py finds the AE through the path the DiT checkpoint recorded."""
import numpy as np
import torch
from conftest import run
from PIL import Image

import data


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
