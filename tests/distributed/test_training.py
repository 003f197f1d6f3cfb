"""The trainer end to end under torchrun (2 CPU processes, gloo) on learnable tiny token shards."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, _free_port, run_torchrun
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

    # A real SIGKILL of every process (no signal handler, no final checkpoint, maybe mid-save):
    # the restart continues from the newest complete checkpoint and replays the same losses.
    killed = tmp_path / "killed"
    saved_step, killed_rows = sigkill_after_a_checkpoint(train_args(data, killed, *common))
    killed_curve = dict(killed_rows)
    assert killed_curve, "the run was killed before it logged a step past its checkpoint"
    again = run_torchrun("-m", *train_args(data, killed, *common))
    assert f"resumed from step {saved_step}" in again.stdout
    c = losses(killed)
    assert sorted(c) == list(range(1, 13))
    for step in range(1, 13):
        assert c[step] == pytest.approx(a[step], abs=1e-6), f"step {step}: {c[step]} vs {a[step]}"
    for step, loss in killed_curve.items():  # steps logged after the checkpoint, then redone
        assert loss == pytest.approx(a[step], abs=1e-6), f"killed run, step {step}"

    # The 2-rank checkpoint at step 8 continues on a single rank (resharded by DCP).
    one_rank = tmp_path / "one_rank"
    (one_rank / "checkpoints").mkdir(parents=True)
    shutil.copytree(resumed / "checkpoints" / "step-00000008", one_rank / "checkpoints" / "step-00000008")
    proc = run_torchrun("-m", *train_args(data, one_rank, *common), nproc=1)
    assert "on 1 x cpu" in proc.stdout and "resumed from step 8" in proc.stdout
    curve = losses(one_rank)
    assert sorted(curve) == list(range(9, 13)) and all(math.isfinite(v) for v in curve.values())


def sigkill_after_a_checkpoint(args: list[str]) -> tuple[int, list[tuple[int, float]]]:
    """Start a 2-rank run, SIGKILL its whole process tree once a checkpoint is complete and later
    steps are logged; return the newest complete checkpoint's step and the logged (step, loss)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", *args]
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run.output_dir=")))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            checkpoint = latest_checkpoint(run_dir / "checkpoints")
            if checkpoint is not None and last_logged_step(run_dir) > read_metadata(checkpoint)["step"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be killed"
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=60)
    saved_step = read_metadata(latest_checkpoint(run_dir / "checkpoints"))["step"]
    assert saved_step < 12
    return saved_step, [(step, loss) for step, loss in losses(run_dir).items() if step > saved_step]


def last_logged_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return 0


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in their own
    sessions, so killing its process group alone leaves the ranks running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree = {pid}
    while True:
        grown = tree | {child for child, parent in parents.items() if parent in tree}
        if grown == tree:
            break
        tree = grown
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(data, tmp_path):
    """Slurm may signal only some processes: the ranks agree at the next step boundary."""
    run_dir = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m",
           *train_args(data, run_dir, "optim.max_steps=400", "checkpoint.every_steps=1000")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and last_logged_step(run_dir) < 3:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it was signalled"
        rank_one = next(pid for pid in children(proc.pid) if "RANK=1" in environ(pid))
        os.kill(rank_one, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=240)
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=60)
    assert f"exiting with {EXIT_CODE_PREEMPTED}" in output, output[-3000:]
    # torchrun reports the first rank to exit with 42 and may SIGTERM the other as it exits too;
    # that both ranks took part in the preemption checkpoint is what the metadata below shows.
    assert f"exitcode  : {EXIT_CODE_PREEMPTED}" in output, output[-3000:]
    metadata = read_metadata(latest_checkpoint(run_dir / "checkpoints"))
    assert metadata["world_size"] == 2 and 3 <= metadata["step"] < 400


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


def environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
