"""`python -m mmoe.bench ...`: the same as `mmoe bench ...`."""

import sys

from mmoe.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
