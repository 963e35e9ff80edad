"""One prepared GPU check: probe, exact limit, offline estimate and 50 real steps, per model.

On a CUDA GPU (issue 2 and 3 acceptance): ResNet-50 fp32 SGD and GPT-2 (config only, seq 1024,
bf16, AdamW). For each: the probe's time, trials, OOMs and answer; the exact limit by bisection;
the simulated estimate for the same capacity; then 50 training steps at the recommendation,
recording whether they survived and peak reserved memory as a fraction of capacity.
A short table is printed last; --out writes JSON.

    python scripts/gpu_check.py --budget-s 480 --out $OUT/gpu_check.json
    python scripts/gpu_check.py --smoke        # the same script on CPU with tiny models
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch

import batchfit
from batchfit.devices import CudaDevice, SimulatedDevice
from batchfit.models import OPTIMIZERS, ModelSpec, build
from batchfit.trial import default_loss

CASES = [
    {"name": "resnet50", "model": "resnet50", "precision": None, "optimizer": "sgd"},
    {"name": "gpt2", "model": "gpt2", "seq_len": 1024, "precision": "bf16", "optimizer": "adamw"},
]
SMOKE = [
    {"name": "resnet18-32px", "model": "resnet18", "input_shape": (3, 32, 32), "precision": None, "optimizer": "sgd"},
]


def train_steps(spec: ModelSpec, batch_size: int, steps: int, optimizer: Any, precision: str | None, device: Any):
    """Plain training loop at `batch_size`: did it survive, and its peak reserved bytes."""
    model = spec.model.to(device.torch_device).train()
    opt = optimizer(p for p in model.parameters() if p.requires_grad)
    loss_fn = spec.loss_fn or default_loss
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "")
    sample = spec.sample
    with device.measure() as measured:
        try:
            for _ in range(steps):
                if isinstance(sample, dict):
                    batch = {
                        k: v.unsqueeze(0).expand(batch_size, *v.shape).contiguous().to(device.torch_device)
                        for k, v in sample.items()
                    }
                else:
                    batch = sample.unsqueeze(0).expand(batch_size, *sample.shape).contiguous().to(device.torch_device)
                with torch.autocast(device.autocast_type, dtype=amp, enabled=amp is not None):
                    out = model(**batch) if isinstance(batch, dict) else model(batch)
                    loss = loss_fn(out, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del out, loss, batch
            survived = True
        except torch.OutOfMemoryError:
            survived = False
    del opt
    spec.model.to("cpu")
    gc.collect()
    device.empty_cache()
    return survived, measured.peak_reserved


def run_case(case: dict[str, Any], args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    row: dict[str, Any] = {"model": case["name"]}
    spec = build(case["model"], input_shape=case.get("input_shape"), seq_len=case.get("seq_len"))
    optimizer = OPTIMIZERS[case["optimizer"]]
    device = CudaDevice(memory=args.memory) if not args.smoke else SimulatedDevice(args.memory, compute="real")
    capacity = device.capacity
    common = {"optimizer": optimizer, "loss_fn": spec.loss_fn, "precision": case["precision"]}

    start = time.perf_counter()
    result = batchfit.find_batch_size(spec.model, spec.sample, device=device, **common)
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
    print(result, flush=True)

    if time.perf_counter() < deadline:
        estimate = batchfit.find_batch_size(spec.model, spec.sample, device=SimulatedDevice(capacity), **common)
        row.update(
            est_recommended=estimate.recommended_batch_size,
            est_limit=estimate.predicted_limit,
            est_per_sample_mib=(estimate.per_sample_bytes or 0) / 2**20,
        )

    if time.perf_counter() < deadline:
        survived, peak = train_steps(
            spec, result.recommended_batch_size, args.steps, optimizer, case["precision"], device
        )
        row.update(steps_ok=survived, steps_peak_frac=peak / capacity)

    if time.perf_counter() < deadline:
        start = time.perf_counter()
        exact = batchfit.find_batch_size(
            spec.model, spec.sample, device=device, exact=True, margin=0.0, max_trials=20, **common
        )
        row.update(exact_limit=exact.exact_limit, exact_s=time.perf_counter() - start)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new phases after this")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--memory", default=None, help="cap the GPU, e.g. 24GiB")
    parser.add_argument("--smoke", action="store_true", help="CPU run with tiny models (checks the script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.memory = args.memory or "2GiB"
    args.memory = batchfit.parse_size(args.memory) if args.memory else None
    deadline = time.perf_counter() + args.budget_s
    rows = []
    for case in SMOKE if args.smoke else CASES:
        if time.perf_counter() > deadline:
            rows.append({"model": case["name"], "skipped": "time budget"})
            continue
        try:
            rows.append(run_case(case, args, deadline))
        except Exception as error:  # one failing case must not hide the others' numbers
            rows.append({"model": case["name"], "error": f"{type(error).__name__}: {error}"[:300]})
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
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols]
        print("| " + " | ".join(cells) + " |")
        for key in ("error", "skipped"):
            if key in row:
                print(f"  {row['model']}: {key}: {row[key]}")


if __name__ == "__main__":
    main()
