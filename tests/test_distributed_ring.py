"""dist_impl="ring" of ClipLoss / SigLipLoss on gloo (loopback), world sizes 2, 3 and 4.

One spawn per world size runs every case in one process group: fp32 and bf16; ClipLoss with
local_loss False and True (its labels offset by rank), SigLipLoss. Each rank checks, on its own
features, the loss and the gradients of its features, logit_scale and logit_bias: ring against
gather (gather_with_grad=True) and both against a float64 single-process evaluation of the global
loss (every rank regenerates all ranks' features from one seed). Each rank's loss gets its own
upstream gradient (1 + rank / 2), so the ring's loss weights are tested, not only their sum.

Failures: mismatched local batch sizes, D or dtypes raise a clear ValueError on every rank (the
group stays usable); a rank that dies makes the others raise within the process group's timeout
naming a neighbour; a rank that hangs, likewise once the timeout expires. Every spawn is bounded.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist_utils import free_port, spawn_bounded

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

DEADLINE_S = 150
N, D = 6, 16
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}  # relative to each quantity's largest value


def _spawn(worker: str, world: int, *args, deadline_s: float = DEADLINE_S, expect: dict | None = None) -> None:
    """Run worker(rank, world, port, *args) in ``world`` processes (tests/dist_utils.py)."""
    spawn_bounded(_entry, world, (worker, world, free_port(), *args), deadline_s, worker, expect)


def _init(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def _entry(rank: int, worker: str, *args) -> None:
    """A worker's body by name (spawn_bounded ends the process: 0 on return, 1 on an exception). A
    rank that caught a broken ring returns without touching the group again."""
    globals()[worker](rank, *args)


# ---------------------------------------------------------------------------------------------
# Ring vs gather vs float64.
# ---------------------------------------------------------------------------------------------
def _global_features(world: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = F.normalize(torch.randn(world * N, D, generator=gen, dtype=torch.float64), dim=-1)
    Y = F.normalize(torch.randn(world * N, D, generator=gen, dtype=torch.float64), dim=-1)
    return X, Y


def _float64_expectation(kind: str, X, Y, rank: int, world: int, dtype):
    """(loss on this rank, grad of its x, grad of its y, grad of logit_scale[, bias]) in float64,
    from the features as this dtype rounds them; rank r's loss has upstream gradient 1 + r / 2."""
    from mmfast import reference as ref  # noqa: PLC0415

    X = X.to(dtype).double().requires_grad_()
    Y = Y.to(dtype).double().requires_grad_()
    log_s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    losses = []
    for r in range(world):
        rows = slice(r * N, (r + 1) * N)
        lab = torch.arange(N) + r * N
        s = log_s.exp()
        if kind == "clip-global":
            losses.append(ref.info_nce(X, Y, s))
        elif kind == "clip-local":
            img = ref.info_nce(X[rows], Y, s, labels=lab, direction="image")
            txt = ref.info_nce(X, Y[rows], s, labels=lab, direction="text")
            losses.append(0.5 * (img + txt))
        else:
            losses.append(ref.siglip_loss(X[rows], Y, s, b, labels=lab, reduction="sum") / N)
    total = sum((1 + 0.5 * r) * loss for r, loss in enumerate(losses))
    gX, gY = torch.autograd.grad(total, (X, Y), retain_graph=True)
    own = (1 + 0.5 * rank) * losses[rank]
    gs, gb = torch.autograd.grad(own, (log_s, b), allow_unused=True)
    rows = slice(rank * N, (rank + 1) * N)
    out = [losses[rank].detach(), gX[rows], gY[rows], gs]
    return out + ([gb] if kind == "siglip" else [])


def _run_module(kind: str, impl: str, x0, y0, rank: int, world: int):
    from mmfast.nn import ClipLoss, SigLipLoss  # noqa: PLC0415

    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    log_s = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(-3.0, requires_grad=True)
    if kind == "siglip":
        loss = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(x, y, log_s.exp(), b)
    else:
        fn = ClipLoss(
            local_loss=kind == "clip-local", gather_with_grad=True, rank=rank, world_size=world, dist_impl=impl
        )
        loss = fn(x, y, log_s.exp())
    (loss * (1 + 0.5 * rank)).backward()
    out = [loss.detach(), x.grad, y.grad, log_s.grad]
    return out + ([b.grad] if kind == "siglip" else [])


def _compare(got, want, dtype, tag: str) -> None:
    names = ("loss", "grad image", "grad text", "grad logit_scale", "grad logit_bias")
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype, tag
    for name, g, w in zip(names, got, want):
        scale = max(float(w.abs().max()), 1e-3)
        torch.testing.assert_close(
            g.double(), w.double(), atol=TOL[dtype] * scale, rtol=TOL[dtype], msg=lambda m, nm=name: f"{tag} {nm}: {m}"
        )


