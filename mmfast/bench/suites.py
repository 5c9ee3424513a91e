"""The two runs the CLI offers: the standard suite (a table) and the batch-size sweep (curves)."""

from __future__ import annotations

import collections
import time

import torch

from mmfast.bench.cases import (
    CONTRASTIVE_OPS,
    Case,
    Data,
    chunked_loss,
    compute_reference,
    contrastive_case,
    flops,
    make_data,
)
from mmfast.bench.measure import PeakMemory
from mmfast.bench.providers import BASELINE, Provider
from mmfast.bench.runner import Progress, Row, Runner

REFERENCE = "reference"  # history key of the ground-truth runs


def _prepare(case: Case, runner: Runner, device: torch.device, share: float) -> Data | str:
    """Inputs and reference results for ``case``, or why they were not computed.

    The reference materializes the logits, so it gets the same time and memory predictions as a
    provider. A contrastive case whose reference would not fit (its predicted time over half of
    ``share``, the seconds of the row that asks for it, or its memory over the budget) takes the
    chunked loss instead: the loss is checked, the gradients only at the smaller N. A cross-attention
    case whose reference would not fit its row's share is skipped.
    """
    data = make_data(case, device)
    ref_case = Case(case.op, case.dims, case.dtype, "fwd+bwd", case.kind)
    fl = flops(ref_case, data.valid_keys)
    key = (REFERENCE, case.op, case.dtype)
    t_pred, m_pred = runner.predicted(key, fl)
    # Contrastive cases have a cheaper truth: take it once the reference would use half the row's share.
    too_slow = t_pred is not None and t_pred > (share / 2 if case.op in CONTRASTIVE_OPS else share)
    too_big = m_pred is not None and m_pred > runner.s.mem_budget
    if too_slow or too_big:
        if case.op not in CONTRASTIVE_OPS:
            return (
                f"reference would need {m_pred / 2**30:.1f} GB"
                if too_big
                else f"time budget (reference needs ~{t_pred:.0f} s)"
            )
        data = _chunked_truth(case, data)
        data.note = (
            f"loss checked, gradients not (the reference would exceed the {'memory' if too_big else 'time'} budget)"
        )
        return data
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        compute_reference(case, data)
    runner.time_hist.setdefault(key, []).append((fl, time.perf_counter() - t0))
    if peak.bytes is not None:
        runner.mem_hist.setdefault(key, []).append((fl, float(max(peak.bytes, 1))))
    return data


