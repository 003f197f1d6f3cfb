"""`var-train`: one subcommand per module in this package.

Each subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`;
`run` only turns arguments into a call of a library function that tests call directly. User errors
(var_train.errors.UserError) print one line `error: ...` and exit 2; see var_train.command_line.
"""

from __future__ import annotations

from typing import NoReturn

from var_train.command_line import exit_process, run_command_line

SUBCOMMAND_MODULES = [
    "var_train.cli.demo",
    "var_train.cli.train",
    "var_train.cli.eval",
    "var_train.cli.fid_stats",
    "var_train.cli.export",
    "var_train.cli.sample",
    "var_train.cli.scaling",
    "var_train.cli.edit",
    "var_train.cli.verify",
]


def main(argv: list[str] | None = None) -> int:
    return run_command_line(
        "var-train", SUBCOMMAND_MODULES,
        "Train, sample and evaluate VAR models (next-scale prediction) from token shards.", argv,
    )


def console_main() -> NoReturn:
    """The `var-train` console script (and `python -m`): `main`, then `exit_process` with its code."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