def _equality_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    for dtype in (torch.float32, torch.bfloat16):
        X, Y = _global_features(world, seed=1234 + world)
        x0, y0 = (t[rank * N : (rank + 1) * N].to(dtype) for t in (X, Y))
        for kind in ("clip-global", "clip-local", "siglip"):
            tag = f"world {world} rank {rank} {dtype} {kind}"
            want = _float64_expectation(kind, X, Y, rank, world, dtype)
            gather = _run_module(kind, "gather", x0, y0, rank, world)
            ring = _run_module(kind, "ring", x0, y0, rank, world)
            _compare(ring, want, dtype, f"{tag}: ring vs float64")
            _compare(gather, want, dtype, f"{tag}: gather vs float64")
            _compare(ring, [g.double() for g in gather], dtype, f"{tag}: ring vs gather")
    if world == 2:
        _mismatch_cases(rank, world)


def _mismatch_cases(rank: int, world: int) -> None:
    """Every rank raises the same clear ValueError; the group is still usable afterwards."""
    from mmfast.nn import ClipLoss, SigLipLoss  # noqa: PLC0415

    cases = {
        "batch": (N + rank, D, torch.float32),
        "D": (N, D + rank, torch.float32),
        "dtype": (N, D, torch.float32 if rank == 0 else torch.bfloat16),
    }
    losses = [
        lambda: ClipLoss(gather_with_grad=True, rank=rank, world_size=world, dist_impl="ring"),
        lambda: ClipLoss(local_loss=True, rank=rank, world_size=world),
        lambda: SigLipLoss(rank=rank, world_size=world, dist_impl="ring"),
        lambda: SigLipLoss(rank=rank, world_size=world, dist_impl="gather"),
    ]
    for what, (n, d, dtype) in cases.items():
        for make in losses:
            fn = make()
            x, y = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
            args = (x, y, 10.0, -10.0) if isinstance(fn, SigLipLoss) else (x, y, 10.0)
            try:
                fn(*args)
            except ValueError as e:
                assert "every rank must pass features of the same shape and dtype" in str(e), e
                assert "rank 0" in str(e) and "rank 1" in str(e), e
            else:
                raise AssertionError(f"{what} mismatch did not raise on rank {rank}")
    t = torch.ones(1)
    dist.all_reduce(t)
    assert float(t) == world


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_equals_gather_and_float64(world):
    _spawn("_equality_worker", world)


# ---------------------------------------------------------------------------------------------
# A rank that dies or hangs inside the ring.
# ---------------------------------------------------------------------------------------------
def _failure_worker(rank: int, world: int, port: int, mode: str, victim: int, timeout_s: float) -> None:
    _init(rank, world, port, timeout_s)
    import mmfast.nn.contrastive_ring as ring_mod  # noqa: PLC0415
    from mmfast.nn import ClipLoss  # noqa: PLC0415

    if rank == victim:
        real, calls = ring_mod.C.block_forward, []

        def failing(*args, **kw):
            calls.append(1)
            if len(calls) == 2:  # inside the ring, after the first exchange has started
                if mode == "dies":
                    os._exit(17)
                time.sleep(10 * timeout_s)
            return real(*args, **kw)

        ring_mod.C.block_forward = failing
    x = F.normalize(torch.randn(N, D), dim=-1)
    y = F.normalize(torch.randn(N, D), dim=-1)
    loss_fn = ClipLoss(gather_with_grad=True, rank=rank, world_size=world, dist_impl="ring")
    start = time.monotonic()
    try:
        loss_fn(x, y, 10.0)
    except RuntimeError as e:
        elapsed = time.monotonic() - start
        msg = str(e)
        assert "ClipLoss(dist_impl='ring'): ring exchange failed" in msg and "rank " in msg, msg
        assert elapsed < timeout_s + 10, f"rank {rank} took {elapsed:.1f} s to fail"
        if mode == "hangs":  # the neighbour that hung is named
            assert f"rank {victim}" in msg, msg
        return
    raise AssertionError(f"rank {rank} finished a ring with a {'dead' if mode == 'dies' else 'hung'} peer")


def test_dead_rank_fails_the_others_naming_the_peer():
    _spawn("_failure_worker", 3, "dies", 2, 20.0, deadline_s=90, expect={2: 17})


def test_hung_rank_fails_the_others_after_the_timeout():
    # rank 1 never exits by itself: it is terminated when rank 0 is done (its exit code is then -15)
    _spawn_hung()


def _spawn_hung() -> None:
    """Rank 0 must raise its timeout error and exit 0 within 90 s; the hung rank is terminated."""
    spawn_bounded(_entry, 2, ("_failure_worker", 2, free_port(), "hangs", 1, 5.0), 90, "hung-peer test", wait_for=(0,))
