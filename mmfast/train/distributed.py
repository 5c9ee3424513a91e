"""Process layout for training: torch.distributed under torchrun (or SLURM), DDP or FSDP2.

``init_distributed`` reads the launcher's environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK,
or SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with MASTER_ADDR / MASTER_PORT set) and
starts a process group: NCCL on GPUs, gloo on CPUs. One process without a launcher is world 1 and
starts no group.

The towers are wrapped separately (``wrap_towers``): each in its own DDP (so GradCache can sync each
on its last replayed chunk) or, with ``--fsdp``, sharded with FSDP2 (``fully_shard`` on every
block of a tower's ModuleLists, then on the tower). The head (logit scale / bias) stays outside
both: its gradient is averaged over ranks explicitly (``average_gradients``), as DDP would.

A launched process ends with ``finish_process``: once its body has torn the group down, it leaves
with ``os._exit`` instead of finalizing the interpreter (why: ``exit_process``).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Dist",
    "average_gradients",
    "exit_process",
    "finish_process",
    "init_distributed",
    "launcher_world_size",
    "mean_over_ranks",
    "wrap_towers",
]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name) not in (None, ""):
            return int(os.environ[name])
    return None


def launcher_world_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Join the launcher's process group (if any) and pick this process's device.

    Args:
        device: "auto" (CUDA when visible, else CPU), "cpu" or "cuda".
        timeout_s: the process group's timeout (a peer that dies makes the others fail after it).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    world = launcher_world_size()
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(f"world size {world} but MASTER_ADDR / MASTER_PORT are not set (launch with torchrun)")
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": dev} if use_cuda else {}),
        )
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _shard_blocks(tower: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    for module in list(tower.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(tower)


def wrap_towers(image_tower: nn.Module, text_tower: nn.Module, d: Dist, *, fsdp: bool) -> tuple[nn.Module, nn.Module]:
    """The modules GradCache should call: DDP wrappers, FSDP2-sharded towers (in place), or the
    towers themselves on one process."""
    if d.world_size == 1:
        return image_tower, text_tower
    if fsdp:
        _shard_blocks(image_tower)
        _shard_blocks(text_tower)
        return image_tower, text_tower
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    ids = [d.device.index] if d.device.type == "cuda" else None
    # broadcast_buffers off: the towers' buffers (position ids, pixel mean/std) are constants
    return tuple(DDP(t, device_ids=ids, broadcast_buffers=False) for t in (image_tower, text_tower))  # type: ignore[return-value]


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """grad <- mean over ranks of grad, for parameters outside DDP/FSDP (the head)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def mean_over_ranks(x: Tensor, world_size: int) -> Tensor:
    """The mean of a tensor over ranks (a copy; the input is unchanged)."""
    x = x.detach().clone()
    if world_size > 1:
        dist.all_reduce(x)
        x /= world_size
    return x


def exit_process(code: int = 0) -> NoReturn:
    """Flush stdio and logging, then leave with ``os._exit(code)``, skipping interpreter finalization.

    Why a process that used a gloo group must not finalize: when a synchronous collective returns,
    gloo's worker thread still holds the finished work, and with it the collective's tensors, for a
    moment; dropping them frees their Python objects, which takes the GIL. If the main thread has
    meanwhile reached interpreter finalization, CPython ends the worker thread with pthread_exit,
    whose unwinding through gloo's loop calls std::terminate: a rank that finished everything dies
    with SIGABRT ("terminate called without an active exception"), the more often the busier the
    machine. A barrier does not close that window (the worker may still hold the barrier's
    predecessor), and ``destroy_process_group`` joins gloo's threads only when nothing else holds the
    group, which torch does not guarantee (``torch.distributed.nn`` imported after
    ``init_process_group`` keeps it as default arguments; FSDP2's DTensor caches keep its mesh).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken stream: nothing more can be said
            pass
    os._exit(code)


def _exit_code(e: SystemExit) -> int:
    """The status ``sys.exit(e.code)`` would give, printing a message code as Python does."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def finish_process(fn: Callable[[], object]) -> NoReturn:
    """Run ``fn()`` as a launched process's whole body, then leave through ``exit_process``: status 0
    when it returns, 1 (after printing the traceback) when it raises, a ``SystemExit``'s own code.
    ``fn`` tears its process group down itself (``cli.main`` does: a barrier, then
    ``destroy_process_group``), so a rank that caught a broken group can still leave at once."""
    try:
        fn()
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - reported through the traceback and the exit status
        traceback.print_exc()
        code = 1
    exit_process(code)
