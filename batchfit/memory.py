"""Memory arithmetic: size strings, the linear memory model and the budget under a margin.

Peak training memory is close to `fixed + per_sample × B` once optimizer state exists
(docs/design.md); everything the search decides rests on that line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

# Binary units are powers of 1024 (IEC); decimal units are powers of 1000 (SI).
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
MIB = 1024**2
GIB = 1024**3
MIN_BLOCK = 512  # CUDACachingAllocator's kMinBlockSize: every request rounds up to a multiple of this


def parse_size(value: str | int | float) -> int:
    """Parse '24GiB', '40GB', '512 MiB' or a plain number of bytes into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r} is not a size; use e.g. '24GiB' or a byte count")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"memory size {value!r} must be a positive number of bytes")
        if value > 2**80:
            raise ValueError(f"memory size {value!r} is too large (over 2**80 bytes); use e.g. '24GiB'")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"memory size {value!r} is not understood; use a number with a unit such as '24GiB', '40GB' or '512MiB'"
        )
    # Fraction keeps '4611686019GB' exact where a float would round it.
    try:
        number = Fraction(match.group(1)) * _UNITS[match.group(2).lower()]
    except (ValueError, OverflowError):
        number = Fraction(0)
    if number < 1:
        raise ValueError(f"memory size {value!r} must be at least one byte")
    if number > 2**80:  # 1 YiB: far past any device, and past what a float keeps exact
        raise ValueError(f"memory size {value!r} is too large (over 2**80 bytes); use e.g. '24GiB'")
    return int(number)


def format_size(nbytes: float) -> str:
    """Render bytes in binary units, e.g. 25.3 GiB."""
    sign = "-" if nbytes < 0 else ""
    n = abs(float(nbytes))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


def round_size(nbytes: int) -> int:
    """Bytes CUDA's caching allocator hands out for a request of `nbytes` (its round_size): the CUDA
    card's allocation watch and the simulated card's allocator model both count requests so."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def budget(capacity: float, margin: float) -> int:
    """Bytes a recommendation may peak at: (1 - margin) of capacity, whole bytes (rounded down)."""
    return math.floor((1 - margin) * capacity)


@dataclass(frozen=True)
class MemoryLine:
    """Peak memory as `fixed + per_sample × B`, fitted on measured trials."""

    fixed: float
    per_sample: float

    def predict(self, batch_size: float) -> float:
        return self.fixed + self.per_sample * batch_size

    def max_batch(self, budget: float) -> int:
        """Largest integer B whose predicted peak stays within `budget` (0 if none)."""
        if self.per_sample <= 0:
            return 0 if self.fixed > budget else 2**62
        return max(0, math.floor((budget - self.fixed) / self.per_sample + 1e-9))


def fit_line(points: Sequence[tuple[float, float]]) -> MemoryLine:
    """Least-squares line through (batch_size, peak_bytes) points.

    At tiny batches the peak can sit in optimizer.step() rather than in backward, so
    memory is the larger of two lines (docs/design.md); callers pass trials with B >= 4
    where they have them. A negative slope (noise on a flat model) is clamped to zero.
    """
    if len({b for b, _ in points}) < 2:
        raise ValueError(f"a memory line needs two distinct batch sizes, got {list(points)}")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    sbb = sum((b - mean_b) ** 2 for b, _ in points)
    sbm = sum((b - mean_b) * (m - mean_m) for b, m in points)
    slope = max(0.0, sbm / sbb)
    return MemoryLine(fixed=mean_m - slope * mean_b, per_sample=slope)


def round_batch(limit: int, rounding: str) -> int:
    """Round a batch-size limit down: 'pow2' to a power of two, 'mult8' to a multiple of 8."""
    if limit < 1:
        return 0
    if rounding == "pow2":
        return 1 << (int(limit).bit_length() - 1)
    if rounding == "mult8":
        return limit // 8 * 8 if limit >= 8 else round_batch(limit, "pow2")
    if rounding == "none":
        return int(limit)
    raise ValueError(f"rounding={rounding!r} is not one of 'pow2', 'mult8', 'none'")
