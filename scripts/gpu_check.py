"""One prepared GPU check: probe, exact limit, offline estimate and 50 real steps, per model.

On a CUDA GPU: ResNet-50 fp32 SGD and GPT-2 (seq 1024, bf16, AdamW), which the calibration data
in tests/data/calibration already holds, then ViT-B/16 and BERT-base, which it does not. For
each: the probe's time, trials, OOMs and answer; its predicted limit (`predict_limit` on the
trials before its first OOM) against the exact limit by bisection; the simulated estimate for the
same capacity (per sample allocated, predicted limit); 50 training steps at the recommendation;
for the first model, if time is left, the compiled probe (inductor) beside its simulated estimate;
for the second, the lever table's checkpointing and frozen-base rows beside real probes of them;
for each, the peaks of two steps and of one primed step (optimizer state made before it) beside
eight steps' at the recommendation (scripts/prime_check.py). A short table is printed last.
--out DIR writes gpu_check.json after every model and each probe's trace (Result.to_dict() with
per-trial largest allocation, fragmentation and retries, plus the exact limit) as
trace_<model>.json: the format of tests/data/calibration, so each GPU run can be added there.

    python scripts/gpu_check.py --budget-s 420 --out $OUT
    python scripts/gpu_check.py --smoke --out /tmp/gc   # the same script on CPU, small models
    python scripts/gpu_check.py --attention --budget-s 420 --out $OUT   # SDPA backends per call, memory
    python scripts/gpu_check.py --fsdp --budget-s 300 --out $OUT   # FSDP2: world 1, and 2 gloo ranks on the card
    python scripts/gpu_check.py --speed --budget-s 420 --out $OUT  # issue 20: a trial's fixed cost, peers again
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_peers import SUITES, Bench, Case
from prime_check import STEADY_STEPS, compare

import batchfit
from batchfit.device import SimulatedDevice
from batchfit.limit import before_first_oom


def _capability() -> tuple[int, int] | None:
    """The card's compute capability, for the simulated device's attention rules."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def lever_check(model: Any, sample: Any, device: Any, common: dict[str, Any], batch: int) -> dict[str, Any]:
    """The lever table's estimate beside real probes of the same variants (checkpointing, frozen base)."""
    from batchfit.changes import checkpointing, frozen_base

    table = batchfit.levers(model, sample, batch, device=device, groups=("checkpointing", "frozen"), **common)
    rows = {lever.name: lever.fits for lever in table.levers}
    real = {}
    for name, variant in (("activation checkpointing", checkpointing), ("frozen base", frozen_base)):
        with variant(model):
            found = batchfit.find_batch_size(model, sample, device=device, rounding="none", **common)
        real[name] = found.recommended_batch_size
    real["as asked"] = batchfit.find_batch_size(
        model, sample, device=device, rounding="none", **common
    ).recommended_batch_size
    return {name: {"estimate": rows.get(name), "real": real.get(name)} for name in real}


