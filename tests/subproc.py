"""Run many small cases in a worker subprocess, so a case that kills its process (SIGFPE, abort,
segfault) or hangs is a failure of that case, not of the test run.

``run_cases(module, names)`` starts ``python -m tests.subproc <module>`` once; the worker imports
``module`` (which defines ``CASES: dict[str, Case]``), runs the named cases one by one, and prints a
``@@start <name>`` line before each and a ``@@end <json>`` line after it. When the worker dies, the
case it had started is the one that killed it; a new worker runs the rest. A case that runs longer
than ``timeout`` seconds is killed the same way.

A case's ``fn`` either raises or returns ``(got, expected)``: tensors (or tuples of them, or None)
that must be equal within ``atol`` / ``rtol`` with the same NaN / inf pattern.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Case:
    """A bad or edge input: ``fn`` must raise an exception whose message names one of ``names``
    (of type ``errors``), or, when ``result_ok``, return (got, expected) that match."""

    fn: Callable[[], object]
    names: tuple[str, ...] = ()
    result_ok: bool = False
    errors: tuple[str, ...] = ("TypeError", "ValueError", "RuntimeError", "NotImplementedError")
    atol: float = 1e-5
    rtol: float = 1e-5
    defect: str = ""  # issue 17's class this case covers, if any


def registrar(cases: dict[str, Case]) -> Callable:
    """A decorator factory ``case(name, names=(), **Case fields)`` that adds the decorated function
    to ``cases`` as a Case (``names``: the argument names its error must mention, a str or a tuple)."""

    def case(name: str, names=(), **kw) -> Callable:
        def add(fn: Callable[[], object]) -> Callable[[], object]:
            cases[name] = Case(fn, tuple(names) if not isinstance(names, str) else (names,), **kw)
            return fn

        return add

    return case


@dataclass
class Outcome:
    status: str  # "raised" | "returned" | "died" | "timeout"
    error_type: str = ""
    message: str = ""
    match: bool | None = None  # for "returned": whether got matched expected
    detail: str = ""
    extra: dict = field(default_factory=dict)


def _flatten(x) -> list:
    if x is None:
        return []
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    return [x]


def compare(got, expected, atol: float, rtol: float) -> tuple[bool, str]:
    """Equal NaN / inf patterns and values within tolerance; (ok, why not)."""
    import torch  # noqa: PLC0415

    gs, es = _flatten(got), _flatten(expected)
    if len(gs) != len(es):
        return False, f"{len(gs)} results, expected {len(es)}"
    for i, (g, e) in enumerate(zip(gs, es)):
        if not isinstance(g, torch.Tensor) or not isinstance(e, torch.Tensor):
            if g != e:
                return False, f"result {i}: {g!r}, expected {e!r}"
            continue
        if tuple(g.shape) != tuple(e.shape):
            return False, f"result {i}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        g, e = g.detach().double(), e.detach().double()
        if not torch.equal(g.isnan(), e.isnan()):
            return (
                False,
                f"result {i}: NaN pattern differs (got {int(g.isnan().sum())} NaN, expected {int(e.isnan().sum())})",
            )
        fin = torch.isfinite(e)
        if not torch.equal(g[~fin & ~e.isnan()], e[~fin & ~e.isnan()]) or not torch.equal(torch.isfinite(g), fin):
            return False, f"result {i}: inf pattern differs"
        if fin.any() and not torch.allclose(g[fin], e[fin], atol=atol, rtol=rtol):
            return False, f"result {i}: max |diff| {(g[fin] - e[fin]).abs().max().item():.3g}"
    return True, ""


def _worker(module: str, names: list[str]) -> None:
    import importlib  # noqa: PLC0415

    cases = importlib.import_module(module).CASES
    for name in names:
        print(f"@@start {name}", flush=True)
        case = cases[name]
        try:
            got, expected = case.fn()
        except Exception as e:  # noqa: BLE001 - every exception is an outcome to report
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
            out = dict(status="raised", error_type=type(e).__name__, message=str(e)[:2000], detail=where)
        else:
            ok, why = compare(got, expected, case.atol, case.rtol)
            out = dict(status="returned", match=ok, detail=why)
        print("@@end " + json.dumps(out), flush=True)


def _reader(pipe, q: queue.Queue) -> None:
    for line in pipe:
        q.put(line)
    q.put(None)


def run_cases(module: str, names: list[str], timeout: float = 120.0) -> dict[str, Outcome]:
    """Outcome per case name; a dying or hanging worker is replaced and the rest goes on."""
    results: dict[str, Outcome] = {}
    todo = list(names)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    while todo:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.subproc", module, *todo], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        err_lines: list[str] = []
        threading.Thread(target=err_lines.extend, args=(proc.stderr,), daemon=True).start()
        current, deadline = None, time.monotonic() + timeout + 60  # start-up: imports
        while True:
            try:
                line = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                proc.wait()
                name = current or todo[0]
                results[name] = Outcome("timeout", detail=f"no result after {timeout:.0f} s")
                todo.remove(name)
                break
            if line is None:  # the worker exited
                rc = proc.wait()
                if current is not None:
                    results[current] = Outcome("died", detail=f"exit code {rc}: {''.join(err_lines)[-1500:]}")
                    todo.remove(current)
                elif todo and rc != 0:
                    raise RuntimeError(f"the case worker failed before any case: {''.join(err_lines)[-3000:]}")
                break
            if line.startswith("@@start "):
                current = line[len("@@start ") :].strip()
                deadline = time.monotonic() + timeout
            elif line.startswith("@@end ") and current is not None:
                results[current] = Outcome(**json.loads(line[len("@@end ") :]))
                todo.remove(current)
                current = None
    return results


def check(case: Case, outcome: Outcome) -> None:
    """Assert the outcome is one this case allows (a clear error naming the argument, or a result
    matching the reference)."""
    import signal  # noqa: PLC0415

    if outcome.status == "died":
        rc = outcome.detail.split(":")[0].split()[-1]
        sig = ""
        if rc.lstrip("-").isdigit() and int(rc) < 0:
            sig = f" ({signal.Signals(-int(rc)).name})"
        raise AssertionError(f"the process died{sig}: {outcome.detail}")
    if outcome.status == "timeout":
        raise AssertionError(f"hung: {outcome.detail}")
    if outcome.status == "returned":
        assert case.result_ok, f"returned a result instead of raising an error naming {case.names}"
        assert outcome.match, f"returned a result that differs from the reference: {outcome.detail}"
        return
    assert outcome.error_type in case.errors, (
        f"raised {outcome.error_type} ({outcome.detail}): {outcome.message[:300]!r}; expected one of {case.errors} "
        f"naming {case.names}" + (" or the reference result" if case.result_ok else "")
    )
    msg = outcome.message.lower()
    assert any(n.lower() in msg for n in case.names), (
        f"{outcome.error_type} does not name the argument {case.names}: {outcome.message[:300]!r}"
    )


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
