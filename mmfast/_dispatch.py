"""Backend registry and selection.

Every public op (``cross_attention``, ``info_nce``, ``siglip_loss``) has up to four backends:

* ``cuda``      hand-written CUDA kernels in ``mmfast._C`` (CUDA tensors)
* ``triton``    Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)
* ``cpu``       C++ kernels in ``mmfast._C`` (CPU tensors)
* ``reference`` pure PyTorch, any device, any floating dtype

A backend declares what it supports and answers ``reasons(inputs) -> list[str]`` (empty: it can
take them). ``backend="auto"`` walks the op's priority list for the inputs' device and picks the
first that is available and has no reasons; when none fits, the error lists every backend and its
reasons. An explicit backend that cannot take the inputs raises with its reasons: no silent
fallback. ``MMFAST_BACKEND`` sets the default for ``backend="auto"`` calls.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mmfast import _tuning

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Priority per device type, best first. On CUDA tensors the order comes from the table of
# measured results in mmfast/_tuning.py (triton first until a GPU run has measured cuda).
DEFAULT_PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
}


# --------------------------------------------------------------------------------------------
# Availability of each backend on this machine (independent of inputs).
# --------------------------------------------------------------------------------------------


BUILD_HINT = (
    "build it in the repository: pip install -e . --no-build-isolation "
    "(or python setup.py build_ext --inplace; bash tools/setup.sh also installs the requirements)"
)


@functools.cache
def extension() -> tuple[Any, str | None]:
    """(mmfast._C or None, why it could not be loaded, with how to build it)."""
    try:
        spec = importlib.util.find_spec("mmfast._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, f"the C++ extension mmfast._C is not built; {BUILD_HINT}"
    try:
        from mmfast import _C  # noqa: PLC0415

        return _C, None
    except ImportError as e:  # import never fails because the extension is missing
        return None, f"mmfast._C ({spec.origin}) does not load ({e}); rebuild it for this torch: {BUILD_HINT}"


def has_ops(*names: str) -> bool:
    """True when mmfast._C is loaded and defines every ``torch.ops.mmfast.<name>`` (a stale build
    from an older checkout may lack some: its kernels are then left unregistered, not half-used)."""
    if extension()[0] is None:
        return False
    return all(hasattr(torch.ops.mmfast, n) for n in names)


TRITON_CPU_RULE = "triton takes CPU tensors only under TRITON_INTERPRET=1 (the interpreter: a test tool, slow)"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    try:
        import triton  # noqa: F401, PLC0415
        import triton.language  # noqa: F401, PLC0415
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton failed to import ({type(e).__name__}: {e})"
    return None


def availability(name: str) -> str | None:
    """None when backend ``name`` can run on this machine, else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        return extension()[1]
    if name == "cuda":
        ext, why = extension()
        if ext is None:
            return why
        if not getattr(ext, "with_cuda", False):
            return "extension built without CUDA (no matching CUDA toolkit at build time, or MMFAST_BUILD_CUDA=0)"
        if not torch.cuda.is_available():
            return "no GPU visible"
        return None
    if name == "triton":
        why = _triton_import_error()
        if why:
            return why
        if not torch.cuda.is_available() and not triton_interpreting():
            return f"no GPU visible; {TRITON_CPU_RULE}"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# --------------------------------------------------------------------------------------------
# Per-op registry.
# --------------------------------------------------------------------------------------------


@dataclass
class Backend:
    """One implementation of one op.

    ``fn`` is called with the op's normalized arguments; ``reasons`` returns why it cannot take
    them (empty list: it can). ``note`` is shown by ``mmfast.backends()`` (e.g. "not yet verified
    on hardware").
    """

    name: str
    fn: Callable[..., Any]
    reasons: Callable[..., list[str]]
    note: str | None = None


@dataclass
class Op:
    name: str
    backends: dict[str, Backend] = field(default_factory=dict)
    priority: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PRIORITY))


_OPS: dict[str, Op] = {}


