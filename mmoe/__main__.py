import sys

from mmoe.cli import main

sys.exit(main())
