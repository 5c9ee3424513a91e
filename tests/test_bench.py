"""The benchmark harness: FLOP counts, agreement gate, memory prediction, sweep truth, and a CLI smoke run."""

import csv
import importlib.util
import json
import sys

import pytest
import torch

import mmfast
from mmfast.bench import measure, report
from mmfast.bench.__main__ import main
from mmfast.bench.cases import (
    attention_case,
    chunked_loss,
    compute_reference,
    contrastive_case,
    flops,
    make_data,
    suite,
)
from mmfast.bench.providers import Provider, Unsupported, _naive_contrastive, _sdpa
from mmfast.bench.runner import Progress, Row, Runner, Settings
from mmfast.bench.suites import REFERENCE, _prepare, plan, run_suite

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def runner(mem_budget: int = 8 << 30) -> Runner:
    return Runner(torch.device("cpu"), Settings(row_time=0.01, min_reps=2, mem_budget=mem_budget), {})


def test_flops_formulas():
    c = contrastive_case("info_nce", 4096, 512, torch.float32, "fwd")
    assert flops(c) == 2 * 4096 * 4096 * 512
    assert flops(contrastive_case("siglip_loss", 4096, 512, torch.float32, "fwd+bwd")) == 3 * flops(c)
    a = attention_case("t", 2, 3, 5, 7, 16, True, torch.float32, "fwd")
    assert flops(a) == 2 * 3 * 5 * (2 * 7) * 2 * 16  # every key counted when no valid count is given
    assert flops(a, valid_keys=9) == 2 * 3 * 5 * 9 * 2 * 16
    b = attention_case("t", 2, 3, 5, 7, 16, True, torch.float32, "fwd+bwd")
    # Model FLOPs: the backward's four products are twice the forward's two, for both op families.
    assert flops(b, valid_keys=9) == 3 * flops(a, valid_keys=9)
    # The algorithm's FLOPs add the recomputed logits / scores (named, shown beside the model rate).
    assert flops(b, valid_keys=9, convention="algorithm") == 3.5 * flops(a, valid_keys=9)
    cb = contrastive_case("info_nce", 4096, 512, torch.float32, "fwd+bwd")
    assert flops(cb, convention="algorithm") == 8 * 4096 * 4096 * 512
    assert flops(c, convention="algorithm") == flops(c)  # forward: the two conventions agree
    with pytest.raises(ValueError, match="convention"):
        flops(c, convention="kernel")


@pytest.mark.skipif(not mmfast.backends()["info_nce"]["cpu"]["available"], reason="extension not built")
def test_cpu_path_providers_force_the_path_and_name_what_is_missing(tmp_path, capsys):
    """``mmfast-cpu:<path>`` runs the cpu backend under cpu_options(gemm=path) (seen from inside the
    call) and is listed as unavailable, naming the missing feature, where the CPU lacks the path."""
    from mmfast import cpu
    from mmfast.bench.providers import cpu_path_providers

    provs = {p.name: p for p in cpu_path_providers()}
    assert set(provs) == {f"mmfast-cpu:{g}" for g in cpu.GEMMS if g != "auto"}
    assert provs["mmfast-cpu:blas"].why_not(torch.device("cpu")) is None
    assert not any(p.default for p in provs.values())  # opt-in only
    isa = cpu.cpu_isa()
    assert (provs["mmfast-cpu:amx"].why_not(torch.device("cpu")) is None) == isa["amx_bf16"]
    seen = []
    real = mmfast.info_nce

    def spy(*a, **k):
        seen.append(cpu.cpu_options().gemm)
        return real(*a, **k)

    case = contrastive_case("info_nce", 33, 16, torch.float32, "fwd")
    inputs = make_data(case, torch.device("cpu"), seed=1).inputs
    mmfast.info_nce = spy
    try:
        out = provs["mmfast-cpu:blas"].build(case, inputs)()
    finally:
        mmfast.info_nce = real
    assert seen == ["blas"] and cpu.cpu_options().gemm == "auto"  # restored after the call
    torch.testing.assert_close(out, mmfast.info_nce(**inputs, backend="reference"))


