"""``python -m mmfast.train --objective itc+itm`` end to end with small settings: the summary and
table (ITC beside re-ranked recall, ITM accuracy), eval of the checkpoint with either fusion
attention, GradCache equal to the plain loop, bit-identical resume, and the seed's JSON format."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from mmfast.train.cli import format_summary, main, parse_train_args
from tests.test_train_cli import SMALL, losses
from tests.test_train_itm_data import write_pairs

ITM = ["--objective", "itc+itm", "--itm-chunk-size", "20", "--rerank-k", "12", "--fusion-layers", "1"]
ITM_KEYS = {"itm_acc", "itm_acc_pos", "itm_acc_neg", "itm_edit_acc", "itc_edit_acc", "rerank_k"}
ITM_KEYS |= {f"rerank{m}_{d}_r{k}" for m in ("", "_itm") for d in ("i2t", "t2i") for k in (1, 5, 10)}


def run(out, *extra) -> dict:
    return main(["--out", str(out), *SMALL, *ITM, *extra])


def test_itm_run_summary_table_and_checkpoint_eval(tmp_path, capsys):
    summary = run(tmp_path, "--steps", "3", "--save-every", "3", "--no-plot", "--val-samples", "24")
    val = summary["val"]
    assert ITM_KEYS <= set(val) and summary["objective"] == "itc+itm"
    assert val["itm_pairs"] == {"positives": 24, "hard_negatives": 48} and val["rerank_k"] == 12
    assert all(0.0 <= val[k] <= 1.0 for k in ITM_KEYS - {"rerank_k"})
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["loss"] == pytest.approx(r["itc"] + r["itm"], rel=1e-5) for r in steps)
    table = capsys.readouterr().out
    assert (
        "re-ranked by ITM + ITC" in table
        and "by ITM alone" in table
        and "ITM accuracy (balanced)" in table
        and "one-attribute edit" in table
    )
    assert format_summary(summary).count("|") == table.split("wrote")[0].count("|")
    ckpt = tmp_path / "checkpoints" / "step_00000003.pt"
    for attn in ("mmfast", "sdpa"):
        result = main(["eval", "--checkpoint", str(ckpt), "--fusion-attn", attn, "--out", str(tmp_path / attn)])
        for k in ITM_KEYS:
            assert result["val"][k] == pytest.approx(val[k], abs=1e-6), (attn, k)


def test_itm_gradcache_steps_equal_the_plain_loop(tmp_path):
    common = ["--steps", "3", "--val-samples", "0", "--save-every", "0", "--no-plot", "--chunk-size", "5"]
    run(tmp_path / "gc", *common)
    run(tmp_path / "plain", *common, "--no-gradcache")
    gc, plain = losses(tmp_path / "gc"), losses(tmp_path / "plain")
    for s in (1, 2, 3):
        assert gc[s] == pytest.approx(plain[s], rel=1e-5, abs=1e-6), (s, gc, plain)


def test_itm_resume_latest_continues_bit_identically(tmp_path):
    # one thread: with two, under load, step 4 differs by ~1e-7 (seen with mmfast and with SDPA
    # attention alike, before and after the fusion length trimming); not yet localised, see the
    # issue-20 report. Bit-identity is claimed for a fixed reduction order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--val-samples", "0", "--no-plot"]
    run(a, *common)
    os.makedirs(b / "checkpoints")
    shutil.copy(a / "checkpoints" / "step_00000002.pt", b / "checkpoints")
    run(b, *common, "--resume", "latest")
    la, lb = losses(a), losses(b)
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]
    final_a = torch.load(a / "checkpoints" / "step_00000004.pt", weights_only=False)["model"]
    final_b = torch.load(b / "checkpoints" / "step_00000004.pt", weights_only=False)["model"]
    assert any(k.startswith("fusion.") for k in final_a)
    for name, t in final_a.items():
        assert torch.equal(t, final_b[name]), name


def test_itm_on_the_seed_json_format(tmp_path):
    train, images = write_pairs(tmp_path / "data", 20, missing=(4,))
    val, _ = write_pairs(tmp_path / "data", 6, name="val.json")  # the first 6 images, with their captions
    summary = run(
        tmp_path / "out", "--train-data", train, "--val-data", val, "--image-dir", images, "--steps", "2",
        "--save-every", "0", "--no-plot", "--context-length", "64", "--val-samples", "6",
    )  # fmt: skip
    assert summary["dataset_type"] == "auto"
    assert summary["val"]["n_images"] == 6 and summary["val"]["n_texts"] == 9  # two captions for even i
    assert summary["val"]["itm_pairs"]["positives"] == 9 and "itm_edit_acc" not in summary["val"]


def test_curves_show_reranked_recall_and_itm_accuracy(tmp_path):
    from mmfast.train.plotting import plot_curves

    ev = {k: 0.5 for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "rerank_i2t_r1", "rerank_t2i_r1", "itm_acc")}
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2)] + [{"step": s, "eval": ev} for s in (1, 2)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    plot_curves(str(tmp_path / "log.jsonl"), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv,steps,detach",
    [
        ([], 150, 37),
        (["--objective", "itc+itm"], 300, 75),
        (["--objective", "itc+itm", "--steps", "40"], 40, 10),
        (["--objective", "itc+itm", "--itm-detach-steps", "0"], 300, 0),
        (["--steps", "3", "--itm-detach-steps", "9"], 3, 9),
    ],
)
def test_steps_and_detach_steps_defaults(argv, steps, detach):
    """--steps defaults by objective, --itm-detach-steps to a quarter of --steps; explicit values win."""
    args = parse_train_args(argv)
    assert (args.steps, args.itm_detach_steps) == (steps, detach)


@pytest.mark.parametrize("flag", ["--itm-detach-steps", "--itm-easy-steps"])
def test_negative_itm_step_counts_are_refused(flag):
    with pytest.raises(SystemExit, match=flag):
        parse_train_args(["--objective", "itc+itm", flag, "-1"])
