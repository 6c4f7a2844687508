"""--benchmark of diffusion.py and ae.py (tiny, CPU, a step or two: the table's fields, never its timings) and
data.py's pieces: the modes, the per-mode peak memory, the FLOP count behind the GMACs and MFU columns."""
import itertools
import os
import re

import pytest
import torch
from conftest import run, torchrun

import data
import diffusion
from diffusion import SIZES

TINY_BENCH = ("--size", "tiny", "--benchmark", "--device-batch", "2", "--bench-steps", "1", "--bench-warmup", "1",
              "--no-compile")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # on a busy shared 2-core CPU a second thread mostly waits (7.2 s vs 0.19 s)


def tables(log):
    """Every markdown table in a log, as (header, rows) with the cells as strings."""
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    lines = log.splitlines()
    return [(cells(lines[i - 1]), [cells(r) for r in itertools.takewhile(lambda r: r.startswith("| "), lines[i + 1:])])
            for i, line in enumerate(lines) if line.startswith("|---")]


def number(cell):
    return float(re.match(r"[\d.e+-]+", cell).group(0))


def precisions():
    """What --benchmark times without --bf16/--no-bf16: fp32, and bf16 too where the CPU runs it natively."""
    return ["fp32"] + (["bf16 autocast"] if data.cpu_has_native_bf16() else [])


def check_training_table(log, world):
    header, rows = tables(log)[0]
    assert header[:4] == ["precision", "compile", header[2], "ms/step"] and header[2].startswith("flash attention")
    assert [r[:2] for r in rows] == [[p, "off"] for p in precisions()]  # --no-compile
    row = dict(zip(header, rows[0]))
    per_process, total = number(row["images/s per process"]), number(row["images/s total"])
    assert per_process > 0 and total == pytest.approx(world * per_process, rel=0.01)
    assert number(row["ms/step"]) > 0 and number(row["peak memory GiB"]) > 0 and number(row["warm-up s"]) >= 0
    assert re.fullmatch(r"[\d.]+% of [\d.e+-]+", row["MFU of peak TFLOP/s"])
    assert "measured float32 matmul on this cpu" in log and "fused" in log
    if not data.cpu_has_native_bf16():
        assert "bf16 not timed: the CPU has no native bf16" in log
    return row


def test_diffusion_benchmark_two_processes():
    """Under torchrun the timed step is the DDP step (gloo on CPU): the training table (images/s total = 2 x per
    process), then the sampler at 5 and 25 Euler steps with and without CFG, then the decoder; rank 0 prints."""
    log = torchrun(2, "diffusion.py", *TINY_BENCH, "--grid", "2", "--latent-channels", "32")
    assert "DDP over gloo, 2 processes" in log and "2 process(es) x 2 x 1 accumulation = 4 images/step" in log
    assert f"{diffusion.forward_macs(dict(SIZES['tiny'], in_channels=32, grid=2, mlp_ratio=4.0)) / 1e9:.2f} GMACs" in log
    check_training_table(log, world=2)
    header, rows = tables(log)[1]
    assert header[:3] == ["Euler steps", "CFG", "batch per forward"] and len(tables(log)) == 2
    assert [r[:3] for r in rows] == [["5", "off", "2"], ["5", "4", "4"], ["25", "off", "2"], ["25", "4", "4"]]
    assert all(number(r[4]) == pytest.approx(2 * number(r[3]), rel=0.01) for r in rows)
    assert re.search(r"decode \(ae.py's tiny vit decoder.*2x2 -> 32 px\): [\d.]+ images/s per process", log)


def test_ae_benchmark_table():
    log = run("ae.py", *TINY_BENCH, "--bench-warmup", "0", "--device-batch", "1", env=ONE_THREAD)
    assert "random encoder and LPIPS weights" in log and re.search(r"[\d.]+ GFLOPs/image per training step", log)
    row = check_training_table(log, world=1)
    assert re.fullmatch(r"(yes|no) / (yes|no)", row["flash attention (ViTs / decoder)"])
    header, rows = tables(log)[1]
    assert header == ["precision", "encode images/s per process", "decode images/s per process"]
    assert [r[0] for r in rows] == precisions() and min(number(c) for r in rows for c in r[1:]) > 0


def test_modes():
    cpu = torch.device("cpu")
    assert data.modes(True, False, cpu) == ([(True, False)], "")  # both pinned
    assert data.modes(False, None, cpu) == ([(False, False), (False, True)], "")
    modes, note = data.modes(None, None, cpu)
    if data.cpu_has_native_bf16():
        assert modes == [(False, False), (False, True), (True, False), (True, True)] and not note
    else:
        assert modes == [(False, False), (False, True)] and "no native bf16" in note


def test_forward_macs_equals_counted():
    """The analytic GMACs/image (README, DiT's convention) is what torch's counter sees in a forward pass."""
    config = dict(in_channels=24, grid=4, depth=2, width=64, num_heads=4, num_classes=10, mlp_ratio=4.0)
    model = diffusion.DiT(**config)
    x = torch.randn(3, 16, 24)
    with torch.no_grad():
        flops = data.count_flops(lambda: model(x, torch.rand(3), torch.tensor([0, 1, 10])))
    assert flops == 2 * 3 * diffusion.forward_macs(config)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_is_per_mode():
    """Each mode's peak memory starts from the memory in use, not from the process's earlier peak."""
    big = torch.ones(2 ** 27)  # 512 MiB, touched
    before = data.peak_memory_gib(torch.device("cpu"))
    del big
    data.reset_peak_memory(torch.device("cpu"))
    assert data.peak_memory_gib(torch.device("cpu")) < before - 0.4


def test_rates_never_print_in_exponent_form():
    """A fast machine decodes > 1,000 tiny images/s: `:.3g` printed that as 1.23e+03 and the log parsers missed it
    (CI failure of stop 16). data.fmt keeps three significant digits without an exponent."""
    assert [data.fmt(x) for x in (12345.6, 999.7, 100.2, 99.94, 1.234, 0.01234)] == \
        ["12346", "1000", "100", "99.9", "1.23", "0.0123"]