@pytest.mark.parametrize("op", ["info_nce", "siglip_loss"])
def test_chunked_truth_matches_reference(op):
    case = contrastive_case(op, 97, 24, torch.float32, "fwd")
    data = make_data(case, torch.device("cpu"), seed=3)
    x, y = data.inputs["image_features"], data.inputs["text_features"]
    s, b = float(data.inputs["logit_scale"]), float(data.inputs.get("logit_bias", torch.tensor(0.0)))
    want = mmfast.info_nce(x, y, s) if op == "info_nce" else mmfast.siglip_loss(x, y, s, b)
    assert chunked_loss(op, x, y, s, b, chunk=16) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_peers_agree_and_are_timed(mode):
    r = runner()
    for case, build in [
        (contrastive_case("info_nce", 33, 16, torch.float32, mode), _naive_contrastive),
        (contrastive_case("siglip_loss", 33, 16, torch.float32, mode), _naive_contrastive),
        (attention_case("t", 2, 2, 5, 19, 8, True, torch.float32, mode), _sdpa),
    ]:
        data = make_data(case, r.device)
        compute_reference(case, data)
        row = r.run(case, Provider("peer", (case.op,), build), data, share=10.0)
        assert row.status == "ok", row.note
        assert row.max_err < 1e-5 and row.reps >= 2 and row.median_ms > 0 and row.gflops > 0


def test_disagreeing_provider_is_flagged_not_timed():
    case = contrastive_case("info_nce", 33, 16, torch.float32, "fwd+bwd")
    data = make_data(case, torch.device("cpu"))
    compute_reference(case, data)
    calls = []

    def wrong(case, inputs):
        good = _naive_contrastive(case, inputs)

        def fn():
            calls.append(1)
            return good() * 1.01

        return fn

    row = runner().run(case, Provider("wrong", ("info_nce",), wrong), data, share=10.0)
    assert row.status == "disagrees" and row.median_ms is None and row.reps == 0
    assert len(calls) == 1  # the checking call only
    assert row.max_err == pytest.approx(0.01, rel=0.05)


def test_rel_error():
    want = torch.tensor([1.0, -4.0, 2.0])
    assert measure.rel_error(want + torch.tensor([0.0, 0.4, 0.0]), want) == pytest.approx(0.1)
    assert measure.rel_error(torch.tensor([1.0, float("nan"), 2.0]), want) == float("inf")
    assert measure.rel_error(want[:2], want) == float("inf")
    # 0-dim: relative to max(|want|, 1), so a cancelled-out scalar gradient is not over-judged.
    assert measure.rel_error(torch.tensor(0.0012), torch.tensor(0.001)) == pytest.approx(2e-4)
    assert measure.rel_error(torch.tensor(8.8), torch.tensor(8.0)) == pytest.approx(0.1)


def test_unsupported_and_error_rows():
    case = contrastive_case("info_nce", 9, 4, torch.float32, "fwd")
    data = make_data(case, torch.device("cpu"))
    compute_reference(case, data)

    def unsupported(case, inputs):
        raise Unsupported("fp32 only")

    def broken(case, inputs):
        return lambda: torch.ones(3) @ torch.ones(4)

    r = runner()
    assert r.run(case, Provider("u", ("info_nce",), unsupported), data, 10.0).status == "unsupported"
    row = r.run(case, Provider("b", ("info_nce",), broken), data, 10.0)
    assert row.status == "error" and "RuntimeError" in row.note


def test_memory_prediction_marks_oom_without_running():
    small = contrastive_case("info_nce", 1024, 512, torch.float32, "fwd+bwd")
    big = contrastive_case("info_nce", 4096, 512, torch.float32, "fwd+bwd")
    r = runner(mem_budget=1 << 30)
    key = ("p", "info_nce", torch.float32, "fwd+bwd")
    r.mem_hist[key] = [(flops(small), 100.0 * 2**20)]  # 100 MiB at N=1024: quadratic growth assumed
    calls = []
    prov = Provider("p", ("info_nce",), lambda c, i: lambda: calls.append(1))
    row = r.run(big, prov, make_data(contrastive_case("info_nce", 8, 4, torch.float32, "fwd"), r.device), 1e9)
    assert row.status == "oom" and not calls
    assert row.needs_mib == pytest.approx(1.1 * 100 * 16)
    assert "OOM (needs 1.7 GB)" in row.note


