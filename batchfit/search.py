"""The search for the largest batch that trains within the budget, over a `run(B)` callable.

Pure: no torch devices, so it is tested in microseconds against synthetic memory curves.
Invariant: every batch size it recommends was run and measured within the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from batchfit.limit import FIT_MIN_BATCH, FIT_SPAN, fit_sizes, predict_limit
from batchfit.memory import MemoryLine, fit_line, round_batch
from batchfit.memory import budget as memory_budget
from batchfit.result import Trial

# A jump whose measured peak is this far from the line's prediction gets a second point
# beside it, so the line is fitted where the recommendation lives.
_FIT_TOLERANCE = 0.05
_MAX_JUMP = 16
# Without rounding, stop once a step would gain less than 1/64 (~1.5%) of the batch.
_CLOSE_ENOUGH = 64
_UNBOUNDED = 2**40


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


def fit_trials(trials: list[Trial], key: str = "peak_reserved") -> MemoryLine | None:
    """The memory line of `key` through the successful trials that describe large batches."""
    ok = [t for t in trials if t.ok]
    sizes = set(fit_sizes(t.batch_size for t in ok))
    if len(sizes) < 2:
        return None
    return fit_line([(t.batch_size, getattr(t, key)) for t in ok if t.batch_size in sizes])


def reserved_model(trials: list[Trial]) -> MemoryLine | None:
    """Peak reserved memory as the allocated line times the cache's overhead at the largest trial.

    Reserved grows in whole segments (2 and 20 MiB, or one per large tensor), so a line fitted
    to reserved peaks of small batches is steppy and can be far too flat; allocated memory is
    smooth. The caching allocator keeps a roughly constant fraction more than is allocated far
    from the cap (18-21% for ResNet-50 on an H200, docs/design.md), so the search plans its jumps
    with allocated × that fraction, and falls back to the reserved line where no allocated
    peak was measured.
    """
    allocated = fit_trials(trials, "peak_allocated")
    ok = [t for t in trials if t.ok and t.peak_allocated > 0]
    if allocated is None or allocated.per_sample <= 0 or not ok:
        return fit_trials(trials)
    top = max(ok, key=lambda t: t.batch_size)
    overhead = max(1.0, top.peak_reserved / top.peak_allocated)
    return MemoryLine(fixed=allocated.fixed * overhead, per_sample=allocated.per_sample * overhead)


def _conforms(batch_size: int, rounding: str) -> bool:
    return round_batch(batch_size, rounding) == batch_size


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
    """Double from `start` until the memory line is known, then jump to its answer and verify.

    A size counts as verified when its trial ran and its measured peak reserved memory
    stayed within (1 - margin) × capacity. Failures and over-budget trials become an
    upper bound, and every new trial refits the line, so the search converges from
    either side of a wrong prediction.
    """
    budget = memory_budget(capacity, margin)
    cap = max_batch_size or _UNBOUNDED
    trials: dict[int, Trial] = {}
    order: list[Trial] = []

    def attempt(batch_size: int) -> Trial:
        trial = run(batch_size)
        trials[batch_size] = trial
        order.append(trial)
        return trial

    def within(trial: Trial) -> bool:
        return trial.ok and trial.peak_reserved <= budget

    def verified() -> int:
        sizes = [b for b, t in trials.items() if within(t) and _conforms(b, rounding)]
        return max(sizes, default=0)

    def ceiling() -> int:
        """Smallest size that failed or broke the budget (exclusive upper bound)."""
        return min((b for b, t in trials.items() if not within(t)), default=cap + 1)

    batch_size = min(start, cap)
    while True:
        trial = attempt(batch_size)
        ready = sum(1 for t in order if t.ok and t.batch_size >= FIT_MIN_BATCH) >= 2
        if not within(trial) or ready or batch_size >= cap or len(order) >= max_trials:
            break
        batch_size = min(batch_size * 2, cap)

    while len(order) < max_trials:
        line = reserved_model(order)
        below = max((b for b, t in trials.items() if t.ok and b < ceiling()), default=0)
        limit = ceiling() - 1
        from_line = line is not None and line.max_batch(budget) < limit
        if line is not None:
            limit = min(limit, line.max_batch(budget))
        if any(not within(t) for t in order) and (below + ceiling()) // 2 < limit:
            # Bracketed: an OOM carries no peak to correct the line with, so never step
            # past the middle of the gap (a safeguarded secant search).
            limit, from_line = (below + ceiling()) // 2, False
        if limit > _MAX_JUMP * below:
            # Lines from small batches can be flat (the optimizer step dominates them) and
            # predict absurd limits: grow at most 16× per trial and refit on the way.
            limit, from_line = _MAX_JUMP * below, False
        candidate = round_batch(limit, rounding)
        best = verified()
        if candidate <= best + best // _CLOSE_ENOUGH or candidate < 1 or candidate in trials:
            break
        trial = attempt(candidate)
        half = candidate // 2
        if (
            from_line
            and line is not None
            and trial.ok
            and half >= FIT_MIN_BATCH
            and half not in trials
            and abs(line.predict(candidate) - trial.peak_reserved) > _FIT_TOLERANCE * trial.peak_reserved
        ):
            attempt(half)

    ok_sizes = sorted(b for b, t in trials.items() if t.ok)
    if ok_sizes and len(order) < max_trials:
        top = ok_sizes[-1]
        if top // 2 >= FIT_MIN_BATCH and not any(top / FIT_SPAN <= b < top for b in ok_sizes):
            # The line is reported and trusted near the top: give it a second point there
            # (half the largest batch that ran, so no new risk of running out of memory).
            attempt(top // 2)

    line = fit_trials(order)
    ran = [t.batch_size for t in order if t.ok]
    smallest_oom = min((t.batch_size for t in order if not t.ok), default=None)
    predicted = None
    if line is not None:
        predicted = predict_limit([t.to_dict() for t in order], capacity)
        predicted = min(predicted, cap) if max_batch_size else predicted

    exact_limit = None
    if exact and ran:
        exact_limit = _bisect(attempt, trials, max(ran), smallest_oom, cap, max_trials, order)

    return SearchOutcome(
        recommended=verified(),
        largest_ran=max((t.batch_size for t in order if t.ok), default=0),
        predicted_limit=predicted,
        line=line,
        line_allocated=fit_trials(order, "peak_allocated"),
        exact_limit=exact_limit,
        trials=order,
    )


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
    while high is None and len(order) < budget_trials:
        nxt = min(low * 2, cap)
        if nxt == low:
            return low
        trial = trials.get(nxt) or attempt(nxt)
        if trial.ok:
            low = nxt
        else:
            high = nxt
    while high is not None and high - low > 1 and len(order) < budget_trials:
        mid = (low + high) // 2
        trial = trials.get(mid) or attempt(mid)
        if trial.ok:
            low = mid
        else:
            high = mid
    return low
