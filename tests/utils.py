"""One input factory per op, and per-dtype tolerance tables (forward and backward separately)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Absolute/relative tolerances against the reference computed in float64.
FWD_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
BWD_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def has_avx512f() -> bool:
    """Whether this CPU has AVX-512F (the cpu backend's fp32 contrastive kernel runs only there)."""
    return " avx512f" in _cpu_flags()


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512_BF16 (the vdpbf16ps kernels of the cpu backend run only there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def poison_(x: Tensor) -> Tensor:
    """Fill a buffer a kernel is about to write with NaN, so unwritten elements show up."""
    return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-1)


def attention_inputs(
    B: int = 2,
    Hq: int = 4,
    Hkv: int | None = None,
    Lq: int = 7,
    Lk: int = 49,
    D: int = 32,
    Dv: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    requires_grad: bool = False,
    layout: str = "bhld",
    pad_frac: float = 0.0,
) -> dict:
    """query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv) and a padding mask.

    ``layout="blhd"`` makes (B, L, H, D) storage viewed as (B, H, L, D) (non-contiguous).
    ``pad_frac`` > 0 pads that fraction of keys at the end of every other batch item, and pads
    every key of the last batch item when B > 2 (an all-masked item).
    """
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv

    def make(h: int, L: int, d: int) -> Tensor:
        if layout == "blhd":
            t = torch.randn(B, L, h, d, device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, h, L, d, device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = make(Hq, Lq, D), make(Hkv, Lk, D), make(Hkv, Lk, Dv)
    kpm = None
    if pad_frac > 0:
        kpm = torch.zeros(B, Lk, dtype=torch.bool, device=device)
        n_pad = int(round(pad_frac * Lk))
        if n_pad:
            kpm[::2, Lk - n_pad :] = True
        if B > 2:
            kpm[-1] = True
    return dict(query=q, key=k, value=v, key_padding_mask=kpm)


def contrastive_inputs(
    N: int = 17,
    M: int | None = None,
    D: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    requires_grad: bool = False,
    normalize: bool = True,
    scale: float = 14.3,
    bias: float = -10.0,
    noncontiguous: bool = False,
) -> dict:
    """image_features (N, D), text_features (M, D), logit_scale and logit_bias (0-dim tensors)."""
    M = N if M is None else M

    def make(n: int) -> Tensor:
        t = torch.randn(n, 2 * D if noncontiguous else D, device=device, dtype=torch.float32)
        t = t[:, ::2] if noncontiguous else t
        if normalize:
            t = t / t.norm(dim=-1, keepdim=True)
        return t.to(dtype).requires_grad_(requires_grad)

    s = torch.tensor(scale, device=device, dtype=torch.float32, requires_grad=requires_grad)
    b = torch.tensor(bias, device=device, dtype=torch.float32, requires_grad=requires_grad)
    return dict(image_features=make(N), text_features=make(M), logit_scale=s, logit_bias=b)


def dense_info_nce(logits: Tensor, labels: Tensor | None, direction: str, reduction: str) -> Tensor:
    """InfoNCE from a whole (N, M) logits matrix, by F.cross_entropy: the dense oracle of the tiled
    loss. labels (N,) (or (M,) for "text"): each row's positive column (None: the diagonal);
    direction "image" (rows), "text" (columns) or "both" (their mean; labels a permutation)."""
    n = logits.shape[1] if direction == "text" else logits.shape[0]
    tgt = torch.arange(n) if labels is None else labels
    if direction == "image":
        rows = F.cross_entropy(logits, tgt, reduction="none")
    elif direction == "text":
        rows = F.cross_entropy(logits.t(), tgt, reduction="none")
    else:
        inv = torch.empty_like(tgt)
        inv[tgt] = torch.arange(tgt.numel())
        rows = 0.5 * (
            F.cross_entropy(logits, tgt, reduction="none") + F.cross_entropy(logits.t(), inv, reduction="none")
        )
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