def test_time_prediction_skips_rows_that_do_not_fit():
    r = runner()
    case = contrastive_case("info_nce", 4096, 512, torch.float32, "fwd")
    r.time_hist[("p", "info_nce", torch.float32, "fwd")] = [(flops(case) / 16, 1.0)]
    tiny = make_data(contrastive_case("info_nce", 8, 4, torch.float32, "fwd"), r.device)
    row = r.run(case, Provider("p", ("info_nce",), None), tiny, share=20.0)
    assert row.status == "skipped" and "needs ~32 s" in row.note  # 2 calls x 16 x 1 s: time grows with the FLOPs
    r.mem_hist[("p", "info_nce", torch.float32, "fwd")] = [(flops(case) / 16, 100.0 * 2**20)]
    assert "needs ~32 s, predicted peak 1.7 GB" in r.needs(case, Provider("p", ("info_nce",), None))
    assert r.needs(case, Provider("q", ("info_nce",), None)) == "no prediction"


def test_memory_growth_read_from_increments():
    # 3 points of a linear-memory provider with a 500 MiB constant offset: p = 0.5 in FLOP space
    # (memory ~ N, FLOPs ~ N^2), so doubling N again predicts 2x the last figure (times the 1.1 margin).
    r = runner()
    key = ("p", "info_nce", torch.float32, "fwd+bwd")
    pts = [
        (flops(contrastive_case("info_nce", n, 512, torch.float32, "fwd+bwd")), 500.0 + n) for n in (1024, 2048, 4096)
    ]
    r.mem_hist[key] = pts
    _, m = r.predicted(key, flops(contrastive_case("info_nce", 8192, 512, torch.float32, "fwd+bwd")))
    assert m == pytest.approx(1.1 * (500 + 4096) * 2)


def test_cpu_peak_memory_sees_a_temporary():
    if not measure._reset_cpu_peak():
        pytest.skip("/proc/self/clear_refs is not writable here: CPU peaks are reported as unknown")
    with measure.PeakMemory(torch.device("cpu")) as m:
        t = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        del t
    assert 60 << 20 <= m.bytes <= 80 << 20


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = Progress(2, "x")
    bar.step("first")
    bar.step("second")
    bar.close()
    assert "[2/2] second" in capsys.readouterr().err


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["--smoke", "--ops", "info_nce", "--modes", "fwd+bwd", "--providers", "mmfast-reference,torch-naive"]
    rc = main(
        [*argv, "--budget", "60", "--no-progress", "--out", str(out)]
    )  # an upper bound: ample on a loaded machine
    assert rc == 0
    table = capsys.readouterr().out
    assert "| info_nce | N=64 D=32 | fp32 | fwd+bwd | torch-naive |" in table
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["provider"] for r in rows] == ["mmfast-reference", "torch-naive"]
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows), rows
    meta = json.load(open(out / "results.json"))["machine"]
    assert meta["matmul_gflops"]["fp32"] > 0 and meta["device"] == "cpu"
    assert (out / "speedup.png").exists() == HAS_MPL


