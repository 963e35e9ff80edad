"""The lever table: what each change to the training run buys when a batch does not fit.

records.py holds the rows, pricing.py the trials of one variant, table.py the table itself,
parallel.py its rows on two cores, sharding.py its FSDP rows; what a lever does to a model is batchfit/changes.py.
"""

from batchfit.lever.records import Lever, LeverTable
from batchfit.lever.table import GROUPS, levers

__all__ = ("GROUPS", "Lever", "LeverTable", "levers")
