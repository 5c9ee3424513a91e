"""One way to run info_nce / siglip_loss forward and backward on every contrastive backend that runs
here: "cpu", "triton" (the interpreter on CPU tensors), "reference", and "emu" (the CUDA kernels
under the SIMT emulation, called through their test module), for the defect and policy tests.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import mmfast
from mmfast import _dispatch
from tests import emu_build

BACKENDS = ["cpu", "triton", "reference", "emu"]
DIRECTION = {"both": 0, "image": 1, "text": 2}
REDUCTION = {"mean": 0, "sum": 1, "none": 2}

_EMU = None


def emu_module():
    global _EMU
    if _EMU is None:
        _EMU = emu_build.load_module("contrastive_emu", "emu/contrastive_emu.cpp")
    return _EMU


def skip_reason(backend: str, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run ``dtype`` here (None: it can)."""
    if backend in ("cpu", "emu") and _dispatch.availability("cpu") is not None:
        return "mmfast._C not built"
    if backend == "triton":
        if _dispatch.availability("triton") is not None:
            return "triton not importable"
        if dtype == torch.bfloat16 and not torch.cuda.is_available():
            return "the Triton interpreter has no bf16 arithmetic"
    if backend in ("triton", "emu") and dtype == torch.float64:
        return "the GPU kernels take fp32 / fp16 / bf16"
    return None


def skip_unless(backend: str, dtype: torch.dtype) -> None:
    if why := skip_reason(backend, dtype):
        pytest.skip(why)


def info_nce(
    backend: str,
    x: Tensor,
    y: Tensor,
    s: float,
    *,
    labels: Tensor | None = None,
    direction: str = "both",
    reduction: str = "mean",
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, d image, d text, d scale) for the upstream gradient ``grad`` (default ones)."""
    if backend == "emu":
        emu, st, b = emu_module(), torch.tensor(float(s)), torch.tensor(0.0)
        codes = (0, DIRECTION[direction], REDUCTION[reduction])
        out, row, col = emu.forward(x, y, st, b, labels, *codes, 2)
        g = torch.ones(out.shape) if grad is None else grad.float()
        dx, dy, ds, _ = emu.backward(g, x, y, st, b, labels, row, col, *codes)
        return out, dx, dy, ds
    xs, ys = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    st = torch.tensor(float(s), requires_grad=True)
    out = mmfast.info_nce(xs, ys, st, labels=labels, direction=direction, reduction=reduction, backend=backend)
    out.backward(torch.ones_like(out) if grad is None else grad.to(out.dtype))
    return out.detach(), xs.grad, ys.grad, st.grad


def siglip_loss(
    backend: str, x: Tensor, y: Tensor, s: float, b: float, *, reduction: str = "mean", grad: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, d image, d text, d scale, d bias)."""
    if backend == "emu":
        emu, st, bt = emu_module(), torch.tensor(float(s)), torch.tensor(float(b))
        codes = (1, 0, REDUCTION[reduction])
        out, row, col = emu.forward(x, y, st, bt, None, *codes, 2)
        g = torch.ones(out.shape) if grad is None else grad.float()
        return (out, *emu.backward(g, x, y, st, bt, None, row, col, *codes))
    xs, ys = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    st = torch.tensor(float(s), requires_grad=True)
    bt = torch.tensor(float(b), requires_grad=True)
    out = mmfast.siglip_loss(xs, ys, st, bt, reduction=reduction, backend=backend)
    out.backward(torch.ones_like(out) if grad is None else grad.to(out.dtype))
    return out.detach(), xs.grad, ys.grad, st.grad, bt.grad
