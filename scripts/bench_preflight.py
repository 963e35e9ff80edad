"""Benchmark: `preflight` on the zoo cases of the golden outputs, at a batch that does not fit.

Prints, per case, the largest size that fits (what `check` reports), the trials run and the
wall time: the answer must not move when preflight changes, the trials should not grow.

    python scripts/bench_preflight.py [--cases resnet50-a10g,gpt2-h100]
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

import batchfit
from batchfit import session
from batchfit.models import build
from batchfit.optimizers import OPTIMIZERS

# name -> (zoo model, build options, preflight options, batch size that does not fit)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], int]] = {
    "resnet50-a10g": ("resnet50", {}, {"gpu": "A10G"}, 256),
    "resnet50-24gib": ("resnet50", {}, {"memory": "24GiB"}, 512),
    "gpt2-h100": ("gpt2", {"seq_len": 1024}, {"gpu": "H100-80GB", "precision": "bf16", "adamw": True}, 64),
    "resnet18-a10g-compile": ("resnet18", {}, {"gpu": "A10G", "compile": True}, 2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    ran: list[int] = []
    run = session.Session.run

    def counted(self: Any, batch_size: int) -> Any:
        ran.append(batch_size)
        return run(self, batch_size)

    session.Session.run = counted  # type: ignore[method-assign]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| case | batch | largest that fits | trials | sizes run | s |")
    print("|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        model_name, build_options, options, batch_size = CASES[name]
        options = dict(options)
        optimizer = OPTIMIZERS["adamw" if options.pop("adamw", False) else "sgd"]
        spec = build(model_name, on_meta=True, **build_options)
        ran.clear()
        start = time.perf_counter()
        try:
            batchfit.preflight(
                spec.model,
                spec.sample,
                batch_size,
                optimizer=optimizer,
                loss_fn=spec.loss_fn,
                device="simulated",
                **options,
            )
            largest: Any = "fits"
        except batchfit.DoesNotFitError as error:
            assert error.check is not None
            largest = error.check.largest_fitting
        seconds = time.perf_counter() - start
        print(f"| {name} | {batch_size} | {largest} | {len(ran)} | {' '.join(map(str, ran))} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
