"""Backend selection: every op lists its backends in one table (``Op``), this module picks one.

Every public op (``cross_attention``, ``info_nce``, ``siglip_loss`` and the contrastive block
primitives) has up to four backends, named in its own module's table (``mmfast/ops/<op>.py``):

* ``cuda``      hand-written CUDA kernels in ``mmfast._C`` (CUDA tensors)
* ``triton``    Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), imported
                the first time they are selected: importing mmfast never imports triton
* ``cpu``       C++ kernels in ``mmfast._C`` (CPU tensors)
* ``reference`` pure PyTorch, any device, any floating dtype

A backend declares what it supports and answers ``reasons(**inputs) -> list[str]`` (empty: it can
take them). ``backend="auto"`` walks the op's priority list for the inputs' device and picks the
first that is available and has no reasons; when none fits, the error lists every backend and its
reasons. An explicit backend that cannot take the inputs raises with its reasons: no silent
fallback. ``MMFAST_BACKEND`` sets the default for ``backend="auto"`` calls. This module imports no
op: the ops import it (no cycle).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmfast import _tuning

BACKENDS = ("cuda", "triton", "cpu", "reference")

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
        if not torch.cuda.is_available() and not triton_interpreting():
            return f"no GPU visible; {TRITON_CPU_RULE}"
        return _triton_import_error()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# --------------------------------------------------------------------------------------------
# Backend tables.
# --------------------------------------------------------------------------------------------


def no_reasons(**_: object) -> list[str]:
    return []


def _resolve(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """A callable, or "module:attribute" imported now (the triton backends load this way; a module
    already imported is looked up, which torch.compile can trace, unlike an import)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    mod = sys.modules.get(module)
    return getattr(mod if mod is not None else importlib.import_module(module), attr)


def preload(ops: tuple[Op, ...]) -> None:
    """Import the string-named backends (triton) of ``ops`` now when they can run on this machine
    (a GPU, or the interpreter): code that torch.compile traces can then look them up instead of
    importing them. On a machine where they cannot run, nothing is imported."""
    for op in ops:
        for name, b in op.backends.items():
            if isinstance(b.fn, str) and availability(name) is None:
                backend_reason(op, name)  # loads it, or records nothing: the reason shows on selection


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` is called with the op's normalized arguments; ``reasons`` returns why it cannot take
    them (empty list: it can). Either may be a "module:attribute" string, imported the first time
    the backend is selected. ``needs_ops`` names the ``torch.ops.mmfast`` custom ops it calls (a
    stale build without them makes it unavailable, with a reason). ``note`` is shown by
    ``mmfast.backends()``.
    """

    name: str
    fn: Callable[..., Any] | str
    reasons: Callable[..., list[str]] | str = no_reasons
    needs_ops: tuple[str, ...] = ()
    note: str | None = None

    def load(self) -> tuple[Callable[..., Any], Callable[..., list[str]]]:
        """(fn, reasons), importing them the first time."""
        return _load(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()[0](*args, **kwargs)


@functools.cache
def _load(b: Backend) -> tuple[Callable[..., Any], Callable[..., list[str]]]:
    return _resolve(b.fn), _resolve(b.reasons)


@dataclass(frozen=True)
class Op:
    """One op's backend table: ``backends`` by name, and the priority on CPU tensors (on CUDA
    tensors the order comes from the measured results in mmfast/_tuning.py)."""

    name: str
    backends: dict[str, Backend]
    cpu_order: tuple[str, ...] = ("cpu", "reference")

    def __post_init__(self) -> None:
        unknown = set(self.backends) - set(BACKENDS)
        if unknown or any(b.name != k for k, b in self.backends.items()):
            raise ValueError(f"op {self.name}: backend names must be keys from {BACKENDS}, got {list(self.backends)}")

    def __hash__(self) -> int:
        return hash(self.name)


def backend_reason(op: Op, name: str) -> str | None:
    """None when ``op``'s backend ``name`` can run on this machine, else why not."""
    b = op.backends.get(name)
    if b is None:
        return "not implemented for this op"
    why = availability(name)
    if why:
        return why
    if b.needs_ops and not has_ops(*b.needs_ops):
        return (
            f"this build of mmfast._C lacks the op's kernels (built from an older checkout?); rebuild it: {BUILD_HINT}"
        )
    if isinstance(b.fn, str):
        try:
            b.load()
        except Exception as e:  # noqa: BLE001 - a backend module that cannot load is unavailable, not fatal
            return f"{b.fn.partition(':')[0]} failed to import ({type(e).__name__}: {e})"
    return None


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


def _all_reasons(op: Op, name: str, device: torch.device, args: dict[str, Any]) -> list[str]:
    why = backend_reason(op, name)
    if why:
        return [why]
    return device_reasons(name, device) + list(op.backends[name].load()[1](**args))


def select(op: Op, backend: str, device: torch.device, args: dict[str, Any]) -> Backend:
    """The backend of ``op`` for inputs ``args`` (a dict passed to the reasons functions); call it
    with the op's arguments."""
    if backend == "auto":
        backend = default_backend()
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of auto, {', '.join(BACKENDS)}")
        reasons = _all_reasons(op, backend, device, args)
        if reasons:
            raise RuntimeError(f"mmfast.{op.name}: backend {backend!r} cannot take these inputs: " + "; ".join(reasons))
        return op.backends[backend]
    order = _tuning.cuda_order(op.name, device) if device.type == "cuda" else op.cpu_order
    if device.type not in ("cpu", "cuda"):
        order = ("reference",)
    report = []
    for name in order:
        reasons = _all_reasons(op, name, device, args)
        if not reasons:
            if name == "reference" and device.type == "cpu" and extension()[0] is None:
                _warn_reference_fallback()
            return op.backends[name]
        report.append(f"  {name}: " + "; ".join(reasons))
    raise RuntimeError(f"mmfast.{op.name}: no backend can take these inputs:\n" + "\n".join(report))


@functools.cache
def _warn_reference_fallback() -> None:
    """Once per process: auto picked the slow reference because the kernels are not built."""
    warnings.warn(f"mmfast runs its pure-PyTorch reference (slow): {extension()[1]}", stacklevel=4)


def report(ops: tuple[Op, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per op, each backend: ``{"available": bool, "reason": str | None, "note": str | None}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for op in sorted(ops, key=lambda o: o.name):
        row = {}
        for name in BACKENDS:
            b = op.backends.get(name)
            why = backend_reason(op, name)
            note = b.note if b else None
            if name == "cuda" and b is not None and not _tuning.cuda_verified(op.name):
                note = "CUDA kernels not yet verified on hardware; auto prefers triton on CUDA tensors"
            if name == "triton" and why is None and not torch.cuda.is_available():
                note = "interpreter only: CPU tensors through TRITON_INTERPRET=1, a test tool (no GPU visible)"
            row[name] = {"available": why is None, "reason": why, "note": note}
        out[op.name] = row
    return out
