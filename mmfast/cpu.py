"""Options of the ``cpu`` backend: which code path runs the tile products, and the output allocator.

The CPU is detected once when ``mmfast._C`` loads (AVX2+FMA, AVX-512, AVX512_BF16, AMX with the OS's
tile permission) and every op picks, per input dtype, the fastest path this CPU has:

========  =====================================================================================
dtype     paths, in the order ``gemm="auto"`` tries them
========  =====================================================================================
float32   ``"avx512"`` (own 8x32 register tiles), ``"avx2"`` (own 6x16 tiles), ``"blas"`` (MKL)
bfloat16  ``"amx"`` (MKL's bf16 GEMM on the AMX tiles), ``"avx512_bf16"`` (own vdpbf16ps kernels),
          ``"blas"`` (MKL's bf16 GEMM without AMX)
float16,  ``"blas"``
float64
========  =====================================================================================

The fused epilogues (online softmax / LSE, the gradient tiles) are mmfast's own on every path.
``cpu_options`` forces a path (for tests and comparisons) or changes the allocator::

    with mmfast.cpu_options(gemm="avx2"):      # fp32 products on the AVX2 tiles in this block
        out = mmfast.cross_attention(q, k, v)
    mmfast.cpu_options(hugepages=False)         # from now on (returns the previous options)

A path of one dtype leaves the other dtypes on their automatic choice; forcing a path this CPU
cannot run raises an error naming the missing feature. The options are process-wide (not per
thread).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmfast import _dispatch

__all__ = ["CpuOptions", "cpu_isa", "cpu_options", "cpu_paths"]

GEMMS = ("auto", "amx", "avx512_bf16", "avx512", "avx2", "blas")
_PATH_DOC = {
    "avx512": "own AVX-512 register tiles",
    "avx2": "own AVX2 register tiles",
    "avx512_bf16": "own vdpbf16ps (AVX512_BF16) kernels",
    "amx": "MKL's bf16 GEMM on the AMX tiles",
    "blas": "MKL GEMM",
}


def _ext():
    ext, why = _dispatch.extension()
    if ext is None:
        raise RuntimeError(f"mmfast.cpu_options: the cpu backend is not available: {why}")
    return ext


@dataclass(frozen=True)
class CpuOptions:
    """The ``cpu`` backend's options; as a context manager, restores ``previous`` on exit.

    Attributes:
        gemm: forced tile-product path, or "auto" (per dtype, the first path this CPU has).
        hugepages: outputs and gradients of 8 MB or more on 2 MB pages (fewer page faults).
        block_cache_mb: cap of the cache of freed huge-page blocks reused by later calls (0: off).
    """

    gemm: str = "auto"
    hugepages: bool = True
    block_cache_mb: int = 256
    previous: CpuOptions | None = None

    def __enter__(self) -> CpuOptions:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            _apply(self.previous)


def _current() -> CpuOptions:
    d = _ext().get_cpu_options()
    return CpuOptions(gemm=d["gemm"], hugepages=bool(d["hugepages"]), block_cache_mb=int(d["block_cache_mb"]))


def _apply(o: CpuOptions) -> None:
    _ext().set_cpu_options(o.gemm, o.hugepages, o.block_cache_mb)


def cpu_options(
    *, gemm: str | None = None, hugepages: bool | None = None, block_cache_mb: int | None = None
) -> CpuOptions:
    """Set the given options (the others keep their values) and return the new options, whose
    ``with`` block restores the previous ones on exit. With no argument: the current options.

    Args:
        gemm: "auto" | "amx" | "avx512_bf16" | "avx512" | "avx2" | "blas" (see the module docstring).
        hugepages: put large outputs on 2 MB pages.
        block_cache_mb: cap (MB) of the cache of freed huge-page blocks; 0 disables it.

    Raises:
        ValueError / TypeError: an unknown path or a wrong type; RuntimeError: a path this CPU
        cannot run (the message names the missing feature), or no extension.
    """
    if gemm is not None and (not isinstance(gemm, str) or gemm not in GEMMS):
        raise ValueError(f"gemm must be one of {', '.join(map(repr, GEMMS))}, got {gemm!r}")
    if hugepages is not None and not isinstance(hugepages, bool):
        raise TypeError(f"hugepages must be a bool, got {type(hugepages).__name__}")
    if block_cache_mb is not None and (isinstance(block_cache_mb, bool) or not isinstance(block_cache_mb, int)):
        raise TypeError(f"block_cache_mb must be an int, got {type(block_cache_mb).__name__}")
    if block_cache_mb is not None and block_cache_mb < 0:
        raise ValueError(f"block_cache_mb must be >= 0, got {block_cache_mb}")
    before = _current()
    if gemm is None and hugepages is None and block_cache_mb is None:
        return before
    if gemm is not None and gemm != "auto":
        missing = _ext().cpu_gemm_missing(gemm)
        if missing:
            raise RuntimeError(f"mmfast.cpu_options: gemm={gemm!r} needs {missing}, which this CPU does not have")
    new = CpuOptions(
        gemm=before.gemm if gemm is None else gemm,
        hugepages=before.hugepages if hugepages is None else hugepages,
        block_cache_mb=before.block_cache_mb if block_cache_mb is None else block_cache_mb,
    )
    _apply(new)
    return replace(new, previous=before)


def cpu_isa() -> dict:
    """What this CPU can run: {"avx2", "avx512", "avx512_bf16", "amx_bf16", "amx_fp16": bool,
    "amx_why": why AMX is off ("" when on)}."""
    return dict(_ext().cpu_isa())


def cpu_paths() -> dict[str, str]:
    """Per input dtype, the tile-product path the cpu backend takes now, with what it is, e.g.
    {"float32": "avx512 (own AVX-512 register tiles)", ...}."""
    ext = _ext()
    out = {}
    for dt in ("float32", "bfloat16", "float16", "float64"):
        path = ext.cpu_gemm_for(dt)
        out[dt] = f"{path} ({_PATH_DOC[path]})"
    return out
