"""Check a run's checkpoints: every file against the checksums written with it, and the DCP
metadata through the restricted reader (a checkpoint that would run code is reported, not loaded).

  var-train verify runs/d16                      every checkpoint of the run (newest first)
  var-train verify runs/d16/checkpoints/step-00050000

Exit 0 when every checkpoint is intact; otherwise each damaged one is listed with its bad files and
the exit code is 2. Nothing is moved or deleted (a resume moves a damaged newest checkpoint aside
by itself and falls back to the newest intact one). Checkpoints written before checksums existed
are reported as "no checksums" and are not counted as damaged.
"""

from __future__ import annotations

import argparse

NAME = "verify"
HELP = "check a run's checkpoints (checksums, complete files, safe metadata)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory, its checkpoints/ directory, or one step directory")


def run(args: argparse.Namespace) -> int:
    from var_train.checkpoint import checkpoints_to_verify, verify_checkpoint
    from var_train.errors import CorruptFileError, MissingInputError

    checkpoints = checkpoints_to_verify(args.run_dir)
    if not checkpoints:
        raise MissingInputError(f"no checkpoints found at {args.run_dir} (looked for step-*/ there and in checkpoints/)")
    damaged = 0
    for checkpoint in checkpoints:
        report = verify_checkpoint(checkpoint)
        print(f"{checkpoint}: {report.summary()}")
        for problem in report.problems:
            print(f"  {problem}")
        damaged += not report.intact
    if damaged:
        raise CorruptFileError(f"{damaged} of {len(checkpoints)} checkpoint(s) in {args.run_dir} are damaged or unsafe "
                               f"(listed above); resume falls back from a damaged newest one to the newest intact one "
                               f"and refuses unsafe ones; export refuses both")
    print(f"ok: {len(checkpoints)} checkpoint(s) intact")
    return 0
