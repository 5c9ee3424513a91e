"""Ring exchange of the contrastive losses across processes (``dist_impl="ring"`` of mmfast.nn's
``ClipLoss`` and ``SigLipLoss``): no process ever holds more than its own and one neighbour's
features, where the gather holds world_size x n.

Notation: W processes in the group, rank r holds image features x_r and text features y_r (n, D);
the global logits S = s X Yᵀ (Wn x Wn) are cut into blocks S_rb = s x_r y_bᵀ, never built.

ClipLoss (InfoNCE, both directions), two passes around the ring, each over W steps. At step k rank
r holds text block b = r - k (mod W), which arrived from its left neighbour during step k - 1:

    forward   block_forward(x_r, y_b) gives the block's row and column log-sum-exp; the rows'
              merge locally (logaddexp) into r's row LSE, the columns' travel with the block and
              merge at every rank, and reach b's owner after the last step. The text block is sent
              on to the right while the kernel runs on it (batch_isend_irecv): the transfer
              overlaps the compute. The positive logits are on the diagonal block (k = 0).
    backward  the blocks travel again with their final column LSE and loss weights; rank r
              accumulates dx_r from every block and adds its share of dy_b to an fp32 accumulator
              that travels with block b and reaches b's owner after the last step.

Results equal ``gather_with_grad=True`` (every rank's loss sends gradients to every rank's
features), with loss weights from the upstream gradients g_r of each rank's loss:

    local_loss=False  L = the global loss (every rank); features get (Σ_r g_r) dL/d(features),
                      logit_scale g_r dL/ds (an all_reduce of the per-rank partial sums).
    local_loss=True   L_r = rows and columns of rank r only; row i of rank r weighs g_r / (2n) in
                      every block it meets, and d(scale) on rank r is its rows' terms plus its
                      columns' terms (the latter travel back with its text block).

SigLipLoss: open_clip's neighbour exchange: rank r's loss is its own block (positives on the
diagonal) plus the negatives of every other rank's texts, which travel the ring; in the backward
the text blocks travel again and carry back their gradient accumulators.

Failures: every call first checks that all ranks pass the same n, D and dtype (a clear error on
every rank instead of a hang); a failed exchange raises naming the neighbour it was with, within
the process group's timeout when that neighbour hangs (at once when it died).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmfast.ops import contrastive as C

__all__ = ["check_peers", "ring_clip_loss", "ring_siglip_loss", "siglip_negatives"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_peers(x: Tensor, y: Tensor, group: Any, what: str) -> None:
    """All ranks pass image and text features of the same shape and dtype, or every rank raises."""
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    mine = torch.tensor([x.shape[0], x.shape[1], y.shape[0], y.shape[1], code], device=x.device)
    world = dist.get_world_size(group)
    seen = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(seen, mine, group=group)
    seen = [tuple(int(v) for v in t.tolist()) for t in seen]
    if len(set(seen)) > 1:
        shapes = ", ".join(f"rank {r}: image {s[:2]}, text {s[2:4]}, {_dtype_name(s[4])}" for r, s in enumerate(seen))
        raise ValueError(f"{what}: every rank must pass features of the same shape and dtype; got {shapes}")


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "an unsupported dtype"


class _Ring:
    """The two neighbours of ``rank`` in ``group``: sends go right (rank + 1), receives come from the
    left (rank - 1). Each exchange is one batch_isend_irecv; failures name the neighbour."""

    def __init__(self, group: Any, what: str) -> None:
        self.group, self.what = group, what
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.right, self.left = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def post(self, send: list[Tensor], recv: list[Tensor], tag: int) -> list[tuple[Any, str, list[Tensor]]]:
        """Start the sends (to the right) and receives (from the left); message i has tag + i. The
        pending list holds the tensors until ``wait``: a buffer in flight is never freed."""
        ops = [
            dist.P2POp(dist.isend, t, group=self.group, group_peer=self.right, tag=tag + i) for i, t in enumerate(send)
        ]
        ops += [
            dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.left, tag=tag + i) for i, t in enumerate(recv)
        ]
        if not ops:
            return []
        peers = [f"send to rank {self._global(self.right)}"] * len(send)
        peers += [f"receive from rank {self._global(self.left)}"] * len(recv)
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):  # one coalesced work (NCCL): name both neighbours
            peers = [" / ".join(dict.fromkeys(peers))] * len(works)
        return [(w, p, send + recv) for w, p in zip(works, peers)]

    def wait(self, pending: list[tuple[Any, str, list[Tensor]]], step: int) -> None:
        for work, peer, _tensors in pending:
            try:
                work.wait()
            except RuntimeError as e:  # a neighbour died (connection closed) or hung (timeout)
                raise RuntimeError(f"{self.what}: ring exchange failed at step {step} ({peer}): {e}") from e

    def _global(self, peer: int) -> int:
        return dist.get_global_rank(self.group, peer) if self.group is not None else peer


def _spares(packet: list[Tensor], world: int) -> list[list[Tensor]]:
    """Receive buffers for the blocks that travel: two used in turn (the block in hand is sent while
    the next arrives), never the caller's tensors, which autograd keeps; one suffices for 2 ranks."""
    return [[torch.empty_like(t) for t in packet] for _ in range(min(2, world - 1))]


