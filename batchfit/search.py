"""The search for the largest batch that trains within the budget, over a `run(B)` callable.

Pure: no torch devices, so it is tested in microseconds against synthetic memory curves.
Invariant: every batch size it recommends was run and measured within the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from batchfit.limit import FIT_MIN_BATCH, FIT_SPAN, fit_trials, predict_limit, reserved_model
from batchfit.memory import MemoryLine, fit_line, round_batch
from batchfit.memory import budget as memory_budget
from batchfit.result import Trial

# A jump's peak this far off the line gets a second point beside it; within, it confirms the line.
_FIT_TOLERANCE = 0.05
_MAX_JUMP = 16
_CLOSE_ENOUGH = 64  # without rounding, stop once a step would gain under 1/64 (~1.5%) of the batch
_UNBOUNDED = 2**40

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOutcome:
    """What the search found; `trials` are in the order they ran."""

    recommended: int
    largest_ran: int
    predicted_limit: int | None
    line: MemoryLine | None
    line_allocated: MemoryLine | None
    exact_limit: int | None
    trials: list[Trial]
    budget: int
    """Bytes a recommendation may peak at, (1 - margin) × capacity, for all that reads the search."""


@dataclass
class Ledger:
    """What the search knows: every trial by size and in order, against one budget."""

    budget: int
    cap: int
    rounding: str = "pow2"
    start: int = 1
    """The smallest size the model can run (2 with BatchNorm); the first trial is at 4 or more."""
    trials: dict[int, Trial] = field(default_factory=dict)
    order: list[Trial] = field(default_factory=list)
    moves: dict[int, Move] = field(default_factory=dict)
    """The move that ran each size."""
    phase: str = "doubling"
    """'doubling' (growing) until the line is known, 'jumping' to its answer, 'closing' at last."""
    last: Move | None = None
    asked: int | None = None
    """The pricing variant's batch asked (`next_price_move`)."""
    over: bool = False
    """The model alone (weights, gradients, optimizer state) needs more than the budget: the pricing
    variant tries the smallest size first (next after a batch asked that ran already)."""

    def record(self, move: Move, trial: Trial) -> None:
        self.trials[trial.batch_size] = trial
        self.order.append(trial)
        self.moves[trial.batch_size] = move
        self.phase, self.last = move.phase, move

    def within(self, trial: Trial) -> bool:
        return trial.within(self.budget)

    def verified(self) -> int:
        """Largest size that ran within the budget and obeys the rounding (0 if none)."""
        sizes = [b for b, t in self.trials.items() if self.within(t) and round_batch(b, self.rounding) == b]
        return max(sizes, default=0)

    def ceiling(self) -> int:
        """Smallest size that failed or broke the budget (exclusive upper bound)."""
        return min((b for b, t in self.trials.items() if not self.within(t)), default=self.cap + 1)


@dataclass(frozen=True)
class Move:
    """The search's next step: a batch size to try (None: stop), why, and the phase after it."""

    batch_size: int | None
    reason: str
    phase: str
    predicted_peak: float | None = None
    """What the line predicted for this size, when the move was a jump to the line's answer."""
    predicted_allocated: float | None = None
    """The allocated line's prediction for that jump: the smooth part, which judges the line."""

    def missed(self, trial: Trial) -> bool:
        """Whether `trial` (this move's) peaked over 5% off the prediction: by allocated bytes
        where measured (the cache's share of reserved changes with pressure, not the line)."""
        if self.predicted_allocated is not None and trial.peak_allocated > 0:
            return abs(self.predicted_allocated - trial.peak_allocated) > _FIT_TOLERANCE * trial.peak_allocated
        if self.predicted_peak is None:
            return True
        return abs(self.predicted_peak - trial.peak_reserved) > _FIT_TOLERANCE * trial.peak_reserved


