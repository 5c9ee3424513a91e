"""Edge inputs whose result docs/numerics.md defines (empty dimensions, NaN scales), run by
tests/test_numerics.py in a worker subprocess (tests/subproc.py): a backend that dies on one of
them (SIGFPE on an empty dimension) fails that case alone. Expected results are written out from
the policy, not taken from the reference backend, whose handling is under test too.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: triton runs on CPU tensors in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bad_input_cases import _attn64, feats, qkv  # noqa: E402
from subproc import Case, registrar  # noqa: E402

import mmfast  # noqa: E402

NAN = float("nan")
CPU_BACKENDS = ("cpu", "reference", "triton")
CASES: dict[str, Case] = {}


case = registrar(CASES)


# ---------------------------------------------------------------------------------------------
# cross_attention: legal edge input (the result per docs/numerics.md), on each backend
# ---------------------------------------------------------------------------------------------


def _empty_expected(B, Hq, Hkv, Lq, Lk, D, Dv):
    """out and lse of an empty-dimension case, per docs/numerics.md."""
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, Dv)
    if Lk == 0:
        out, lse = torch.zeros(B, Hq, Lq, Dv), torch.full((B, Hq, Lq), -math.inf)
    elif D == 0:  # every score 0: the mean of the values
        rep = Hq // max(Hkv, 1)
        out = v.double().mean(2, keepdim=True).repeat_interleave(rep, 1).expand(B, Hq, Lq, Dv)
        lse = torch.full((B, Hq, Lq), math.log(Lk))
    elif B * Hq * Lq == 0:
        out, lse = torch.zeros(B, Hq, Lq, Dv), torch.zeros(B, Hq, Lq)
    else:  # Dv == 0: the LSE is that of the scores
        out, lse = torch.zeros(B, Hq, Lq, 0), _attn64(q, k, torch.zeros(B, Hkv, Lk, 1))[1]
    return out, lse


def _empty_grads(shape, q, k, v):
    """dq, dk, dv for an upstream gradient of ones: zero, except D = 0 (out = mean of the values:
    dv = the number of query rows over Lk)."""
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    if D == 0 and Lk and Lq * Hq * B:
        grads[2] = torch.full_like(v, Lq * (Hq // Hkv) / Lk)
    return grads


def _empty_case(backend, shape):
    def fn():
        q, k, v = qkv(*shape, grad=True)
        out, lse = mmfast.cross_attention(q, k, v, return_lse=True, backend=backend)
        out.sum().backward()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (q, k, v)]
        return (out, lse, *grads), (*_empty_expected(*shape), *_empty_grads(shape, q, k, v))

    return fn


EMPTY_SHAPES = {  # B, Hq, Hkv, Lq, Lk, D, Dv
    "B=0": (0, 2, 1, 3, 5, 8, 8),
    "Hq=Hkv=0": (1, 0, 0, 3, 5, 8, 8),
    "Hq=0, Hkv=1": (1, 0, 1, 3, 5, 8, 8),
    "Lq=0": (1, 2, 1, 0, 5, 8, 8),
    "Lk=0": (1, 2, 1, 3, 0, 8, 8),
    "D=0": (1, 2, 1, 3, 5, 0, 8),
    "Dv=0": (1, 2, 1, 3, 5, 8, 0),
}


def _declines(backend: str, shape) -> bool:
    """Whether ``backend`` declares it does not take this shape (then an error naming the head dim
    is the right answer: the dispatcher's contract for an explicit backend)."""
    from mmfast.ops.cross_attention import OP  # noqa: PLC0415

    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    fn = OP.backends["cuda" if backend == "emulated" else backend].load()[1]
    return bool(fn(dtype=torch.float32, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv))


for _backend in CPU_BACKENDS:
    for _name, _shape in EMPTY_SHAPES.items():
        _defect = {"Lq=0": "1", "Lk=0": "13"}.get(_name, "")
        _names = ("head dim",) if _declines(_backend, _shape) else ()
        case(f"cross_attention[{_backend}]: {_name}", _names, result_ok=True, defect=_defect)(
            _empty_case(_backend, _shape)
        )


def _nan_scale(backend):
    def fn():
        q, k, v = qkv(B=2, Lq=3)
        pad = torch.zeros(2, 9, dtype=torch.bool)
        pad[1] = True  # batch item 1: every row fully masked
        out, lse = mmfast.cross_attention(q, k, v, key_padding_mask=pad, scale=NAN, return_lse=True, backend=backend)
        want_out = torch.full_like(out, NAN)
        want_out[1] = 0
        want_lse = torch.full_like(lse, NAN)
        want_lse[1] = -math.inf
        return (out, lse), (want_out, want_lse)

    return fn


for _backend in CPU_BACKENDS:
    case(f"cross_attention[{_backend}]: scale NaN", ("scale",), result_ok=True, defect="10")(_nan_scale(_backend))


def _info_nce64(x, y, s, direction="both", reduction="mean", labels=None):
    from mmfast import reference  # noqa: PLC0415

    return reference.info_nce(x.double(), y.double(), s, direction=direction, reduction=reduction, labels=labels)


def _loss_empty(backend, loss, N, M, D, reduction):
    """N = 0 / D = 0, per docs/numerics.md."""

    def fn():
        x, y = torch.randn(N, D, requires_grad=True), torch.randn(M, D, requires_grad=True)
        if loss == "siglip":
            got = mmfast.siglip_loss(x, y, 10.0, -3.0, reduction=reduction, backend=backend)
            # every logit is the bias -3: row i = -log sigmoid(-3) + (M - 1) * -log sigmoid(3)
            want_rows = torch.tensor([(M - 1) * math.log1p(math.exp(-3.0)) + math.log1p(math.exp(3.0))] * N)
        else:
            got = mmfast.info_nce(
                x, y, 10.0, reduction=reduction, direction="image" if M != N else "both", backend=backend
            )
            want_rows = torch.full((N,), math.log(M)) if N else torch.zeros(0)
        want = {
            "none": want_rows,
            "sum": want_rows.sum(),
            "mean": want_rows.mean() if loss == "info_nce" else want_rows.sum() / N if N else torch.tensor(NAN),
        }[reduction]
        got.sum().backward()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (x, y)]
        return (got.float(), *grads), (want.float(), torch.zeros_like(x), torch.zeros_like(y))

    return fn


