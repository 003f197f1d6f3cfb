"""`var-prep`: prepare data for var_train (token extraction, tokenizer training, demo data)."""

from __future__ import annotations

import sys

from var_train.cli import build_parser

SUBCOMMAND_MODULES: list[str] = [
    "data_prep.commands.extract",
    "data_prep.commands.demo_data",
    "data_prep.commands.train_tokenizer",
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "var-prep", SUBCOMMAND_MODULES,
        "Prepare data for var_train: tokenize images into shards, train the tokenizer, make demo data.",
    )
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
