"""``mmfast.train.distributed.finish_process`` / ``exit_process``: how a launched rank ends.

A rank must leave with the status its body earned (0, 1 with the traceback for an exception, a
``SystemExit``'s own code or message), with everything it printed or logged flushed to a pipe, and
without finalizing the interpreter (an atexit hook does not run): finalizing while a gloo worker
thread still frees the last collective's tensors aborted ranks that had passed. And mmfast's own
collectives must not keep a destroyed group (and gloo's threads) alive. Each case is a subprocess,
bounded by a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import atexit, logging, sys
from mmfast.train.distributed import finish_process
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
atexit.register(lambda: print("ATEXIT RAN", flush=True))
def body():
    print("partial line without a newline", end="")
    logging.getLogger("rank").info("logged before the end")
"""

CASES = {
    # name: (the body's last statement, expected status, text expected on stderr)
    "returns": ("return None", 0, ""),
    "raises": ("raise ValueError('bad shard')", 1, "ValueError: bad shard"),
    "exit code": ("sys.exit(3)", 3, ""),
    "exit none": ("sys.exit()", 0, ""),
    "exit message": ("sys.exit('stopping: no data')", 1, "stopping: no data"),
    "keyboard interrupt": ("raise KeyboardInterrupt", 1, "KeyboardInterrupt"),
}


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_status_flush_and_no_finalization(case):
    last, status, err = CASES[case]
    proc = _run(PRELUDE + f"    {last}\nfinish_process(body)\nprint('NOT REACHED')\n")
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "partial line without a newline", proc.stdout  # flushed, no atexit, no return
    assert "logged before the end" in proc.stderr
    assert err in proc.stderr, proc.stderr


def test_rank_with_a_live_gloo_group_exits_cleanly():
    """A body that ends right after a collective, with its group torn down, exits 0 (one process)."""
    code = textwrap.dedent(
        """
        import socket, torch, torch.distributed as dist
        from mmfast.train.distributed import finish_process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        def body():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            t = torch.ones(8)
            dist.all_reduce(t)
            assert t.sum().item() == 8
            dist.barrier()
            dist.destroy_process_group()
            print("done", end="")
        finish_process(body)
        """
    )
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout == "done", (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_differentiable_gather_works_and_keeps_no_group_alive():
    """ClipLoss/SigLipLoss's differentiable all_gather (one rank: the identity, gradient included)
    holds no reference to the group: once destroyed, gloo's worker threads are gone, and the
    deprecated torch.distributed.nn (whose default arguments pin the group) was never imported."""
    code = textwrap.dedent(
        """
        import gc, os, socket, sys, torch, torch.distributed as dist
        from mmfast.nn.contrastive import _all_gather_with_grad
        def gloo_threads():
            names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
            return sum(n.startswith("pt_gloo") for n in names)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 7, dtype=torch.float64)
        (out,) = _all_gather_with_grad(x)
        assert torch.equal(out, x)
        (out * w).sum().backward()
        assert torch.equal(x.grad, w)
        assert gloo_threads() > 0  # the backend starts with its first collective
        del out
        dist.destroy_process_group()
        gc.collect()
        assert "torch.distributed.nn" not in sys.modules, "torch.distributed.nn was imported"
        assert gloo_threads() == 0, f"{gloo_threads()} gloo worker threads outlive the group"
        print("ok", end="")
        """
    )
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout == "ok", (proc.returncode, proc.stdout, proc.stderr)