def _diag(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


# --------------------------------------------------------------------------------------------
# ClipLoss
# --------------------------------------------------------------------------------------------


def _clip_forward(ring: _Ring, x: Tensor, y: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(row_lse (n,) of rank r's images, col_lse (n,) of its texts, positive logits (n,))."""
    n, W = x.shape[0], ring.world
    cur, spare = y, _spares([y], W)
    row_lse = target = None
    col_in = None  # the block in hand's column LSE over the ranks before this one
    pending_send: list = []
    for k in range(W):
        b = (ring.rank - k) % W
        works = []
        if k > 0:  # the left sent block b's column LSE at the end of its step k - 1: receive it first
            col_in = torch.empty(n, device=x.device, dtype=row_lse.dtype)
            works += ring.post([], [col_in], tag=20)
        if k < W - 1:  # the text block on to the right while the kernel runs on it
            nxt = spare[k % 2][0]
            works += ring.post([cur], [nxt], tag=10)
        labels = _diag(n, x.device) if b == ring.rank else None
        row, col, tgt = C.block_forward(x, cur, scale, labels=labels, backend=backend)
        row_lse = row if row_lse is None else C.merge_lse(row_lse, row)
        if b == ring.rank:
            target = tgt
        ring.wait(works + pending_send, k)
        col_acc = col if col_in is None else C.merge_lse(col_in, col)
        pending_send = ring.post([col_acc], [], tag=20)  # to the next rank, or (k = W - 1) to b's owner
        if k < W - 1:
            cur = nxt
    col_lse = torch.empty_like(row_lse)
    ring.wait(ring.post([], [col_lse], tag=20) + pending_send, W)
    return row_lse, col_lse, target


def _clip_backward(
    ring: _Ring, x: Tensor, y: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, w_img: Tensor,
    w_txt: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dy) fp32 of rank r's features, and d(scale) of rank r's row terms and of its column terms
    (summed over every block each meets). w_img (n,): weights of r's image rows, w_txt (n,): of its
    texts; the texts' travel with their block."""
    n, W = x.shape[0], ring.world
    packet = [y, col_lse, w_txt]  # the text block in hand, its column LSE and weights (constant)
    spare = _spares(packet, W)
    dx = ds_rows = None
    acc_in = pending_send = []
    for k in range(W):
        b = (ring.rank - k) % W
        works = []
        if k > 0:  # the accumulators of block b (dy, the column terms' d(scale)), sent before the packet
            acc_in = [torch.empty(n, x.shape[1], **_like(dx)), torch.empty(1, **_like(dx))]
            works += ring.post([], acc_in, tag=40)
        if k < W - 1:
            nxt = spare[k % 2]
            works += ring.post(packet, nxt, tag=30)
        labels = _diag(n, x.device) if b == ring.rank else None
        dxb, dyb, dsb, _ = C.block_backward(
            x, packet[0], scale, labels=labels, row_lse=row_lse, col_lse=packet[1], row_weight=w_img,
            col_weight=packet[2], backend=backend,
        )  # fmt: skip
        dx = dxb if dx is None else dx.add_(dxb)
        ds_rows = dsb[0] if ds_rows is None else ds_rows + dsb[0]
        del dxb  # before the next block's kernel allocates its own
        ring.wait(works + pending_send, k)
        acc = [dyb, dsb[1:]] if k == 0 else [acc_in[0].add_(dyb), acc_in[1].add_(dsb[1:])]
        del dyb
        pending_send = ring.post(acc, [], tag=40)
        if k < W - 1:
            packet = nxt
    own = [torch.empty_like(dx), torch.empty(1, **_like(dx))]
    ring.wait(ring.post([], own, tag=40) + pending_send, W)
    return dx, own[0], ds_rows, own[1][0]


def _like(t: Tensor) -> dict:
    return dict(device=t.device, dtype=t.dtype)


class _RingClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, local_loss: bool, ring: _Ring, backend: str) -> Tensor:
        row_lse, col_lse, target = _clip_forward(ring, x, y, scale.detach(), backend)
        total = ((row_lse - target) + (col_lse - target)).sum()
        n, W = x.shape[0], ring.world
        if not local_loss:
            dist.all_reduce(total, group=ring.group)
        ctx.save_for_backward(x, y, scale, row_lse, col_lse)
        ctx.local_loss, ctx.ring, ctx.backend = local_loss, ring, backend
        return total / (2 * n * (1 if local_loss else W))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        ring, n, W = ctx.ring, x.shape[0], ctx.ring.world
        g = grad.detach().to(row_lse.dtype).reshape(())
        if ctx.local_loss:  # rank r's rows and columns, weighted by its own loss's gradient
            c, w = g, g / (2 * n)
        else:  # every rank's loss is the global one: their gradients add up
            c = g.clone()
            dist.all_reduce(c, group=ring.group)
            # weights c / (2Wn) when c is usable, so the kernels' one rounding gives the gradient;
            # else unit weights, scaled after (d(scale) needs dL/ds itself, not c times it)
            usable = bool(torch.isfinite(c) & (c != 0))
            w = (c if usable else torch.ones_like(c)) / (2 * n * W)
        wv = w.expand(n).contiguous()
        dx, dy, ds_rows, ds_cols = _clip_backward(ring, x, y, scale.detach(), row_lse, col_lse, wv, wv, ctx.backend)
        ds = ds_rows + ds_cols
        if not ctx.local_loss:  # dL/ds of the global loss: every rank's blocks, then this rank's share
            dist.all_reduce(ds, group=ring.group)
            ds = g * ds / (c if usable else 1.0)
            if not usable:
                dx, dy = dx * c, dy * c
        dscale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), dy.to(y.dtype), dscale, None, None, None


def ring_clip_loss(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, *, local_loss: bool, group: Any, backend: str
) -> Tensor:
    """ClipLoss over all ranks of ``group`` by ring exchange; see the module docstring."""
    ring = _Ring(group, "mmfast.nn.ClipLoss(dist_impl='ring')")
    scale = _scale_tensor(logit_scale, x)
    return _RingClip.apply(x.contiguous(), y.contiguous(), scale, local_loss, ring, backend)


def _scale_tensor(v: Tensor | float, x: Tensor) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(v, Tensor):
        return v.reshape(()).to(device=x.device)
    return torch.tensor(float(v), device=x.device, dtype=acc)


# --------------------------------------------------------------------------------------------
# SigLipLoss
# --------------------------------------------------------------------------------------------


def _siglip_forward(ring: _Ring, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    """Σ over every text block of rank r's image rows' losses (positives on its own block)."""
    n, W = x.shape[0], ring.world
    cur, spare = y, _spares([y], W)
    total = None
    for k in range(W):
        b = (ring.rank - k) % W
        nxt = spare[k % 2][0] if k < W - 1 else None
        works = ring.post([cur], [nxt], tag=50) if k < W - 1 else []
        labels = _diag(n, x.device) if b == ring.rank else None
        rows, _, _ = C.block_forward(x, cur, scale, bias, labels=labels, loss="siglip", backend=backend)
        total = rows.sum() if total is None else total + rows.sum()
        ring.wait(works, k)
        cur = nxt
    return total


def _siglip_backward(
    ring: _Ring, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, w: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy) fp32 of rank r's features, d(scale), d(bias) of rank r's loss."""
    n, W = x.shape[0], ring.world
    cur, spare = y, _spares([y], W)
    dx = ds = db = None
    acc_in = pending_send = []
    for k in range(W):
        b = (ring.rank - k) % W
        works = []
        if k > 0:  # block b's dy accumulator, sent by the left before the next block
            acc_in = [torch.empty(n, x.shape[1], **_like(dx))]
            works += ring.post([], acc_in, tag=70)
        if k < W - 1:
            nxt = spare[k % 2][0]
            works += ring.post([cur], [nxt], tag=60)
        labels = _diag(n, x.device) if b == ring.rank else None
        dxb, dyb, dsb, dbb = C.block_backward(
            x, cur, scale, bias, labels=labels, row_weight=w, loss="siglip", backend=backend
        )
        dx, ds, db = (dxb, dsb[0], dbb) if dx is None else (dx.add_(dxb), ds + dsb[0], db + dbb)
        del dxb
        ring.wait(works + pending_send, k)
        pending_send = ring.post([dyb if k == 0 else acc_in[0].add_(dyb)], [], tag=70)
        del dyb
        if k < W - 1:
            cur = nxt
    own = [torch.empty_like(dx)]
    ring.wait(ring.post([], own, tag=70) + pending_send, W)
    return dx, own[0], ds, db


class _RingSigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, ring: _Ring, backend: str) -> Tensor:
        total = _siglip_forward(ring, x, y, scale.detach(), bias.detach(), backend)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.ring, ctx.backend = ring, backend
        return total / x.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, y, scale, bias = ctx.saved_tensors
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = (grad.detach().to(acc) / x.shape[0]).reshape(()).expand(x.shape[0]).contiguous()
        dx, dy, ds, db = _siglip_backward(ctx.ring, x, y, scale.detach(), bias.detach(), w, ctx.backend)
        dscale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        dbias = db.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None
        return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias, None, None


def ring_siglip_loss(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *, group: Any, backend: str
) -> Tensor:
    """SigLipLoss over all ranks of ``group`` by ring exchange; see the module docstring."""
    ring = _Ring(group, "mmfast.nn.SigLipLoss(dist_impl='ring')")
    scale, bias = _scale_tensor(logit_scale, x), _scale_tensor(logit_bias, x)
    return _RingSigLip.apply(x.contiguous(), y.contiguous(), scale, bias, ring, backend)


class _SigLipNegatives(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
        rows, _, _ = C.block_forward(x, y, scale.detach(), bias.detach(), loss="siglip", backend=backend)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.backend = backend
        return rows.sum() / x.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, y, scale, bias = ctx.saved_tensors
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = (grad.detach().to(acc) / x.shape[0]).reshape(()).expand(x.shape[0]).contiguous()
        dx, dy, ds, db = C.block_backward(
            x, y, scale.detach(), bias.detach(), row_weight=w, loss="siglip", backend=ctx.backend
        )
        dscale = ds[0].to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        dbias = db.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None
        return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias, None


def siglip_negatives(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *, backend: str = "auto"
) -> Tensor:
    """-(1/n) Σ_ij log σ(-(s x_i·y_j + b)): a block of only negative pairs (another rank's texts), as
    a differentiable loss on the fused block kernels (no cancellation against the positives' form)."""
    scale, bias = _scale_tensor(logit_scale, x), _scale_tensor(logit_bias, x)
    return _SigLipNegatives.apply(x, y, scale, bias, backend)
