"""Eager against compiled (compile=True) on the simulated device: per-sample memory and the answer.

    python scripts/compile_vs_eager.py [--models resnet18,resnet50,gpt2]

Prints one row per model; the numbers go in the issue's note (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time

import batchfit
from batchfit.memory import format_size
from batchfit.models import build
from batchfit.optimizers import OPTIMIZERS

CASES = {
    "resnet18": ({"name": "resnet18"}, {"gpu": "A10G"}, "sgd"),
    "resnet50": ({"name": "resnet50"}, {"gpu": "A10G"}, "sgd"),
    "gpt2": ({"name": "gpt2", "seq_len": 1024}, {"gpu": "H100-80GB", "precision": "bf16"}, "adamw"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        spec_args, options, optimizer = CASES[name]
        row = [name]
        for compile in (False, True):
            spec = build(spec_args["name"], seq_len=spec_args.get("seq_len"), on_meta=True)
            start = time.perf_counter()
            result = batchfit.find_batch_size(
                spec.model,
                spec.sample,
                optimizer=OPTIMIZERS[optimizer],
                loss_fn=spec.loss_fn,
                device="simulated",
                compile=compile,
                **options,
            )
            row += [
                format_size(result.per_sample_allocated_bytes or 0),
                str(result.predicted_limit),
                str(result.recommended_batch_size),
                f"{time.perf_counter() - start:.1f}",
            ]
            if compile and result.compiled:
                c = result.compiled
                row.append(f"{c['compilations']}/{c['recompiles']}/{c['graph_breaks']}")
        rows.append(row)
    header = (
        "| model | eager per sample | eager limit | eager answer | eager s | compiled per sample "
        "| compiled limit | compiled answer | compiled s | compilations/recompiles/graph breaks |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
