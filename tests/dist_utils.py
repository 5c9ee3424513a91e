"""Multi-process tests on torch.distributed (gloo on 127.0.0.1): a free port, and a bounded spawn
that fails the test, never hangs it, when a rank does not finish.

Every spawned rank ends through ``mmfast.train.distributed.finish_process``: once its body returns
(having destroyed its group, or left a broken one alone) it leaves with ``os._exit``, never
finalizing the interpreter while a gloo worker thread may still free the last collective's tensors
(that aborted ranks which had passed, under load)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable[..., None], args: tuple) -> None:
    from mmfast.train.distributed import finish_process  # noqa: PLC0415

    finish_process(lambda: fn(rank, *args))


def spawn_bounded(
    fn: Callable[..., None],
    world: int,
    args: tuple,
    deadline_s: float,
    what: str,
    expect: dict | None = None,
    wait_for: tuple[int, ...] | None = None,
) -> None:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes (one OpenMP thread each, gloo on the
    loopback device, every rank ending through ``finish_process``: exit 0 when ``fn`` returns, 1 on
    an exception, the code of a ``SystemExit``). The ranks in ``wait_for`` (default: all) must exit
    0, or with the code ``expect`` gives them, within ``deadline_s``; ranks still alive then are
    terminated, and the test fails naming ``what`` if a waited-for rank had not finished. The parent's environment is
    restored afterwards."""
    ranks = tuple(range(world)) if wait_for is None else wait_for
    saved = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(_rank_main, args=(fn, args), nprocs=world, join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    end = time.monotonic() + deadline_s
    try:
        while not all(ctx.processes[r].exitcode is not None for r in ranks):
            if time.monotonic() > end:
                pytest.fail(f"{what} (world {world}) did not finish in {deadline_s} s")
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    codes = [ctx.processes[r].exitcode for r in ranks]
    want = [(expect or {}).get(r, 0) for r in ranks]
    assert codes == want, f"{what}: exit codes {codes} of ranks {list(ranks)}, expected {want} (tracebacks above)"
