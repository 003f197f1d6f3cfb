"""What `var-train` and `var-prep` share: subcommands from modules, and one error-handling path.

Each subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
`run_command_line` parses, runs, and turns a `UserError` (bad config, missing or mismatched files,
a full disk) into one line `error: ...` on stderr and exit code 2, under torchrun too (one line per
rank at most: rank 0 says `error: ...`, another rank only `error (rank N): ...`). `--debug` or
VAR_TRAIN_DEBUG=1 prints the traceback as well. Any other exception is a bug: it propagates with
its traceback. Ctrl-C (KeyboardInterrupt) prints one line and exits 130 (traceback with --debug).
On every way out, a process group the command joined is left before the interpreter shuts down, and
the console entry points end the process with `exit_process` (why: its docstring).
This module sits below both command packages, so neither imports the other.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
import traceback
from typing import NoReturn

from var_train.errors import EXIT_CODE_USER_ERROR, UserError
from var_train.preemption import EXIT_CODE_INTERRUPTED

DEBUG_ENV = "VAR_TRAIN_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes said like every other user error: one line `error: ...`, exit 2
    (argparse prints the whole usage block first; `--help` still shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CODE_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


# -- argument types: a value out of range is argparse's one-line error, before any work ----------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def probability(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def device_name(text: str) -> str:
    """A torch device this machine has (see `available_device`)."""
    from var_train.errors import ConfigError
    from var_train.precision import available_device

    try:
        available_device(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# Names argparse puts into its message ("invalid positive_int value"): say what was expected instead.
positive_int.__name__ = "whole number"
non_negative_int.__name__ = "whole number"
finite_float.__name__ = probability.__name__ = "number"
device_name.__name__ = "device"


def build_parser(prog: str, module_names: list[str], description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in module_names:
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            module.NAME, help=module.HELP, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        # Also accepted after the subcommand; SUPPRESS keeps it from resetting the top-level flag.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")
        sub.set_defaults(run=module.run)
    return parser


def one_line(error: BaseException) -> str:
    """A multi-line message ("title:\\n  detail\\n  detail") as one line ("title: detail; detail")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith((":", ".")) else f"{head}; {'; '.join(rest)}"


def report_user_error(error: UserError, debug: bool) -> int:
    if debug:
        traceback.print_exception(error)
    rank = int(os.environ.get("RANK", "0") or 0)
    prefix = "error" if rank == 0 else f"error (rank {rank})"
    print(f"{prefix}: {one_line(error)}", file=sys.stderr, flush=True)
    return getattr(error, "exit_code", EXIT_CODE_USER_ERROR)


def _leave_process_group() -> None:
    """On every way out of a command: leave the process group before the interpreter shuts down
    (see `destroy_distributed`: a finished torchrun or srun job must not abort at exit)."""
    if "torch.distributed" not in sys.modules:  # a command that never touched torch: nothing to import
        return
    from var_train.parallel.distributed import destroy_distributed

    try:
        destroy_distributed()
    except Exception:  # best effort: the command's own outcome is already decided
        pass


def run_command_line(prog: str, module_names: list[str], description: str, argv: list[str] | None = None) -> int:
    parser = build_parser(prog, module_names, description)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return _run(args, debug)
    finally:  # after _run's frames (and an exception's traceback) are gone, so their objects can be freed
        _leave_process_group()


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        return report_user_error(error, debug)
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a bug: no traceback unless --debug
        if debug:
            traceback.print_exc()
        print("interrupted (Ctrl-C): what was finished is kept; run the same command again to go on (training "
              "resumes from its last checkpoint, extraction from its last finished shard)", file=sys.stderr, flush=True)
        return EXIT_CODE_INTERRUPTED


def exit_process(code: int) -> NoReturn:
    """End a command-line process with `code`: Python's exit, less the interpreter's own teardown.

    What Python does on exit before that teardown is done here too: non-daemon threads are joined,
    atexit handlers run (W&B, logging, multiprocessing's children), stdout and stderr are flushed.
    Then os._exit. In the teardown, a C++ thread that needs the GIL (a gloo worker of a process group a
    library still holds after destroy_process_group, as DeepSpeed does; any torch op on a daemon
    thread) aborts the process: "terminate called without an active exception", exit -6, after all
    the work is done (pytorch/pytorch#190489, #38228), and Slurm reports a finished job as failed.
    Only process entry points call this; `run_command_line` returns, so tests call it in-process.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Py_Finalize would run; public modules expose no other way
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            pass
    os._exit(code)
