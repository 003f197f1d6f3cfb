"""`var-train`: one subcommand per module in this package.

Each subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`;
`run` only turns arguments into a call of a library function that tests call directly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = [
    "var_train.cli.demo",
    "var_train.cli.train",
    "var_train.cli.eval",
    "var_train.cli.fid_stats",
    "var_train.cli.export",
    "var_train.cli.sample",
]


def build_parser(prog: str, module_names: list[str], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in module_names:
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            module.NAME, help=module.HELP, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "var-train", SUBCOMMAND_MODULES,
        "Train, sample and evaluate VAR models (next-scale prediction) from token shards.",
    )
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
