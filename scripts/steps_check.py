"""The simulated card's repeated second step (device/sim/steps.py) against running it, zoo-wide.

A trial's second step is the first's allocator stream less what the first kept (the optimizer
state); where a model's first trial shows that, the simulated card sends it through the
allocator model instead of dispatching it again. This script runs the same trials, model by
model and optimizer by optimizer, on two fresh simulated cards, one repeating and one running
every step, and prints whether every trial came out the same (peaks allocated, reserved,
inactive split, largest request, retries, out of memory) and what each took.

    python scripts/steps_check.py [--models gpt2,resnet50] [--sizes 4,16,8,32,100000]

Text models run at their zoo sequence length unless --seq-len is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchfit.config import ProbeConfig  # noqa: E402
from batchfit.device import SimulatedDevice  # noqa: E402
from batchfit.device.sim.steps import StepReplay  # noqa: E402
from batchfit.memory import parse_size  # noqa: E402
from batchfit.optimizers import OPTIMIZERS  # noqa: E402
from batchfit.result import Trial  # noqa: E402
from batchfit.session import holding  # noqa: E402

MODELS = ("resnet50", "gpt2", "bert-base", "t5-small")


def trials(
    spec: Any, optimizer: Any, config: ProbeConfig, capacity: int, sizes: list[int], repeat: bool
) -> tuple[list[Trial], float, int]:
    """The trials at `sizes` on a fresh card: (trials, seconds, steps repeated)."""
    repeated = [0]
    real = StepReplay.repeat

    def counted(self: StepReplay, *args: Any) -> bool:
        done = real(self, *args)
        repeated[0] += done
        return done

    patch = mock.patch.object(StepReplay, "repeat", counted if repeat else lambda self, *a: False)
    device = SimulatedDevice(capacity)
    start = time.perf_counter()
    with patch, holding(spec.model, spec.sample, device, optimizer, spec.loss_fn, config, None) as held:
        out = [held.run(size) for size in sizes]
    return out, time.perf_counter() - start, repeated[0]


def main() -> None:
    from batchfit.models import HF_FAMILIES, build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--sizes", default="4,16,8,32,100000", help="the trials, in order (the last: out of memory)")
    parser.add_argument("--seq-len", type=int, default=None, help="for text models (default: the zoo's)")
    parser.add_argument("--memory", default="80GiB", help="the simulated card's capacity")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    capacity = parse_size(args.memory)
    print(f"simulated {args.memory} card; trials at {sizes}, the second step repeated, then every step run")
    print("| model | optimizer | precision | trials ok | steps repeated | same | s repeated | s run | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    differ, warm = 0, False
    for name in args.models.split(","):
        text = name in HF_FAMILIES
        seq = (args.seq_len or HF_FAMILIES[name]["seq_len"]) if text else None
        spec = build(name, seq_len=seq, on_meta=True)
        label = f"{name} seq {seq}" if text else name
        if not warm:  # the process's first trials pay torch's first-use costs: not in either column
            trials(spec, OPTIMIZERS["sgd"], ProbeConfig(), capacity, sizes[:2], True)
            warm = True
        for opt in args.optimizers.split(","):
            for precision in args.precisions.split(","):
                config = ProbeConfig(precision=None if precision == "fp32" else precision)  # type: ignore[arg-type]
                fast, fast_s, repeated = trials(spec, OPTIMIZERS[opt], config, capacity, sizes, True)
                slow, slow_s, _ = trials(spec, OPTIMIZERS[opt], config, capacity, sizes, False)
                same = fast == slow
                differ += not same
                print(
                    f"| {label} | {opt} | {precision} | {sum(t.ok for t in fast)} of {len(fast)} | {repeated} | "
                    f"{'yes' if same else 'NO'} | {fast_s:.1f} | {slow_s:.1f} | {fast_s / slow_s:.2f} |",
                    flush=True,
                )
    print(f"\n{differ} case(s) where a trial differed")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