for _backend in CPU_BACKENDS:
    for _loss in ("info_nce", "siglip"):
        for _red in ("none", "sum", "mean"):
            case(f"{_loss}[{_backend}]: N=0, {_red}", result_ok=True)(_loss_empty(_backend, _loss, 0, 0, 8, _red))
            case(f"{_loss}[{_backend}]: D=0, {_red}", result_ok=True)(_loss_empty(_backend, _loss, 5, 5, 0, _red))
    case(f"info_nce[{_backend}]: image N=0 over M=5, sum", result_ok=True)(
        _loss_empty(_backend, "info_nce", 0, 5, 8, "sum")
    )


def _nan_logit_scale(backend, loss):
    def fn():
        x, y = feats()
        if loss == "siglip":
            got = mmfast.siglip_loss(x, y, NAN, 0.0, reduction="none", backend=backend)
        else:
            got = mmfast.info_nce(x, y, torch.tensor(NAN), reduction="none", backend=backend)
        return got, torch.full((6,), NAN)

    return fn


for _backend in CPU_BACKENDS:
    for _loss in ("info_nce", "siglip"):
        case(f"{_loss}[{_backend}]: logit_scale NaN", ("logit_scale",), result_ok=True)(
            _nan_logit_scale(_backend, _loss)
        )


def _emulated_empty(shape):
    """The CUDA kernels under emulation, called as the cuda backend calls them (upstream of ones)."""

    def fn():
        from tests import emu_build  # noqa: PLC0415

        emu = emu_build.load_module(
            "cross_attention_emu", "emu/cross_attention_emu.cpp", extra_cflags=("-O2", "-std=c++20")
        )
        q, k, v = qkv(*shape)
        scale = 1.0 if shape[5] == 0 else shape[5] ** -0.5
        out, lse = emu.forward(q, k, v, None, None, False, scale, 0.0, 0)
        dq, dk, dv, _ = emu.backward(torch.ones_like(out), q, k, v, out, lse, None, None, False, scale, 0.0, 0, False)
        return (out, lse, dq, dk, dv), (*_empty_expected(*shape), *_empty_grads(shape, q, k, v))

    return fn


for _name, _shape in EMPTY_SHAPES.items():
    _names = ("head dim",) if _declines("emulated", _shape) else ()
    case(f"cross_attention[emulated]: {_name}", _names, result_ok=True)(_emulated_empty(_shape))
