"""Where a trial's time goes beyond its steps (issue 20: the fixed cost of a trial).

Holds a zoo model on a device as the probe does, runs a few trials at one small batch, and
times each part around the steps: building the batch, constructing the optimizer, entering and
leaving the measurement (peak statistics, synchronisation), emptying the cache after the trial,
and the rest. The first step carries the allocation watch and the optimizer's state; the second
step is the plain one: their difference bounds the watch's cost. On a GPU run it as

    PYTHONPATH=. python3 scripts/trial_overhead.py --device cuda [--model resnet50 --batch 2]

On this CPU machine `--device cpu` (real compute on CPU) shows the host-side share only: a CUDA
card adds its own (cudaMalloc after each empty_cache, synchronisation, statistics).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchfit.config import ProbeConfig
from batchfit.device import resolve_device
from batchfit.models import build
from batchfit.optimizers import OPTIMIZERS
from batchfit.session import holding


def _timed(parts: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - start

    return wrapper


def breakdown(model_name: str, device_name: str, batch: int, trials: int, optimizer: str) -> list[dict[str, float]]:
    """Per trial: its wall time, its steps, and the parts around them (seconds)."""
    seq = 128 if model_name.startswith(("gpt2", "llama", "bert", "t5")) else None
    spec = build(model_name, seq_len=seq)
    config = ProbeConfig(memory="16GiB" if device_name == "cpu" else None)  # CPU: a capacity to plan for
    device = resolve_device(device_name, config)
    rows: list[dict[str, float]] = []
    parts: dict[str, float] = defaultdict(float)
    steps: list[float] = []
    measure = device.measure

    @contextlib.contextmanager
    def measured() -> Iterator[Any]:
        start = time.perf_counter()
        with measure() as measurement:
            parts["measure: enter"] += time.perf_counter() - start
            yield measurement
            left = time.perf_counter()
        parts["measure: exit"] += time.perf_counter() - left
        steps[:] = measurement.step_seconds

    device.measure = measured  # type: ignore[method-assign]
    device.empty_cache = _timed(parts, "empty_cache", device.empty_cache)  # type: ignore[method-assign]
    with holding(spec.model, spec.sample, device, OPTIMIZERS[optimizer], spec.loss_fn, config, None) as probe:
        probe.workload.batch = _timed(parts, "batch", probe.workload.batch)  # type: ignore[method-assign]
        probe.workload.make_optimizer = _timed(parts, "optimizer", probe.workload.make_optimizer)
        for _ in range(trials):
            parts.clear()
            start = time.perf_counter()
            probe.run(batch)
            wall = time.perf_counter() - start
            row = {"wall": wall, "step 1": steps[0], "step 2": steps[-1], "beyond steps": wall - sum(steps)}
            row.update(parts)
            row["other"] = row["beyond steps"] - sum(parts.values())
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS))
    args = parser.parse_args()
    try:
        rows = breakdown(args.model, args.device, args.batch, args.trials, args.optimizer)
    except ValueError as error:  # an unknown model or device: one line
        parser.error(str(error))
    later = rows[1:] or rows  # the first trial pays first calls (kernels, allocator warm-up)
    print(f"{args.model} on {args.device}, batch {args.batch}, {len(later)} trials after the first; median s")
    print("| part | first trial | median of the rest |")
    print("|---|---|---|")
    for key in rows[0]:
        print(f"| {key} | {rows[0][key]:.4f} | {statistics.median(r.get(key, 0.0) for r in later):.4f} |")


if __name__ == "__main__":
    main()
