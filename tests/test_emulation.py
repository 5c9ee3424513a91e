"""The SIMT emulation layer (csrc/common/emu.h via portable.cuh) against plain host-side loops.

csrc/emu/emu_selftest.cpp holds the kernels (shuffles, barriers, indices, conversions, ldmatrix,
cp.async, mma tiles loaded with ldmatrix vs a plain matmul); each is one pytest case here.
"""

from __future__ import annotations

import pytest

from tests import emu_build

TESTS = [
    "shuffle",
    "barrier",
    "indices",
    "convert",
    "ldmatrix",
    "cp_async",
    "poison",
    "mma_bf16_tile",
    "mma_fp16_tile",
    "mma_bf16_trans",
    "mma_fp16_gemm",
    "mma_bf16_gemm_trans",
]


@pytest.fixture(scope="module")
def selftest():
    return emu_build.build_executable("emu_selftest", "emu/emu_selftest.cpp")


def test_every_selftest_is_listed(selftest):
    rc, out = emu_build.run([str(selftest), "--list"])
    assert rc == 0, out
    assert out.split() == TESTS


@pytest.mark.parametrize("name", TESTS)
def test_selftest(selftest, name):
    rc, out = emu_build.run([str(selftest), name], timeout=300)
    assert rc == 0 and f"PASS {name}" in out, out


def test_unknown_test_name_fails(selftest):
    rc, out = emu_build.run([str(selftest), "no_such_test"])
    assert rc != 0 and "FAIL" in out
