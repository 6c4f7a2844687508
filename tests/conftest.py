"""Shared fixtures. Everything runs on CPU, offline: no hub downloads (HF_HUB_OFFLINE before timm loads)."""
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def run(*args, env=None, timeout=900):
    """Run a project script like a user would; fail the test with its output if it fails."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def torchrun(nproc, *args, timeout=900):
    return run("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args, timeout=timeout)


# Flags for a tiny, offline autoencoder run: random encoder and LPIPS trunk (no downloads), few steps, few images.
TINY_AE_FLAGS = ("--size", "tiny", "--encoder-weights", "random", "--lpips-weights", "random", "--steps", "24",
                 "--batch-size", "4", "--device-batch", "4", "--eval-every", "12", "--eval-images", "16",
                 "--stats-images", "64", "--num-workers", "0", "--log-every", "4")


@pytest.fixture(scope="session")
def tiny_ae_ckpt(tmp_path_factory):
    """Train a tiny autoencoder once per session (ae.py on the built-in shapes) and return its checkpoint path.
    The run's log is at <dir>/log.txt."""
    out = tmp_path_factory.mktemp("tiny_ae")
    log = run("ae.py", *TINY_AE_FLAGS, "--out-dir", str(out))
    (out / "log.txt").write_text(log)
    return str(out / "ae.pt")
