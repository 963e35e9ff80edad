"""Replay: the search against memory and step-time curves recorded on a real H200.

The search is pure (`search.next_move` over a ledger), so its GPU time can be modelled without a
GPU: each trial's peaks come from the recorded probe traces in tests/data/calibration/
(interpolated in B, extrapolated from the last two sizes; out of memory above the exact limit
measured on the card), and its time is

    steps × recorded step time at B + the per-trial overhead + the allocation watch (if watched)

The per-trial overhead is what the recorded batchfit run spent beyond its steps, divided by its
trials (bench_peers' batchfit time on the same card); the watch's cost was measured on CPU (the
first step's allocation watch: ResNet-50 +0.04 s, GPT-2 +0.09 s a trial). The fastest peer's
time is bench_peers' on the same card, same session. Under perturbation (per-sample memory ±10%;
±25% beyond a pivot size, so a line learned below it is wrong where the search jumps; the cache's
overhead ±30%; 1% noise on every peak) it reports the trials, OOMs and answers of each run, and
the predicted limit against that card's own exact limit.

    python scripts/bench_replay.py [--runs 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchfit.config import ProbeConfig  # noqa: E402
from batchfit.limit import LARGEST_FRACTION  # noqa: E402
from batchfit.result import Trial  # noqa: E402
from batchfit.search import SearchOutcome, search  # noqa: E402

DATA = ROOT / "tests" / "data" / "calibration"


@dataclass(frozen=True)
class Case:
    """A recorded probe, its card's exact limit and the peers' times from the same session."""

    name: str
    trace: str
    peers: str
    exact: int
    batchnorm: bool
    watch_s: float
    """The first step's allocation watch, a trial (measured on CPU while building it)."""


CASES = (
    Case("ResNet-50 fp32 SGD", "h200_resnet50_fp32_sgd.json", "h200_bench_peers_resnet50.json", 1710, True, 0.04),
    Case(
        "GPT-2 seq 1024 bf16 AdamW",
        "h200_gpt2_seq1024_bf16_adamw.json",
        "h200_bench_peers_gpt2.json",
        93,
        False,
        0.09,
    ),
)
RECORDED_STEPS = 2
"""Steps a trial ran when the traces were recorded."""


@dataclass(frozen=True)
class Perturbation:
    """How the replayed card differs from the recorded one (all zero: the recorded card)."""

    per_sample: float = 0.0
    beyond: float = 0.0
    """Per-sample memory beyond `pivot`, relative."""
    cache: float = 0.0
    """The caching allocator's excess over allocated, relative."""
    noise: float = 0.0
    """Relative noise on every measured peak (uniform)."""
    pivot: float = 0.0


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended by the nearest segment."""
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class Curves:
    """One recorded card's memory and time as functions of the batch size."""

    sizes: list[float]
    allocated: list[float]
    ratio: list[float]
    largest: list[float]
    step_s: list[float]
    capacity: int
    exact: int

    @classmethod
    def load(cls, case: Case) -> Curves:
        trace = json.loads((DATA / case.trace).read_text())
        derived = json.loads((DATA / "derived_largest_alloc.json").read_text())[case.trace]
        ran = sorted((t for t in trace["trials"] if t["status"] == "fitted"), key=lambda t: t["batch_size"])
        return cls(
            sizes=[t["batch_size"] for t in ran],
            allocated=[t["peak_allocated_bytes"] for t in ran],
            ratio=[t["peak_reserved_bytes"] / t["peak_allocated_bytes"] for t in ran],
            largest=[derived[str(t["batch_size"])] for t in ran],
            step_s=[t["seconds_per_step"] for t in ran],
            capacity=trace["capacity_bytes"],
            exact=case.exact,
        )

    def pressure(self, b: float) -> float:
        """What decides an out-of-memory error (the limit model's: allocated + ½ largest request)."""
        return _interpolate(self.sizes, self.allocated, b) + LARGEST_FRACTION * _interpolate(
            self.sizes, self.largest, b
        )

    def seconds(self, b: float) -> float:
        return max(_interpolate(self.sizes, self.step_s, b), min(self.step_s))