def next_move(ledger: Ledger) -> Move:
    """The next batch size to try and why. Pure: reads the ledger, changes nothing."""
    if not ledger.order:
        # Sizes below 4 peak on another line (the optimizer step) and are never fitted: start at 4.
        first = max(ledger.start, FIT_MIN_BATCH)
        return Move(min(first, ledger.cap), "start: the smallest size the memory line is fitted on", "doubling")
    if ledger.phase == "doubling":
        trial = ledger.order[-1]
        if not ledger.verified() and not ledger.within(trial) and trial.batch_size > ledger.start:
            half = max(ledger.start, trial.batch_size // 2)
            return Move(half, "halve: nothing ran within the budget yet", "doubling")
        ready = sum(1 for t in ledger.order if t.ok and t.batch_size >= FIT_MIN_BATCH) >= 2
        grow = _grow(ledger, trial)
        if ledger.within(trial) and not ready and trial.batch_size < grow < ledger.ceiling():
            return Move(grow, "grow: as far as one point shows within the budget", "doubling")
    if ledger.phase in ("doubling", "jumping"):
        second = _second_point(ledger)
        if second is not None:
            return second
        jump = _jump(ledger)
        if jump.batch_size is not None:
            return jump
        return _closing(ledger) or jump
    return Move(None, "done", "closing")


def _grow(ledger: Ledger, trial: Trial) -> int:
    """The second point, 2x to 16x: fixed + per-sample × B with fixed >= 0 keeps every B up to
    b × budget / peak(b) within the budget. Small batches leave the card idle, so a far point
    costs little more than a near one and fits the line nearer the answer (docs/design.md)."""
    b, peak = trial.batch_size, trial.peak_reserved
    bound = min(b * ledger.budget // peak, _MAX_JUMP * b) if peak > 0 else 0
    grow = min(max(2 * b, round_batch(bound, ledger.rounding)), ledger.cap)
    return grow if grow < ledger.ceiling() else min(2 * b, ledger.cap)


def _second_point(ledger: Ledger) -> Move | None:
    """After a jump the line mispredicted by over 5%, a point at half of it to refit near there."""
    last, trial = ledger.last, ledger.order[-1]
    if last is None or last.predicted_peak is None or last.batch_size != trial.batch_size or not trial.ok:
        return None
    half = trial.batch_size // 2
    if half < FIT_MIN_BATCH or half in ledger.trials or not last.missed(trial):
        return None
    return Move(half, "second point: the line missed the jump's peak by over 5%", "jumping")


def _jump(ledger: Ledger) -> Move:
    """To the largest rounded size the line puts within the budget, safeguarded."""
    line = reserved_model(ledger.order)
    ceiling = ledger.ceiling()
    below = max((b for b, t in ledger.trials.items() if t.ok and b < ceiling), default=0)
    limit, reason = ceiling - 1, "below the smallest size that failed or broke the budget"
    from_line = line is not None and line.max_batch(ledger.budget) < limit
    if line is not None and from_line:
        limit, reason = line.max_batch(ledger.budget), "the memory line's largest size within the budget"
    if any(not ledger.within(t) for t in ledger.order) and (below + ceiling) // 2 < limit:
        # Bracketed: an OOM has no peak to correct the line, so at most the middle (safeguarded secant).
        limit, from_line, reason = (below + ceiling) // 2, False, "bisect: the middle of the bracket"
    if limit > _MAX_JUMP * below:
        # Lines from small batches can be flat (the optimizer step dominates): at most 16x a trial.
        limit, from_line, reason = _MAX_JUMP * below, False, "grow at most 16x per trial"
    candidate = round_batch(limit, ledger.rounding)
    best = ledger.verified()
    if candidate <= best + best // _CLOSE_ENOUGH or candidate < 1:
        return Move(None, "stop: nothing larger to gain", "jumping")
    if candidate in ledger.trials:
        return Move(None, "stop: the next size already ran", "jumping")
    # The allocated line's prediction is kept for every jump the line reaches past (a capped one too),
    # which its trial confirms or not; only a jump to the line's answer gets a second point on a miss.
    allocated = fit_trials(ledger.order, "peak_allocated")
    predicted_allocated = allocated.predict(candidate) if allocated is not None and line is not None else None
    predicted = line.predict(candidate) if from_line and line is not None else None
    return Move(candidate, reason, "jumping", predicted, predicted_allocated)


def _closing(ledger: Ledger) -> Move | None:
    """A second point near the top (half of it: no new risk), where the reported line is trusted,
    unless one is there or the top was a jump whose peak the line predicted (that confirms it)."""
    ok_sizes = sorted(b for b, t in ledger.trials.items() if t.ok)
    if not ok_sizes:
        return None
    top = ok_sizes[-1]
    if top // 2 < FIT_MIN_BATCH or any(top / FIT_SPAN <= b < top for b in ok_sizes):
        return None
    ran = ledger.moves.get(top)
    predicted = ran is not None and (ran.predicted_peak is not None or ran.predicted_allocated is not None)
    if ran is not None and predicted and not ran.missed(ledger.trials[top]):
        return None
    return Move(top // 2, "second point near the top for the reported line", "closing")


def search(
    run: Callable[[int], Trial],
    capacity: int,
    *,
    margin: float = 0.2,
    start: int = 1,
    max_batch_size: int | None = None,
    rounding: str = "pow2",
    exact: bool = False,
    max_trials: int = 40,
) -> SearchOutcome:
    """Grow from `start` until the memory line is known, then jump to its answer and verify.

    A size is verified when its trial ran with its peak reserved memory within (1 - margin) ×
    capacity. Failures and over-budget trials become an upper bound, and every trial refits the
    line, so the search converges from either side of a wrong prediction (`next_move` decides)."""
    cap = max_batch_size or _UNBOUNDED
    ledger = Ledger(budget=memory_budget(capacity, margin), cap=cap, rounding=rounding, start=start)
    drive(ledger, run, next_move, max_trials)

    order, trials = ledger.order, ledger.trials
    line = fit_trials(order)
    ran = [t.batch_size for t in order if t.ok]
    smallest_oom = min((t.batch_size for t in order if not t.ok), default=None)
    predicted = None
    if line is not None:
        predicted = predict_limit([t.to_dict() for t in order], capacity)
        predicted = min(predicted, cap) if max_batch_size else predicted

    exact_limit = None
    if exact and ran:

        def attempt(batch_size: int) -> Trial:
            trial = run(batch_size)
            ledger.record(Move(batch_size, "exact: bisect to the largest size that runs", "closing"), trial)
            return trial

        exact_limit = _bisect(attempt, trials, max(ran), smallest_oom, cap, max_trials, order)

    return SearchOutcome(
        recommended=ledger.verified(),
        largest_ran=max((t.batch_size for t in order if t.ok), default=0),
        predicted_limit=predicted,
        line=line,
        line_allocated=fit_trials(order, "peak_allocated"),
        exact_limit=exact_limit,
        trials=order,
        budget=ledger.budget,
    )


def drive(ledger: Ledger, run: Callable[[int], Trial], decide: Callable[[Ledger], Move], max_trials: int) -> None:
    """Run the moves `decide` (`next_move`, `next_price_move`) picks until it stops."""
    while len(ledger.order) < max_trials:
        move = decide(ledger)
        if move.batch_size is None:
            break
        log.debug("trial at %d: %s", move.batch_size, move.reason)
        ledger.record(move, run(move.batch_size))


# The pricing variant (the lever table's): down from the batch asked, then the line refined to 1/16.
PRICE_REFINES = 3
PRICE_PRECISION = 16
PRICE_GROWTH = 8


def next_price_move(ledger: Ledger) -> Move:
    """The pricing variant's next size and why, from `ledger.asked` down to `ledger.start`; pure."""
    best = ledger.verified()
    if ledger.over and not best and ledger.start not in ledger.trials and (ledger.asked or 0) > ledger.start:
        return Move(ledger.start, "price: the model alone needs more than the budget", "descending")
    # First, or after the smallest (`over`) ran, for its peak: unless the smallest ran out of memory.
    if ledger.asked not in ledger.trials and (not ledger.order or ledger.order[-1].ok):
        return Move(ledger.asked, "price: the batch asked", "descending")
    last = ledger.order[-1]
    if not best:
        if last.batch_size > ledger.start and ledger.start not in ledger.trials:
            half = max(ledger.start, last.batch_size // 2)
            return Move(half, "price: halve to a size within the budget", "descending")
        return Move(None, "price: not even the smallest size fits", "descending")
    ran = sorted({t.batch_size for t in ledger.order if t.ok})
    seconds = [m for m in ledger.moves.values() if m.phase == "second"]
    if len(ran) < 2 and not seconds:
        other = max(ledger.start, best // 2) if best > ledger.start else best * 2
        return Move(other, "price: a second point for the memory line", "second")
    if sum(m.phase == "refining" for m in ledger.moves.values()) >= PRICE_REFINES:
        return Move(None, "price: refined enough", "refining")
    guess = _price_refine(ledger, best, ran)
    if guess is None:
        return Move(None, "price: within 1/16 of the answer, or nothing new to try", "refining")
    return Move(guess, "price: the line through the trials nearest the limit meets the budget", "refining")


def _price_refine(ledger: Ledger, best: int, ran: list[int]) -> int | None:
    """Where the line through the largest size within the budget and its nearest neighbour that
    ran meets the budget, inside the bracket; None once the bracket is within 1/16."""
    ceiling = min((b for b in ledger.trials if b > best), default=None)
    if ceiling is not None and ceiling - best <= max(1, best // PRICE_PRECISION):
        return None
    above, below = [b for b in ran if b > best], [b for b in ran if b < best]
    partner = above[0] if above else below[-1] if below else None
    if partner is None:
        return None
    line = fit_line([(b, ledger.trials[b].peak_reserved) for b in (best, partner)])
    # A flat line (a tiny model, whole 2 MiB blocks) predicts no end: grow by 8x at most.
    guess = min(line.max_batch(ledger.budget), PRICE_GROWTH * best)
    if ceiling is not None:
        guess = min(guess, ceiling - 1)
    return None if guess <= best or guess in ledger.trials else guess


def price(
    run: Callable[[int], Trial],
    budget: int,
    batch_size: int,
    smallest: int = 1,
    max_trials: int = 40,
    over: bool = False,
    ran: dict[int, Trial] | None = None,
) -> Ledger:
    """The search down from a batch asked (the lever table's rows, preflight's largest size): its
    trials at `batch_size` and below, in a ledger (`verified()`: the largest within `budget`,
    unrounded). `over`: the model alone needs more than the budget (`Ledger.over`). `ran`: trials
    run already (the check's at the batch asked), recorded as run, not run again."""
    ran = ran or {}
    ledger = Ledger(budget=budget, cap=_UNBOUNDED, rounding="none", start=smallest, asked=batch_size, over=over)
    if batch_size in ran:
        ledger.record(Move(batch_size, "price: the batch asked", "descending"), ran[batch_size])
    drive(ledger, lambda b: ran.get(b) or run(b), next_price_move, max_trials)
    return ledger


def _bisect(
    attempt: Callable[[int], Trial],
    trials: dict[int, Trial],
    low: int,
    high: int | None,
    cap: int,
    max_trials: int,
    order: list[Trial],
) -> int:
    """Largest size that runs: double past `low` until a failure, then bisect."""
    budget_trials = max_trials * 2  # exactness is asked for; allow it more room
    while len(order) < budget_trials and (high is None or high - low > 1):
        size = min(low * 2, cap) if high is None else (low + high) // 2
        if size == low:  # doubling stopped at the cap
            return low
        trial = trials.get(size) or attempt(size)
        low, high = (size, high) if trial.ok else (low, size)
    return low
