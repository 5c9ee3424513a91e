"""Training checkpoints: everything a bit-identical continuation needs, in one file.

``OUT/checkpoints/step_%08d.pt`` holds the full (unsharded) model and optimizer state, the LR
scheduler's, the step, every rank's RNG states, the model spec and tokenizer spec (so
``python -m mmfast.train eval --checkpoint FILE`` rebuilds the model without the training
command) and the training arguments. Written by rank 0 to a temporary name and renamed, so a crash
never leaves a truncated "latest". FSDP2-sharded models are gathered with
``torch.distributed.checkpoint.state_dict`` (full state dicts, on CPU) and scattered back on load.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mmfast.train.distributed import Dist

__all__ = ["latest_checkpoint", "load_checkpoint", "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """This process's generators: torch CPU (and CUDA), numpy's global, Python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_states(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: PLC0415

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(
    out_dir: str,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    d: Dist,
    fsdp: bool,
    extra: dict[str, Any],
    keep: int = 0,
) -> str:
    """Write ``out_dir/checkpoints/step_%08d.pt`` (collective: every rank must call it).

    Args:
        extra: stored as is (model spec, tokenizer spec, arguments, ...).
        keep: keep only the newest ``keep`` checkpoints (0 keeps all).
    """
    model_state, optim_state = _full_states(model, optimizer, fsdp)
    rngs = [rng_state()]
    if d.world_size > 1:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    path = os.path.join(out_dir, "checkpoints", f"step_{step:08d}.pt")
    if d.is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {
            "step": step,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "world_size": d.world_size,
            **extra,
        }
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        if keep > 0:
            for old in sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*.pt")))[:-keep]:
                os.remove(old)
    d.barrier()
    return path


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest ``step_*.pt`` in ``out_dir/checkpoints`` (None if there is none)."""
    files = sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*.pt")))
    return files[-1] if files else None


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint file on the CPU (a clear error when it is missing or not one of ours)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "model_spec" not in state:
        raise ValueError(f"{path!r} is not an mmfast.train checkpoint")
    return state


def load_checkpoint(
    state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, d: Dist, fsdp: bool
) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG from ``read_checkpoint``'s dict;
    returns the step to continue from."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict  # noqa: PLC0415

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=opts
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state(rngs[d.rank] if len(rngs) == d.world_size else rngs[0])
    return int(state["step"])
