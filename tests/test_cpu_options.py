"""mmfast.cpu_options / cpu_isa / cpu_paths: detection, the automatic choice per dtype, forcing a
path (and the error for one this CPU lacks), and restoring the options after a ``with`` block."""

from __future__ import annotations

import pytest
import torch
from utils import _cpu_flags

import mmfast
from mmfast.cpu import cpu_isa, cpu_paths


def test_isa_matches_proc_cpuinfo():
    flags = set(_cpu_flags().split())
    isa = cpu_isa()
    assert isa["avx2"] == ("avx2" in flags and "fma" in flags)
    assert isa["avx512"] == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert isa["avx512_bf16"] == (isa["avx512"] and "avx512_bf16" in flags)
    if "amx_bf16" not in flags:
        assert not isa["amx_bf16"] and isa["amx_why"]


def test_auto_takes_the_first_path_this_cpu_has():
    isa = cpu_isa()
    paths = {dt: p.split()[0] for dt, p in cpu_paths().items()}
    assert paths["float32"] == ("avx512" if isa["avx512"] else "avx2" if isa["avx2"] else "blas")
    assert paths["bfloat16"] == ("amx" if isa["amx_bf16"] else "avx512_bf16" if isa["avx512_bf16"] else "blas")
    assert paths["float16"] == paths["float64"] == "blas"


def test_forcing_a_path_and_restoring():
    before = mmfast.cpu_options()
    with mmfast.cpu_options(gemm="blas", hugepages=False, block_cache_mb=0) as opts:
        assert (opts.gemm, opts.hugepages, opts.block_cache_mb) == ("blas", False, 0)
        assert mmfast.cpu_options() == opts.__class__(gemm="blas", hugepages=False, block_cache_mb=0)
        assert all(p.startswith("blas") for p in cpu_paths().values())
        with mmfast.cpu_options(gemm="avx2"):  # an fp32 path: bf16 goes back to its automatic choice
            paths = cpu_paths()
            assert paths["float32"].startswith("avx2") and not paths["bfloat16"].startswith("avx2")
        assert mmfast.cpu_options().gemm == "blas"
    assert mmfast.cpu_options() == before


def test_a_path_this_cpu_lacks_is_an_error_naming_the_feature():
    isa = cpu_isa()
    needs = {"amx": ("amx_bf16", "AMX"), "avx512_bf16": ("avx512_bf16", "AVX512_BF16"), "avx512": ("avx512", "AVX-512")}
    lacking = [(g, word) for g, (key, word) in needs.items() if not isa[key]]
    if not lacking:
        pytest.skip("this CPU runs every path")
    before = mmfast.cpu_options()
    for gemm, word in lacking:
        with pytest.raises(RuntimeError, match=word):
            mmfast.cpu_options(gemm=gemm)
    assert mmfast.cpu_options() == before  # nothing changed


@pytest.mark.parametrize(
    "kw,err",
    [
        (dict(gemm="gpu"), ValueError),
        (dict(gemm=1), ValueError),
        (dict(hugepages="no"), TypeError),
        (dict(block_cache_mb=-1), ValueError),
        (dict(block_cache_mb=1.5), TypeError),
        (dict(block_cache_mb=True), TypeError),
    ],
)
def test_bad_options(kw, err):
    with pytest.raises(err):
        mmfast.cpu_options(**kw)


def test_options_reach_the_kernels():
    """The forced paths are the ones that run: the generic kernel (blas) and the fast path round the
    same fp32 attention differently, and both match each other closely."""
    q = torch.randn(2, 4, 33, 64)
    with mmfast.cpu_options(gemm="blas"):
        generic = mmfast.cross_attention(q, q, q, backend="cpu")
    with mmfast.cpu_options(gemm="avx2"):
        fast = mmfast.cross_attention(q, q, q, backend="cpu")
    torch.testing.assert_close(generic, fast)
    assert not torch.equal(generic, fast)