def run_case(
    case: Case,
    suite: str,
    steps: int,
    deadline: float,
    out: Path | None,
    compile: bool = False,
    levers_too: bool = False,
) -> dict[str, Any]:
    bench = Bench(case, suite)
    row: dict[str, Any] = {"model": case.name}
    model, sample, loss_fn, device = bench.fresh()
    common = {"optimizer": bench.optimizer, "loss_fn": loss_fn, "precision": case.precision}
    start = time.perf_counter()
    result = batchfit.find_batch_size(model, sample, device=device, **common)
    print(result, flush=True)
    trace = {"model": case.name, "torch": torch.__version__, **result.to_dict()}
    below = before_first_oom(trace["trials"])
    row.update(
        probe_s=time.perf_counter() - start,
        trials=len(result.trials),
        oom_trials=sum(not t.ok for t in result.trials),
        recommended=result.recommended_batch_size,
        predicted_limit=result.predicted_limit,
        predicted_below=batchfit.predict_limit(below, result.capacity_bytes)
        if len({t["batch_size"] for t in below}) >= 2
        else None,
        alloc_mib=(result.per_sample_allocated_bytes or 0) / 2**20,
        knee=result.throughput_knee,
        device=result.device,
    )
    if time.perf_counter() < deadline:
        card = SimulatedDevice(device.capacity, capability=_capability())
        estimate = batchfit.find_batch_size(model, sample, device=card, **common)
        row.update(est_limit=estimate.predicted_limit, est_alloc_mib=(estimate.per_sample_allocated_bytes or 0) / 2**20)
    if time.perf_counter() < deadline:
        # Two steps and one primed step (the optimizer state made before it) against eight.
        at = result.recommended_batch_size
        peaks = compare(model, sample, lambda: device, at, bench.optimizer, loss_fn, precision=case.precision)
        row["prime"] = {
            "batch_size": at,
            **{name: [t.peak_allocated, t.peak_reserved] for name, t in peaks._asdict().items()},
        }
    if time.perf_counter() < deadline:
        row["steps_ok"], row["steps_peak_frac"] = bench.survive(result.recommended_batch_size, steps)
    if time.perf_counter() < deadline:
        start = time.perf_counter()
        row["exact_limit"] = trace["exact_limit"] = bench.exact()
        row["exact_s"] = time.perf_counter() - start
    if compile and time.perf_counter() < deadline:
        # The compiled model (inductor on CUDA) beside the simulated compiled estimate.
        start = time.perf_counter()
        compiled = batchfit.find_batch_size(model, sample, device=device, compile=True, **common)
        row.update(
            compiled_s=time.perf_counter() - start,
            compiled_recommended=compiled.recommended_batch_size,
            compiled_alloc_mib=(compiled.per_sample_allocated_bytes or 0) / 2**20,
            compiled_counts=compiled.compiled,
        )
        trace["compiled_trials"] = [t.to_dict() for t in compiled.trials]
        estimate = batchfit.find_batch_size(
            model, sample, device=SimulatedDevice(device.capacity), compile=True, **common
        )
        row["compiled_est_alloc_mib"] = (estimate.per_sample_allocated_bytes or 0) / 2**20
    if levers_too and time.perf_counter() < deadline:
        row["levers"] = lever_check(model, sample, device, common, result.recommended_batch_size * 4)
    if out is not None:
        slug = re.sub(r"[^a-z0-9]+", "_", case.name.lower()).strip("_")[:40]
        (out / f"trace_{slug}.json").write_text(json.dumps(trace, indent=2, default=str) + "\n")
    return row


def attention_only(deadline: float, smoke: bool, out: Path | None) -> None:
    """Which SDPA backend each zoo text model's calls take on this card, beside the simulation's."""
    from attention_check import attention_rows, print_table

    rows = attention_rows(deadline, smoke)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        summary = {"torch": torch.__version__, "attention": rows}
        (out / "attention_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ntorch {torch.__version__}")
    print_table(rows)


