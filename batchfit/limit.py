"""The limit model: the largest batch a device can run, predicted from trials below it.

A line fitted to peak *reserved* memory far from the cap overstates the marginal cost: there
the caching allocator keeps ~20% more than is allocated, and near the cap it flushes that cache
and retries (ResNet-50 on an H200: predicted 16.5% low). What does not shrink under pressure
is allocated memory, and the one request that needs a single free hole: the largest
allocation (GPT-2's fp32 logits) fails while gigabytes lie free in smaller holes. So a batch
fits while

    allocated_line(B) + LARGEST_FRACTION × largest_allocation_line(B) <= capacity

Fitted to two real H200 traces (docs/accuracy.md), any fraction from 1/3 to 2/3 lands within
2.2% of the exact limits (ResNet-50 fp32: 1710; GPT-2 bf16 at seq 1024: 93); 1/2 is the middle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from batchfit.memory import MemoryLine, fit_line

if TYPE_CHECKING:
    from batchfit.result import Trial

LARGEST_FRACTION = 0.5
# Trials below this size can peak in optimizer.step() rather than in backward, which bends
# the line (docs/design.md): the fit prefers trials at or above it, and within 1/4 of the top.
FIT_MIN_BATCH = 4
FIT_SPAN = 4


def fit_sizes(batch_sizes: Iterable[int]) -> list[int]:
    """The batch sizes a memory line is fitted on: those that describe large batches.

    Small batches peak in optimizer.step() and sit on a flatter line, so sizes below 4 or
    below 1/4 of the largest are left out while two distinct sizes remain.
    """
    sizes = sorted(set(batch_sizes))
    if len(sizes) < 2:
        return sizes
    top = sizes[-1]
    use = [b for b in sizes if b >= max(FIT_MIN_BATCH, top / FIT_SPAN)]
    return use if len(use) >= 2 else sizes[-2:]


def fit_key(trials: Sequence[Mapping[str, Any]], key: str) -> MemoryLine | None:
    """The memory line of `key` (e.g. 'peak_allocated_bytes') over the fitted trials, or None."""
    fitted = [t for t in trials if t.get("status") == "fitted"]
    sizes = fit_sizes(t["batch_size"] for t in fitted)
    if len(sizes) < 2:
        return None
    chosen = set(sizes)
    return fit_line([(t["batch_size"], float(t.get(key) or 0)) for t in fitted if t["batch_size"] in chosen])


def predict_limit(trials: Sequence[Mapping[str, Any]], capacity_bytes: int) -> int:
    """The largest batch size predicted to run within `capacity_bytes`.

    `trials` are the dicts of `Result.to_dict()["trials"]`: `batch_size`, `status`
    ('fitted' or 'oom'), `peak_allocated_bytes` and, where measured, `largest_alloc_bytes`.
    The answer is never below a batch that ran nor at or above one that ran out of memory.

    >>> trials = [
    ...     {"batch_size": b, "status": "fitted", "peak_allocated_bytes": 100 + 10 * b, "largest_alloc_bytes": 2 * b}
    ...     for b in (4, 8)
    ... ]
    >>> predict_limit(trials, 1200)  # 100 + 10 B + (2 B) / 2 <= 1200
    100
    """
    if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes={capacity_bytes!r} must be a positive number of bytes")
    allocated = fit_key(trials, "peak_allocated_bytes")
    if allocated is None:
        raise ValueError("predict_limit needs fitted trials at two or more batch sizes")
    largest = fit_key(trials, "largest_alloc_bytes") or MemoryLine(0.0, 0.0)
    line = MemoryLine(
        fixed=allocated.fixed + LARGEST_FRACTION * largest.fixed,
        per_sample=allocated.per_sample + LARGEST_FRACTION * largest.per_sample,
    )
    limit = line.max_batch(capacity_bytes)
    ran = [t["batch_size"] for t in trials if t.get("status") == "fitted"]
    failed = [t["batch_size"] for t in trials if t.get("status") == "oom"]
    if failed:
        limit = min(limit, min(failed) - 1)
    return max(limit, max(ran))


def before_first_oom(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The trials a probe ran before its first out-of-memory error: all below the limit."""
    cut = next((i for i, t in enumerate(trials) if t.get("status") != "fitted"), len(trials))
    return list(trials[:cut])


def fit_trials(trials: list[Trial], key: str = "peak_reserved") -> MemoryLine | None:
    """The memory line of `key` ('peak_reserved', 'peak_allocated') through the trials that
    describe large batches: the limit model's own selection (`limit.fit_key`)."""
    return fit_key([t.to_dict() for t in trials], f"{key}_bytes")


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
