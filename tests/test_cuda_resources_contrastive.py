"""Compile the contrastive CUDA kernels (csrc/contrastive/kernel*.cuh) for sm_80 and sm_90 with
``-Xptxas -v`` and read ptxas' resource report: no spill stores or loads in any kernel, and no stack
frame (local memory) in the hot tile kernels. Needs nvcc only (no GPU); skipped where it is absent.
"""

from __future__ import annotations

import re

import pytest

from tests import emu_build

NVCC = emu_build.nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit absent)")

# A torch-free translation unit instantiating every kernel template for every dtype.
SOURCE = """
#include "contrastive/kernel_bwd.cuh"
#include "contrastive/kernel_fwd.cuh"
namespace mc = mmfast::contrastive;
using mmfast::port::bf16_t;
using mmfast::port::half_t;
template __global__ void mc::fwd_tiles_kernel<float>(mc::FwdParams);
template __global__ void mc::fwd_tiles_kernel<bf16_t>(mc::FwdParams);
template __global__ void mc::fwd_tiles_kernel<half_t>(mc::FwdParams);
template __global__ void mc::bwd_tiles_kernel<float>(mc::BwdParams);
template __global__ void mc::bwd_tiles_kernel<bf16_t>(mc::BwdParams);
template __global__ void mc::bwd_tiles_kernel<half_t>(mc::BwdParams);
template __global__ void mc::pairs_kernel<float>(mc::PairParams);
template __global__ void mc::pairs_kernel<bf16_t>(mc::PairParams);
template __global__ void mc::pairs_kernel<half_t>(mc::PairParams);
"""
HOT = ("fwd_tiles_kernel", "bwd_tiles_kernel")
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{mangled kernel name: {"stack", "spill_stores", "spill_loads", "registers"}} from ptxas -v."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {})
        elif current is not None and (m := FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := REGS.search(line)):
            current["registers"] = int(m.group(1))
    return kernels


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def report(request, tmp_path_factory):
    arch = request.param
    src = tmp_path_factory.mktemp(arch) / "contrastive_kernels.cu"
    src.write_text(SOURCE)
    cmd = [NVCC, "-std=c++17", "--expt-relaxed-constexpr", "-O3", "-cubin", f"-arch={arch}", "-Xptxas", "-v"]
    cmd += [f"-I{emu_build.CSRC}", str(src), "-o", str(src.with_suffix(".cubin"))]
    rc, log = emu_build.run(cmd, timeout=1200)
    assert rc == 0, log[-6000:]
    return arch, parse_ptxas(log)


def test_every_kernel_reported(report):
    arch, kernels = report
    for name in (*HOT, "pairs_kernel", "targets_kernel", "colmerge_kernel", "finish_kernel", "coef_kernel"):
        assert any(name in k for k in kernels), f"{name} missing from the {arch} ptxas report: {sorted(kernels)}"
    for entry in kernels.values():
        assert {"stack", "spill_stores", "spill_loads", "registers"} <= entry.keys()


def test_no_spills(report):
    arch, kernels = report
    spilled = {k: v for k, v in kernels.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spilled, f"{arch}: register spills in {spilled}"


def test_hot_kernels_use_no_local_memory(report):
    arch, kernels = report
    local = {k: v for k, v in kernels.items() if any(h in k for h in HOT) and v["stack"]}
    assert not local, f"{arch}: stack frame (local memory) in hot kernels {local}"
    assert all(v["registers"] <= 255 for v in kernels.values())


def test_parser_reads_a_spill():
    log = (
        "ptxas info    : Compiling entry function '_Z3foov' for 'sm_80'\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, 368 bytes cmem[0]\n"
    )
    assert parse_ptxas(log) == {"_Z3foov": {"stack": 16, "spill_stores": 8, "spill_loads": 4, "registers": 255}}