def speed_only(deadline: float, smoke: bool, out: Path) -> None:
    """What scripts/bench_replay.py models a probe's time with, measured again on this card: where a
    trial's time goes beyond its steps (trial_overhead.py, ResNet-50 SGD and GPT-2 AdamW), then
    batchfit and its peers on the two recorded cases (bench_peers.py: every trial's peaks, each
    finder's time). Each output is kept in OUT as it comes; a part past the budget is skipped."""
    out.mkdir(parents=True, exist_ok=True)
    here, device = Path(__file__).parent, "cpu" if smoke else "cuda"
    parts = {
        "overhead_resnet": ["trial_overhead.py", "--device", device, "--model", "resnet18" if smoke else "resnet50"],
        "overhead_gpt2": ["trial_overhead.py", "--device", device, "--model", "gpt2", "--optimizer", "adamw"],
        "bench_peers": ["bench_peers.py", "--suite", "smoke" if smoke else "gpu", "--models", "resnet,ResNet,GPT"],
    }
    parts["bench_peers"] += ["--steps", "20", "--json", str(out / "bench_peers.json")]
    for name, (script, *options) in parts.items():
        left = deadline - time.perf_counter()
        if left < 30:
            print(f"{name}: skipped: time budget")
            continue
        command = [sys.executable, str(here / script), *options]
        if script == "bench_peers.py":
            command += ["--budget-s", str(round(left / 2))]  # a case started is finished
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=left)
            text = done.stdout + (f"\nexit {done.returncode}: {done.stderr[-2000:]}" if done.returncode else "")
        except subprocess.TimeoutExpired as expired:
            partial = expired.stdout or b""
            text = (partial.decode() if isinstance(partial, bytes) else partial) + "\ntimed out"
        (out / f"speed_{name}.txt").write_text(text)
        print(f"## {name}\n{text.strip()}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480, help="start no new phase after this")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="CPU run with small models (checks the script)")
    parser.add_argument("--out", default=None, help="folder for gpu_check.json and the traces")
    parser.add_argument(
        "--attention", action="store_true", help="only the SDPA check: backends per call and memory (zoo text models)"
    )
    parser.add_argument("--fsdp", action="store_true", help="only the FSDP2 check (scripts/fsdp_check.py)")
    parser.add_argument(
        "--speed", action="store_true", help="only the speed check: trial_overhead.py, then bench_peers.py again"
    )
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    if args.speed:
        speed_only(deadline, args.smoke, Path(args.out or "/tmp/speed_check"))
        return
    if args.fsdp:
        command = [sys.executable, str(Path(__file__).with_name("fsdp_check.py")), "--budget-s", str(args.budget_s)]
        command += ["--out", args.out or "/tmp/fsdp_check"] + (["--smoke"] if args.smoke else [])
        raise SystemExit(subprocess.call(command))
    if args.attention:
        attention_only(deadline, args.smoke, Path(args.out) if args.out else None)
        return
    suite = "smoke" if args.smoke else "gpu"
    order = ("ResNet", "GPT", "ViT", "BERT")  # calibrated models first, then two new ones
    cases = (
        SUITES[suite][:1]
        if args.smoke
        else sorted(
            (c for c in SUITES["gpu"] if c.name.startswith(order)),
            key=lambda c: next(i for i, prefix in enumerate(order) if c.name.startswith(prefix)),
        )
    )
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        if time.perf_counter() > deadline:
            rows.append({"model": case.name, "skipped": "time budget"})
            continue
        try:
            first, second = case is cases[0], len(cases) > 1 and case is cases[1]
            rows.append(
                run_case(case, suite, args.steps, deadline, out, compile=first, levers_too=second or args.smoke)
            )
        except Exception as error:  # one failing case must not hide the others' numbers
            rows.append({"model": case.name, "error": f"{type(error).__name__}: {error}"[:300]})
        if out is not None:
            summary = {"torch": torch.__version__, "rows": rows}
            (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ntorch {torch.__version__}; device: {rows[0].get('device', '?')}")
    cols = [
        "model",
        "probe_s",
        "trials",
        "oom_trials",
        "recommended",
        "predicted_limit",
        "predicted_below",
        "exact_limit",
        "est_limit",
        "alloc_mib",
        "est_alloc_mib",
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
        if "prime" in row:
            p = row["prime"]
            print(
                f"  {row['model']} at {p['batch_size']}: peak allocated / reserved, two steps {p['two']}, "
                f"one primed step {p['primed']}, {STEADY_STEPS} steps {p['steady']}"
            )
        if "levers" in row:
            print(f"  {row['model']} levers (estimate / real probe, no rounding): {row['levers']}")
        if "compiled_recommended" in row:
            print(
                f"  {row['model']} compiled: recommended {row['compiled_recommended']}, "
                f"{row['compiled_alloc_mib']:.1f} MiB a sample (estimate {row.get('compiled_est_alloc_mib', 0):.1f}), "
                f"{row['compiled_counts']}, {row['compiled_s']:.0f} s"
            )
        for key in ("error", "skipped"):
            if key in row:
                print(f"  {row['model']}: {key}: {row[key]}")


if __name__ == "__main__":
    main()
