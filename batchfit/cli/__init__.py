"""The `batchfit` command line: thin over the library (options.py, run.py, commands.py)."""

from batchfit.cli.commands import entry, main

__all__ = ("entry", "main")
