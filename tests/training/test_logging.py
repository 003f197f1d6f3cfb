"""W&B and the console in real training runs: what an offline W&B run records (summary, sample grid and
table), labelled console lines with an ETA, and a run that keeps training when W&B's service dies."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.training.test_trainer_process import command, environment, metrics
from tests.evaluation.helpers import seeded_classifier
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.logging import _console_label, format_duration, read_wandb_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging_data")
    return make_learnable_shards(root / "shards", num_records=64), make_tiny_vae(root / "vae.safetensors")


def wandb_records(run_dir: Path, offline_run: Path | None = None) -> list:
    """Every record of an offline .wandb file (W&B's leveldb-style log of protobuf Records): the
    run directory's only one, or that of `offline_run`."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (offline_run or run_dir).glob("run-*.wandb") if offline_run else run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pieces, records = 7, 32768, [], []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding up to the end of the block
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pieces = [chunk] if kind in (1, 2) else pieces + [chunk]
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
    return records


def summary_and_history(run_dir: Path, offline_run: Path | None = None) -> tuple[dict, list[dict]]:
    summary, history = {}, []
    for record in wandb_records(run_dir, offline_run):
        kind = record.WhichOneof("record_type")
        items = record.summary.update if kind == "summary" else record.history.item if kind == "history" else []
        values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
        (summary.update if kind == "summary" else history.append)(values) if values else None
    return summary, history


def test_console_helpers():
    assert [format_duration(s) for s in (7, 95, 3725, 0.4)] == ["7s", "1m35s", "1h02m", "0s"]
    assert _console_label({"val/loss": 1.0, "progress/images_seen": 4}) == "val"
    assert _console_label({"train/loss": 1.0, "perf/eta_seconds": 3.0}) == "train"
    assert _console_label({"eval/fid": 3.0}) == "eval"


def test_wandb_run_records_summary_grid_table_and_labelled_console(data, tmp_path):
    run_dir = tmp_path / "run"
    shards, _ = data
    proc = subprocess.run(command(data, run_dir, "optim.max_steps=8", "logging.wandb_mode=offline",
                                  "logging.log_every=2", f"data.val_shards={shards}", "run.val_every_steps=4",
                                  "run.val_batches=2", "eval.grid_every_steps=4", "eval.grid_samples=6"),
                          cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    train = [line for line in lines if line.startswith("train step")]
    val = [line for line in lines if line.startswith("val   step")]
    assert len(train) == 4 and all(" eta " in line for line in train) and train[-1].endswith("eta 0s"), lines
    assert len(val) == 2 and val[-1].startswith("val   step       8 | loss "), lines  # the last step once
    assert [row["step"] for row in metrics(run_dir) if "val/loss" in row] == [4, 8]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "samples_grid-step0000004.png", "samples_grid-step0000008.png"]

    assert read_wandb_run(run_dir)["id"] == run_dir.glob("wandb/offline-run-*").__next__().name.split("-")[-1]
    summary, history = summary_and_history(run_dir)
    assert summary["final/status"] == "finished" and summary["final/step"] == 8
    assert summary["params/total"] > 0 and summary["compute/images_seen"] == 8 * 4
    assert summary["compute/precision"] == "fp32" and summary["val/loss"] == metrics(run_dir)[-1]["val/loss"]
    tables = [h for h in history if any(k.startswith("samples/grid_table/") for k in h)]
    assert [h["trainer/step"] for h in tables] == [4, 8]
    assert tables[0]["samples/grid_table/_type"] == "table-file" and tables[0]["samples/grid_table/nrows"] == 6

    # `var-train export --wandb-artifact` and `var-train eval` of the run log into the same run.
    _, vae = data
    classifier = seeded_classifier(4).save(tmp_path / "classifier.safetensors")
    for args in (["export", str(run_dir), "--out", str(tmp_path / "var.safetensors"), "--wandb-artifact"],
                 ["eval", "--var", str(run_dir), "--vae", str(vae), "--feature-extractor", str(classifier),
                  "--num-samples", "4", "--batch-size", "4", "--no-precision-recall", "--out", str(tmp_path / "eval"),
                  "--quiet"]):
        done = subprocess.run([sys.executable, "-m", "var_train.cli", *args], cwd=REPO_ROOT, env=environment(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "logged into the training run" in done.stdout
    evaluated = [row for row in metrics(run_dir) if "eval_checkpoint/class_accuracy" in row]
    assert [row["step"] for row in evaluated] == [8] and evaluated[0]["eval_checkpoint/num_samples"] == 4
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 3 and len({r.name.split("-")[-1] for r in runs}) == 1  # train, export, eval: one run id
    kinds = [[r.WhichOneof("record_type") for r in wandb_records(run_dir, one)] for one in runs]
    assert "artifact" in kinds[1]  # the model artifact of the export
    _, eval_history = summary_and_history(run_dir, runs[2])
    assert any(h.get("eval_checkpoint/samples_table/nrows") == 4 for h in eval_history)


def _wandb_core_children(pid: int) -> list[int]:
    """PIDs of the `wandb-core` processes started by process `pid` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if int(fields[1]) == pid and name.startswith("wandb-core"):
            found.append(int(entry.name))
    return found


def test_training_survives_wandb_core_killed(data, tmp_path):
    """Slurm's SIGTERM reaches wandb-core too (issue 12): the run warns once, finishes, exits 0,
    and metrics.jsonl holds every step."""
    run_dir = tmp_path / "run"
    steps = 40
    proc = subprocess.Popen(command(data, run_dir, f"optim.max_steps={steps}", "logging.wandb_mode=offline",
                                    "eval.grid_every_steps=10", "eval.grid_samples=4", "checkpoint.every_steps=10"),
                            cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not any(r.get("step", 0) >= 3 for r in metrics(run_dir)):
            time.sleep(0.1)
        killed = _wandb_core_children(proc.pid)
        assert proc.poll() is None and len(killed) == 1, (killed, proc.poll())
        os.kill(killed[0], signal.SIGTERM)
        killed_at = max(r["step"] for r in metrics(run_dir))
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert killed_at < steps, "the run ended before W&B was killed: the test did not test anything"
    assert stderr.count("warning: W&B") == 1 and "W&B is off for the rest of this run" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert sorted({r["step"] for r in metrics(run_dir) if "train/loss" in r}) == list(range(1, steps + 1))
    assert f"done: {steps} steps" in stdout
    assert len(list((run_dir / "samples").glob("*.png"))) == steps // 10  # the grids are still written to disk
