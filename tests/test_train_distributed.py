"""``torchrun --standalone --nproc_per_node 2 -m mmfast.train`` on gloo: it reports world size 2 and
its per-step losses equal one process with the same global batch (fp32, 1e-4) -- with DDP, with
FSDP2 (whose full checkpoint then evaluates in one process), and with the ring exchange of
mmfast.nn's losses. Each torchrun is a subprocess bounded by a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmfast.train.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--steps", "5", "--batch-size", "16", "--chunk-size", "4", "--val-samples", "32", "--zeroshot-images", "0"]
ARGS += ["--workers", "0", "--no-progress", "--no-plot", "--warmup", "2", "--eval-chunk-size", "8"]
TIMEOUT_S = 240


def torchrun(out, *extra) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "mmfast.train", "--out", str(out), *ARGS, *extra]
    # PYTHONFAULTHANDLER: a rank killed by a signal (e.g. an abort in gloo's teardown) prints every
    # thread's Python stack to its stderr, which the failure message shows.
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads((out / "summary.json").read_text())


def one_process(out, *extra) -> dict:
    return main(["--out", str(out), *ARGS, *extra])


def assert_same_losses(two: dict, one: dict) -> None:
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_batch"] == one["global_batch"] == 16 and two["local_batch"] == 8
    assert len(two["losses"]) == len(one["losses"]) == 5
    for step, (a, b) in enumerate(zip(two["losses"], one["losses"]), 1):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), f"step {step}: 2 processes {a}, 1 process {b}"


def test_torchrun_ddp_equals_one_process(tmp_path):
    two = torchrun(tmp_path / "ddp")
    one = one_process(tmp_path / "one")
    assert_same_losses(two, one)
    assert two["val"]["n_pairs"] == 32
    for k in ("i2t_r1", "t2i_r10"):  # the same weights after 5 steps: the same retrieval
        assert two["val"][k] == pytest.approx(one["val"][k], abs=1 / 32)


def test_torchrun_fsdp2_equals_one_process_and_saves_a_full_checkpoint(tmp_path):
    two = torchrun(tmp_path / "fsdp", "--fsdp", "--loss", "siglip", "--save-every", "5")
    one = one_process(tmp_path / "one", "--loss", "siglip", "--save-every", "0")
    assert_same_losses(two, one)
    result = main(["eval", "--checkpoint", str(tmp_path / "fsdp" / "checkpoints" / "step_00000005.pt")])
    assert result["world_size"] == 1
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert result["val"][k] == pytest.approx(two["val"][k], abs=1 / 32)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_torchrun_ring_equals_one_process(tmp_path, loss):
    two = torchrun(tmp_path / "ring", "--dist-impl", "ring", "--loss", loss)
    one = one_process(tmp_path / "one", "--loss", loss)
    assert_same_losses(two, one)


def test_dist_impl_is_checked():
    from mmfast.train.objectives import _dist_kwargs  # noqa: PLC0415

    with pytest.raises(ValueError, match="--dist-impl"):
        _dist_kwargs("bidir")
    assert _dist_kwargs("ring") == {"dist_impl": "ring"}
