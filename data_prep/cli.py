"""`var-prep`: prepare data for var_train (token extraction, tokenizer training, demo data).

User errors print one line `error: ...` and exit 2 (`--debug` or VAR_TRAIN_DEBUG=1 for the
traceback), exactly as in `var-train`: both use var_train.command_line.
"""

from __future__ import annotations

from typing import NoReturn

from var_train.command_line import exit_process, run_command_line

SUBCOMMAND_MODULES: list[str] = [
    "data_prep.commands.extract",
    "data_prep.commands.demo_data",
    "data_prep.commands.train_tokenizer",
    "data_prep.commands.verify",
]


def main(argv: list[str] | None = None) -> int:
    return run_command_line(
        "var-prep", SUBCOMMAND_MODULES,
        "Prepare data for var_train: tokenize images into shards, train the tokenizer, make demo data.", argv,
    )


def console_main() -> NoReturn:
    """The `var-prep` console script (and `python -m`): `main`, then `exit_process` with its code."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
