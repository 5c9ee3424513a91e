"""The readable form of ``mmfast.backends()``: ``python -m mmfast`` or ``mmfast.backends(pretty=True)``.

An op x backend grid ("yes", or "no" with a numbered reason below it), what the extension is, and
the code paths the ``cpu`` backend takes on this CPU.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from mmfast import _dispatch

# The cpu backend's choices mirrored from the C++ rules, until mmfast._C reports them itself (the
# CPU-path options API of issue 16): csrc/contrastive/cpu.cpp (avx512_enabled, vnni_enabled) and
# csrc/cross_attention/cpu_fast*.h (fast_path_ok, fast_bf16_ok). An extension that defines
# ``cpu_paths() -> dict[str, str]`` (label -> path) is asked instead.
_FAST_KEYS = 16384  # kMaxFastKeys in csrc/cross_attention/cpu_fast.h


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _env_on(name: str) -> bool:
    return os.environ.get(name, "") != "0"


def cpu_paths(ext: Any = None) -> dict[str, str]:
    """Which code path the cpu backend takes per op and dtype on this CPU (label -> description)."""
    if ext is not None and hasattr(ext, "cpu_paths"):
        return dict(ext.cpu_paths())
    flags = _cpu_flags()
    avx512 = "avx512f" in flags
    bf16 = avx512 and {"avx512bw", "avx512vl", "avx512_bf16"} <= flags
    paths = {}
    if avx512 and _env_on("MMFAST_CONTRASTIVE_AVX512"):
        paths["info_nce, siglip_loss fp32"] = "own AVX-512 GEMM, softmax fused in its epilogue"
    else:
        why = "MMFAST_CONTRASTIVE_AVX512=0" if avx512 else "no AVX-512"
        paths["info_nce, siglip_loss fp32"] = f"MKL SGEMM and vectorized epilogues ({why})"
    if bf16 and _env_on("MMFAST_CONTRASTIVE_VNNI"):
        paths["info_nce, siglip_loss bf16"] = "vdpbf16ps kernel (AVX512_BF16)"
    else:
        why = "MMFAST_CONTRASTIVE_VNNI=0" if bf16 else "no AVX512_BF16"
        paths["info_nce, siglip_loss bf16"] = f"MKL bf16 GEMM ({why})"
    paths["info_nce, siglip_loss fp16, fp64"] = "MKL GEMMs"
    generic = f"dense attn_mask, dropout or > {_FAST_KEYS} keys: the generic kernel"
    if not _env_on("MMFAST_XATTN_CPU_FAST"):
        paths["cross_attention"] = "the generic kernel only (MMFAST_XATTN_CPU_FAST=0)"
        return paths
    tiles = "AVX-512" if avx512 and _env_on("MMFAST_XATTN_CPU_AVX512") else "AVX2"
    paths["cross_attention fp32"] = f"fast path on {tiles} register tiles (head dims % 8 == 0; {generic})"
    if bf16:
        paths["cross_attention bf16"] = f"fast path, vdpbf16ps (AVX512_BF16; {generic})"
    else:
        paths["cross_attention bf16"] = "the generic kernel (no AVX512_BF16)"
    paths["cross_attention fp16, fp64"] = "the generic kernel"
    return paths


def _isa_line() -> str:
    flags = _cpu_flags()
    isa = ", ".join(
        f"{name} {'yes' if flag in flags else 'no'}"
        for name, flag in (
            ("AVX2", "avx2"),
            ("AVX-512", "avx512f"),
            ("AVX512_BF16", "avx512_bf16"),
            ("AMX", "amx_tile"),
        )
    )
    isa = isa if flags else f"torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}"
    return f"{_cpu_name()}, {torch.get_num_threads()} threads; {isa}"


def _extension_line(ext: Any, why: str | None) -> str:
    if ext is None:
        return f"mmfast._C: NOT AVAILABLE: {why}"
    cuda = f"CUDA kernels for {ext.cuda_archs}" if ext.with_cuda else "no CUDA kernels"
    return f"mmfast._C: built with {ext.compiler} against torch {ext.torch_version}, {cuda}"


def backends_table(report: dict[str, dict[str, dict[str, Any]]], ext_why: tuple[Any, str | None]) -> str:
    """Render ``mmfast.backends()``'s dict (``report``) with the extension status ``ext_why``."""
    import mmfast  # noqa: PLC0415

    ext, why_ext = ext_why
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    lines = [
        f"mmfast {mmfast.__version__}, torch {torch.__version__}, Python {platform.python_version()}, GPU: {gpu}",
        _extension_line(ext, why_ext),
        "",
    ]
    reasons: list[str] = []  # footnotes, numbered in order of first use
    notes: list[str] = []
    grid = [["op", *_dispatch.BACKENDS]]
    for op, row in report.items():
        cells = [op]
        for name in _dispatch.BACKENDS:
            entry = row[name]
            if entry["available"]:
                cell = "yes"
                if entry["note"]:
                    notes += [] if entry["note"] in notes else [entry["note"]]
                    cell += f" ({'abcdefghij'[notes.index(entry['note'])]})"
            else:
                reasons += [] if entry["reason"] in reasons else [entry["reason"]]
                cell = f"no [{reasons.index(entry['reason']) + 1}]"
            cells.append(cell)
        grid.append(cells)
    widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in grid]
    lines += [""] + [f"[{i}] {r}" for i, r in enumerate(reasons, 1)]
    lines += [f"({'abcdefghij'[i]}) {n}" for i, n in enumerate(notes)]
    lines += ["", f"CPU: {_isa_line()}"]
    if ext is None:
        lines.append("cpu backend paths: none (the extension is not available)")
    else:
        paths = cpu_paths(ext)
        width = max(len(k) for k in paths)
        lines.append("cpu backend paths (switches: README, 'The cpu backend picks its code path per call'):")
        lines += [f"  {k.ljust(width)}  {v}" for k, v in paths.items()]
    return "\n".join(lines) + "\n"