@dataclass
class Card:
    """The replayed card: `run(B)` is a trial, and the modelled seconds add up as it goes."""

    curves: Curves
    perturbation: Perturbation
    steps: int
    overhead_s: float
    watch_s: float
    rng: random.Random
    seconds: float = 0.0
    threshold: float = field(init=False)

    def __post_init__(self) -> None:
        # The card's own limit lies between the exact limit and the next size.
        self.threshold = self.curves.pressure(self.curves.exact + 0.5)

    def _scaled(self, values: list[float], b: int) -> float:
        """A recorded quantity at `b` with its per-sample part perturbed."""
        sizes, p = self.curves.sizes, self.perturbation
        base = _interpolate(sizes, values, sizes[0])
        at = lambda x: base + (_interpolate(sizes, values, x) - base) * (1 + p.per_sample)  # noqa: E731
        if p.pivot and b > p.pivot:
            return at(p.pivot) + (at(b) - at(p.pivot)) * (1 + p.beyond)
        return at(b)

    def fits(self, b: int) -> bool:
        pressure = self._scaled(self.curves.allocated, b) + LARGEST_FRACTION * self._scaled(self.curves.largest, b)
        return pressure <= self.threshold

    def exact(self) -> int:
        """This card's exact limit: the largest size that runs."""
        b = 1
        while self.fits(b + 1):
            b += 1
        return b

    def run(self, b: int) -> Trial:
        c, p = self.curves, self.perturbation
        allocated = self._scaled(c.allocated, b)
        largest = self._scaled(c.largest, b)
        excess = (_interpolate(c.sizes, c.ratio, b) - 1) * (1 + p.cache)
        self.seconds += self.overhead_s + self.watch_s
        if not self.fits(b):
            self.seconds += c.seconds(b)  # fails in its first step
            return Trial(b, False)
        self.seconds += self.steps * c.seconds(b)
        noisy = lambda x: round(x * (1 + self.rng.uniform(-p.noise, p.noise)))  # noqa: E731
        reserved = min(allocated * (1 + max(excess, 0.0)), c.capacity)
        return Trial(b, True, noisy(allocated), noisy(reserved), c.seconds(b), largest_alloc=noisy(largest))


@dataclass(frozen=True)
class Replay:
    """One replayed probe: what the search did and what it would have cost on the card."""

    outcome: SearchOutcome
    seconds: float
    exact: int
    """The replayed card's exact limit."""

    @property
    def sizes(self) -> list[int]:
        return [t.batch_size for t in self.outcome.trials]

    @property
    def ooms(self) -> int:
        return sum(not t.ok for t in self.outcome.trials)


def recorded_overhead(case: Case) -> float:
    """Seconds a trial cost beyond its steps in the recorded batchfit run (bench_peers, same card)."""
    curves = Curves.load(case)
    trace = json.loads((DATA / case.trace).read_text())
    row = next(r for r in json.loads((DATA / case.peers).read_text())["rows"] if r["finder"] == "batchfit")
    ran = [t for t in trace["trials"][: row["trials"]] if t["status"] == "fitted"]
    stepping = sum(RECORDED_STEPS * curves.seconds(t["batch_size"]) for t in ran)
    return (row["seconds"] - stepping) / row["trials"]


def fastest_peer(case: Case) -> tuple[str, float]:
    rows = json.loads((DATA / case.peers).read_text())["rows"]
    best = min((r for r in rows if r["finder"] != "batchfit"), key=lambda r: r["seconds"])
    return best["finder"], best["seconds"]


def replay(case: Case, perturbation: Perturbation = Perturbation(), seed: int = 0, steps: int | None = None) -> Replay:
    """The search as the probe runs it (same start, margin, rounding) on the replayed card;
    `steps` a trial (default: the probe's)."""
    config = ProbeConfig()
    card = Card(
        Curves.load(case),
        perturbation,
        steps or config.steps_per_trial,
        recorded_overhead(case),
        case.watch_s,
        random.Random(seed),
    )
    outcome = search(
        card.run,
        card.curves.capacity,
        margin=config.margin,
        start=2 if case.batchnorm else 1,
        rounding=config.rounding,
        max_trials=config.max_trials,
    )
    return Replay(outcome, card.seconds, card.exact())


