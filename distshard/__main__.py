"""``python -m distshard``: the command line (see :mod:`distshard.cli`)."""

import sys

from .cli import main

sys.exit(main())
