"""Each CPU code path of cross-attention against the float64 reference.

fp32 inputs without attn_mask or dropout take the fast path on the tiles of the fp32 tile-product
path (gemm "avx512" or "avx2"; "blas" runs the generic kernel on MKL); bf16 inputs without them take
the bf16 fast path when the bf16 path is "avx512_bf16"; everything else takes the generic kernel.
Each path is forced here through mmfast.cpu_options.
"""

import pytest
import torch
from cross_attention_helpers import compare_with_reference
from utils import attention_inputs, has_avx512_bf16, has_avx512f

import mmfast

# name -> mmfast.cpu_options arguments
PATHS = {
    "fast-avx512": dict(gemm="avx512"),
    "fast-avx2": dict(gemm="avx2"),
    "generic": dict(gemm="blas"),
    "fast-no-hugepages": dict(hugepages=False, block_cache_mb=0),  # outputs from c10's allocator
}


@pytest.fixture
def cpu_path(request):
    """Applies the options of the path named by the test's ``path`` parameter for its duration."""
    opts = PATHS.get(request.node.callspec.params["path"], {})
    can = {"avx512": has_avx512f, "avx512_bf16": has_avx512_bf16}.get(opts.get("gemm"), lambda: True)
    if not can():
        pytest.skip(f"this CPU cannot run gemm={opts['gemm']!r}")
    with mmfast.cpu_options(**opts):
        yield


CASES = [
    # B, Hq, Hkv, Lq, Lk, D, pad_frac, is_causal
    (2, 4, 4, 7, 49, 64, 0.0, False),
    (3, 8, 2, 32, 97, 80, 0.5, False),  # GQA, padding incl. an all-padded item
    (2, 2, 1, 77, 33, 16, 0.0, True),  # causal with Lq > Lk
    (1, 3, 3, 5, 1500, 32, 0.3, True),  # long keys, causal with Lq < Lk
    (2, 2, 2, 1, 1, 8, 0.0, False),
    (1, 2, 1, 13, 300, 64, 0.2, False),  # backward blocks of 16 lanes (AVX-512 exp2, one zmm per row)
    (1, 2, 2, 64, 200, 32, 0.0, True),  # forward blocks of 16 lanes with 2 threads; causal, 2 blocks
]
# The bf16 fast path takes any D (odd D and odd key counts exercise the kernel's odd-K tails).
BF16_CASES = CASES + [
    (2, 4, 2, 33, 577, 100, 0.5, False),  # two query blocks, D = 100, GQA, padding
    (1, 2, 2, 40, 31, 7, 0.0, True),  # odd D, causal with Lq > Lk (empty rows)
    (2, 12, 12, 32, 197, 64, 0.0, False),  # text -> image at ViT-B/16 size
    (3, 4, 4, 32, 97, 64, 0.5, False),  # one block per task (dk, dv rounded straight out), padding
    (1, 2, 2, 16, 31, 8, 0.0, True),  # one block per task, causal with Lq < Lk
]


def _compare(case: tuple, dtype: torch.dtype) -> None:
    B, Hq, Hkv, Lq, Lk, D, pad, causal = case
    inp = attention_inputs(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, pad_frac=pad, dtype=dtype)
    compare_with_reference(
        inp["query"],
        inp["key"],
        inp["value"],
        key_padding_mask=inp["key_padding_mask"],
        is_causal=causal,
        backend="cpu",
    )


PATHS["fast-bf16"] = dict(gemm="avx512_bf16")


@pytest.mark.parametrize("path", ["fast-bf16", "fast-no-hugepages", "generic"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_bf16_path_matches_reference(path, case, cpu_path):
    _compare(case, torch.bfloat16)


@pytest.mark.parametrize("path", ["fast-avx512", "fast-avx2", "generic", "fast-no-hugepages"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_path_matches_reference(path, case, cpu_path):
    _compare(case, torch.float32)


@pytest.mark.parametrize("path", ["fast-avx512", "fast-avx2", "generic", "fast-bf16"])
def test_cpu_large_outputs_from_the_block_cache(path, cpu_path):
    """dk, dv >= 8 MB come from huge-page blocks that are reused after they are freed (stale contents):
    two calls with different padding must both match the reference, every element written."""
    dtype, Lk = (torch.bfloat16, 16400) if path == "fast-bf16" else (torch.float32, 8200)
    for seed, pad in ((0, 0.0), (1, 0.4), (2, 0.2)):  # the second call reuses the first one's blocks
        if seed == 2:  # the third maps fresh ones after the cache is emptied (as the benchmark does)
            mmfast._C.release_cpu_block_cache()
        torch.manual_seed(seed)
        inp = attention_inputs(B=2, Hq=2, Hkv=2, Lq=5, Lk=Lk, D=64, pad_frac=pad, dtype=dtype)
        compare_with_reference(
            inp["query"], inp["key"], inp["value"], key_padding_mask=inp["key_padding_mask"], backend="cpu"
        )


@pytest.mark.parametrize("path", ["fast-avx512", "fast-avx2", "fast-bf16"])
def test_cpu_fast_path_interior_padding(path, cpu_path):
    """Padded keys inside the span of unpadded ones (the mask pass runs) next to items padded only at
    the end (the forward skips the mask pass there)."""
    torch.manual_seed(3)
    dtype = torch.bfloat16 if path == "fast-bf16" else torch.float32
    inp = attention_inputs(B=3, Hq=4, Hkv=2, Lq=40, Lk=150, D=32, dtype=dtype)
    kpm = torch.zeros(3, 150, dtype=torch.bool)
    kpm[0, 10:30] = True  # interior hole
    kpm[0, 140:] = True
    kpm[1, ::3] = True  # every third key
    kpm[2, 100:] = True  # trailing only
    compare_with_reference(inp["query"], inp["key"], inp["value"], key_padding_mask=kpm, backend="cpu")
