"""Pricing one variant: its trials on a fresh simulated card, down to a batch within the budget,
then the variant's memory line refined inside the bracket of what fits and what does not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from batchfit.config import ProbeConfig
from batchfit.device import Device
from batchfit.memory import MemoryLine, fit_line
from batchfit.result import Trial
from batchfit.session import has_batchnorm, holding

REFINE_TRIES = 3
PRECISION = 16
GROWTH = 8


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

        From the batch asked down by halves to one within the budget, a second point for the
        variant's memory line, then the line's answer verified by a trial and refined (three times
        at most, to within 1/16).
        """
        trials: list[Trial] = []
        smallest = 2 if has_batchnorm(model) else 1
        with holding(model, sample, self.card(), optimizer, loss_fn, config, None) as probe:

            def run(b: int) -> Trial:
                trials.append(probe.run(b))
                return trials[-1]

            asked = run(self.batch_size)
            peak = asked.peak_reserved if asked.ok else None
            size = self.batch_size
            # Down by halves to a batch within the budget (when the asked one is not).
            while not self.within(trials[-1]) and size > smallest:
                size = max(smallest, size // 2)
                run(size)
            if not self.within(trials[-1]):
                return 0, peak, trials
            # A second point for the memory line.
            ran = [t for t in trials if t.ok]
            if len({t.batch_size for t in ran}) < 2:
                other = max(smallest, size // 2) if size > smallest else size * 2
                run(other)
            for _ in range(REFINE_TRIES):
                guess = self._next(trials)
                if guess is None:
                    break
                run(guess)
        return self._best(trials), peak, trials

    def within(self, trial: Trial) -> bool:
        return trial.ok and trial.peak_reserved <= self.budget

    def _next(self, trials: list[Trial]) -> int | None:
        """The next batch to try: where the memory line through the trials nearest the limit meets
        the budget, inside the bracket of the largest batch within it and the smallest beyond it;
        None once that bracket is within 1/PRECISION of the answer."""
        best = self._best(trials)
        beyond = [t for t in trials if t.batch_size > best]
        ceiling = min((t.batch_size for t in beyond), default=None)
        if ceiling is not None and ceiling - best <= max(1, best // PRECISION):
            return None
        ran = {t.batch_size: t for t in trials if t.ok}
        above = [b for b in sorted(ran) if b > best]
        below = [b for b in sorted(ran) if b < best]
        partner = above[0] if above else below[-1] if below else None
        if partner is None:
            return None
        line = fit_line([(b, ran[b].peak_reserved) for b in (best, partner)])
        # A flat line (a tiny model, whole 2 MiB blocks) predicts no end: grow by GROWTH at most.
        guess = min(line.max_batch(self.budget), GROWTH * best)
        if ceiling is not None:
            guess = min(guess, ceiling - 1)
        return None if guess <= best or any(t.batch_size == guess for t in trials) else guess

    def _best(self, trials: list[Trial]) -> int:
        return max((t.batch_size for t in trials if self.within(t)), default=0)


def line_of(trials: list[Trial]) -> MemoryLine | None:
    """The reserved-memory line through the two largest batches that ran."""
    ran = {t.batch_size: t for t in trials if t.ok}
    if len(ran) < 2:
        return None
    top = [ran[b] for b in sorted(ran)[-2:]]
    return fit_line([(t.batch_size, t.peak_reserved) for t in top])
