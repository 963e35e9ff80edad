"""`python -m batchfit` (and `torchrun -m batchfit`) runs the command line."""

import os
import sys

try:
    from batchfit.cli import entry
except KeyboardInterrupt:  # Ctrl-C while the command line itself imports: exit 130 as at any moment
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # not sys.exit: an interrupt inside a dataclass's exec would make it -2 (cli.entry)

entry()
