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
