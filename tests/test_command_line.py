"""`run_command_line` leaves the process group a command joined, however the command ends.

Left to interpreter shutdown, gloo's worker threads can abort a finished process (exit -6,
pytorch/pytorch#190489): a Slurm job that did all its work would be reported failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch.distributed as dist

from var_train.command_line import run_command_line
from var_train.errors import UserError
from var_train.parallel import init_distributed


class Bug(Exception):
    pass


def _command_module(monkeypatch) -> str:
    module = types.ModuleType("joining_command")
    module.NAME, module.HELP = "join", "joins a process group, then ends as told"

    def add_arguments(parser):
        parser.add_argument("ending", choices=["returns", "user-error", "ctrl-c", "bug"])

    def run(args):
        init_distributed()  # no launcher variables: a world of one
        assert dist.is_initialized() and dist.get_world_size() == 1
        if args.ending == "user-error":
            raise UserError("the file is missing")
        if args.ending == "ctrl-c":
            raise KeyboardInterrupt
        if args.ending == "bug":
            raise Bug("a bug keeps its traceback")
        return 0

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    return module.__name__


@pytest.mark.parametrize("ending, exit_code", [("returns", 0), ("user-error", 2), ("ctrl-c", 130)])
def test_the_process_group_is_left_on_every_way_out(monkeypatch, capsys, ending, exit_code):
    module = _command_module(monkeypatch)
    assert not dist.is_initialized()
    assert run_command_line("prog", [module], "test", ["join", ending]) == exit_code
    assert not dist.is_initialized(), f"the process group outlived a command that {ending}"


def test_a_bug_propagates_and_the_process_group_is_left_too(monkeypatch):
    module = _command_module(monkeypatch)
    with pytest.raises(Bug):
        run_command_line("prog", [module], "test", ["join", "bug"])
    assert not dist.is_initialized()


EXITING_SCRIPT = """
import atexit, sys, threading, time
import torch
from var_train.command_line import exit_process, run_command_line

def busy():  # a torch thread that needs the GIL back after every op, as gloo's workers do
    a = torch.randn(128, 128)
    while True:
        a @ a

def slow_writer():  # a non-daemon thread: Python's exit waits for it, so must exit_process
    time.sleep(0.3)
    print("non-daemon thread finished", flush=False)

threading.Thread(target=busy, daemon=True).start()
threading.Thread(target=slow_writer).start()
atexit.register(lambda: print("atexit handler ran", flush=False))
print("unflushed output", end="", flush=False)
sys.stdout.write("\\n")
exit_process(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 42])
def test_exit_process_exits_with_the_code_after_python_s_own_exit_steps(tmp_path, code):
    """A C++ thread that needs the GIL during interpreter teardown aborts a plain `sys.exit`
    (exit -6, "terminate called without an active exception"); `exit_process` gives the command's
    code, with threads joined, atexit handlers run and buffered output delivered."""
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(script), str(code)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == ["unflushed output", "non-daemon thread finished", "atexit handler ran"], \
        proc.stdout
