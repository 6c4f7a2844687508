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


def script_error(script, monkeypatch, *argv):
    """`script.main()` with argv must stop with one clear line (returned)."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    with pytest.raises(SystemExit) as e:
        script.main()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) > 20, msg
    return msg


def torchrun(nproc, *args, timeout=900):
    return run("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args, timeout=timeout)


# Flags for a tiny, offline autoencoder run: random encoder and LPIPS trunk (no downloads), few steps, few images.
TINY_AE_FLAGS = ("--size", "tiny", "--encoder-weights", "random", "--lpips-weights", "random", "--steps", "16",
                 "--batch-size", "4", "--device-batch", "4", "--eval-every", "8", "--eval-images", "16",
                 "--stats-images", "32", "--num-workers", "0", "--log-every", "4", "--perceptual-weight", "0",
                 "--cache-features", "32")


@pytest.fixture(scope="session")
def tiny_ae_ckpt(tmp_path_factory):
    """Train a tiny autoencoder once per session (ae.py on the built-in shapes) and return its checkpoint path.
    The run's log is at <dir>/log.txt."""
    out = tmp_path_factory.mktemp("tiny_ae")
    log = run("ae.py", *TINY_AE_FLAGS, "--out-dir", str(out))
    (out / "log.txt").write_text(log)
    return str(out / "ae.pt")


# Flags for a tiny diffusion run on the tiny AE: a few steps on 16 cached latents (the tiny preset's CPU path), one EMA
# preview at the end (exercises the sampler).
TINY_DIT_FLAGS = ("--size", "tiny", "--steps", "4", "--batch-size", "4", "--device-batch", "4", "--log-every", "1",
                  "--sample-every", "4", "--num-workers", "0", "--ema-decay", "0.9", "--cache-latents", "16")


@pytest.fixture(scope="session")
def tiny_dit_ckpt(tiny_ae_ckpt, tmp_path_factory):
    """Train a tiny DiT once per session (diffusion.py on the tiny AE's latents of the built-in shapes) and
    return its checkpoint path. The run's log is at <dir>/log.txt."""
    out = tmp_path_factory.mktemp("tiny_dit")
    log = run("diffusion.py", *TINY_DIT_FLAGS, "--ae", tiny_ae_ckpt, "--out-dir", str(out))
    (out / "log.txt").write_text(log)
    return str(out / "dit.pt")
