"""batchfit against Lightning's and accelerate's batch-size finders and a doubling loop, in one run.

For each model, each finder starts from a fresh model and device; we record wall time, trials,
OOM trials and its answer, then train 50 steps at that answer (did it survive, peak memory
as a fraction of capacity), and compare every answer with the exact limit (bisection).

Without CUDA (--suite cpu) the device is batchfit's simulated GPU with **real CPU compute**:
the capacity is enforced by the memory tracker, whose OOM is a real torch.OutOfMemoryError
worded as CUDA's, so every peer's OOM handling recognises it. With CUDA (--suite gpu):
ResNet-50 fp32 SGD, ViT-B/16, BERT-base (seq 512) and GPT-2 (seq 1024), bf16 AdamW.

    python scripts/bench_peers.py --suite cpu --json docs/bench_cpu.json --markdown docs/bench_cpu.md
    python scripts/bench_peers.py --suite gpu --budget-s 500 --json $OUT/bench_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import batchfit
from batchfit.device import CudaDevice, Device, SimulatedDevice
from batchfit.models import build
from batchfit.optimizers import OPTIMIZERS
from batchfit.trial import Workload, default_loss

STEPS_PER_TRIAL = 3  # Lightning's default; batchfit uses its own default of 2: each tool as users run it.


def _ce(output: torch.Tensor, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(
        output.float(), torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
    )


def tiny_cnn() -> tuple[nn.Module, Any, Any]:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    return net, torch.randn(3, 16, 16), _ce


def small_mlp() -> tuple[nn.Module, Any, Any]:
    net = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    return net, torch.randn(256), _ce


def zoo(name: str, **kwargs: Any) -> Callable[[], tuple[nn.Module, Any, Any]]:
    def make() -> tuple[nn.Module, Any, Any]:
        spec = build(name, **kwargs)
        return spec.model, spec.sample, spec.loss_fn or default_loss

    return make


@dataclass
class Case:
    name: str
    make: Callable[[], tuple[nn.Module, Any, Any]]
    optimizer: str = "sgd"
    precision: str | None = None
    capacity: str | None = None  # simulated capacity (CPU suite); None: the whole GPU
    accelerate_start: int = 8192


SUITES = {
    "cpu": [
        Case("tiny CNN (16×16 input, SGD)", tiny_cnn, capacity="48MiB"),
        Case("small MLP (256-2048-2048-10, SGD)", small_mlp, capacity="96MiB"),
    ],
    # The GPU suite's code paths (zoo models, dict batches, Lightning, accelerate) on CPU, small.
    "smoke": [
        Case("resnet18 32px SGD", zoo("resnet18", input_shape=(3, 32, 32)), capacity="512MiB", accelerate_start=512),
        Case(
            "bert-base seq 16 bf16 AdamW",
            zoo("bert-base", seq_len=16),
            "adamw",
            "bf16",
            capacity="4GiB",
            accelerate_start=256,
        ),
    ],
    "gpu": [
        Case("ResNet-50 fp32 SGD", zoo("resnet50"), accelerate_start=2048),
        Case("ViT-B/16 bf16 AdamW", zoo("vit_b_16"), "adamw", "bf16", accelerate_start=2048),
        Case("BERT-base seq 512 bf16 AdamW", zoo("bert-base"), "adamw", "bf16", accelerate_start=1024),
        Case("GPT-2 seq 1024 bf16 AdamW", zoo("gpt2"), "adamw", "bf16", accelerate_start=512),
    ],
}


class Bench:
    """One case on one kind of device: fresh models and devices, and the loops every finder runs."""

    def __init__(self, case: Case, suite: str) -> None:
        self.case, self.suite = case, suite
        self.optimizer = (
            functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
            if case.optimizer == "sgd"
            else OPTIMIZERS[case.optimizer]
        )

    def fresh(self) -> tuple[nn.Module, Any, Any, Device]:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        model, sample, loss_fn = self.case.make()
        if self.case.capacity:
            # Cards of tens of MiB: too small to hold Hopper's 65 MiB of cuBLAS workspaces.
            capacity = batchfit.parse_size(self.case.capacity)
            device: Device = SimulatedDevice(capacity, compute="real", workspaces=())
        else:
            device = CudaDevice()
        self.ooms_before = device.num_ooms()  # CUDA's count is per process; count from here
        return model, sample, loss_fn, device

    @contextlib.contextmanager
    def enforced(self, device: Device, model: nn.Module) -> Iterator[Any]:
        """Run any code (a peer's loop) on the device: capacity enforced, peaks measured."""
        with device.session(), device.hold(model), device.measure() as measured:
            yield measured

    def train(self, model: nn.Module, sample: Any, loss_fn: Any, device: Device, batch_size: int, steps: int) -> None:
        workload = Workload(model, sample, loss_fn, self.optimizer)
        opt = self.optimizer(model.parameters())
        amp = {"bf16": torch.bfloat16}.get(self.case.precision or "")
        for _ in range(steps):
            batch = workload.batch(device, batch_size)
            with torch.autocast(device.autocast_type, dtype=amp, enabled=amp is not None):
                out = model(**batch) if isinstance(batch, Mapping) else model(batch)
                loss = loss_fn(out, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del batch, out, loss
        device.synchronize()

    def batchfit(self) -> tuple[int, int, int]:
        model, sample, loss_fn, device = self.fresh()
        result = batchfit.find_batch_size(
            model, sample, optimizer=self.optimizer, loss_fn=loss_fn, device=device, precision=self.case.precision
        )
        return result.recommended_batch_size, len(result.trials), sum(not t.ok for t in result.trials)

    def exact(self) -> int:
        model, sample, loss_fn, device = self.fresh()
        result = batchfit.find_batch_size(
            model,
            sample,
            optimizer=self.optimizer,
            loss_fn=loss_fn,
            device=device,
            precision=self.case.precision,
            exact=True,
            margin=0.0,
            rounding="none",
        )
        return int(result.exact_limit or 0)

    def doubling(self) -> tuple[int, int, int]:
        model, sample, loss_fn, device = self.fresh()
        # BatchNorm cannot train on one example: a user's loop would start at 2 there too.
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        size, best, trials = 2 if has_bn else 1, 0, 0
        with self.enforced(device, model):
            while True:
                trials += 1
                try:
                    self.train(model, sample, loss_fn, device, size, STEPS_PER_TRIAL)
                except torch.OutOfMemoryError:
                    return best, trials, device.num_ooms() - self.ooms_before
                finally:
                    gc.collect()
                    device.empty_cache()
                best, size = size, size * 2

    def accelerate(self) -> tuple[int, int, int]:
        from accelerate.utils import find_executable_batch_size

        model, sample, loss_fn, device = self.fresh()
        calls: list[int] = []

        @find_executable_batch_size(starting_batch_size=self.case.accelerate_start)
        def loop(batch_size: int) -> int:
            calls.append(batch_size)
            self.train(model, sample, loss_fn, device, batch_size, STEPS_PER_TRIAL)
            return batch_size

        with self.enforced(device, model):
            answer = loop()
        return answer, len(calls), device.num_ooms() - self.ooms_before

    def lightning(self, mode: str) -> tuple[int, int, int]:
        import lightning.pytorch as pl
        from lightning.pytorch.tuner import Tuner

        model, sample, loss_fn, device = self.fresh()
        bench, calls = self, []

        class Same(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 10**7

            def __getitem__(self, index: int) -> Any:
                return sample

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = model
                self.batch_size = 2

            def training_step(self, batch: Any, index: int) -> torch.Tensor:
                amp = {"bf16": torch.bfloat16}.get(bench.case.precision or "")
                with torch.autocast(device.autocast_type, dtype=amp, enabled=amp is not None):
                    out = self.net(**batch) if isinstance(batch, Mapping) else self.net(batch)
                    return loss_fn(out, batch)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return bench.optimizer(self.parameters())

            def train_dataloader(self) -> Any:
                calls.append(self.batch_size)  # the tuner rebuilds the loader for every trial
                return torch.utils.data.DataLoader(Same(), batch_size=self.batch_size)

        trainer = pl.Trainer(
            accelerator="gpu" if self.suite == "gpu" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_epochs=1,
            default_root_dir=tempfile.mkdtemp(prefix="bench_peers_"),
        )
        with self.enforced(device, model):
            answer = Tuner(trainer).scale_batch_size(
                Module(), mode=mode, steps_per_trial=STEPS_PER_TRIAL, max_trials=25, max_val=2**16
            )
        return int(answer or 0), len(calls), device.num_ooms() - self.ooms_before

    def survive(self, batch_size: int, steps: int) -> tuple[bool, float]:
        model, sample, loss_fn, device = self.fresh()
        try:
            with self.enforced(device, model) as measured:
                self.train(model, sample, loss_fn, device, batch_size, steps)
            return True, measured.peak_reserved / device.capacity
        except torch.OutOfMemoryError:
            return False, 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="comma-separated substrings of case names to run")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=3600, help="start no new case after this")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    cases = [c for c in SUITES[args.suite] if not args.models or any(m in c.name for m in args.models.split(","))]
    rows: list[dict[str, Any]] = []
    for case in cases:
        if time.perf_counter() > deadline:
            rows.append({"model": case.name, "finder": "-", "error": "skipped: time budget"})
            continue
        bench = Bench(case, args.suite)
        exact = bench.exact()
        finders: dict[str, Callable[[], tuple[int, int, int]]] = {
            "batchfit": bench.batchfit,
            "doubling loop": bench.doubling,
            f"accelerate (start {case.accelerate_start})": bench.accelerate,
            "lightning power": functools.partial(bench.lightning, "power"),
            "lightning binsearch": functools.partial(bench.lightning, "binsearch"),
        }
        times: dict[str, float] = {}
        for name, finder in finders.items():
            start = time.perf_counter()
            try:
                answer, trials, ooms = finder()
            except Exception as error:  # a peer failing is a result, not a crash of the benchmark
                rows.append({"model": case.name, "finder": name, "error": f"{type(error).__name__}: {error}"[:200]})
                continue
            times[name] = time.perf_counter() - start
            ok, frac = bench.survive(answer, args.steps) if answer else (False, 0.0)
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
                }
            )
        fastest = min((t for n, t in times.items() if n != "batchfit"), default=None)
        for row in rows:
            if row["model"] == case.name and "seconds" in row and fastest:
                row["time_vs_fastest_other"] = row["seconds"] / fastest
        if args.json:  # after every case, so a run cut short keeps what it measured
            write(args, rows)
    write(args, rows, show=True)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], show: bool = False) -> None:
    where = (
        torch.cuda.get_device_name()
        if args.suite == "gpu"
        else f"CPU ({platform.machine()}), simulated capacity with real compute"
    )
    header = (
        f"{where}, torch {torch.__version__}, {datetime.date.today()}, "
        f"`python scripts/bench_peers.py --suite {args.suite}`"
    )
    cols = [
        "model",
        "finder",
        "seconds",
        "time_vs_fastest_other",
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
    if show:
        print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "rows": rows}, handle, indent=2, default=str)
    if args.markdown and show:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
