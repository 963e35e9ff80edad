"""`python -m batchfit` (and `torchrun -m batchfit`) runs the command line."""

from batchfit.cli import entry

entry()
