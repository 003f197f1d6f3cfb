"""`var-train scaling fit` on synthetic runs drawn from known power laws with noise: alpha and beta
are recovered within a few percent, r is reported, the compute fit uses the frontier, and runs with
a missing or partial summary are reported, not used."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from var_train.scaling.fit import fit_power_law, frontier
from var_train.scaling.report import write_report

ALPHA_N, BETA_N = -0.20, 2.5e-11  # L = (beta N)^alpha: about 4 at 100M parameters
ALPHA_C, BETA_C = -0.15, 1e-20


def law(x, alpha, beta):
    return (beta * np.asarray(x, dtype=float)) ** alpha


def summary(depth, params, flops, loss, loss_last, finished=True, **extra):
    return {"depth": depth, "params": params, "train_flops": flops, "images_seen": 1000, "val_loss": loss,
            "val_loss_last_scale": loss_last, "val_acc": 0.05, "val_acc_last_scale": 0.02, "finished": finished,
            **extra}


def write_run(root: Path, name: str, data: dict | None, history: list[dict] | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if data is not None:
        (run / "summary.json").write_text(json.dumps(data))
    if history is not None:
        with open(run / "metrics.jsonl", "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
    return run


def test_power_law_fit_recovers_alpha_beta_and_reports_r():
    rng = np.random.default_rng(0)
    n = np.geomspace(18e6, 2e9, 12)  # the paper's range of sizes
    loss = law(n, ALPHA_N, BETA_N) * np.exp(rng.normal(0, 0.003, n.size))
    fit = fit_power_law(n, loss)
    assert fit.alpha == pytest.approx(ALPHA_N, rel=0.02)
    assert fit.beta == pytest.approx(BETA_N, rel=0.05)
    assert fit.r < -0.99 and fit.alpha_ci[0] < ALPHA_N < fit.alpha_ci[1]
    assert len(fit.points) == 12
    noisy = fit_power_law(n, law(n, ALPHA_N, BETA_N) * np.exp(rng.normal(0, 0.05, n.size)))
    assert noisy.r > fit.r and noisy.alpha_ci[1] - noisy.alpha_ci[0] > fit.alpha_ci[1] - fit.alpha_ci[0]
    assert fit_power_law([1e6], [4.0]).alpha is None  # one point: no fit, with a reason
    assert "at least 2 points" in fit_power_law([1e6], [4.0]).problem


def test_a_flat_curve_is_no_fit_with_a_reason_not_beta_zero():
    # Three short runs whose losses barely differ (a new user's 4-step sweep): the slope is ~1e-6,
    # so beta = exp(intercept / alpha) is beyond floating point.
    fit = fit_power_law([1.0e6, 2.0e6, 4.0e6], [5.5400, 5.5401, 5.5400])
    assert fit.alpha is None and fit.beta is None and "barely change" in fit.problem, fit


def test_frontier_keeps_the_lowest_loss_at_each_compute():
    curves = [[(1, 10.0), (2, 8.0), (4, 7.0)], [(2, 9.0), (4, 6.0), (8, 5.0)], [(3, 7.5), (8, 5.5), (16, 4.0)]]
    assert frontier(curves) == [(1, 10.0), (2, 8.0), (3, 7.5), (4, 6.0), (8, 5.0), (16, 4.0)]


def synthetic_sweep(root: Path, rng) -> list[Path]:
    """Six runs whose final losses lie on the params law (with noise) and, at the compute each
    run spent, on the compute law; earlier validations are twice the compute law (well above the
    frontier). The smallest run has only its summary.json (copied from elsewhere); the largest is
    unfinished."""
    params = np.geomspace(2e7, 2e9, 6)
    runs = []
    for i, n in enumerate(params):
        loss = float(law(n, ALPHA_N, BETA_N)) * math.exp(rng.normal(0, 0.003))
        c = loss ** (1 / ALPHA_C) / BETA_C  # the compute at which the compute law reaches `loss`
        data = summary(6 + 2 * i, int(n), c, loss, loss * 0.9, finished=i < 5)
        history = None
        if i > 0:
            history = [{"step": s, "val/loss": 2 * float(law(f * c, ALPHA_C, BETA_C)), "val/loss_last_scale": 2.0,
                        "val/acc": 0.1, "val/acc_last_scale": 0.1, "progress/train_flops": f * c}
                       for s, f in ((10, 0.4), (20, 0.6), (30, 0.8))]
            history.append({"step": 40, "val/loss": loss, "val/loss_last_scale": loss * 0.9, "val/acc": 0.05,
                            "val/acc_last_scale": 0.02, "progress/train_flops": c})
            history.append({"step": 40, "train/loss": 1.0})  # not a validation record
        runs.append(write_run(root, f"d{6 + 2 * i}", data, history))
    return runs


def test_fit_report_on_synthetic_runs(tmp_path):
    runs = synthetic_sweep(tmp_path / "runs", np.random.default_rng(1))
    missing = write_run(tmp_path / "runs", "d99-no-summary", None, [{"step": 1, "train/loss": 3.0}])
    partial = write_run(tmp_path / "runs", "d98-partial", {"depth": 98, "params": 10, "train_flops": 1e9})
    report = write_report([*runs, missing, partial], tmp_path / "out")
    fits = json.loads((tmp_path / "out" / "fit.json").read_text())
    metrics = ("val_loss", "val_loss_last_scale", "val_error_rate", "val_error_rate_last_scale")
    for metric in metrics:
        for x in ("params", "compute"):
            assert {"alpha", "beta", "r", "alpha_ci", "points"} <= set(fits[f"{metric}_vs_{x}"])
    assert fits["val_loss_vs_params"]["alpha"] == pytest.approx(ALPHA_N, rel=0.03)
    assert fits["val_loss_vs_params"]["beta"] == pytest.approx(BETA_N, rel=0.1)
    assert fits["val_loss_vs_params"]["r"] < -0.99 and len(fits["val_loss_vs_params"]["points"]) == 6
    # Compute: the frontier is the six final points (the smallest from its summary only); the
    # earlier points, twice the law, are not on it.
    compute_fit = fits["val_loss_vs_compute"]
    assert len(compute_fit["points"]) == 6
    assert compute_fit["alpha"] == pytest.approx(ALPHA_C, rel=0.01)
    assert compute_fit["beta"] == pytest.approx(BETA_C, rel=0.05)
    # Error rate = 1 - accuracy (0.95 for every run here): constant, so no power law, with a reason.
    constant = fits["val_error_rate_vs_params"]
    assert constant["alpha"] is None and "all 0.95" in constant["problem"]
    left = {Path(r["path"]).name: r["status"] for r in fits["left_out"]}
    assert "no summary.json" in left["d99-no-summary"]
    assert "partial summary.json" in left["d98-partial"] and "val_loss" in left["d98-partial"]
    assert [r["finished"] for r in fits["runs"]] == [True] * 5 + [False]
    table = (tmp_path / "out" / "fit.md").read_text()
    assert "unfinished" in table and "d99-no-summary" in table and "-0.20" in table  # the paper's column
    for png in ("scaling_params.png", "scaling_compute.png", "scaling_losses.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report.runs) == 6 and len(report.left_out) == 2

    finished = write_report([tmp_path / "runs"], tmp_path / "finished", finished_only=True, plots=False)
    assert len(finished.runs) == 5 and any("unfinished" in r.problem for r in finished.left_out)


def test_cli_fit_and_its_user_error(tmp_path):
    runs = synthetic_sweep(tmp_path / "runs", np.random.default_rng(2))
    cmd = [sys.executable, "-m", "var_train.cli", "scaling", "fit", *map(str, runs[:3]), "--out", str(tmp_path / "o"),
           "--no-plots"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "val_loss_vs_params" in proc.stdout and (tmp_path / "o" / "fit.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([*cmd[:5], str(empty), "--out", str(tmp_path / "o2")], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run to fit") and "Traceback" not in proc.stderr


def test_fit_is_logged_to_wandb_when_a_project_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = synthetic_sweep(tmp_path / "runs", np.random.default_rng(3))
    write_report(runs, tmp_path / "out", wandb_project="scaling-test", wandb_mode="offline", wandb_group="sweep-1")
    runs_dir = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs_dir) == 1 and list(runs_dir[0].glob("run-*.wandb"))
    media = runs_dir[0] / "files" / "media"
    table = json.loads(next(media.glob("table/scaling/fits_*.table.json")).read_text())
    assert table["columns"][:2] == ["fit", "alpha"] and len(table["data"]) == 8
    row = next(r for r in table["data"] if r[0] == "val_loss_vs_params")
    assert row[1] == pytest.approx(ALPHA_N, rel=0.03)
    images = {p.name.split("_0_")[0] for p in media.glob("images/scaling/*.png")}
    assert images == {"scaling_params", "scaling_compute", "scaling_losses"}


def small_sweep(root: Path, sizes: dict[int, int]) -> Path:
    """depth -> params: runs validated at 4 steps, each point below the last (its learning curve),
    the larger models lower; FLOPs per image proportional to params. Written out by hand."""
    for depth, params in sizes.items():
        history = [{"step": step, "val/loss": 6.0 - 0.1 * depth - step / 400, "val/loss_last_scale": 6.5 - step / 400,
                    "val/acc": 0.1 + depth / 100 + step / 1e4, "val/acc_last_scale": 0.05 + step / 1e4,
                    "progress/train_flops": step * 64 * 32.0 * params} for step in (100, 200, 300, 400)]
        last = history[-1]
        write_run(root, f"d{depth}", summary(depth, params, last["progress/train_flops"], last["val/loss"],
                                             last["val/loss_last_scale"], val_acc=last["val/acc"]), history)
    return root


def fit_cli(runs, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "var_train.cli", "scaling", "fit", *map(str, runs), "--out", str(out),
                           "--no-plots"], cwd=REPO_ROOT, capture_output=True, text=True)


def test_a_fit_on_one_size_says_it_is_a_learning_curve_and_why_the_params_fits_are_missing(tmp_path):
    root = small_sweep(tmp_path / "runs", {1: 31_234})
    proc = fit_cli([root / "d1"], tmp_path / "fit")
    assert proc.returncode == 0, proc.stderr
    fit_md = (tmp_path / "fit" / "fit.md").read_text()
    for text in (proc.stdout, fit_md):  # the console shows fit.md: both say it
        assert "needs at least 2 points with different x, got 1" in text  # why the params fits are "—"
        assert "one model's learning curve, not a scaling law" in text
        assert "1 model size (d1)" in text and "train at least 3 sizes" in text
        assert "31.2k" in text and "0.0M" not in text  # the runs table
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 model size (d1)" in warnings[0], proc.stderr
    fits = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fits["val_loss_vs_params"]["alpha"] is None and fits["val_loss_vs_params"]["sizes"] == 1
    compute = fits["val_loss_vs_compute"]  # made (4 points of d1's curve), and marked
    assert compute["alpha"] is not None and len(compute["points"]) == 4 and compute["sizes"] == 1
    assert "learning curve" in compute["warning"] and len(fits["warnings"]) == 1
    assert {"alpha", "beta", "r", "alpha_ci", "points", "confidence", "problem"} <= set(compute)  # kept


def test_a_fit_on_two_sizes_warns_that_r_says_nothing(tmp_path):
    root = small_sweep(tmp_path / "runs", {1: 31_234, 2: 160_000})
    proc = fit_cli([root], tmp_path / "fit")
    assert proc.returncode == 0, proc.stderr
    fits = json.loads((tmp_path / "fit" / "fit.json").read_text())
    params = fits["val_loss_vs_params"]
    assert params["r"] == pytest.approx(-1.0) and params["alpha_ci"] is None and params["sizes"] == 2
    assert "two points always lie on a line" in params["warning"]
    assert "only 2 model sizes" in fits["val_loss_vs_compute"]["warning"]
    fit_md = (tmp_path / "fit" / "fit.md").read_text()
    for text in (proc.stdout, fit_md):
        assert "2 model sizes (d1, d2)" in text and "two points always lie on a line" in text
        assert "31.2k" in text and "160.0k" in text
    assert any(line.startswith("warning: the fits rest on 2 model sizes") for line in proc.stderr.splitlines())


def test_three_sizes_carry_no_warning(tmp_path):
    root = small_sweep(tmp_path / "runs", {1: 31_234, 2: 160_000, 3: 460_000})
    report = write_report([root], tmp_path / "fit", plots=False)
    assert report.warnings == [] and report.fits["val_loss_vs_params"].warning is None
    assert report.fits["val_loss_vs_params"].sizes == 3
    assert "Warning" not in (tmp_path / "fit" / "fit.md").read_text()


def test_the_frontier_of_one_model_is_a_learning_curve_however_many_runs(tmp_path):
    # d2's curve lies below d1's and starts at less compute: the frontier is d2's alone.
    for depth, start, flops in ((1, 5.0, 1e9), (2, 4.0, 1e8)):
        history = [{"step": s, "val/loss": start - s / 100, "val/loss_last_scale": 5.0, "val/acc": 0.1,
                    "val/acc_last_scale": 0.1, "progress/train_flops": s * flops} for s in (1, 2, 3)]
        write_run(tmp_path / "runs", f"d{depth}", summary(depth, 1000 * depth, history[-1]["progress/train_flops"],
                                                         history[-1]["val/loss"], 5.0), history)
    report = write_report([tmp_path / "runs"], tmp_path / "fit", plots=False)
    assert report.fits["val_loss_vs_compute"].points == [[1e8, 3.99], [2e8, 3.98], [3e8, 3.97]]
    assert report.fits["val_loss_vs_compute"].sizes == 1
    assert "one model's learning curve" in report.fits["val_loss_vs_compute"].warning


@pytest.mark.parametrize("count, text", [(0, "0"), (950, "950"), (31_234, "31.2k"), (999_960, "1.0M"),
                                         (3_100_000, "3.1M"), (310_283_520, "310.3M"), (2_010_020_356, "2.0B")])
def test_parameter_counts_are_readable_at_any_size(count, text):
    from var_train.scaling.summary import format_count

    assert format_count(count) == text
