"""torchrun worker: `var-prep extract` through the CLI on 2 ranks (gloo). Arguments are passed on."""

import os
import sys

from data_prep.cli import main

if __name__ == "__main__":
    assert int(os.environ["WORLD_SIZE"]) == 2, os.environ["WORLD_SIZE"]
    sys.exit(main(["extract", *sys.argv[1:]]))
