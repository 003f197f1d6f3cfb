"""Faults in checkpoints, through `var-train train / export / verify`: a planted pickle, a resume
with a changed model, flipped bytes in the newest checkpoint, a full disk during a save."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from tests.reliability.helpers import assert_one_line_error, run_command, small_filesystem
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_faults")
    return make_learnable_shards(root / "shards", num_records=64), make_tiny_vae(root / "vae.safetensors")


def train(data, run_dir: Path, *overrides: str, timeout: float = 600):
    shards, vae = data
    return run_command("var-train", "train", "--recipe", "recipes/tiny.yaml", f"data.train_shards={shards}",
                       f"data.vae={vae}", f"run.output_dir={run_dir}", "data.num_workers=0",
                       "optim.global_batch_size=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
                       *overrides, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged train/loss of each step (a resumed run logs its steps again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_checksums(checkpoint: Path) -> None:
    """What an attacker who hands over a folder would do: make the checksums match the planted
    file (XXH3-128 computed here with xxhash directly, not with the project's code)."""
    sums = json.loads((checkpoint / "checksums.json").read_text())
    for name in sums["files"]:
        data = (checkpoint / name).read_bytes()
        sums["files"][name] = {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    (checkpoint / "checksums.json").write_text(json.dumps(sums))
    metadata = json.loads((checkpoint / "metadata.json").read_text())
    metadata["checksums"]["checksums_file"] = xxhash.xxh3_128((checkpoint / "checksums.json").read_bytes()).hexdigest()
    (checkpoint / "metadata.json").write_text(json.dumps(metadata))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_on_resume_export_and_verify(data, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    assert train(data, run_dir, "optim.max_steps=2").returncode == 0
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    (checkpoint / "state" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    rewrite_checksums(checkpoint)

    proc = train(data, run_dir, "optim.max_steps=4")
    assert_one_line_error(proc, "refusing to load", ".metadata")
    proc = run_command("var-train", "export", run_dir, "--out", tmp_path / "var.safetensors")
    assert_one_line_error(proc, "refusing to load")
    proc = run_command("var-train", "verify", run_dir)
    assert proc.returncode == 2 and "UNSAFE" in proc.stdout, proc.stdout + proc.stderr
    assert not marker.exists()
    assert checkpoint.is_dir()  # an unsafe checkpoint is refused, not moved or deleted
    assert not (tmp_path / "var.safetensors").exists()


def test_planted_torch_pickle_is_refused_before_any_load(data, tmp_path):
    """The other pickles of a checkpoint (RNG, trainer state, DeepSpeed's files, which DeepSpeed loads
    with weights_only=False) are scanned before anything is loaded."""
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    assert train(data, run_dir, "optim.max_steps=2").returncode == 0
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    torch.save({"state": _Payload(marker)}, checkpoint / "rng" / "rank-00000.pt")
    rewrite_checksums(checkpoint)
    proc = run_command("var-train", "verify", run_dir)
    assert proc.returncode == 2 and "UNSAFE" in proc.stdout and "rank-00000.pt" in proc.stdout, proc.stdout
    proc = train(data, run_dir, "optim.max_steps=4")
    assert_one_line_error(proc, "refusing to load", "rank-00000.pt")
    assert not marker.exists()


def test_resume_with_a_smaller_model_exits_2_and_changes_nothing(data, tmp_path):
    run_dir = tmp_path / "run"
    assert train(data, run_dir, "optim.max_steps=4").returncode == 0
    before = snapshot(run_dir)
    assert any(name.startswith("checkpoints/step-00000004/") for name in before)
    proc = train(data, run_dir, "optim.max_steps=8", "model.depth=1")
    line = assert_one_line_error(proc, "depth: 2 -> 1", "run.output_dir", "model.init_from")
    assert "nothing was changed" in line
    assert snapshot(run_dir) == before  # every checkpoint file, config.yaml and metrics.jsonl byte-identical

    proc = train(data, run_dir, "optim.max_steps=6", "optim.base_lr=0.04")  # optimizer-only: allowed, logged
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "optim.base_lr: 0.05 -> 0.04" in proc.stdout and "resumed from step 4" in proc.stdout


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_one(data, tmp_path):
    damaged, clean = tmp_path / "damaged", tmp_path / "clean"
    # The run that sees the corruption: checkpoints at steps 2 and 4, then a flipped byte in step 4.
    assert train(data, damaged, "optim.max_steps=6", "run.stop_after_steps=4").returncode == 42
    newest = damaged / "checkpoints" / "step-00000004"
    shard = sorted((newest / "state").glob("*.distcp"))[0]
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0x10
    shard.write_bytes(bytes(payload))

    proc = run_command("var-train", "verify", damaged)
    assert proc.returncode == 2 and f"state/{shard.name}" in proc.stdout, proc.stdout + proc.stderr
    proc = run_command("var-train", "export", damaged, "--out", tmp_path / "bad.safetensors")
    assert_one_line_error(proc, "step-00000004", f"state/{shard.name}", "--newest-intact")
    proc = run_command("var-train", "export", damaged, "--out", tmp_path / "ok.safetensors", "--newest-intact")
    assert proc.returncode == 0 and "step 2" in proc.stdout, proc.stdout + proc.stderr

    resumed = train(data, damaged, "optim.max_steps=6")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    output = resumed.stdout + resumed.stderr
    assert f"state/{shard.name}" in output and "resumed from step 2" in output
    aside = damaged / "checkpoints" / "corrupt-step-00000004"
    assert aside.is_dir() and (aside / "state" / shard.name).read_bytes() == bytes(payload)  # kept, not deleted

    # The run that never saw it: stopped at step 2, resumed to 6.
    assert train(data, clean, "optim.max_steps=6", "run.stop_after_steps=2").returncode == 42
    assert train(data, clean, "optim.max_steps=6").returncode == 0
    expected, got = losses(clean), losses(damaged)
    assert [got[step] for step in range(3, 7)] == [expected[step] for step in range(3, 7)]
    assert run_command("var-train", "verify", damaged).returncode == 0


def test_full_disk_during_a_save_reports_it_and_leaves_a_resumable_run(data, tmp_path):
    with small_filesystem(tmp_path / "disk", "6m") as disk:
        run_dir = disk / "run"
        assert train(data, run_dir, "optim.max_steps=2").returncode == 0
        checkpoint_bytes = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        filler.write_bytes(b"\0" * max(0, free - checkpoint_bytes // 2))   # room for half a checkpoint
        proc = train(data, run_dir, "optim.max_steps=4")
        assert_one_line_error(proc, "no space left on device at", "needed ~", "free ")
        assert "unexpected pos" not in proc.stderr
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        assert leftovers == [], leftovers
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002"]
        with open(run_dir / "metrics.jsonl", "a") as handle:
            handle.write('{"step": 3, "train/lo')                      # a torn last line, as a crash leaves
        filler.unlink()                                                 # the user frees space, runs again
        proc = train(data, run_dir, "optim.max_steps=4")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "resumed from step 2" in proc.stdout
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(row["step"] for row in rows) == 4
