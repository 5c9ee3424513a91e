"""Measuring: wall time, peak memory, the machine's matmul rate, agreement with the reference.

Time: CUDA events around each call on a GPU, ``perf_counter`` on the CPU; the median and the
20%/80% quantiles of the repetitions are reported.

Peak memory is the most a single call needs beyond its inputs:
- CUDA: the caching allocator's peak (``max_memory_allocated``) minus what was allocated before.
- CPU: the peak resident set size (VmHWM) minus the resident size before the call. Freed heap pages
  (and mmfast's cache of freed huge-page output blocks) are first returned to the OS
  (``malloc_trim``, ``mmfast._C.release_cpu_block_cache``) and the high-water mark is reset by writing 5 to
  ``/proc/self/clear_refs``, so the figure is the call's own peak, as a fresh subprocess would
  see it, without paying a subprocess (and a torch import) per row. Where that file cannot be
  written the CPU figure is left empty rather than guessed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Agreement: max |out - ref| / max |ref| per tensor (output and every gradient). fp32 allows TF32
# matmuls (Triton's default for fp32 dots); bf16/fp16 allow the inputs' own rounding of the logits.
AGREE_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], reps: int, device: torch.device) -> list[float]:
    """Seconds per call for ``reps`` calls (results are dropped between calls)."""
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            del out
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile); with fewer than 2 samples all three are the one time."""
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


# --------------------------------------------------------------------------------------------
# Peak memory.
# --------------------------------------------------------------------------------------------


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:  # mmfast's cache of freed huge-page output blocks: a fresh process would not have it
        from mmfast import _C  # noqa: PLC0415

        _C.release_cpu_block_cache()
    except (ImportError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: fn()`` then ``m.bytes``: the call's peak beyond its inputs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self._base = 0
        self._ok = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._ok = True
        else:
            self._ok = _reset_cpu_peak()
            self._base = _proc_status("VmRSS:") if self._ok else 0
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ok:
            return
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.bytes = max(0, _proc_status("VmHWM:") - self._base)


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation now (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


# --------------------------------------------------------------------------------------------
# The machine's matmul rate, measured in the same run as the kernels.
# --------------------------------------------------------------------------------------------


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, scale: int = 1) -> float:
    """Best GFLOP/s of plain ``torch.mm`` over a square GEMM and the contrastive-loss GEMM shape.

    ``scale`` > 1 divides the shapes (harness self-tests only: small GEMMs understate the rate).
    """
    shapes = (
        [(8192, 8192, 8192), (16384, 16384, 512)] if device.type == "cuda" else [(2048, 2048, 2048), (4096, 4096, 512)]
    )
    shapes = [(m // scale, n // scale, max(1, k // scale)) for m, n, k in shapes]
    best = 0.0
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        fn = functools.partial(torch.mm, a, b)
        first = time_calls(fn, 1, device)[0]  # warm-up, and the call's cost
        reps = max(2, min(50, int(seconds / max(first, 1e-6))))
        median = quantiles(time_calls(fn, reps, device))[0]
        best = max(best, 2.0 * m * n * k / median / 1e9)
    return best


# --------------------------------------------------------------------------------------------
# Agreement.
# --------------------------------------------------------------------------------------------


def rel_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (inf for a shape mismatch or a non-finite value).

    A 0-dim result (a loss, or the gradient of logit_scale / logit_bias) is divided by
    max(|want|, 1) instead: it is a sum of O(1) terms that can cancel to almost nothing (the SigLIP
    scale gradient at initialization is ~1e-3), and relative to that remainder even a correct bf16
    sum looks 10% off.
    """
    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    got, want = got.detach().float(), want.detach().float()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    if not got.numel():
        return 0.0
    scale = float(want.abs().max())
    if want.dim() == 0:
        scale = max(scale, 1.0)
    return float((got - want).abs().max()) / max(scale, 1e-30)


# --------------------------------------------------------------------------------------------
# Machine description (goes into the JSON and the table's caption).
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import mmfast

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "mmfast": mmfast.__version__,
        "mmfast_build": mmfast.build_info(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_paths"] = _cpu_paths()
    return info


def _cpu_paths() -> dict[str, Any]:
    """The cpu backend's path per dtype and the CPU's peak multiply-add rate (GFLOP/s, the floors'
    denominator: ``mmfast._C.cpu_peak_gflops``), when the extension is built."""
    from mmfast import _dispatch, cpu

    ext, _ = _dispatch.extension()
    if ext is None:
        return {}
    return {
        "isa": cpu.cpu_isa(),
        "paths": cpu.cpu_paths(),
        "peak_gflops": {d: round(ext.cpu_peak_gflops(d), 1) for d in ("fp32", "bf16")},
    }
