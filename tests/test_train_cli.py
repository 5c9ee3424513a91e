"""``python -m mmfast.train`` end to end with small settings: outputs, eval of a checkpoint,
bit-identical resume, GradCache against the plain loop, the real data formats, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmfast.train.cli import build_parser, main
from tests.test_train_data import write_coco, write_csv, write_shards

SMALL = ["--batch-size", "16", "--chunk-size", "8", "--val-samples", "32", "--zeroshot-images", "16", "--workers", "0"]
SMALL += ["--no-progress", "--eval-chunk-size", "16", "--warmup", "2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n_pairs"}


def run(out, *extra) -> dict:
    return main(["--out", str(out), *SMALL, *extra])


def losses(out) -> dict[int, float]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_help_documents_the_options():
    text = build_parser().format_help()
    for flag in (
        "--batch-size",
        "--chunk-size",
        "--loss",
        "--dist-impl",
        "--fsdp",
        "--precision",
        "--resume",
        "--model",
    ):
        assert flag in text
    assert "torchrun" in text and "eval --checkpoint" in text and "--csv-img-key" in text
    out = subprocess.run(
        [sys.executable, "-m", "mmfast.train", "eval", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--checkpoint" in out.stdout


def test_cli_from_a_fresh_process_then_eval(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mmfast.train",
        "--out",
        str(out),
        "--steps",
        "4",
        "--val-every",
        "2",
        "--save-every",
        "4",
    ]
    proc = subprocess.run(cmd + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "R@1 image->text / text->image" in proc.stdout and "zero-shot colour" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert VAL_KEYS <= set(summary["val"]) and summary["val"]["n_pairs"] == 32
    assert summary["world_size"] == 1 and summary["global_batch"] == 16 and summary["steps"] == 4
    assert summary["seconds"] > 0 and len(summary["losses"]) == 4
    assert (out / "curves.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval" in r] == [2, 4]
    ckpt = out / "checkpoints" / "step_00000004.pt"
    result = main(["eval", "--checkpoint", str(ckpt), "--zeroshot-images", "16"])
    for k in VAL_KEYS:
        assert result["val"][k] == pytest.approx(summary["val"][k]), k
    assert json.loads((out / "checkpoints" / "eval.json").read_text())["step"] == 4


def test_resume_latest_continues_bit_identically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--steps", "6", "--save-every", "3", "--keep-checkpoints", "0", "--val-samples", "0", "--no-plot"]
    run(a, *common)
    os.makedirs(b / "checkpoints")
    shutil.copy(a / "checkpoints" / "step_00000003.pt", b / "checkpoints")
    with open(a / "log.jsonl") as src, open(b / "log.jsonl", "w") as dst:  # the interrupted run's log
        dst.writelines(line for line in src if json.loads(line)["step"] <= 3)
    run(b, *common, "--resume", "latest")
    la, lb = losses(a), losses(b)
    assert list(lb) == [1, 2, 3, 4, 5, 6]
    assert [la[s] for s in (4, 5, 6)] == [lb[s] for s in (4, 5, 6)]  # exactly, not approximately
    final_a = torch.load(a / "checkpoints" / "step_00000006.pt", weights_only=False)
    final_b = torch.load(b / "checkpoints" / "step_00000006.pt", weights_only=False)
    for name, t in final_a["model"].items():
        assert torch.equal(t, final_b["model"][name]), name
    assert final_a["optimizer"]["state"].keys() == final_b["optimizer"]["state"].keys()
    for k, st in final_a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], final_b["optimizer"]["state"][k]["exp_avg"])


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_gradcache_steps_equal_the_plain_loop(tmp_path, loss):
    common = ["--steps", "3", "--loss", loss, "--val-samples", "0", "--save-every", "0", "--no-plot"]
    run(tmp_path / "gc", *common)
    run(tmp_path / "plain", *common, "--no-gradcache")
    gc, plain = losses(tmp_path / "gc"), losses(tmp_path / "plain")
    for s in (1, 2, 3):
        assert gc[s] == pytest.approx(plain[s], rel=1e-5, abs=1e-6), (s, gc, plain)


def test_bf16_runs(tmp_path):
    summary = run(
        tmp_path, "--steps", "2", "--precision", "bf16", "--val-samples", "16", "--save-every", "0", "--no-plot"
    )
    assert all(torch.isfinite(torch.tensor(summary["losses"])))


def test_csv_end_to_end(tmp_path):
    data = write_csv(tmp_path / "csv", 40, sep=",", img_key="img", cap_key="cap", corrupt=(5,))
    summary = run(
        tmp_path / "out", "--train-data", data, "--csv-separator", ",", "--csv-img-key", "img", "--csv-caption-key", "cap",
        "--steps", "3", "--val-samples", "8", "--save-every", "0", "--no-plot", "--context-length", "64",
    )  # fmt: skip
    assert summary["dataset_type"] == "auto" and summary["val"]["n_pairs"] + summary["val"]["skipped"] == 8
    assert summary["skipped_samples"] + summary["val"]["skipped"] >= 1  # img_5 is corrupt, counted where it fell


def test_coco_karpathy_end_to_end(tmp_path):
    ann, images, karpathy = write_coco(tmp_path / "coco", 24)
    summary = run(
        tmp_path / "out", "--dataset-type", "coco", "--train-data", ann, "--coco-images", images,
        "--coco-karpathy", karpathy, "--steps", "2", "--save-every", "0", "--no-plot", "--context-length", "64",
    )  # fmt: skip
    assert summary["val"]["n_images"] == 6 and summary["val"]["n_texts"] == 12  # two captions per image


def test_webdataset_end_to_end(tmp_path):
    train = write_shards(tmp_path / "train", 2, 16)
    val = write_shards(tmp_path / "val", 1, 8, seed=9)
    summary = run(
        tmp_path / "out", "--train-data", train, "--val-data", val, "--steps", "2", "--save-every", "0", "--no-plot",
        "--context-length", "64",
    )  # fmt: skip
    assert summary["val"]["n_pairs"] == 8


@pytest.mark.parametrize(
    "args, error, match",
    [
        (["--train-data", "/nonexistent/data.csv"], FileNotFoundError, "--train-data '/nonexistent/data.csv'"),
        (
            ["--dataset-type", "coco", "--train-data", "/nonexistent/c.json", "--coco-images", "/tmp"],
            FileNotFoundError,
            "--train-data",
        ),
        (["--train-data", "/nonexistent/{0..3}.tar"], FileNotFoundError, "shard"),
        (["--train-data", "data.parquet"], ValueError, "--dataset-type"),
        (["--model", "hf:/nonexistent"], FileNotFoundError, "no such folder"),
        (["--resume", "/nonexistent/step_1.pt"], FileNotFoundError, "checkpoint"),
        (["--dist-impl", "ring"], None, None),  # one process: no exchange, nothing to reject
    ],
)
def test_bad_arguments(tmp_path, args, error, match):
    if error is None:
        run(tmp_path, "--steps", "1", "--val-samples", "0", "--save-every", "0", "--no-plot", *args)
        return
    with pytest.raises(error, match=match):
        run(tmp_path, "--steps", "1", *args)


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--batch-size 15 is not divisible by the world size 2"):
        main(["--out", str(tmp_path), "--batch-size", "15"])


def test_empty_csv_is_an_error(tmp_path):
    (tmp_path / "empty.csv").write_text("filepath\ttitle\n")
    with pytest.raises(ValueError, match="no rows"):
        run(tmp_path / "out", "--train-data", str(tmp_path / "empty.csv"), "--steps", "1")


def test_rng_state_round_trip():
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from mmfast.train.checkpoint import rng_state, set_rng_state  # noqa: PLC0415

    state = rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
