"""The readable form of ``mmfast.backends()``: ``python -m mmfast`` or ``mmfast.backends(pretty=True)``.

An op x backend grid ("yes", or "no" with a numbered reason below it), what the extension is, and
the code paths the ``cpu`` backend takes on this CPU.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from mmfast import _dispatch
from mmfast._version import __version__

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


def cpu_paths(ext: Any = None) -> dict[str, str]:
    """Which code path the cpu backend takes now, per op and dtype (label -> description), from the
    extension's own choice (mmfast.cpu_options, csrc/common/cpu_isa.h)."""
    if ext is None:
        return {}
    gemm = {dt: ext.cpu_gemm_for(dt) for dt in ("float32", "bfloat16")}
    generic = f"dense attn_mask, dropout or > {_FAST_KEYS} keys: the generic kernel"
    paths = {}
    if gemm["float32"] == "avx512":
        paths["info_nce, siglip_loss fp32"] = "own AVX-512 GEMM, softmax fused in its epilogue"
    else:
        paths["info_nce, siglip_loss fp32"] = f"MKL SGEMM tiles and vectorized epilogues (gemm={gemm['float32']})"
    if gemm["bfloat16"] == "avx512_bf16":
        paths["info_nce, siglip_loss bf16"] = "own vdpbf16ps kernel (AVX512_BF16)"
    else:
        where = "on the AMX tiles" if gemm["bfloat16"] == "amx" else f"gemm={gemm['bfloat16']}"
        paths["info_nce, siglip_loss bf16"] = f"MKL bf16 GEMM tiles ({where})"
    paths["info_nce, siglip_loss fp16, fp64"] = "MKL GEMMs"
    if gemm["float32"] in ("avx512", "avx2"):
        tiles = "AVX-512" if gemm["float32"] == "avx512" else "AVX2"
        paths["cross_attention fp32"] = f"fast path on own {tiles} register tiles (head dims % 8 == 0; {generic})"
    else:
        paths["cross_attention fp32"] = "the generic kernel on MKL SGEMM (gemm=blas)"
    if gemm["bfloat16"] == "avx512_bf16":
        paths["cross_attention bf16"] = f"fast path, own vdpbf16ps kernels (AVX512_BF16; {generic})"
    else:
        where = "on the AMX tiles" if gemm["bfloat16"] == "amx" else f"gemm={gemm['bfloat16']}"
        paths["cross_attention bf16"] = f"the generic kernel on MKL's bf16 GEMM ({where})"
    paths["cross_attention fp16, fp64"] = "the generic kernel on MKL"
    return paths


def _isa_line(ext: Any = None) -> str:
    if ext is not None:
        isa = ext.cpu_isa()
        amx = "yes" if isa["amx_bf16"] else f"no ({isa['amx_why']})"
        names = (("AVX2", "avx2"), ("AVX-512", "avx512"), ("AVX512_BF16", "avx512_bf16"))
        have = ", ".join(f"{name} {'yes' if isa[key] else 'no'}" for name, key in names)
        return f"{_cpu_name()}, {torch.get_num_threads()} threads; {have}, AMX-BF16 {amx}"
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
    ext, why_ext = ext_why
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    lines = [
        f"mmfast {__version__}, torch {torch.__version__}, Python {platform.python_version()}, GPU: {gpu}",
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
    lines += ["", f"CPU: {_isa_line(ext)}"]
    if ext is None:
        lines.append("cpu backend paths: none (the extension is not available)")
    else:
        paths = cpu_paths(ext)
        width = max(len(k) for k in paths)
        forced = ext.get_cpu_options()["gemm"]
        lines.append(f"cpu backend paths (mmfast.cpu_options(gemm={forced!r}); see mmfast.cpu):")
        lines += [f"  {k.ljust(width)}  {v}" for k, v in paths.items()]
    return "\n".join(lines) + "\n"
