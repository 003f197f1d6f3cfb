"""torchrun worker: `var-prep extract` through the CLI on 2 ranks (gloo). Arguments are passed on."""

import os
import sys

from data_prep.cli import main
from var_train.command_line import exit_process

if __name__ == "__main__":
    assert int(os.environ["WORLD_SIZE"]) == 2, os.environ["WORLD_SIZE"]
    exit_process(main(["extract", *sys.argv[1:]]))  # as the var-prep console script ends
