"""Check a token-shard directory against its manifest: every shard present, of the recorded size,
with the recorded sha256.

  var-prep verify /data/tokens/train
  var-prep verify /data/tokens/train --sizes-only     (one stat per shard; what training does at start)

Exit 0 when the shards are exactly those `var-prep extract` wrote; otherwise each bad shard is listed
and the exit code is 2. To repair, delete a bad shard and its `.json` sidecar and run the same
`var-prep extract` command again: only the missing shards are redone. Shards of manifests written
before checksums were recorded are checked for presence only.
"""

from __future__ import annotations

import argparse
import sys

NAME = "verify"
HELP = "check token shards against their manifest (sizes and sha256 checksums)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="token-shard directory (with manifest.json)")
    parser.add_argument("--sizes-only", action="store_true", help="compare sizes only, skip the checksums")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from var_train.data.manifest import read_manifest, verify_shards
    from var_train.errors import CorruptFileError

    manifest = read_manifest(args.shards)
    recorded = sum(1 for shard in manifest.shards if shard.sha256)
    with tqdm(total=manifest.num_shards, unit="shard", disable=args.no_progress, file=sys.stderr) as bar:
        problems = verify_shards(args.shards, checksums=not args.sizes_only, progress=lambda _: bar.update())
    for problem in problems:
        print(f"bad shard: {problem}")
    if problems:
        raise CorruptFileError(f"{len(problems)} of {manifest.num_shards} shard(s) in {args.shards} do not match the "
                               f"manifest (listed above); delete each bad shard and its .json, then run the same "
                               f"`var-prep extract` command again")
    what = "sizes" if args.sizes_only else ("sizes and sha256" if recorded else "presence (no checksums recorded)")
    print(f"ok: {manifest.num_shards} shards, {manifest.num_records} records in {args.shards} ({what} checked)")
    return 0