def _chunked_truth(case: Case, data: Data) -> Data:
    x, y = data.inputs["image_features"], data.inputs["text_features"]
    s = float(data.inputs["logit_scale"])
    b = float(data.inputs.get("logit_bias", torch.tensor(0.0)))
    loss = chunked_loss(case.op, x, y, s, b, chunk=max(128, (1 << 26) // case["N"]))
    data.ref_out, data.ref_grads = torch.tensor(loss, dtype=torch.float32, device=x.device), {}
    return data


def is_mmfast(provider: Provider) -> bool:
    return provider.name.startswith("mmfast-")


def plan(cases: list[Case], providers: list[Provider], device: torch.device) -> list[tuple[int, Case, Provider]]:
    """The rows (part, case, provider) in the order they run: by part, cheapest first in each (FLOPs,
    then the dtype's width).

    0. mmfast's rows; 1. the baselines (every group gets its speed-up before the large batch runs);
    2. mmfast's rows at the largest contrastive batch, when the suite has several; 3. their
    baselines; 4. the other peers.
    """
    pairs = [(c, p) for c in cases for p in providers if c.op in p.ops and p.why_not(device) is None]
    sizes = {c["N"] for c in cases if c.op in CONTRASTIVE_OPS}
    large = max(sizes) if len(sizes) > 1 else None

    def part(case: Case, p: Provider) -> int:
        if not is_mmfast(p) and p.name != BASELINE.get(case.op):
            return 4
        return (2 if case.op in CONTRASTIVE_OPS and case["N"] == large else 0) + (0 if is_mmfast(p) else 1)

    # At equal FLOPs the narrower dtype first: it is the cheaper row, and the time it leaves goes on.
    return sorted(
        ((part(c, p), c, p) for c, p in pairs), key=lambda row: (row[0], flops(row[1]), row[1].dtype.itemsize)
    )


def run_suite(
    cases: list[Case], providers: list[Provider], runner: Runner, budget_s: float, progress: bool = True
) -> list[Row]:
    """Every (case, provider) row, in ``plan``'s order, within ``budget_s`` seconds (references included).

    A row's share is the time left over the rows left in its part, so each part may use all the
    time the earlier ones left, and the time small rows leave goes to the big ones. Where the run
    has an mmfast provider, a peer runs only in a group (op, shape, dtype, mode) where mmfast's row
    ran: no group times a peer without mmfast. A row predicted not to fit its share is marked
    "skipped" (with what it would need).
    """
    device = runner.device
    rows_plan = plan(cases, providers, device)
    left_in_part = collections.Counter(part for part, _, _ in rows_plan)
    last_use = {c.data_key: i for i, (_, c, _) in enumerate(rows_plan)}
    start = time.perf_counter()
    cache: dict[tuple, Data | str] = {}
    with_mmfast = {c for _, c, p in rows_plan if is_mmfast(p)}  # (--providers may leave mmfast out)
    mmfast_ran: set[Case] = set()  # cases where an mmfast row was attempted (not skipped for budget)
    bar = Progress(len(rows_plan), "mmfast-bench", progress)
    rows = []
    for i, (part, case, prov) in enumerate(rows_plan):
        left = start + budget_s + runner.setup_s - time.perf_counter()
        share = left / left_in_part[part]
        left_in_part[part] -= 1
        if not is_mmfast(prov) and case in with_mmfast and case not in mmfast_ran:
            row = runner.blank_row(case, prov.name, "skipped", "mmfast's row of this group did not run", flops(case))
        else:
            row = runner.precheck(case, prov, share) if left > 0 else _spent(runner, case, prov)
        if row is None:
            # Inputs and reference are made at the first row of a case that is going to run.
            if case.data_key not in cache:
                try:
                    cache[case.data_key] = _prepare(case, runner, device, share)
                except Exception as e:  # noqa: BLE001 - the case's rows say why, the run goes on
                    cache[case.data_key] = f"reference failed: {type(e).__name__}: {e}".splitlines()[0][:160]
            data = cache[case.data_key]
            if isinstance(data, str):
                row = runner.blank_row(case, prov.name, "skipped", data, flops(case))
            else:
                row = runner.run(case, prov, data, share)
        if is_mmfast(prov) and row.status not in ("skipped", "oom"):
            mmfast_ran.add(case)
        rows.append(row)
        if last_use[case.data_key] == i:
            cache.pop(case.data_key, None)
        bar.step(f"{case.label} {prov.name}")
    bar.close()
    return rows


def run_sweep(
    ops: list[str],
    dtype: torch.dtype,
    providers: list[Provider],
    runner: Runner,
    sizes: list[int],
    D: int,
    budget_s: float,
    point_cap_s: float,
    progress: bool = True,
) -> list[Row]:
    """Time and peak memory of fwd+bwd against batch size N for the contrastive losses.

    Each provider climbs the sizes until its predicted peak exceeds the memory budget (marked
    "OOM (needs X GB)", never run) or its predicted time exceeds ``point_cap_s`` or what is left of
    ``budget_s``. The loss is checked at every size against ``chunked_loss`` (O(N) memory).
    """
    device = runner.device
    ops = [op for op in ops if op in CONTRASTIVE_OPS]
    deadline = time.perf_counter() + budget_s
    rows: list[Row] = []
    plan = [(op, N) for op in ops for N in sizes]
    bar = Progress(len(plan), "mmfast-bench sweep", progress)
    for op, N in plan:
        case = contrastive_case(op, N, D, dtype, "fwd+bwd")
        provs = [p for p in providers if op in p.ops and p.why_not(device) is None]
        share = min(point_cap_s, deadline - time.perf_counter())
        skips = {p.name: runner.precheck(case, p, share) if share > 0 else _spent(runner, case, p) for p in provs}
        data = None
        if any(row is None for row in skips.values()):
            data = _chunked_truth(case, make_data(case, device))
        for p in provs:
            row = skips[p.name]
            rows.append(row or runner.run(case, p, data, min(point_cap_s, deadline - time.perf_counter())))
        del data
        bar.step(case.label)
    bar.close()
    return rows


def _spent(runner: Runner, case: Case, p: Provider) -> Row:
    return runner.blank_row(case, p.name, "skipped", f"time budget spent ({runner.needs(case, p)})", flops(case))
