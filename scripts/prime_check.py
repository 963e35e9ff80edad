"""A primed trial (optimizer state made before its one step) against two steps, and both against
the steady state of training.

A trial's first step runs without optimizer state and peaks low, so a trial runs two steps.
`trial.prime` (`steps_per_trial=1`) makes the state before one step through the optimizer's own
code. Which of the two is closer to what training reaches later? This script runs, model by
model and optimizer by optimizer, each on a fresh card at the same batch: two steps, one primed
step, and eight steps of an ordinary training loop (not a trial: a new batch each step, as from
a loader; forward, backward, step, zero_grad), and prints their peaks (allocated, reserved) and
the first two's differences from the loop's. On the simulated device here; on a CUDA GPU through scripts/gpu_check.py,
which calls `compare` there.

    python scripts/prime_check.py [--models gpt2,resnet50] [--batch-size 16] [--seq-len 512]
    python scripts/prime_check.py --device cuda   # the same 12 cases on a real card (real weights)

Text models run at their zoo sequence length (gpt2 1024, bert-base and t5-small 512) unless
--seq-len is given; about two minutes for the 12 cases on a 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchfit.config import ProbeConfig  # noqa: E402
from batchfit.device import Device, Measurement, resolve_device  # noqa: E402
from batchfit.memory import GIB  # noqa: E402
from batchfit.optimizers import OPTIMIZERS  # noqa: E402
from batchfit.result import Trial  # noqa: E402
from batchfit.session import holding  # noqa: E402

MODELS = ("resnet50", "gpt2", "bert-base", "t5-small")
STEADY_STEPS = 8


class Peaks(NamedTuple):
    """One trial each, at the same batch, each on a fresh card."""

    two: Trial
    """Two steps, the optimizer state made by the first (the default trial)."""
    primed: Trial
    """One step, the state made before it (`steps_per_trial=1`)."""
    steady: Measurement
    """`STEADY_STEPS` steps of a training loop: what training reaches once it has run a while."""


def compare(
    model: Any,
    sample: Any,
    card: Callable[[], Device],
    batch_size: int,
    optimizer: Any,
    loss_fn: Any = None,
    steady_steps: int = STEADY_STEPS,
    precision: str | None = None,
) -> Peaks:
    """Two steps, one primed step and `steady_steps` steps of training `model` at `batch_size`."""
    trials = []
    for steps in (2, 1):
        config = ProbeConfig(steps_per_trial=steps, precision=precision)  # type: ignore[arg-type]
        with holding(model, sample, card(), optimizer, loss_fn, config, None) as session:
            trials.append(session.run(batch_size))
    loop = training(model, sample, card, batch_size, optimizer, loss_fn, steady_steps, precision)
    return Peaks(*trials, loop)


def training(
    model: Any,
    sample: Any,
    card: Callable[[], Device],
    batch_size: int,
    optimizer: Any,
    loss_fn: Any,
    steps: int,
    precision: str | None = None,
) -> Measurement:
    """The peaks of `steps` steps of an ordinary training loop, on the same held model as a trial."""
    config = ProbeConfig(precision=precision)  # type: ignore[arg-type]
    with holding(model, sample, card(), optimizer, loss_fn, config, None) as held:
        device, workload = held.device, held.workload
        with device.measure() as measured:
            stepper = workload.make_optimizer(held.params)
            for _ in range(steps):
                batch = workload.batch(device, batch_size)  # the last one lives until the next is made
                with device.autocast(workload.amp_dtype):
                    loss = workload.loss(held.tensors, batch)
                loss.backward()
                del loss
                stepper.step()
                stepper.zero_grad(set_to_none=True)
                device.synchronize()
            del batch, stepper
    return measured


def off(trial: Trial, steady: Measurement) -> tuple[float, float]:
    """`trial`'s peak allocated and reserved against `steady`'s, as fractions (+: above)."""
    return (
        trial.peak_allocated / steady.peak_allocated - 1,
        trial.peak_reserved / steady.peak_reserved - 1,
    )


def close(before: Trial, primed: Trial) -> bool:
    """Allocated within 1%, reserved within 5%: the caching allocator's segments differ with the
    order tensors were made in (the state before the activations, not in their holes)."""
    return (
        abs(primed.peak_allocated - before.peak_allocated) <= 0.01 * before.peak_allocated
        and abs(primed.peak_reserved - before.peak_reserved) <= 0.05 * before.peak_reserved
    )


def _gib(trial: Trial | Measurement) -> str:
    return f"{trial.peak_allocated / GIB:.3f} / {trial.peak_reserved / GIB:.3f}"


def _pct(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.1%} / {pair[1]:+.1%}"


def main() -> None:
    from batchfit.models import HF_FAMILIES, build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None, help="for text models (default: the zoo's)")
    parser.add_argument("--steady-steps", type=int, default=STEADY_STEPS)
    parser.add_argument("--memory-gib", type=float, default=80, help="the simulated card's (a real card: its own)")
    parser.add_argument("--device", choices=("simulated", "cuda"), default="simulated")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    args = parser.parse_args()
    real = args.device == "cuda"
    config = ProbeConfig(memory=None if real else f"{args.memory_gib}GiB")
    card = lambda: resolve_device(args.device, config)  # noqa: E731
    n, precision = args.steady_steps, None if args.precision == "fp32" else args.precision
    print(f"{card().description}; peaks allocated / reserved, GiB; differences from an {n}-step training loop")
    print(f"| model | optimizer | B | {n}-step loop | two steps | diff | primed step | diff | closer (reserved) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    wrong, closer = 0, {"two": 0, "primed": 0, "tie": 0}
    for name in args.models.split(","):
        text = name in HF_FAMILIES
        seq = (args.seq_len or HF_FAMILIES[name]["seq_len"]) if text else None
        spec = build(name, seq_len=seq, on_meta=not real)
        label = f"{name} seq {seq}" if text else name
        for opt in args.optimizers.split(","):
            start = time.perf_counter()
            peaks = compare(spec.model, spec.sample, card, args.batch_size, OPTIMIZERS[opt], spec.loss_fn, n, precision)
            two, primed = off(peaks.two, peaks.steady), off(peaks.primed, peaks.steady)
            wrong += abs(peaks.primed.peak_allocated / peaks.two.peak_allocated - 1) > 0.01
            winner = "tie" if abs(two[1]) == abs(primed[1]) else "two" if abs(two[1]) < abs(primed[1]) else "primed"
            closer[winner] += 1
            print(
                f"| {label} | {opt} | {args.batch_size} | {_gib(peaks.steady)} | {_gib(peaks.two)} | {_pct(two)} | "
                f"{_gib(peaks.primed)} | {_pct(primed)} | {winner} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
    counts = ", ".join(f"{k} {v}" for k, v in closer.items())
    print(f"\ncloser to the {n}-step loop in reserved: {counts}")
    print(f"{wrong} with the primed step's allocated more than 1% from two steps'")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
