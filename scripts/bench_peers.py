"""batchfit against Lightning's and accelerate's batch-size finders and a doubling loop, in one run.

For each model, each finder starts from a fresh model and device; we record wall time, trials,
OOM trials and its answer, then train 50 steps at that answer (did it survive, peak memory
as a fraction of capacity), and compare every answer with the exact limit (bisection).

On a machine without CUDA the device is batchfit's simulated GPU with **real CPU compute**: the
capacity is enforced by the memory tracker, whose OOM is a real torch.OutOfMemoryError worded as
CUDA's, so every peer's OOM handling recognises it.

    python scripts/bench_peers.py [--json docs/bench_cpu.json] [--markdown docs/bench_cpu.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import batchfit
from batchfit.devices import SimulatedDevice


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    capacity: str
    classes: int = 10


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


CASES = [
    Case("tiny CNN (16×16 input, SGD)", tiny_cnn, (3, 16, 16), "48MiB"),
    Case("small MLP (256-2048-2048-10, SGD)", small_mlp, (256,), "96MiB"),
]
STEPS_PER_TRIAL = 3  # Lightning's default; batchfit uses 2 (its own default) — each tool as users run it.


def loss_fn(output: torch.Tensor, batch: Any) -> torch.Tensor:
    target = torch.zeros(output.shape[0], dtype=torch.long)
    return nn.functional.cross_entropy(output, target)


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def train(model: nn.Module, batch_size: int, steps: int, shape: tuple[int, ...]) -> None:
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        x = torch.randn(batch_size, *shape)
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def enforced(device: SimulatedDevice, model: nn.Module) -> Iterator[Any]:
    """Run arbitrary code (a peer's loop) against the simulated capacity."""
    with device.session(), device.hold(model), device.measure() as measured:
        yield measured


def fresh(case: Case) -> tuple[nn.Module, SimulatedDevice]:
    torch.manual_seed(0)
    return case.make(), SimulatedDevice(batchfit.parse_size(case.capacity), compute="real")


def run_batchfit(case: Case) -> tuple[int, int, int]:
    model, device = fresh(case)
    result = batchfit.find_batch_size(
        model, torch.randn(*case.sample_shape), optimizer=make_optimizer, loss_fn=loss_fn, device=device
    )
    return result.recommended_batch_size, len(result.trials), sum(not t.ok for t in result.trials)


def run_doubling(case: Case) -> tuple[int, int, int]:
    model, device = fresh(case)
    size, best, trials = 1, 0, 0
    with enforced(device, model):
        while True:
            trials += 1
            try:
                train(model, size, STEPS_PER_TRIAL, case.sample_shape)
            except torch.OutOfMemoryError:
                return best, trials, device.tracker.num_ooms
            finally:
                gc.collect()
            best, size = size, size * 2


def run_accelerate(case: Case, start: int) -> tuple[int, int, int]:
    from accelerate.utils import find_executable_batch_size

    model, device = fresh(case)
    calls: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def loop(batch_size: int) -> int:
        calls.append(batch_size)
        train(model, batch_size, STEPS_PER_TRIAL, case.sample_shape)
        return batch_size

    with enforced(device, model):
        answer = loop()
    return answer, len(calls), device.tracker.num_ooms


def run_lightning(case: Case, mode: str) -> tuple[int, int, int]:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    model, device = fresh(case)
    data = torch.utils.data.TensorDataset(torch.randn(40000, *case.sample_shape))
    calls: list[int] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.batch_size = 2

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            return loss_fn(self.net(batch[0]), batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.parameters())

        def train_dataloader(self) -> Any:
            calls.append(self.batch_size)  # the tuner rebuilds the loader for every trial
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        default_root_dir=tempfile.mkdtemp(prefix="bench_peers_"),
    )
    with enforced(device, model):
        answer = Tuner(trainer).scale_batch_size(
            module, mode=mode, steps_per_trial=STEPS_PER_TRIAL, max_trials=25, max_val=2**16
        )
    return int(answer or 0), len(calls), device.tracker.num_ooms


def survive(case: Case, batch_size: int, steps: int) -> tuple[bool, float]:
    model, device = fresh(case)
    try:
        with enforced(device, model) as measured:
            train(model, batch_size, steps, case.sample_shape)
        return True, measured.peak_reserved / device.capacity
    except torch.OutOfMemoryError:
        return False, 1.0


def exact_limit(case: Case) -> int:
    model, device = fresh(case)
    result = batchfit.find_batch_size(
        model,
        torch.randn(*case.sample_shape),
        optimizer=make_optimizer,
        loss_fn=loss_fn,
        device=device,
        exact=True,
        margin=0.0,
        rounding="none",
    )
    return int(result.exact_limit or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--accelerate-start", type=int, default=8192)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    finders: dict[str, Callable[[Case], tuple[int, int, int]]] = {
        "batchfit": run_batchfit,
        "doubling loop": run_doubling,
        f"accelerate (start {args.accelerate_start})": lambda c: run_accelerate(c, args.accelerate_start),
        "lightning power": lambda c: run_lightning(c, "power"),
        "lightning binsearch": lambda c: run_lightning(c, "binsearch"),
    }
    rows = []
    for case in CASES:
        exact = exact_limit(case)
        times: dict[str, float] = {}
        for name, finder in finders.items():
            start = time.perf_counter()
            try:
                answer, trials, ooms = finder(case)
            except Exception as error:  # a peer failing is a result, not a crash of the benchmark
                rows.append({"model": case.name, "finder": name, "error": f"{type(error).__name__}: {error}"[:200]})
                continue
            times[name] = time.perf_counter() - start
            ok, frac = survive(case, answer, args.steps) if answer else (False, 0.0)
            rows.append(
                {
                    "model": case.name,
                    "finder": name,
                    "seconds": times[name],
                    "trials": trials,
                    "oom_trials": ooms,
                    "answer": answer,
                    "exact_limit": exact,
                    "answer_of_exact": answer / exact if exact else None,
                    f"survived_{args.steps}_steps": ok,
                    "peak_of_capacity": frac,
                    "capacity": case.capacity,
                }
            )
        fastest_peer = min((t for n, t in times.items() if n != "batchfit"), default=None)
        for row in rows:
            if row["model"] == case.name and "seconds" in row and fastest_peer:
                row["time_vs_fastest_peer"] = row["seconds"] / fastest_peer
    header = (
        f"CPU (2 cores, {platform.machine()}), torch {torch.__version__}, simulated capacity with real "
        f"compute, {datetime.date.today()}, `python scripts/bench_peers.py`"
    )
    cols = [
        "model",
        "finder",
        "seconds",
        "time_vs_fastest_peer",
        "trials",
        "oom_trials",
        "answer",
        "exact_limit",
        "answer_of_exact",
        f"survived_{args.steps}_steps",
        "peak_of_capacity",
    ]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['finder']} | error: {row['error']} |")
            continue
        lines.append(
            "| "
            + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols)
            + " |"
        )
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"header": header, "rows": rows, "cases": [asdict(c) | {"make": c.make.__name__} for c in CASES]},
                handle,
                indent=2,
                default=str,
            )
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
