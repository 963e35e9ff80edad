"""`check`'s lever table: prepared before the check (its helper process forked then, before any
backward pass here), priced after it; Ctrl-C while pricing keeps the verdict and the rows so far."""

from __future__ import annotations

from typing import Any

from batchfit.cli.run import FAILURES, Run, fail


def prepare_table(run: Run, batch_size: int) -> Any:
    """The lever table before any trial (`lever.table.prepare`); a bad option is a one-line failure."""
    from batchfit.lever.table import prepare

    try:
        return run.call(prepare, batch_size)
    except FAILURES as error:
        fail(error, run, None)


def price_levers(run: Run, batch_size: int, check: Any, world_sizes: tuple[int, ...], ahead: Any) -> tuple[Any, bool]:
    """The lever table for the checked batch, and whether Ctrl-C cut it short (then the rows
    priced so far: the check's verdict was already reached and is not lost); or a one-line failure."""
    from batchfit.lever import GROUPS, LeverTable

    run.say("pricing the levers on the simulated card ...")
    rows: list[Any] = []
    try:
        table = ahead or prepare_table(run, batch_size)
        # On the simulated card the check's trial is the first row's at the batch asked: not run twice.
        asked = check.trial if run.device_kind == "simulated" else None
        return table.price(GROUPS, rows.append, world_sizes, asked), False
    except KeyboardInterrupt:
        budget = round(check.budget_bytes)
        return LeverTable(batch_size, check.capacity_bytes, budget, check.device, rows), True
    except FAILURES as error:
        fail(error, run, None)
