"""``swap_modules(model)``: replace every compatible ``nn.MultiheadAttention`` with ``mmfast.nn.CrossAttention``.

The replacement ADOPTS the old module's parameters (the same ``nn.Parameter`` objects, and its
``out_proj`` module), so weights, device, dtype, ``requires_grad``, weight tying and any optimizer
that already holds the parameters all carry over; train/eval state is copied. A module shared by
several parents is replaced once and stays shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from mmfast.nn.cross_attention import CrossAttention
from mmfast.ops._validate import check_backend

__all__ = ["SwapReport", "swap_modules"]


@dataclass
class SwapReport:
    """What ``swap_modules`` did: ``swapped`` and ``left`` map module names to a description / reason;
    ``notes`` holds caveats about swapped modules (e.g. a parent that may bypass them)."""

    swapped: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"mmfast.swap_modules: swapped {len(self.swapped)}, left {len(self.left)}"]
        lines += [f"  swapped {name or '<root>'}: {what}" for name, what in self.swapped.items()]
        lines += [f"  left    {name or '<root>'}: {why}" for name, why in self.left.items()]
        lines += [f"  note    {name or '<root>'}: {note}" for name, note in self.notes.items()]
        return "\n".join(lines)


def _why_not(mha: nn.Module) -> str | None:
    """None if ``mha`` can be replaced by a CrossAttention computing the same function."""
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return f"{type(mha).__name__} overrides nn.MultiheadAttention.forward"
    if mha.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(len(getattr(mha, h, {})) for h in hooks):
        return "has hooks registered on it (they would be lost)"
    if getattr(mha, "parametrizations", None) is not None:
        return "has parametrizations"
    if len({p.dtype for p in mha.parameters()}) > 1:
        dtypes = ", ".join(f"{n} {str(p.dtype).removeprefix('torch.')}" for n, p in mha.named_parameters())
        return f"parameters of mixed dtypes ({dtypes}); CrossAttention computes in one dtype"
    return None


def _adopt(mha: nn.MultiheadAttention, backend: str) -> CrossAttention:
    """A CrossAttention whose parameters ARE mha's (built on the meta device, then re-pointed)."""
    new = CrossAttention(
        mha.embed_dim,
        mha.num_heads,
        dropout=mha.dropout,
        bias=mha.in_proj_bias is not None,
        kdim=mha.kdim,
        vdim=mha.vdim,
        batch_first=mha.batch_first,
        device="meta",
        dtype=mha.out_proj.weight.dtype,
        backend=backend,
    )
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
        p = getattr(mha, name)
        if (p is None) != (getattr(new, name) is None):
            raise AssertionError(f"parameter layout mismatch on {name}")
        if p is not None:
            setattr(new, name, p)
    new.out_proj = mha.out_proj
    return new.train(mha.training)


def _parent_note(parent: nn.Module) -> str | None:
    if isinstance(parent, nn.TransformerEncoderLayer):
        return (
            f"parent {type(parent).__name__} may take torch's fused inference fast path (eval mode, no grad), "
            "which reads the weights directly and bypasses the swapped module; results are unchanged"
        )
    return None


def swap_modules(
    model: nn.Module,
    *,
    backend: str = "auto",
    filter: Callable[[str, nn.Module], bool] | None = None,  # noqa: A002 - the natural name here
) -> SwapReport:
    """Replace every compatible ``nn.MultiheadAttention`` in ``model`` (in place) with mmfast's CrossAttention.

    Args:
        model: any module; if it is itself an nn.MultiheadAttention it cannot be replaced in place
            (listed under ``left``: use ``CrossAttention.from_multihead_attention``).
        backend: mmfast backend the new modules use.
        filter: optional ``(qualified_name, module) -> bool``; modules it rejects are left.

    Returns:
        SwapReport with ``swapped`` / ``left`` (name -> what / why) and ``notes``. ``print(report)``
        gives a readable summary.

    Behaviour changes, documented: ``need_weights`` defaults to False in CrossAttention (pass
    ``need_weights=True`` where the weights are read), and fully masked query rows give 0, not NaN.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be a callable (name, module) -> bool or None, got {type(filter).__name__}")
    report = SwapReport()
    replaced: dict[int, CrossAttention] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # parent._modules, not named_children(): that de-duplicates, so a module held twice by one
        # parent (nn.ModuleList([a, a])) would be swapped in one slot only.
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
                report.swapped[name] = "shared module, replaced by the same CrossAttention"
                continue
            why = _why_not(child)
            if why is None and filter is not None and not filter(name, child):
                why = "rejected by filter"
            if why is not None:
                report.left[name] = why
                continue
            new = _adopt(child, backend)
            replaced[id(child)] = new
            setattr(parent, child_name, new)
            report.swapped[name] = (
                f"nn.MultiheadAttention(embed_dim={child.embed_dim}, num_heads={child.num_heads}, "
                f"batch_first={child.batch_first}) -> mmfast.nn.CrossAttention"
            )
            note = _parent_note(parent)
            if note:
                report.notes[name] = note
    if isinstance(model, nn.MultiheadAttention):
        report.left[""] = "the root module cannot be replaced in place; use CrossAttention.from_multihead_attention"
    return report
