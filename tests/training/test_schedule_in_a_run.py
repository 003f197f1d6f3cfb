"""The learning-rate and weight-decay schedules as a real run applies them, against the paper's
recipe written out here by hand (REFERENCE.md, "Training recipe of the paper"):

    peak = base_lr x global_batch / 256; linear warmup over `warmup_epochs` from 0.005 x peak;
    then the peak is held for 5% of the remaining steps, then a linear decay to wpe x peak at the
    last step; weight decay on the "decay" group only (d30: a cosine rise from 0.05 to 0.08),
    never on the "no_decay" group.

Nothing here calls var_train.schedules: the formulas below are the oracle.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.config import load_config

WORKER = Path(__file__).with_name("schedule_worker.py")
NUM_RECORDS = 128
# The run: the tiny recipe for 3 epochs of 128 records, 8 per micro-batch, 16 per step (two
# micro-batches accumulated) -> 8 steps per epoch, 24 steps; warmup 0.25 epochs = 2 steps.
BASE_LR, GLOBAL_BATCH, MICRO_BATCH, EPOCHS, WARMUP_EPOCHS = 5e-2, 16, 8, 3, 0.25
WD_START, WD_END = 0.05, 0.08


def paper_lr(step: int, total: int, warmup: int, peak: float, wpe: float, hold: float = 0.05,
             start_ratio: float = 0.005) -> float:
    if step < warmup:
        return peak * (start_ratio + (1 - start_ratio) * step / warmup)
    progress = (step - warmup) / (total - 1 - warmup)  # 0 after warmup, 1 at the last step
    if progress < hold:
        return peak
    return peak * (wpe + (1 - wpe) * (1 - progress) / (1 - hold))


def paper_weight_decay(step: int, total: int, start: float, end: float) -> float:
    progress = step / (total - 1)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedule_run")
    shards = make_learnable_shards(root / "shards", num_records=NUM_RECORDS)
    vae = make_tiny_vae(root / "vae.safetensors")
    run_dir, out_json = root / "run", root / "groups.json"
    overrides = [f"data.train_shards={shards}", f"data.vae={vae}", f"run.output_dir={run_dir}",
                 f"optim.epochs={EPOCHS}", f"optim.warmup_epochs={WARMUP_EPOCHS}", f"optim.micro_batch_size={MICRO_BATCH}",
                 f"optim.weight_decay={WD_START}", f"optim.weight_decay_end={WD_END}", "checkpoint.every_steps=0",
                 "logging.log_every=1"]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_JOB_ID", "SLURM_STEP_ID")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(WORKER), str(out_json), "recipes/tiny.yaml", *overrides], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/lr" in r], json.loads(out_json.read_text())


def test_logged_lr_and_weight_decay_follow_the_paper_schedule_at_every_step(run):
    rows, recorded = run
    steps_per_epoch = (NUM_RECORDS // MICRO_BATCH) // (GLOBAL_BATCH // MICRO_BATCH)
    total, warmup = EPOCHS * steps_per_epoch, round(WARMUP_EPOCHS * steps_per_epoch)
    assert (steps_per_epoch, total, warmup) == (8, 24, 2) and recorded["steps_per_epoch"] == 8
    peak = BASE_LR * GLOBAL_BATCH / 256
    assert [r["step"] for r in rows] == list(range(1, total + 1)), "log_every=1 must log every step"
    for row in rows:
        step = row["step"] - 1  # the logged step counts finished steps; step t ran with lr(t)
        assert row["train/lr"] == pytest.approx(paper_lr(step, total, warmup, peak, wpe=0.1), rel=1e-9, abs=0), step
        assert row["train/weight_decay"] == pytest.approx(paper_weight_decay(step, total, WD_START, WD_END),
                                                          rel=1e-9), step
    # The shape itself: warmup from 0.005 x peak, held at the peak right after it, wpe x peak at the end.
    lrs = [r["train/lr"] for r in rows]
    assert lrs[0] == pytest.approx(0.005 * peak) and lrs[warmup] == lrs[warmup + 1] == pytest.approx(peak)
    assert lrs[warmup + 2] < peak and lrs[-1] == pytest.approx(0.1 * peak)


def test_no_decay_group_is_never_decayed_and_the_optimizer_holds_the_logged_values(run):
    rows, recorded = run
    assert recorded["exit_code"] == 0 and len(recorded["groups"]) == len(rows)
    for row, groups in zip(rows, recorded["groups"]):
        by_name = {g["name"]: g for g in groups}
        assert set(by_name) == {"decay", "no_decay"}, by_name
        assert by_name["no_decay"]["weight_decay"] == 0.0, (row["step"], by_name["no_decay"])
        assert by_name["decay"]["weight_decay"] == pytest.approx(row["train/weight_decay"], rel=1e-12)
        assert all(g["lr"] == pytest.approx(row["train/lr"], rel=1e-12) for g in groups)
        assert by_name["decay"]["num_params"] > 0 and by_name["no_decay"]["num_params"] > 0


# The paper's schedule keys of each released recipe (REFERENCE.md), written by hand.
PAPER_RECIPES = {
    "d16": dict(base_lr=1e-4, global_batch_size=768, epochs=200, wpe=0.1, weight_decay_end=None),
    "d20": dict(base_lr=1e-4, global_batch_size=768, epochs=250, wpe=0.1, weight_decay_end=None),
    "d24": dict(base_lr=8e-5, global_batch_size=768, epochs=350, wpe=0.01, weight_decay_end=None),
    "d30": dict(base_lr=8e-5, global_batch_size=1024, epochs=350, wpe=0.01, weight_decay_end=0.08),
}


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_recipes_pin_the_papers_schedule(name):
    optim = load_config(REPO_ROOT / "recipes" / f"{name}.yaml").optim
    expected = {**PAPER_RECIPES[name], "weight_decay": 0.05, "hold_fraction": 0.05, "warmup_start_ratio": 0.005,
                "warmup_epochs": None, "betas": [0.9, 0.95], "clip_grad_norm": 2.0}
    actual = {key: getattr(optim, key) for key in expected}
    if actual["warmup_epochs"] is not None:  # written out as epochs / 50 is the same schedule
        assert actual["warmup_epochs"] == pytest.approx(expected["epochs"] / 50)
        actual["warmup_epochs"] = None
    assert actual == expected, (name, actual, expected)
