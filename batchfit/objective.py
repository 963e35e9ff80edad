"""What a recommendation maximises besides memory: the throughput knee and Pollux goodput.

Both need real step times; on a device without them the memory answer stands.
"""

from __future__ import annotations

from batchfit.result import Trial

# Pollux (Qiao et al. 2021): the knee is the smallest batch within 95% of the best throughput.
KNEE_FRACTION = 0.95


def throughput_knee(trials: list[Trial]) -> int | None:
    """Smallest batch whose samples/s is within 95% of the best measured."""
    rates = [(t.batch_size, t.samples_per_s) for t in trials if t.samples_per_s]
    if not rates:
        return None
    best = max(r for _, r in rates)
    return min(b for b, r in rates if r >= KNEE_FRACTION * best)


def goodput_batch_size(trials: list[Trial], noise_scale: float) -> int | None:
    """Batch maximising throughput × statistical efficiency (φ + B₀)/(φ + B) (Pollux).

    B₀ only scales every candidate by the same constant, so it does not move the argmax.
    """
    rates = [(t.batch_size, t.samples_per_s) for t in trials if t.samples_per_s]
    if not rates:
        return None
    return max(rates, key=lambda br: br[1] / (noise_scale + br[0]))[0]
