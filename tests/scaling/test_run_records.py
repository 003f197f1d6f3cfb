"""What every run records for the scaling laws, checked on real 2-process CPU runs (gloo):
cumulative FLOPs (k steps -> k x global batch x FLOPs per image, continued across a resume) and
summary.json with every key the fit reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.nn as nn

from tests.conftest import run_torchrun
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.config import load_config

pytestmark = pytest.mark.distributed

SUMMARY_KEYS = {"depth", "params", "train_flops", "images_seen", "val_loss", "val_loss_last_scale", "val_acc",
                "val_acc_last_scale"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling_data")
    return (make_learnable_shards(root / "train"), make_learnable_shards(root / "val", num_records=64, seed=1),
            make_tiny_vae(root / "vae.safetensors"))


def train(data, run_dir: Path, *overrides: str, check: bool = True):
    train_shards, val_shards, vae = data
    return run_torchrun("-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml",
                        f"data.train_shards={train_shards}", f"data.val_shards={val_shards}", f"data.vae={vae}",
                        f"run.output_dir={run_dir}", "run.val_batches=4", *overrides, check=check)


def independent_flops_per_image(recipe_overrides=()) -> float:
    """The paper's count from the module shapes: 6 x (weights of the per-token linears x L + the
    AdaLN linears, which run once per image). Written independently of VAR.train_flops_per_image."""
    from var_train.train import build_model

    cfg = load_config("recipes/tiny.yaml", list(recipe_overrides))
    model = build_model(cfg)
    tokens = sum(p * p for p in cfg.model.patch_nums)
    per_token = per_image = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if "ada_lin" in name:
                per_image += module.in_features * module.out_features
            else:
                per_token += module.in_features * module.out_features
    return 6.0 * (per_token * tokens + per_image)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flops_and_summary_of_a_two_process_run(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(data, run_dir, "optim.max_steps=6", "run.val_every_steps=3")
    assert "on 2 x cpu" in proc.stdout, proc.stdout
    flops = independent_flops_per_image()
    batch = 16  # recipes/tiny.yaml's global batch: 2 ranks x micro 4 x accumulation 2
    rows = records(run_dir)
    for row in rows:
        if "train/loss" in row:
            assert row["progress/images_seen"] == row["step"] * batch
            assert row["progress/train_flops"] == pytest.approx(row["step"] * batch * flops, rel=1e-9)
    validations = [row for row in rows if "val/loss" in row]
    assert [row["step"] for row in validations] == [3, 6]  # the end (step 6) is validated once
    for row in validations:
        assert row["progress/train_flops"] == pytest.approx(row["step"] * batch * flops, rel=1e-9)
        assert row["val/error_rate"] == pytest.approx(1 - row["val/acc"])
        assert row["val/error_rate_last_scale"] == pytest.approx(1 - row["val/acc_last_scale"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["depth"] == 2 and summary["finished"] is True and summary["step"] == 6
    assert summary["images_seen"] == 6 * batch
    assert summary["train_flops"] == pytest.approx(6 * batch * flops, rel=1e-9)
    assert summary["params"] == sum(p.numel() for p in __import__("var_train.train", fromlist=["x"])
                                    .build_model(load_config("recipes/tiny.yaml")).parameters())
    last = validations[-1]
    assert summary["val_loss"] == pytest.approx(last["val/loss"]) and summary["val_step"] == 6
    assert summary["val_acc_last_scale"] == pytest.approx(last["val/acc_last_scale"])
    assert not list(run_dir.glob(".tmp-*"))  # written atomically


def test_resumed_run_continues_the_compute_count(data, tmp_path):
    """4 steps of global batch 16, then resumed with global batch 32: the count continues from the
    checkpoint (64 images) and adds 32 per step; a count rebuilt from the step (8 x 32) would differ."""
    run_dir = tmp_path / "run"
    first = train(data, run_dir, "optim.max_steps=8", "run.stop_after_steps=4", "checkpoint.every_steps=2",
                  check=False)
    assert first.returncode != 0, first.stdout + first.stderr  # torchrun reports the ranks' exit 42 as 1
    assert "preempted: checkpoint saved at step 4" in first.stdout
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["finished"] is False and interrupted["images_seen"] == 64
    train(data, run_dir, "optim.max_steps=8", "checkpoint.every_steps=2", "optim.global_batch_size=32")
    summary = json.loads((run_dir / "summary.json").read_text())
    flops = independent_flops_per_image()
    assert summary["finished"] is True and summary["step"] == 8
    assert summary["images_seen"] == 4 * 16 + 4 * 32
    assert summary["train_flops"] == pytest.approx((4 * 16 + 4 * 32) * flops, rel=1e-9)
    last = [row for row in records(run_dir) if "train/loss" in row][-1]
    assert last["step"] == 8 and last["progress/images_seen"] == 4 * 16 + 4 * 32
