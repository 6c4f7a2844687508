"""
Speed measurement shared by the stages' --benchmark (nanoGPT's bench.py, but timing each stage's own train_step, the
function its training loop calls, so the numbers are what a run gets):

  python diffusion.py --size XL --benchmark            # DiT training step in every mode, then the sampler
  python ae.py --size full --benchmark                 # AE training step, then encode / decode
  torchrun --standalone --nproc_per_node=8 diffusion.py --size XL --benchmark   # the DDP step, all-reduce included

This file holds what both need: the modes a machine runs, the peak that MFU divides by, which fast paths are on,
a timer that drops the warm-up (and compile) steps, a FLOP counter and the table.
"""
import gc
import math
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data

# dense datasheet peaks in TFLOP/s (bf16, TF32); any other device gets a measured matmul instead
PEAK_TFLOPS = {"H100": (989.0, 494.7), "H200": (989.0, 494.7), "A100": (312.0, 156.0)}


def add_args(parser):
    """The benchmark's flags, the same in ae.py and diffusion.py."""
    parser.add_argument("--benchmark", action="store_true",
                        help="time the training step on synthetic data in every mode this machine runs, print a table, exit")
    parser.add_argument("--bench-steps", type=int, default=10, help="--benchmark: timed steps per mode")
    parser.add_argument("--bench-warmup", type=int, default=2, help="--benchmark: untimed first steps (compilation included)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_tflops(device, dtype=torch.float32):
    """The best of a few large square matmuls: what this device's BLAS reaches in practice."""
    n = 8192 if device.type == "cuda" else 1536
    g = torch.Generator().manual_seed(0)  # its own generator: the run's random stream stays untouched
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    a @ b  # warm-up
    best = math.inf
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device, bf16):
    """(TFLOP/s, its source) for MFU: the datasheet's dense peak of known GPUs; elsewhere a measured matmul in this
    process, since a CPU has no datasheet figure that its BLAS reaches (a shared CPU also measures its neighbours' load)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak_bf16, peak_tf32) in PEAK_TFLOPS.items():
            if key in name:
                return (peak_bf16 if bf16 else peak_tf32), f"{name} datasheet, dense {'bf16' if bf16 else 'TF32'}"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return matmul_tflops(device, dtype), f"measured {str(dtype)[6:]} matmul on this {device.type}"


def modes(bf16, compile, device):
    """(bf16, compile) pairs to time: both precisions where bf16 is native and both compile settings, unless
    --bf16/--no-bf16 or --compile/--no-compile pins one. Returns (modes, a note on what was skipped or '')."""
    note = ""
    if bf16 is None:
        native, why = data.choose_bf16(None, device)
        precisions = [False, True] if native else [False]
        note = "" if native else f"bf16 not timed: {why} (force it with --bf16)"
    else:
        precisions = [bf16]
    return [(p, c) for p in precisions for c in ([False, True] if compile is None else [compile])], note


def precision_name(bf16, device):
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "bf16 autocast" if bf16 else "TF32" if tf32 else "fp32"


def flash_attention(device, dtype, num_heads, tokens, head_dim):
    """Whether scaled_dot_product_attention takes the flash kernel for this shape and dtype (it prefers flash
    whenever the kernel accepts the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.zeros(1, num_heads, tokens, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the refusal is the answer; CUDA also warns why
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def fast_paths(device, opt, run):
    """One line: the settings that decide speed besides precision and compile."""
    fused = bool(opt.defaults.get("fused"))
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    backend = f"DDP over {dist.get_backend()}, {run['world_size']} processes" if run["ddp"] else "1 process, no DDP"
    return (f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}) | "
            f"{backend} | fused {type(opt).__name__} {'on' if fused else 'off'} | TF32 matmuls "
            f"{'on' if tf32 else 'off' if device.type == 'cuda' else 'n/a (not CUDA)'} | torch.compile wraps the model before DDP")


def reset_peak_memory(device):
    """Start a mode's peak-memory count: CUDA's allocator peak, or on Linux the process's peak RSS (writing 5 to
    /proc/self/clear_refs resets it, and ru_maxrss with it, which data.peak_memory_gib reads). False where it cannot
    (then the peak is the process's so far)."""
    torch.compiler.reset()  # drop the previous mode's compiled graphs and what they hold
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_steps(step, warmup, steps, device):
    """Calls step(i) for i < warmup + steps; returns (seconds of the warm-up calls, where compilation happens, and
    mean seconds per timed call). Under DDP every call ends in the all-reduce, so ranks stay in step."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    t1 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync(device)
    return t1 - t0, (time.perf_counter() - t1) / steps


def count_flops(fn):
    """FLOPs of one call of fn, forward and backward, as torch's counter sees them (matmuls, convolutions, attention).
    Attention runs through the math kernel here: its matmuls are counted on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def table(header, rows):
    """A markdown table, printed by rank 0: it pastes into the README as it is."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    data.print0("\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]))
