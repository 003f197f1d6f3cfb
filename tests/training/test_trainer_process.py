"""The trainer as users start it, one process: preemption signal, non-finite steps, W&B resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.checkpoint import latest_checkpoint, read_metadata
from var_train.preemption import EXIT_CODE_NONFINITE, EXIT_CODE_PREEMPTED

SECRET = "test-api-key-that-must-never-be-written"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return make_learnable_shards(root / "shards", num_records=64), make_tiny_vae(root / "vae.safetensors")


def command(data, run_dir, *overrides):
    shards, vae = data
    return [sys.executable, "-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml",
            f"data.train_shards={shards}", f"data.vae={vae}", f"run.output_dir={run_dir}",
            "data.num_workers=0", "optim.global_batch_size=4", *overrides]


def environment():
    # Without WANDB_SERVICE: a W&B run started earlier in this pytest process exports it, and the
    # child would then attach to that service instead of starting its own, as a real job does.
    inherited = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    return {**inherited, "WANDB_API_KEY": SECRET, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_ROOT)}


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_checkpoints_exits_42_and_resumes_the_same_wandb_run(data, tmp_path):
    run_dir = tmp_path / "run"
    args = command(data, run_dir, "optim.max_steps=400", "logging.wandb_mode=offline", "checkpoint.every_steps=1000")
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(row.get("step", 0) >= 3 for row in metrics(run_dir)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_CODE_PREEMPTED, output
    step = read_metadata(latest_checkpoint(run_dir / "checkpoints"))["step"]
    assert 3 <= step < 400 and f"checkpoint saved at step {step}" in output

    finish = subprocess.run(command(data, run_dir, f"optim.max_steps={step + 2}", "logging.wandb_mode=offline"),
                            cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert f"resumed from step {step}" in finish.stdout
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1], runs
    for text in (output, finish.stdout, finish.stderr, (run_dir / "config.yaml").read_text(),
                 (run_dir / "metrics.jsonl").read_text()):
        assert SECRET not in text


def test_non_finite_steps_are_skipped_then_stop_the_run(data, tmp_path):
    skipped = tmp_path / "skipped"
    proc = subprocess.run(command(data, skipped, "optim.max_steps=4", "run.debug_nonfinite_steps=[1]"),
                          cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["step"]: row for row in metrics(skipped) if "train/nonfinite_steps" in row}
    assert rows[1]["train/nonfinite_steps"] == 0 and rows[2]["train/nonfinite_steps"] == 1
    assert rows[4]["train/nonfinite_steps"] == 1 and isinstance(rows[4]["train/loss"], float)

    stopped = tmp_path / "stopped"
    proc = subprocess.run(command(data, stopped, "optim.max_steps=20", "run.debug_nonfinite_steps=[2,3,4,5]",
                                  "run.max_consecutive_nonfinite=2"),
                          cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == EXIT_CODE_NONFINITE, proc.stdout + proc.stderr
    assert "consecutive steps had a non-finite loss" in proc.stdout
    assert read_metadata(latest_checkpoint(stopped / "checkpoints"))["step"] == 5


def test_a_resume_after_a_lost_checkpoint_keeps_one_metrics_row_per_step(data, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run(command(data, run_dir, "optim.max_steps=6", "checkpoint.every_steps=3"),
                           cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    # A crash after step 6 was logged but before its checkpoint was committed: the run has rows
    # for steps 4-6 that the resumed job trains again from step 3.
    shutil.rmtree(latest_checkpoint(run_dir / "checkpoints"))
    assert read_metadata(latest_checkpoint(run_dir / "checkpoints"))["step"] == 3
    before = [row["step"] for row in metrics(run_dir) if "train/loss" in row]
    assert before == [1, 2, 3, 4, 5, 6], before

    again = subprocess.run(command(data, run_dir, "optim.max_steps=6", "checkpoint.every_steps=3"),
                           cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from step 3" in again.stdout and "dropped 3 rows after step 3" in again.stdout, again.stdout
    steps = [row["step"] for row in metrics(run_dir) if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6], steps
