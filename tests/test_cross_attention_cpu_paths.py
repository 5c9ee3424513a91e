"""Each CPU code path of cross-attention against the float64 reference.

fp32 inputs without attn_mask or dropout take the fast path (its AVX-512 tiles where the CPU has
them, else AVX2); bf16 inputs without them take the bf16 fast path where the CPU has AVX512_BF16;
everything else takes the generic kernel. The kernel reads MMFAST_XATTN_CPU_FAST /
MMFAST_XATTN_CPU_AVX512 / MMFAST_XATTN_CPU_PASS3 / MMFAST_XATTN_CPU_DYNAMIC / MMFAST_CPU_HUGEPAGES on
every call, so each path is forced here.
"""

import pytest
import torch
from utils import attention_inputs, has_avx512_bf16
from xattn_helpers import compare_with_reference

import mmfast

PATHS = {
    "fast-avx512": {},
    "fast-avx2": {"MMFAST_XATTN_CPU_AVX512": "0"},
    "generic": {"MMFAST_XATTN_CPU_FAST": "0"},
    # the fast path without performance pass 3: AVX2 exp with AVX-512 tiles, static tasks, at::empty
    "fast-pass2": {"MMFAST_XATTN_CPU_PASS3": "0", "MMFAST_XATTN_CPU_DYNAMIC": "0", "MMFAST_CPU_HUGEPAGES": "0"},
}
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


@pytest.mark.parametrize("path", ["fast-bf16", "fast-bf16-pass2", "generic"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_bf16_path_matches_reference(path, case, monkeypatch):
    if path.startswith("fast-bf16") and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512_BF16: bf16 runs the generic kernel")
    if path == "generic":
        monkeypatch.setenv("MMFAST_XATTN_CPU_FAST", "0")
    if path == "fast-bf16-pass2":  # AVX2 exp and static tasks instead of the AVX-512 exp2 softmax
        for name, value in PATHS["fast-pass2"].items():
            monkeypatch.setenv(name, value)
    _compare(case, torch.bfloat16)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_path_matches_reference(path, case, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setenv(name, value)
    _compare(case, torch.float32)


@pytest.mark.parametrize("path", ["fast-avx512", "fast-avx2", "generic", "fast-bf16"])
def test_cpu_large_outputs_from_the_block_cache(path, monkeypatch):
    """dk, dv >= 8 MB come from huge-page blocks that are reused after they are freed (stale contents):
    two calls with different padding must both match the reference, every element written."""
    if path == "fast-bf16" and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512_BF16: bf16 runs the generic kernel")
    for name, value in PATHS.get(path, {}).items():
        monkeypatch.setenv(name, value)
    dtype, Lk = (torch.bfloat16, 16400) if path == "fast-bf16" else (torch.float32, 8200)
    for seed, pad in ((0, 0.0), (1, 0.4), (2, 0.2)):  # the second call reuses the first one's blocks
        if seed == 2:  # the third maps fresh ones after the cache is emptied (as the benchmark does)
            mmfast._C.release_cpu_block_cache()
        torch.manual_seed(seed)
        inp = attention_inputs(B=2, Hq=2, Hkv=2, Lq=5, Lk=Lk, D=64, pad_frac=pad, dtype=dtype)
        compare_with_reference(
            inp["query"], inp["key"], inp["value"], key_padding_mask=inp["key_padding_mask"], backend="cpu"
        )


@pytest.mark.parametrize("path", ["fast-avx512", "fast-avx2", "fast-pass2"])
def test_cpu_fast_path_interior_padding(path, monkeypatch):
    """Padded keys inside the span of unpadded ones (the mask pass runs) next to items padded only at
    the end (the forward skips the mask pass there)."""
    for name, value in PATHS[path].items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(3)
    inp = attention_inputs(B=3, Hq=4, Hkv=2, Lq=40, Lk=150, D=32, dtype=torch.float32)
    kpm = torch.zeros(3, 150, dtype=torch.bool)
    kpm[0, 10:30] = True  # interior hole
    kpm[0, 140:] = True
    kpm[1, ::3] = True  # every third key
    kpm[2, 100:] = True  # trailing only
    compare_with_reference(inp["query"], inp["key"], inp["value"], key_padding_mask=kpm, backend="cpu")
