"""What `var-train` and `var-prep` share: subcommands from modules, and one error-handling path.

Each subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
`run_command_line` parses, runs, and turns a `UserError` (bad config, missing or mismatched files,
a full disk) into one line `error: ...` on stderr and exit code 2, under torchrun too (one line per
rank at most: rank 0 says `error: ...`, another rank only `error (rank N): ...`). `--debug` or
VAR_TRAIN_DEBUG=1 prints the traceback as well. Any other exception is a bug: it propagates with
its traceback. Ctrl-C (KeyboardInterrupt) prints one line and exits 130 (traceback with --debug).
This module sits below both command packages, so neither imports the other.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from var_train.errors import EXIT_CODE_USER_ERROR, UserError
from var_train.preemption import EXIT_CODE_INTERRUPTED

DEBUG_ENV = "VAR_TRAIN_DEBUG"


def build_parser(prog: str, module_names: list[str], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
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
    _leave_process_group()
    return getattr(error, "exit_code", EXIT_CODE_USER_ERROR)


def _leave_process_group() -> None:
    """Exit cleanly from a torchrun start-up check (all ranks raise the same error)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # best effort: we are exiting with the user's error anyway
        pass


def run_command_line(prog: str, module_names: list[str], description: str, argv: list[str] | None = None) -> int:
    parser = build_parser(prog, module_names, description)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        return report_user_error(error, debug)
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a bug: no traceback unless --debug
        if debug:
            traceback.print_exc()
        print("interrupted (Ctrl-C): work not yet saved is lost (a training run's first Ctrl-C saves a checkpoint "
              "before it exits; a second one quits without it); run the same command again to resume",
              file=sys.stderr, flush=True)
        return EXIT_CODE_INTERRUPTED
