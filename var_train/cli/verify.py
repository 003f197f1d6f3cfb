"""Check a run's checkpoints: every file against the checksums written with it, and the DCP
metadata through the restricted reader (a checkpoint that would run code is reported, not loaded).

  var-train verify runs/d16                      every checkpoint of the run (newest first)
  var-train verify runs/d16/checkpoints/step-00050000
  var-train verify var_d16.safetensors           an exported file, against the digest it records

Exit 0 when every checkpoint is intact; otherwise each damaged one is listed with its bad files and
the exit code is 2. Nothing is moved or deleted (a resume moves a damaged newest checkpoint aside
by itself and falls back to the newest intact one). Checkpoints written before checksums existed
are reported as "no checksums" and are not counted as damaged.

An exported `.safetensors` carries a digest of its tensors (every read checks it); a file without
one (a reference `.pth`, another tool's file) is reported readable, its content unchecked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "verify"
HELP = "check a run's checkpoints (checksums, complete files, safe metadata) or an exported weights file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH",
                        help="run directory, its checkpoints/ directory, one step directory, or a weights file")


def run(args: argparse.Namespace) -> int:
    from var_train.checkpoint import checkpoints_to_verify, verify_checkpoint
    from var_train.errors import CorruptFileError, MissingInputError

    if not Path(args.path).exists():
        raise MissingInputError(f"not found: {args.path} (a run directory, one of its checkpoints, or a weights file)")
    if Path(args.path).is_file():
        return _verify_weights_file(Path(args.path))
    checkpoints = checkpoints_to_verify(args.path)
    if not checkpoints:
        raise MissingInputError(f"no checkpoints found at {args.path} (looked for step-*/ there and in checkpoints/)")
    damaged = 0
    for checkpoint in checkpoints:
        report = verify_checkpoint(checkpoint)
        print(f"{checkpoint}: {report.summary()}")
        for problem in report.problems:
            print(f"  {problem}")
        damaged += not report.intact
    if damaged:
        raise CorruptFileError(f"{damaged} of {len(checkpoints)} checkpoint(s) in {args.path} are damaged or unsafe "
                               f"(listed above); resume falls back from a damaged newest one to the newest intact one "
                               f"and refuses unsafe ones; export refuses both")
    print(f"ok: {len(checkpoints)} checkpoint(s) intact")
    return 0


def _verify_weights_file(path: Path) -> int:
    from var_train.models.checkpoint_io import DIGEST_METADATA_KEY, read_weights

    state, metadata = read_weights(path)  # a damaged file, or one unlike its digest, raises CorruptFileError
    count = len(state) if isinstance(state, dict) else 0
    if DIGEST_METADATA_KEY in metadata:
        print(f"ok: {path}: intact ({count} tensors, as the digest recorded when it was written)")
    else:
        print(f"ok: {path}: readable ({count} tensors); it records no digest (not written by var_train, or "
              f"before digests), so its content is unchecked")
    return 0