def test_cli_sweep_smoke(tmp_path, capsys):
    # A 1 MiB memory budget: the naive loss needs 16 MiB of logits at N=2048, so by N=4096 at the
    # latest it must be predicted out of memory, and not run.
    if not measure._reset_cpu_peak():
        pytest.skip("/proc/self/clear_refs is not writable here: no CPU peaks to predict from")
    out = tmp_path / "sweep"
    argv = ["--smoke", "--sweep-batch", "--ops", "siglip_loss", "--providers", "torch-naive", "--max-n", "4096"]
    assert main([*argv, "--mem-budget-gb", str(1 / 1024), "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [int(r["N"]) for r in rows] == [64, 128, 256, 512, 1024, 2048, 4096]
    assert rows[0]["status"] == "ok" and rows[-1]["status"] == "oom" and "OOM (needs" in rows[-1]["note"]
    assert (out / "sweep.png").exists() == HAS_MPL


def _providers():
    return [
        Provider("torch-lce", ("info_nce",), _naive_contrastive),  # a non-baseline peer
        Provider("torch-naive", ("info_nce",), _naive_contrastive),  # info_nce's baseline
        Provider("mmfast-x", ("info_nce",), _naive_contrastive),
    ]


def test_plan_order_mmfast_baselines_large_batch_then_peers():
    cases = [contrastive_case("info_nce", n, 8, torch.float32, m) for n in (128, 64) for m in ("fwd+bwd", "fwd")]
    order = [(part, p.name, c["N"], c.mode) for part, c, p in plan(cases, _providers(), torch.device("cpu"))]
    small, large = [(64, "fwd"), (64, "fwd+bwd")], [(128, "fwd"), (128, "fwd+bwd")]
    assert order == (
        [(0, "mmfast-x", *nm) for nm in small]
        + [(1, "torch-naive", *nm) for nm in small]
        + [(2, "mmfast-x", *nm) for nm in large]  # the largest batch, after every smaller group has a speed-up
        + [(3, "torch-naive", *nm) for nm in large]
        + [(4, "torch-lce", *nm) for nm in small + large]
    )
    one_size = [c for c in cases if c["N"] == 64]
    assert [part for part, _, _ in plan(one_size, _providers(), torch.device("cpu"))] == [0, 0, 1, 1, 4, 4]
    # Equal FLOPs: the narrower dtype first (the cheaper row).
    both = [contrastive_case("info_nce", 64, 8, dtype, "fwd") for dtype in (torch.float32, torch.bfloat16)]
    assert [c.dtype for _, c, _ in plan(both, _providers()[2:], torch.device("cpu"))] == [torch.bfloat16, torch.float32]


def test_a_group_times_no_peer_without_mmfast():
    """mmfast's fwd+bwd row is predicted not to fit: the peers of that group are not timed either."""
    cases = [contrastive_case("info_nce", 64, 8, torch.float32, m) for m in ("fwd", "fwd+bwd")]
    r = runner()
    r.time_hist[("mmfast-x", "info_nce", torch.float32, "fwd+bwd")] = [(flops(cases[1]), 1e4)]
    rows = {(row.provider, row.mode): row for row in run_suite(cases, _providers(), r, 30.0, progress=False)}
    assert rows[("mmfast-x", "fwd+bwd")].status == "skipped" and "needs ~" in rows[("mmfast-x", "fwd+bwd")].note
    for peer in ("torch-naive", "torch-lce"):
        assert rows[(peer, "fwd")].status == "ok"
        assert rows[(peer, "fwd+bwd")].status == "skipped"
        assert rows[(peer, "fwd+bwd")].note == "mmfast's row of this group did not run"
    assert rows[("mmfast-x", "fwd")].status == "ok"
    # Peers alone (--providers without mmfast): the rule does not apply, they run.
    rows = run_suite(cases, _providers()[:2], runner(), 30.0, progress=False)
    assert [row.status for row in rows] == ["ok"] * 4, [row.note for row in rows]


def test_costly_reference_falls_back_to_the_chunked_loss():
    """A big contrastive case whose reference would not fit its row's share is still checked (the
    loss, against the chunked evaluation) instead of being skipped."""
    case = contrastive_case("siglip_loss", 96, 16, torch.float32, "fwd+bwd")
    r = runner()
    r.time_hist[(REFERENCE, "siglip_loss", torch.float32)] = [(flops(case), 50.0)]
    data = _prepare(case, r, r.device, share=60.0)
    assert not data.ref_grads and "loss checked, gradients not" in data.note
    row = r.run(case, Provider("mmfast-x", ("siglip_loss",), _naive_contrastive), data, share=10.0)
    assert row.status == "ok" and row.max_err < 1e-5 and "gradients not" in row.note
    assert _prepare(case, r, r.device, share=1000.0).ref_grads  # fits: the full reference, gradients too


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed (plots are optional)")
def test_speedup_plot_labels_fit_and_legend_names_the_baselines():
    shapes = ["text->image B=32 H=12 Lq=32 Lk=577 D=64 pad with a long tail of words", "N=16384 D=512"]
    rows = []
    for op, shape in (("cross_attention", shapes[0]), ("info_nce", shapes[1])):
        for prov, speedup in (("mmfast-cpu", 2.5), ("open_clip", 0.7)):
            rows.append(Row(op, shape, "fp32", "fwd+bwd", prov, "ok", speedup=speedup, median_ms=1.0))
    fig = report.speedup_figure(rows, {"cpu": "test CPU", "date_utc": "today"})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    ax = fig.axes[0]
    legend = ax.get_legend()
    for artist in [*ax.get_yticklabels(), legend, ax.xaxis.label, ax.title]:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, artist
    texts = " ".join(t.get_text() for t in legend.get_texts())
    assert "torch-naive (info_nce)" in texts and "torch-sdpa (cross_attention)" in texts and "mmfast-cpu" in texts


def test_default_suite_has_the_large_batch_in_training_mode():
    cases = suite("default", ["info_nce", "siglip_loss"], [torch.float32, torch.bfloat16], ["fwd", "fwd+bwd"])
    assert {(c.op, c["N"], c.mode) for c in cases} == {
        (op, n, mode)
        for op in ("info_nce", "siglip_loss")
        for n, mode in ((4096, "fwd"), (4096, "fwd+bwd"), (16384, "fwd+bwd"))
    }
