"""`python -m batchfit` (and `torchrun -m batchfit`) runs the command line."""

import sys

try:
    from batchfit.cli import entry
except KeyboardInterrupt:  # Ctrl-C while the command line itself imports: exit 130 as at any moment
    print("interrupted", file=sys.stderr)
    sys.exit(130)

entry()
