import sys

from var_train.cli import main

sys.exit(main())
