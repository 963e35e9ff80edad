"""The lever table: what each change to the training run buys when a batch does not fit.

records.py holds the rows, changes.py what a lever does to a model (with its undo),
pricing.py the trials of one variant, table.py the table itself.
"""

from batchfit.lever.records import Lever, LeverTable
from batchfit.lever.table import GROUPS, levers

__all__ = ("GROUPS", "Lever", "LeverTable", "levers")
