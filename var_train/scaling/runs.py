"""Reading training runs back for the scaling fits.

A run directory holds `summary.json` (the run's size, compute and latest validation, written by the
trainer) and usually `metrics.jsonl` (every logged record; its validation records, each with the
cumulative compute `progress/train_flops`, make the run's test-loss curve). A directory with only a
summary.json (copied from a cluster, or written by another tool) contributes its final point; a
directory without a usable summary (missing, unreadable, no validation yet, keys missing) is
reported with the reason and not fitted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .summary import SUMMARY_FILE, TRAIN_FLOPS, VALIDATION_KEYS

# The four test metrics of the paper's figures: loss and token error rate, mean and last scale.
METRICS = ("val_loss", "val_loss_last_scale", "val_error_rate", "val_error_rate_last_scale")
REQUIRED = ("depth", "params", "train_flops", "val_loss", "val_loss_last_scale", "val_acc", "val_acc_last_scale")


@dataclass
class RunRecord:
    path: Path
    depth: int | None = None
    params: int | None = None
    train_flops: float | None = None
    finished: bool = False
    final: dict[str, float] = field(default_factory=dict)  # metric -> value at the latest validation
    final_flops: float | None = None  # cumulative compute at that validation
    history: list[dict[str, float]] = field(default_factory=list)  # {"train_flops", metric...} by step
    problem: str | None = None  # why the run cannot be used (None: usable)

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return self.path.name

    def status(self) -> str:
        if self.problem:
            return f"not used: {self.problem}"
        return "finished" if self.finished else "unfinished"


def _with_error_rates(values: dict) -> dict:
    """Summary/metric fields -> the four METRICS (error rate = 1 - accuracy when not recorded)."""
    out = dict(values)
    for suffix in ("", "_last_scale"):
        if out.get(f"val_error_rate{suffix}") is None and out.get(f"val_acc{suffix}") is not None:
            out[f"val_error_rate{suffix}"] = 1.0 - float(out[f"val_acc{suffix}"])
    return {k: float(out[k]) for k in METRICS if out.get(k) is not None}


def _history(metrics_path: Path) -> list[dict[str, float]]:
    """Validation records of metrics.jsonl with their compute; a step logged twice (a resumed run
    redoes the steps since its last checkpoint) keeps its last record. Torn lines are skipped."""
    by_step: dict[int, dict[str, float]] = {}
    with open(metrics_path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or "val/loss" not in row or TRAIN_FLOPS not in row:
                continue
            values = {name: row[key] for key, name in VALIDATION_KEYS.items() if isinstance(row.get(key), (int, float))}
            point = _with_error_rates(values)
            point["train_flops"] = float(row[TRAIN_FLOPS])
            by_step[int(row.get("step", len(by_step)))] = point
    return [by_step[step] for step in sorted(by_step)]


def read_run(path: str | Path) -> RunRecord:
    run = RunRecord(Path(path))
    summary_path = run.path / SUMMARY_FILE
    if not run.path.is_dir():
        run.problem = "not a directory"
        return run
    if not summary_path.is_file():
        run.problem = f"no {SUMMARY_FILE} (the run has not validated yet, or the directory is not a run)"
        return run
    try:
        summary = json.loads(summary_path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        run.problem = f"{SUMMARY_FILE} cannot be read ({error})"
        return run
    run.depth = summary.get("depth")
    run.params = summary.get("params")
    run.train_flops = summary.get("train_flops")
    run.finished = bool(summary.get("finished", False))
    missing = [key for key in REQUIRED if summary.get(key) is None]
    if missing:
        run.problem = (f"partial {SUMMARY_FILE}: no {', '.join(missing)}"
                       + (" (no validation yet: set data.val_shards)" if "val_loss" in missing else ""))
        return run
    run.final = _with_error_rates(summary)
    run.final_flops = float(summary.get("val_train_flops") or summary["train_flops"])
    metrics_path = run.path / "metrics.jsonl"
    if metrics_path.is_file():
        run.history = _history(metrics_path)
    if not run.history:  # summary-only run: its final point is its curve
        run.history = [{"train_flops": run.final_flops, **run.final}]
    return run


def read_runs(paths, finished_only: bool = False) -> tuple[list[RunRecord], list[RunRecord]]:
    """-> (runs to fit, runs left out with their reason). Directories that hold run directories
    (no summary.json of their own, but subdirectories with one) are expanded."""
    expanded: list[Path] = []
    for path in map(Path, paths):
        children = sorted(p for p in path.iterdir() if (p / SUMMARY_FILE).is_file()) if path.is_dir() else []
        if not (path / SUMMARY_FILE).is_file() and children:
            expanded += children
        else:
            expanded.append(path)
    used, left_out = [], []
    for path in expanded:
        run = read_run(path)
        if run.usable and finished_only and not run.finished:
            run.problem = "unfinished (left out by --finished-only)"
        (used if run.usable else left_out).append(run)
    used.sort(key=lambda r: (r.params or 0, r.name))
    return used, left_out
