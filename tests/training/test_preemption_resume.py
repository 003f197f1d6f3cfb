"""One trainer process preempted the way Slurm does it, then started again, equals the run that was
never interrupted: same loss at every step.

Slurm signals every process of a job step, not only the trainer: here SIGTERM goes to the whole
process group, so the DataLoader worker (data.num_workers=1) and W&B's service process get it too.
Only the trainer may act on it: the worker ignores it, a dead W&B is not fatal, and the run
checkpoints and exits 42.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.checkpoint import latest_checkpoint, read_metadata
from var_train.preemption import EXIT_CODE_PREEMPTED

MAX_STEPS = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_data")
    return make_learnable_shards(root / "shards", num_records=64), make_tiny_vae(root / "vae.safetensors")


def command(data, run_dir: Path) -> list[str]:
    shards, vae = data
    return [sys.executable, "-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml",
            f"data.train_shards={shards}", f"data.vae={vae}", f"run.output_dir={run_dir}",
            "data.num_workers=1", "optim.global_batch_size=4", f"optim.max_steps={MAX_STEPS}",
            "checkpoint.every_steps=1000", "logging.wandb_mode=offline"]


def environment() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}  # a redone step: the last


def test_sigterm_to_every_process_then_restart_equals_the_uninterrupted_run(data, tmp_path):
    full = tmp_path / "uninterrupted"
    done = subprocess.run(command(data, full), cwd=REPO_ROOT, env=environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = losses(full)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))

    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(command(data, run_dir), cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and max(losses(run_dir), default=0) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it was signalled"
        os.killpg(proc.pid, signal.SIGTERM)  # like Slurm: the trainer, its loader worker, wandb-core
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_CODE_PREEMPTED, output[-4000:]
    assert "killed by signal" not in output, output[-4000:]
    step = read_metadata(latest_checkpoint(run_dir / "checkpoints"))["step"]
    assert 2 <= step < MAX_STEPS and f"checkpoint saved at step {step}" in output

    again = subprocess.run(command(data, run_dir), cwd=REPO_ROOT, env=environment(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    for s in range(1, MAX_STEPS + 1):
        assert resumed[s] == pytest.approx(expected[s], abs=1e-6), f"step {s}: {resumed[s]} vs {expected[s]}"
