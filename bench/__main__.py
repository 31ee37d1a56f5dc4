"""`python -m mmoe.bench ...`: the same as `mmoe bench ...`."""

import sys

from mmoe.bench.run import main

sys.exit(main(sys.argv[1:]))
