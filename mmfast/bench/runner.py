"""Running rows: agreement first, then timing and peak memory, within a time and a memory budget.

For each (case, provider) row:
  1. predict its call time and peak memory from the same provider's smaller cases; a row whose
     memory would exceed the budget is marked "oom" (with the memory it would need) and never run;
     one whose time would not fit its share of the remaining budget is marked "skipped";
  2. call it once and compare the output (and, for fwd+bwd, every gradient) with the reference;
     a row that disagrees is flagged and not timed;
  3. time ``reps`` calls (reps chosen from the checked call's time), the first inside a peak-memory
     measurement.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmfast.bench import measure
from mmfast.bench.cases import DTYPE_NAMES, Case, Data, flops, leaves
from mmfast.bench.providers import Provider, Unsupported


@dataclass
class Row:
    """One line of the results table (times in milliseconds, memory in MiB)."""

    op: str
    shape: str
    dtype: str
    mode: str
    provider: str
    status: str  # ok | disagrees | unsupported | error | skipped | oom
    note: str = ""
    N: int | None = None
    flops: float = 0.0
    median_ms: float | None = None
    q20_ms: float | None = None
    q80_ms: float | None = None
    reps: int = 0
    speedup: float | None = None
    gflops: float | None = None  # model FLOPs / time (cases.flops)
    algo_gflops: float | None = None  # the algorithm's FLOPs / time, where they differ from the model's
    frac_matmul: float | None = None
    peak_mib: float | None = None
    max_err: float | None = None
    needs_mib: float | None = None  # predicted peak of an "oom" row


@dataclass
class Settings:
    row_time: float = 1.0  # seconds of timed calls a row aims for
    min_reps: int = 3
    max_reps: int = 50
    mem_budget: int = 8 << 30  # bytes one call may need beyond its inputs


class Progress:
    """tqdm when installed, else one rewritten stderr line."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            sys.stderr.write(f"\r[{self.done}/{self.total}] {label[:100]:<100}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _predict(points: list[tuple[float, float]], x: float, lo: float, hi: float) -> float | None:
    """y at size x from the (x, y) points seen so far, as the power law y ~ x^p, p in [lo, hi].

    With fewer than three points p = hi (the worst case). With three, p is read from the growth of
    the last two increments, which cancels a constant offset (the allocator's and the thread pool's
    first-call overheads) that would make small sizes look flatter than the trend.
    """
    if not points:
        return None
    x2, y2 = points[-1]
    slope = hi
    if len(points) >= 3:
        (x0, y0), (x1, y1) = points[-3], points[-2]
        if x2 > x1 > x0 and y2 > y1 > y0:
            slope = math.log((y2 - y1) / (y1 - y0)) / math.log(x2 / x1)
            slope = min(hi, max(lo, slope))
    return y2 * (x / x2) ** slope


def is_unsupported(e: Exception) -> bool:
    msg = str(e)
    return isinstance(e, Unsupported) or "cannot take these inputs" in msg or "not implemented for this op" in msg


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.1f} GB" if b >= 2**30 else f"{b / 2**20:.0f} MB"