PIVOTS = (8, 32, 128)
"""Where the searches jump from: the corners bend the curve there."""


def perturbations(case: Case, runs: int, seed: int) -> list[Perturbation]:
    """The corners of the perturbation box at each pivot below half the limit, then random ones
    inside it (pivot log-uniform from 4 to half the limit): `runs` in all, or the corners."""
    corners = [
        Perturbation(a, b, c, 0.01, pivot)
        for pivot in PIVOTS
        if pivot < case.exact / 2
        for a in (-0.10, 0.10)
        for b in (-0.25, 0.25)
        for c in (-0.30, 0.30)
    ]
    rng = random.Random(seed)
    inside = [
        Perturbation(
            rng.uniform(-0.1, 0.1),
            rng.uniform(-0.25, 0.25),
            rng.uniform(-0.3, 0.3),
            0.01,
            4 * (case.exact / 8) ** rng.random(),
        )
        for _ in range(max(0, runs - len(corners)))
    ]
    return corners + inside


def summary(runs: int = 100, seed: int = 0, steps: int | None = None) -> list[dict[str, Any]]:
    """One row a case: the recorded card's replay, the peers, and the perturbed runs."""
    rows = []
    for case in CASES:
        base = replay(case, steps=steps)
        peer, peer_s = fastest_peer(case)
        perturbed = [replay(case, p, seed + i, steps) for i, p in enumerate(perturbations(case, runs, seed))]
        off = [abs((r.outcome.predicted_limit or 0) / r.exact - 1) for r in perturbed]
        rows.append(
            {
                "case": case.name,
                "sizes": base.sizes,
                "ooms": base.ooms,
                "recommended": base.outcome.recommended,
                "predicted_limit": base.outcome.predicted_limit,
                "exact": case.exact,
                "seconds": base.seconds,
                "peer": peer,
                "peer_s": peer_s,
                "ratio": base.seconds / peer_s,
                "overhead_s": recorded_overhead(case),
                "runs": len(perturbed),
                "trials": Counter(len(r.sizes) for r in perturbed),
                "oom_runs": sum(r.ooms > 0 for r in perturbed),
                "answers": Counter(r.outcome.recommended for r in perturbed),
                "within_3": sum(o <= 0.03 for o in off),
                "worst_limit": max(off),
                "median_s": statistics.median(r.seconds for r in perturbed),
                "max_s": max(r.seconds for r in perturbed),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="perturbed runs a case (the corners at least)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="steps a trial (default: the probe's)")
    args = parser.parse_args()
    rows = summary(args.runs, args.seed, args.steps)
    steps = args.steps or ProbeConfig().steps_per_trial
    print(f"replay on recorded H200 curves; {steps} step(s) a trial; time = steps × step + overhead + watch")
    print("| case | trials (sizes) | OOM | answer | predicted limit (exact) | modelled s | fastest peer | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sizes = ", ".join(map(str, r["sizes"]))
        print(
            f"| {r['case']} | {len(r['sizes'])} ({sizes}) | {r['ooms']} | {r['recommended']} | "
            f"{r['predicted_limit']} ({r['exact']}, {r['predicted_limit'] / r['exact'] - 1:+.1%}) | "
            f"{r['seconds']:.2f} | {r['peer']} {r['peer_s']:.2f} | {r['ratio']:.2f} |"
        )
    print()
    print(
        "| case | perturbed runs | runs with an OOM | trials: runs | answers: runs | limit within 3% "
        "| worst limit | median s | max s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        trials = ", ".join(f"{k}: {v}" for k, v in sorted(r["trials"].items()))
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"].items()))
        print(
            f"| {r['case']} | {r['runs']} | {r['oom_runs']} | {trials} | {answers} | {r['within_3']} | "
            f"{r['worst_limit']:.1%} | {r['median_s']:.2f} | {r['max_s']:.2f} |"
        )
    print()
    for r in rows:
        print(f"{r['case']}: overhead {r['overhead_s']:.3f} s a trial beyond its steps (recorded run)")


if __name__ == "__main__":
    main()
