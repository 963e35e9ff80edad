"""Pricing one variant: its trials on a fresh simulated card through the search's pricing variant
(`search.price`): down to a batch within the budget, then the variant's memory line refined
inside the bracket of what fits and what does not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from batchfit.config import ProbeConfig
from batchfit.device import Device
from batchfit.memory import MemoryLine, fit_line
from batchfit.result import Trial
from batchfit.search import price
from batchfit.session import has_batchnorm, holding


@dataclass
class Pricer:
    """Runs a variant's trials on a fresh simulated card of the planned capacity."""

    card: Callable[[], Device]
    """A fresh simulated card for each variant, as each probe gets its own."""
    budget: int
    batch_size: int

    def price_one(
        self, model: nn.Module, sample: Any, optimizer: Any, loss_fn: Any, config: ProbeConfig, batch_size: int
    ) -> Trial:
        """One trial of the variant at `batch_size`."""
        with holding(model, sample, self.card(), optimizer, loss_fn, config, None) as probe:
            return probe.run(batch_size)

    def price(
        self,
        model: nn.Module,
        sample: Any,
        optimizer: Any,
        loss_fn: Any,
        config: ProbeConfig,
    ) -> tuple[int, int | None, list[Trial]]:
        """(largest batch within the budget, peak at the batch asked or None on OOM, the trials).

        The search's pricing variant (`search.price`): from the batch asked down by halves to one
        within the budget, a second point for the variant's memory line, then the line's answer
        verified by a trial and refined (three times at most, to within 1/16).
        """
        smallest = 2 if has_batchnorm(model) else 1
        with holding(model, sample, self.card(), optimizer, loss_fn, config, None) as probe:
            ledger = price(probe.run, self.budget, self.batch_size, smallest)
        asked = ledger.order[0]
        return ledger.verified(), asked.peak_reserved if asked.ok else None, ledger.order

    def within(self, trial: Trial) -> bool:
        return trial.within(self.budget)


def line_of(trials: list[Trial]) -> MemoryLine | None:
    """The reserved-memory line through the two largest batches that ran."""
    ran = {t.batch_size: t for t in trials if t.ok}
    if len(ran) < 2:
        return None
    top = [ran[b] for b in sorted(ran)[-2:]]
    return fit_line([(t.batch_size, t.peak_reserved) for t in top])
