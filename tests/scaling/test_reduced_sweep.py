"""A 3-size reduced sweep on real runs (1 CPU process each, a few steps), fitted with
`var-train scaling fit`: the fit reads what the trainer wrote (summary.json + metrics.jsonl)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_torchrun
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae

pytestmark = pytest.mark.distributed


def test_three_size_sweep_is_fitted_from_its_runs(tmp_path):
    train, val = make_learnable_shards(tmp_path / "train"), make_learnable_shards(tmp_path / "val", 32, seed=3)
    vae = make_tiny_vae(tmp_path / "vae.safetensors")
    runs = []
    for depth in (1, 2, 3):
        run_dir = tmp_path / "runs" / f"d{depth}"
        proc = run_torchrun("-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml",
                            f"data.train_shards={train}", f"data.val_shards={val}", f"data.vae={vae}", f"run.output_dir={run_dir}",
                            f"model.depth={depth}", f"model.embed_dim={16 * depth}", f"model.num_heads={depth}",
                            "optim.max_steps=4", "run.val_every_steps=2", "checkpoint.every_steps=0",
                            "optim.micro_batch_size=8", nproc=1)
        assert "on 1 x cpu" in proc.stdout
        runs.append(run_dir)
    out = tmp_path / "fit"
    proc = subprocess.run([sys.executable, "-m", "var_train.cli", "scaling", "fit", str(tmp_path / "runs"), "--out",
                           str(out)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    fits = json.loads((out / "fit.json").read_text())
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert [s["depth"] for s in summaries] == [1, 2, 3] and all(s["finished"] for s in summaries)
    by_params = fits["val_loss_vs_params"]
    assert sorted(by_params["points"]) == sorted([[s["params"], s["val_loss"]] for s in summaries])
    assert by_params["alpha"] is not None and -1 <= by_params["r"] <= 1 and by_params["alpha_ci"] is not None
    # The compute frontier is drawn from the validations at steps 2 and 4 of every run.
    compute_points = fits["val_loss_vs_compute"]["points"]
    logged = {(row["progress/train_flops"], row["val/loss"]) for run in runs
              for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in row}
    assert len(logged) == 6 and compute_points and all(tuple(p) in logged for p in compute_points)
    assert min(p[0] for p in compute_points) == min(c for c, _ in logged)  # the cheapest point starts it
    assert (out / "scaling_params.png").is_file() and (out / "scaling_compute.png").is_file()
