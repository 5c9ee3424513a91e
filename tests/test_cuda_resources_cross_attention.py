"""Compile-time checks of the CUDA cross-attention kernels (no GPU needed).

1. ptxas resource report: nvcc compiles a torch-free translation unit instantiating the hot kernels
   for sm_80 and sm_90 with ``-Xptxas -v``; any register spill or stack frame (local memory) fails.
2. ThreadSanitizer: csrc/emu/tsan_cross_attention.cpp runs the emulated kernels (one OS thread per
   CUDA thread) against naive loops; any data race report or mismatch fails.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests import emu_build

# (dtype, head dim) per kernel; fp16 differs from bf16 only in the mma instruction (slow run).
HOT = [("bf16_t", 64), ("bf16_t", 128), ("float", 64), ("float", 128)]
HOT_FP16 = [("half_t", 64), ("half_t", 128)]
KERNELS = ("fwd_kernel", "dkdv_kernel", "dq_kernel")


def _translation_unit(configs) -> str:
    lines = [
        '#include "cross_attention/kernel_bwd.cuh"',
        '#include "cross_attention/kernel_fwd.cuh"',
        "using namespace mmfast::port;",
    ]
    ns = "mmfast::cross_attention"
    for dtype, hd in configs:
        for k in KERNELS:
            lines.append(f"template __global__ void {ns}::{k}<{dtype}, {hd}>({ns}::Params);")
    lines.append(f"template __global__ void {ns}::combine_kernel<bf16_t>({ns}::Params);")
    lines.append(f"template __global__ void {ns}::delta_kernel<bf16_t>({ns}::Params);")
    return "\n".join(lines) + "\n"


def _ptxas_report(nvcc: str, src, arch: str, tmp_path) -> subprocess.Popen:
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        "--expt-relaxed-constexpr",
        "-cubin",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        f"-I{emu_build.CSRC}",
        str(src),
        "-o",
        str(tmp_path / f"cross_attention_{arch}.cubin"),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _parse(log: str) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name): stack frame, spill stores, spill loads and registers."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name] = dict(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name in out:
            out[name]["registers"] = int(m.group(1))
    return out


def _check_resources(configs, tmp_path):
    nvcc = emu_build.nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    src = tmp_path / "cross_attention_kernels.cu"
    src.write_text(_translation_unit(configs))
    procs = {arch: _ptxas_report(nvcc, src, arch, tmp_path) for arch in ("sm_80", "sm_90")}  # in parallel
    expected = len(configs) * len(KERNELS) + 2
    for arch, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"nvcc {arch} failed:\n{log}"
        report = _parse(log)
        assert len(report) == expected, f"{arch}: parsed {len(report)} kernels, expected {expected}:\n{log}"
        bad = {k: v for k, v in report.items() if v["stack"] or v["spill_stores"] or v["spill_loads"]}
        assert not bad, f"{arch}: local memory / spills in {bad}"
        assert all(v.get("registers", 0) <= 255 for v in report.values()), report


def test_hot_kernels_have_no_spills(tmp_path):
    _check_resources(HOT, tmp_path)


@pytest.mark.slow
def test_fp16_kernels_have_no_spills(tmp_path):
    _check_resources(HOT_FP16, tmp_path)


def test_threadsanitizer_finds_no_race():
    exe = emu_build.build_executable(
        "tsan_cross_attention", "emu/tsan_cross_attention.cpp", flags=("-O1", "-g", "-fsanitize=thread")
    )
    env = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 second_deadlock_stack=1"}
    rc, out = emu_build.run([str(exe)], timeout=900, env=env)
    assert "ThreadSanitizer" not in out, out
    assert rc == 0, out
    assert out.count("PASS") == 6 and "FAIL" not in out, out