class Runner:
    """Runs rows on one device; remembers each provider's times and peaks to predict larger cases."""

    def __init__(self, device: torch.device, settings: Settings, rates: dict[torch.dtype, float]) -> None:
        self.device, self.s, self.rates = device, settings, rates
        self.time_hist: dict[tuple, list[tuple[float, float]]] = {}
        self.mem_hist: dict[tuple, list[tuple[float, float]]] = {}
        self.setup_s = 0.0  # seconds spent in warm-up (compilation) calls, outside the budget
        self.time_skipped: set[tuple] = set()  # keys (provider, op, dtype, mode) already skipped for time

    def blank_row(self, case: Case, provider: str, status: str, note: str = "", fl: float = 0.0) -> Row:
        N = dict(case.dims).get("N")
        return Row(
            case.op,
            case.shape_label,
            DTYPE_NAMES.get(case.dtype, str(case.dtype)),
            case.mode,
            provider,
            status,
            note,
            N,
            fl,
        )

    def predicted(self, key: tuple, fl: float) -> tuple[float | None, float | None]:
        """(seconds per call, peak bytes) predicted for ``key`` at ``fl`` FLOPs (None: no history).

        Time grows about linearly with FLOPs; peak memory between O(sqrt(FLOPs)) (linear-memory
        losses) and O(FLOPs) (materialized logits); without enough history both assume the worst.
        """
        t = _predict(self.time_hist.get(key, []), fl, 0.8, 1.0)
        m = _predict(self.mem_hist.get(key, []), fl, 0.5, 1.0)
        return t, None if m is None else 1.1 * m

    def precheck(self, case: Case, provider: Provider, share: float, fl: float | None = None) -> Row | None:
        """The "oom" or "skipped" row when the prediction says ``provider`` does not fit, else None."""
        fl = flops(case) if fl is None else fl
        key = (provider.name, case.op, case.dtype, case.mode)
        t_pred, m_pred = self.predicted(key, fl)
        # Past a size skipped for time, a memory figure would extrapolate from too far below: stay "skipped".
        if m_pred is not None and m_pred > self.s.mem_budget and key not in self.time_skipped:
            row = self.blank_row(case, provider.name, "oom", f"OOM (needs {_fmt_bytes(m_pred)})", fl)
            row.needs_mib = m_pred / 2**20
            return row
        if t_pred is not None and (2 * t_pred > share or key in self.time_skipped):
            self.time_skipped.add(key)
            return self.blank_row(case, provider.name, "skipped", f"time budget ({self.needs(case, provider, fl)})", fl)
        return None

    def needs(self, case: Case, provider: Provider, fl: float | None = None) -> str:
        """What the prediction says a row would need: "needs ~T s, predicted peak M" (or "no prediction")."""
        fl = flops(case) if fl is None else fl
        t_pred, m_pred = self.predicted((provider.name, case.op, case.dtype, case.mode), fl)
        if t_pred is None:
            return "no prediction"
        return f"needs ~{2 * t_pred:.0f} s" + ("" if m_pred is None else f", predicted peak {_fmt_bytes(m_pred)}")

    def run(self, case: Case, provider: Provider, data: Data, share: float) -> Row:
        """Check, then time ``provider`` on ``case``; ``share``: the seconds this row may spend."""
        fl = flops(case, data.valid_keys)
        key = (provider.name, case.op, case.dtype, case.mode)
        skip = self.precheck(case, provider, share, fl)
        if skip is not None:
            return skip
        row = self.blank_row(case, provider.name, "ok", data.note, fl)
        try:
            call = self.make_call(case, provider, data)
            if provider.warmup:
                t0 = time.perf_counter()
                call()  # compiles; the result is dropped
                self.setup_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = call()
            measure.sync(self.device)
            t_check = time.perf_counter() - t0
            row.max_err = self.agreement(case, data, result)
            del result
        except Exception as e:  # noqa: BLE001 - any failure becomes the row's status, never a crash
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next row a clean pool
            row.status = "unsupported" if is_unsupported(e) else "error"
            row.note = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            return row
        if not row.max_err <= measure.AGREE_TOL.get(case.dtype, 1e-2):
            row.status, row.note = "disagrees", f"max rel. error {row.max_err:.2e}: not timed"
            return row
        reps = max(self.s.min_reps, min(self.s.max_reps, int(self.s.row_time / max(t_check, 1e-6))))
        reps = max(1, min(reps, int(share / max(t_check, 1e-6)) - 1))
        try:
            with measure.PeakMemory(self.device) as peak:
                times = measure.time_calls(call, 1, self.device)
            times += measure.time_calls(call, reps - 1, self.device)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on a later call
            row.status, row.note = "error", f"while timing: {type(e).__name__}: {e}".splitlines()[0][:160]
            return row
        med, q20, q80 = measure.quantiles(times)
        row.median_ms, row.q20_ms, row.q80_ms, row.reps = med * 1e3, q20 * 1e3, q80 * 1e3, len(times)
        row.gflops = fl / med / 1e9
        algo = flops(case, data.valid_keys, "algorithm")
        row.algo_gflops = algo / med / 1e9 if algo != fl else None
        rate = self.rates.get(case.dtype)
        row.frac_matmul = row.gflops / rate if rate else None
        if peak.bytes is not None:
            row.peak_mib = peak.bytes / 2**20
            self.mem_hist.setdefault(key, []).append((fl, float(max(peak.bytes, 1))))
        self.time_hist.setdefault(key, []).append((fl, med))
        return row

    def make_call(self, case: Case, provider: Provider, data: Data) -> Callable[[], Any]:
        inputs = leaves(data, case)
        fwd = provider.build(case, inputs)
        if case.mode == "fwd":
            return fwd
        wrt = [inputs[n] for n in data.grad_names]

        def fwd_bwd() -> tuple[Tensor, tuple[Tensor, ...]]:
            out = fwd()
            return out, torch.autograd.grad(out, wrt, grad_outputs=data.grad_output)

        return fwd_bwd

    def agreement(self, case: Case, data: Data, result: Any) -> float:
        out, grads = (result, ()) if case.mode == "fwd" else result
        errs = [measure.rel_error(out, data.ref_out)]
        if data.ref_grads:
            errs += [measure.rel_error(g, data.ref_grads[n]) for n, g in zip(data.grad_names, grads)]
        return max(errs)


def add_speedups(rows: Iterable[Row], baseline: dict[str, str]) -> None:
    """Fill ``speedup`` = baseline median / row median, within the same op, shape, dtype and mode."""
    rows = list(rows)
    base = {
        (r.op, r.shape, r.dtype, r.mode): r.median_ms
        for r in rows
        if r.provider == baseline.get(r.op) and r.median_ms is not None
    }
    for r in rows:
        b = base.get((r.op, r.shape, r.dtype, r.mode))
        if b is not None and r.median_ms:
            r.speedup = b / r.median_ms


def asdict_rows(rows: Iterable[Row]) -> list[dict[str, Any]]:
    return [dict(vars(r)) for r in rows]
