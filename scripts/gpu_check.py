"""One prepared GPU check: probe, exact limit, offline estimate and 50 real steps, per model.

On a CUDA GPU (issues 2 and 3): ResNet-50 fp32 SGD and GPT-2 (config only, seq 1024, bf16,
AdamW). For each: the probe's time, trials, OOMs and answer; the simulated estimate for the same
capacity; 50 training steps at the recommendation (survived? peak reserved over capacity); the
exact limit by bisection. A short table is printed last; --out writes JSON after every model.

    python scripts/gpu_check.py --budget-s 480 --out $OUT/gpu_check.json
    python scripts/gpu_check.py --smoke        # the same script on CPU, small models, simulated capacity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_peers import SUITES, Bench, Case

import batchfit
from batchfit.devices import SimulatedDevice


def run_case(case: Case, suite: str, steps: int, deadline: float) -> dict[str, Any]:
    bench = Bench(case, suite)
    row: dict[str, Any] = {"model": case.name}
    model, sample, loss_fn, device = bench.fresh()
    common = {"optimizer": bench.optimizer, "loss_fn": loss_fn, "precision": case.precision}
    start = time.perf_counter()
    result = batchfit.find_batch_size(model, sample, device=device, **common)
    print(result, flush=True)
    row.update(
        probe_s=time.perf_counter() - start,
        trials=len(result.trials),
        oom_trials=sum(not t.ok for t in result.trials),
        recommended=result.recommended_batch_size,
        predicted_limit=result.predicted_limit,
        per_sample_mib=(result.per_sample_bytes or 0) / 2**20,
        knee=result.throughput_knee,
        device=result.device,
    )
    if time.perf_counter() < deadline:
        estimate = batchfit.find_batch_size(model, sample, device=SimulatedDevice(device.capacity), **common)
        row.update(est_limit=estimate.predicted_limit, est_per_sample_mib=(estimate.per_sample_bytes or 0) / 2**20)
    if time.perf_counter() < deadline:
        row["steps_ok"], row["steps_peak_frac"] = bench.survive(result.recommended_batch_size, steps)
    if time.perf_counter() < deadline:
        start = time.perf_counter()
        row["exact_limit"] = bench.exact()
        row["exact_s"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480, help="start no new phase after this")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="CPU run with small models (checks the script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    suite = "smoke" if args.smoke else "gpu"
    cases = SUITES[suite][:1] if args.smoke else [c for c in SUITES["gpu"] if c.name.startswith(("ResNet", "GPT"))]
    rows = []
    for case in cases:
        if time.perf_counter() > deadline:
            rows.append({"model": case.name, "skipped": "time budget"})
            continue
        try:
            rows.append(run_case(case, suite, args.steps, deadline))
        except Exception as error:  # one failing case must not hide the others' numbers
            rows.append({"model": case.name, "error": f"{type(error).__name__}: {error}"[:300]})
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({"torch": torch.__version__, "rows": rows}, handle, indent=2, default=str)
    print(f"\ntorch {torch.__version__}; device: {rows[0].get('device', '?')}")
    cols = [
        "model",
        "probe_s",
        "trials",
        "oom_trials",
        "recommended",
        "predicted_limit",
        "exact_limit",
        "est_limit",
        "per_sample_mib",
        "est_per_sample_mib",
        "steps_ok",
        "steps_peak_frac",
        "knee",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols)
            + " |"
        )
        for key in ("error", "skipped"):
            if key in row:
                print(f"  {row['model']}: {key}: {row[key]}")


if __name__ == "__main__":
    main()