def register(
    op: str, backend: str, fn: Callable[..., Any], reasons: Callable[..., list[str]], note: str | None = None
) -> None:
    """Register ``fn`` as backend ``backend`` of ``op`` (later registration replaces earlier)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _OPS.setdefault(op, Op(op)).backends[backend] = Backend(backend, fn, reasons, note)


def set_priority(op: str, device_type: str, order: tuple[str, ...]) -> None:
    _OPS.setdefault(op, Op(op)).priority[device_type] = tuple(order)


def default_backend() -> str:
    name = os.environ.get("MMFAST_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"MMFAST_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


def device_reasons(name: str, device: torch.device) -> list[str]:
    """Reasons tied to where the tensors live, shared by all ops."""
    if name == "cpu" and device.type != "cpu":
        return [f"cpu backend takes CPU tensors, got {device.type}"]
    if name == "cuda" and device.type != "cuda":
        return [f"cuda backend takes CUDA tensors, got {device.type}"]
    if name == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return [TRITON_CPU_RULE]
        if device.type not in ("cpu", "cuda"):
            return [f"triton backend takes CUDA tensors, got {device.type}"]
    return []


def _all_reasons(b: Backend, device: torch.device, args: dict[str, Any]) -> list[str]:
    why = availability(b.name)
    if why:
        return [why]
    return device_reasons(b.name, device) + list(b.reasons(**args))


def select(op: str, backend: str, device: torch.device, args: dict[str, Any]) -> Backend:
    """Pick the backend for ``op`` on inputs ``args`` (a dict passed to the reasons functions)."""
    entry = _OPS[op]
    if backend == "auto":
        backend = default_backend()
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of auto, {', '.join(BACKENDS)}")
        b = entry.backends.get(backend)
        if b is None:
            raise RuntimeError(f"mmfast.{op}: backend {backend!r} is unavailable: {unregistered_reason(backend)}")
        reasons = _all_reasons(b, device, args)
        if reasons:
            raise RuntimeError(f"mmfast.{op}: backend {backend!r} cannot take these inputs: " + "; ".join(reasons))
        return b
    if device.type == "cuda" and "cuda" not in entry.priority:
        order = _tuning.cuda_order(op, device)
    else:
        order = entry.priority.get(device.type, ("reference",))
    report = []
    for name in order:
        b = entry.backends.get(name)
        if b is None:
            report.append(f"  {name}: {unregistered_reason(name)}")
            continue
        reasons = _all_reasons(b, device, args)
        if not reasons:
            if name == "reference" and device.type == "cpu" and extension()[0] is None:
                _warn_reference_fallback()
            return b
        report.append(f"  {name}: " + "; ".join(reasons))
    raise RuntimeError(f"mmfast.{op}: no backend can take these inputs:\n" + "\n".join(report))


def unregistered_reason(name: str) -> str:
    """Why backend ``name`` has no implementation of an op registered here."""
    if name in ("cpu", "cuda"):
        ext, why = extension()
        if ext is None:
            return why or ""
        return (
            f"this build of mmfast._C lacks the op's kernels (built from an older checkout?); rebuild it: {BUILD_HINT}"
        )
    if name == "triton" and _triton_import_error():
        return _triton_import_error() or ""
    return "not implemented for this op"


@functools.cache
def _warn_reference_fallback() -> None:
    """Once per process: auto picked the slow reference because the kernels are not built."""
    warnings.warn(f"mmfast runs its pure-PyTorch reference (slow): {extension()[1]}", stacklevel=4)


def backends(pretty: bool = False) -> dict[str, dict[str, dict[str, Any]]] | str:
    """Per op, each backend: ``{"available": bool, "reason": str | None, "note": str | None}``.

    ``pretty=True`` returns a readable table instead (op x backend, why not, the CPU code paths):
    ``print(mmfast.backends(pretty=True))``, or ``python -m mmfast``.
    """
    _load_ops()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for op_name, entry in sorted(_OPS.items()):
        row = {}
        for name in BACKENDS:
            b = entry.backends.get(name)
            why = unregistered_reason(name) if b is None else availability(name)
            note = b.note if b else None
            if name == "cuda" and b is not None and not _tuning.cuda_verified(op_name):
                note = "CUDA kernels not yet verified on hardware; auto prefers triton on CUDA tensors"
            if name == "triton" and why is None and not torch.cuda.is_available():
                note = "interpreter only: CPU tensors through TRITON_INTERPRET=1, a test tool (no GPU visible)"
            row[name] = {"available": why is None, "reason": why, "note": note}
        out[op_name] = row
    if pretty:
        from mmfast._backends_table import backends_table  # noqa: PLC0415

        return backends_table(out, extension())
    return out


def _load_ops() -> None:
    import mmfast.ops  # noqa: F401, PLC0415 - registers every op's backends on import
