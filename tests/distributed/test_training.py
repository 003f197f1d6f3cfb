"""The trainer end to end under torchrun (2 CPU processes, gloo) on learnable tiny token shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.checkpoint import latest_checkpoint, read_metadata
from var_train.preemption import EXIT_CODE_PREEMPTED

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return make_learnable_shards(root / "shards"), make_tiny_vae(root / "vae.safetensors")


def train_args(data, run_dir: Path, *overrides: str) -> list[str]:
    shards, vae = data
    return ["var_train.cli", "train", "--recipe", "recipes/tiny.yaml", f"data.train_shards={shards}",
            f"data.vae={vae}", f"run.output_dir={run_dir}", *overrides]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_rank_training_lowers_the_loss(data, tmp_path, engine):
    run_dir = tmp_path / engine
    proc = run_torchrun("-m", *train_args(data, run_dir, f"parallel.engine={engine}", "optim.max_steps=16"))
    assert "on 2 x cpu" in proc.stdout, proc.stdout  # the world size the trainer saw
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 17))
    assert all(math.isfinite(v) for v in curve.values())
    assert curve[16] < curve[1] - 0.1, curve
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert read_metadata(checkpoint)["world_size"] == 2 and read_metadata(checkpoint)["step"] == 16


def test_interrupted_run_resumes_exactly_and_on_one_rank(data, tmp_path):
    common = ("optim.max_steps=12", "checkpoint.every_steps=4")
    full = tmp_path / "uninterrupted"
    run_torchrun("-m", *train_args(data, full, *common))

    resumed = tmp_path / "interrupted"
    first = run_torchrun("-m", *train_args(data, resumed, *common, "run.stop_after_steps=6"), check=False)
    assert first.returncode != 0 and f"exiting with {EXIT_CODE_PREEMPTED}" in first.stdout
    assert read_metadata(latest_checkpoint(resumed / "checkpoints"))["step"] == 6
    second = run_torchrun("-m", *train_args(data, resumed, *common))
    assert "resumed from step 6" in second.stdout
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], abs=1e-6), f"step {step}: {b[step]} vs {a[step]}"

    # The 2-rank checkpoint at step 6 continues on a single rank (resharded by DCP).
    one_rank = tmp_path / "one_rank"
    (one_rank / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(resumed / "checkpoints" / "step-00000008", one_rank / "checkpoints" / "step-00000008")
    proc = run_torchrun("-m", *train_args(data, one_rank, *common), nproc=1)
    assert "on 1 x cpu" in proc.stdout and "resumed from step 8" in proc.stdout
    curve = losses(one_rank)
    assert sorted(curve) == list(range(9, 13)) and all(math.isfinite(v) for v in curve.values())
