"""Ctrl-C: the first press saves a checkpoint at the end of the step and exits 130; a second press
(a second or more later) quits at once. Real SIGINTs: to this process, and to a torchrun process
group as a terminal sends them (every process of the foreground group, then torchrun relays its own)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, _free_port, run_torchrun
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.checkpoint import latest_checkpoint, read_metadata
from var_train.preemption import PreemptionHandler

CPU = torch.device("cpu")


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


def test_first_ctrl_c_asks_for_a_save_a_relayed_copy_is_ignored_a_later_press_quits(capsys):
    handler = PreemptionHandler(announce=True).install()
    try:
        assert handler.stop_code(CPU) is None
        _deliver(signal.SIGINT)
        assert handler.stop_code(CPU) == 130
        assert "Ctrl-C: saving a checkpoint" in capsys.readouterr().err
        _deliver(signal.SIGINT)  # torchrun's relay of the same press: no exception
        assert handler.stop_code(CPU) == 130
        _deliver(signal.SIGTERM)  # within the same second: preemption wins, the job must be requeued
        assert handler.stop_code(CPU) == 42
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # how torchrun passes on a second press
            _deliver(signal.SIGTERM)
    finally:
        handler.uninstall()
    preempted = PreemptionHandler(announce=False).install()
    try:
        _deliver(signal.SIGTERM)  # a preemption alone never quits before the checkpoint
        time.sleep(1.1)
        _deliver(signal.SIGUSR1)
        assert preempted.stop_code(CPU) == 42
    finally:
        preempted.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.distributed
def test_ctrl_c_under_torchrun_saves_a_checkpoint_on_both_ranks_and_resumes(tmp_path):
    shards = make_learnable_shards(tmp_path / "shards", num_records=64)
    vae = make_tiny_vae(tmp_path / "vae.safetensors")
    run_dir = tmp_path / "run"
    train = ["-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml", f"data.train_shards={shards}",
             f"data.vae={vae}", f"run.output_dir={run_dir}", "data.num_workers=1", "optim.global_batch_size=8",
             "checkpoint.every_steps=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *train, "optim.max_steps=400"]
    # A session of its own: torchrun, both ranks and their DataLoader workers form one process
    # group, like a command in a terminal, and killpg reaches all of them as Ctrl-C does.
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and max(_metrics_steps(run_dir), default=0) < 3:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "on 2 x cpu" in output, output  # the world size the trainer saw
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None, output
    metadata = read_metadata(checkpoint)
    step = metadata["step"]
    assert metadata["world_size"] == 2 and 3 <= step < 400, metadata
    assert f"interrupted: checkpoint saved at step {step}" in output, output
    assert "Ctrl-C: saving a checkpoint" in output
    # The only traceback is torchrun's own report of the SIGINT it received; the ranks print none.
    assert output.count("Traceback") == 1 and "SignalException" in output, output
    assert "DataLoader worker" not in output, output  # the workers ignore the terminal's SIGINT

    resumed = run_torchrun(*train, f"optim.max_steps={step + 2}", env={"WANDB_MODE": "offline"})
    assert f"resumed from step {step}" in resumed.stdout, resumed.stdout
    assert read_metadata(latest_checkpoint(run_dir / "checkpoints"))["step"] == step + 2


TORCHRUN_REPORT = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 22454 got signal: 2
"""
RANK_CRASH = """Traceback (most recent call last):
  File "/repo/var_train/train.py", line 10, in fit
    out = self.train_step()
RuntimeError: a real crash
"""


def test_the_demo_relays_every_line_but_torchruns_report_of_its_own_ctrl_c():
    from var_train.cli.demo_pipeline import relay_without_torchrun_signal_report

    progress = "tokenizer  10%|#   | 1/10\rtokenizer  20%|##  | 2/10\r"
    source = io.StringIO("W1130 Received 2 death signal, shutting down workers\n" + progress + RANK_CRASH
                         + "interrupted: checkpoint saved at step 13\n" + TORCHRUN_REPORT, newline="")
    sink = io.StringIO(newline="")
    assert relay_without_torchrun_signal_report(source, sink) == 2  # the signal torchrun reported
    assert sink.getvalue() == ("W1130 Received 2 death signal, shutting down workers\n" + progress + RANK_CRASH
                               + "interrupted: checkpoint saved at step 13\n")
    assert relay_without_torchrun_signal_report(io.StringIO(RANK_CRASH), io.StringIO()) is None


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("reached", ["everyone", "torchrun and its ranks"])
def test_ctrl_c_in_the_demos_training_stage_prints_no_traceback(tmp_path, reached):
    """Ctrl-C in a terminal reaches the whole process group. When it reaches only torchrun and its
    ranks (the demo ignores SIGINT as a background job of a script, or only torchrun was sent it),
    torchrun exits 1; the demo must still say "interrupted", exit 130, and not call it a failure."""
    shards = make_learnable_shards(tmp_path / "shards", num_records=64)
    vae = make_tiny_vae(tmp_path / "vae.safetensors")
    run_dir = tmp_path / "run"
    # The demo's training stage alone (the command turns the KeyboardInterrupt into one line, exit 130).
    launcher = ("import sys; from pathlib import Path; from var_train.cli.demo_pipeline import DemoConfig, _train_var\n"
                "try:\n"
                "    _train_var(DemoConfig(recipe='recipes/tiny.yaml', train_overrides=['optim.max_steps=400', "
                "'optim.global_batch_size=8', 'data.num_workers=0']), *map(Path, sys.argv[1:]))\n"
                "except KeyboardInterrupt:\n"
                "    sys.exit(130)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(shards), str(vae), str(run_dir)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and max(_metrics_steps(run_dir), default=0) < 3:
            time.sleep(0.5)
        if reached == "everyone":
            os.killpg(proc.pid, signal.SIGINT)  # the demo, torchrun and both ranks, as a terminal does
        else:
            (torchrun,) = _children(proc.pid)
            for pid in [torchrun, *_children(torchrun)]:
                os.kill(pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted: checkpoint saved at step" in stdout, stdout + stderr
    assert "exited with" not in stderr, stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
    assert "Received 2 death signal" in stderr  # torchrun's other lines still come through


def _child(ignore: str, seconds: float) -> subprocess.Popen:
    code = f"import signal, time\nfor name in {ignore!r}.split():\n    signal.signal(getattr(signal, name), signal.SIG_IGN)\n" \
           f"time.sleep({seconds})\n"
    child = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)  # its handlers are in place
    return child


def test_after_ctrl_c_the_demo_waits_for_its_training_however_often_ctrl_c_is_pressed():
    from var_train.cli.demo_pipeline import _wait_for_training_to_stop

    # Training that takes 3 s to save and exit; two more presses (to this process) meanwhile.
    child = _child("SIGINT", 3)
    presses = [threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)) for delay in (0.5, 1.5)]
    for press in presses:
        press.start()
    started = time.monotonic()
    _wait_for_training_to_stop(child)
    assert child.poll() == 0 and time.monotonic() - started > 2  # it ran to its end: nothing left behind

    # Only this process was signalled: SIGTERM is passed on after relay_seconds; a child that
    # ignores that too is killed after term_seconds more.
    stubborn = _child("SIGINT", 30)
    _wait_for_training_to_stop(stubborn, relay_seconds=0.5, term_seconds=5)
    assert stubborn.returncode == -signal.SIGTERM
    deaf = _child("SIGINT SIGTERM", 30)
    _wait_for_training_to_stop(deaf, relay_seconds=0.5, term_seconds=1)
    assert deaf.returncode == -signal.SIGKILL
