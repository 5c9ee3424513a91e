"""The differentiable ``out=`` path of cross_attention, for every backend whose kernel can write into
a caller's buffer (cpu, cuda, triton): one pair of autograd Functions, parameterised by the
backend's forward-into and backward.

``out`` (any strides, e.g. a slice of an attention-fusion buffer) is written in place and marked
dirty, so no copy is made and autograd's view bookkeeping keeps the rest of the buffer's history.
The old contents of ``out`` were overwritten: they get a zero gradient. The LSE leaves the first
Function through a box (CopySlices wants the modified view as the only output) and gets its own
gradient path from the second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

GradTuple = tuple[Tensor, Tensor, Tensor, Tensor | None]


@dataclass(frozen=True)
class IntoCall:
    """One call's kernels, with its settings (causal, scale, dropout seed, ...) bound in:

    * ``forward_out(q, k, v, key_padding_mask, attn_mask, out) -> lse`` writes the attention into out;
    * ``backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, attn_mask, mask_grad)
      -> (dq, dk, dv, d attn_mask or None)``; grad_out or grad_lse may be None (not used).
    """

    forward_out: Callable[..., Tensor]
    backward: Callable[..., GradTuple]


def _mask_grad(ctx, mask: Tensor | None, index: int) -> bool:
    return mask is not None and mask.is_floating_point() and bool(ctx.needs_input_grad[index])


class _IntoOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, q, k, v, mask, kpm, call, lse_box):
        lse = call.forward_out(q, k, v, kpm, mask, out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(q, k, v, out, lse, kpm, mask)
        ctx.call = call
        lse_box.append(lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, kpm, mask = ctx.saved_tensors
        dq, dk, dv, dmask = ctx.call.backward(grad_out, None, q, k, v, out, lse, kpm, mask, _mask_grad(ctx, mask, 4))
        # A zero gradient for the overwritten contents (None would make autograd drop the gradient of
        # the whole buffer ``out`` is a view of, e.g. the text half of a fusion buffer).
        return torch.zeros_like(grad_out), dq, dk, dv, dmask, None, None, None


class _LseOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, lse, kpm, call):
        ctx.save_for_backward(q, k, v, lse, kpm, mask)
        ctx.call = call
        return lse.clone()

    @staticmethod
    def backward(ctx, grad_lse):
        q, k, v, lse, kpm, mask = ctx.saved_tensors
        dq, dk, dv, dmask = ctx.call.backward(None, grad_lse, q, k, v, None, lse, kpm, mask, _mask_grad(ctx, mask, 3))
        return dq, dk, dv, dmask, None, None, None


def attention_into(
    out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    call: IntoCall,
) -> tuple[Tensor, Tensor]:
    """(out written in place, lse), both differentiable when gradients are enabled."""
    mask_needs = attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad
    if not (torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v, out)) or mask_needs)):
        return out, call.forward_out(q, k, v, key_padding_mask, attn_mask, out)
    box: list[Tensor] = []
    o = _IntoOut.apply(out, q, k, v, attn_mask, key_padding_mask, call, box)
    return o, _LseOf.apply(q, k, v, attn_mask, box[0], key_padding_mask, call)
