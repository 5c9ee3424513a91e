"""Boundary checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast._dispatch import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x: object, ndim: int | None = None, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    return x


def check_same(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> None:
    first_name, first = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}")


def check_scalar(name: str, value: object, device: torch.device) -> Tensor | float:
    """A Python number, or a one-element tensor (returned as a 0-dim tensor on ``device``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got bool")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    return value.reshape(()).to(device)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_backend(backend: object) -> str:
    """A module's ``backend`` argument, checked when the module is built (not at its first call)."""
    if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend
