"""Sharded training (FSDP2): the batch that fits each GPU, estimated in one process for world sizes
you don't have.

For each world size N, torch's fake process group stands for N ranks: the model is built on the
meta device, checkpointed if asked, sharded by the user's function (default: `fully_shard` on each
repeated block and on the root), materialised as fake tensors on a fresh simulated card, and
probed there as rank 0 of N. FSDP2 pads every rank's shard to the same size, so rank 0 holds
what every rank holds. Collectives under the fake group return at once; their buffers are real
allocations and are counted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from batchfit.answer import finish
from batchfit.changes import enable_checkpointing, repeated_blocks, structure_copy
from batchfit.config import ProbeConfig, check_positive_int
from batchfit.device import SimulatedDevice, resolve_device
from batchfit.distributed import refuse_unsupported
from batchfit.internals import fake_store, fsdp_modules
from batchfit.memory import format_size
from batchfit.result import Result

ShardFn = Callable[[nn.Module, Any, Any], None]
"""shard(model, mesh, mp_policy): apply fully_shard to `model` in place (mp_policy may be None)."""


@dataclass(frozen=True)
class ShardedEstimate:
    """One answer per world size: the per-GPU batch, the global batch, its learning rate, the
    per-rank memory line."""

    results: dict[int, Result]
    mp_policy: str
    checkpointing: bool
    elapsed_s: float = 0.0
    """Wall time of the whole estimate (world sizes may run side by side)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "fsdp": {
                "mp_policy": self.mp_policy,
                "checkpointing": self.checkpointing,
                "world_sizes": {str(n): r.to_dict() for n, r in self.results.items()},
                "elapsed_s": self.elapsed_s,
            }
        }

    def __str__(self) -> str:
        first = next(iter(self.results.values()))
        lines = [
            f"FSDP2 (fully_shard), {self.mp_policy}{', activation checkpointing' if self.checkpointing else ''}; "
            f"per rank on {first.device.split(', rank 0 of')[0]} — an estimate",
            f"{'world':>6} {'per-GPU batch':>13} {'global batch':>12} {'learning rate':>13} "
            f"{'fixed/rank':>11} {'per sample':>11} {'predicted limit':>15}",
        ]
        for world, r in self.results.items():
            lr = f"{r.learning_rate:.6g}" if r.learning_rate is not None else "-"
            fixed = format_size(r.fixed_bytes) if r.fixed_bytes is not None else "-"
            per = format_size(r.per_sample_bytes) if r.per_sample_bytes is not None else "-"
            limit = str(r.predicted_limit) if r.predicted_limit is not None else "-"
            lines.append(
                f"{world:>6} {r.recommended_batch_size:>13} {r.global_batch_size or '-':>12} {lr:>13} "
                f"{fixed:>11} {per:>11} {limit:>15}"
            )
        lines.append(
            f"(per rank, reserved memory within {1 - first.margin:.0%} of {format_size(first.capacity_bytes)}; "
            "global batch = per-GPU batch × world size × accumulation)"
        )
        for note in dict.fromkeys(n for r in self.results.values() for n in r.notes):
            lines.append(f"note: {note}")
        lines.append(f"elapsed: {self.elapsed_s:.1f} s")
        return "\n".join(lines)


def default_shard(model: nn.Module, mesh: Any, mp_policy: Any) -> None:
    """`fully_shard` on each repeated block (transformer layers, ResNet stages' blocks) and the root:
    the wrapping FSDP2's own examples and torchtitan use."""
    from torch.distributed.fsdp import fully_shard

    options = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    for name in repeated_blocks(model):
        fully_shard(model.get_submodule(name), **options)
    fully_shard(model, **options)


def estimate_sharded(
    model: nn.Module | Callable[[], nn.Module],
    sample: Any,
    world_sizes: Sequence[int],
    *,
    shard: ShardFn | None = None,
    mp_policy: Any = None,
    checkpointing: bool = False,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    device: str | None = None,
    config: ProbeConfig | None = None,
    on_start: Callable[[Any], None] | None = None,
    on_trial: Callable[[Any], None] | None = None,
    **options: Any,
) -> ShardedEstimate:
    """The per-GPU batch that trains `model` sharded with FSDP2 over each of `world_sizes` GPUs.

    `model` is a module (on any device: only its structure is used, through a meta copy) or a
    factory called on the meta device. `shard(model, mesh, mp_policy)` applies `fully_shard`
    (default: `default_shard`); `mp_policy` is FSDP's MixedPrecisionPolicy (distinct from
    autocast `precision=`); `checkpointing` checkpoints the repeated blocks first. The card is
    `gpu=` or `memory=` (config or options). Runs in a process without a process group.
    """
    from batchfit.probe import find_batch_size

    config = ProbeConfig.from_options(config, options)
    if device not in (None, "simulated"):
        raise ValueError(f"device={device!r}: a sharded estimate runs on the simulated card (gpu= or memory=)")
    if config.capacity_bytes is None:
        raise ValueError("a sharded estimate plans for a card: pass gpu='H100-80GB' or memory='80GiB'")
    if config.mode != "train":
        raise ValueError("a sharded estimate sizes training; mode= does not apply")
    if not world_sizes:
        raise ValueError("world_sizes is empty: give the numbers of GPUs to plan for, e.g. (8, 64)")
    for world in world_sizes:
        check_positive_int("world size", world)
    refuse_unsupported(None, config)
    if not isinstance(model, nn.Module) and not callable(model):
        raise ValueError(f"model must be a torch.nn.Module or a factory, got {type(model).__name__}")
    # The search and its answer are per rank; the global batch and its rate come per world size.
    local_config = replace(config, target_global_batch=None, base_lr=None, base_batch_size=None)

    def one(world: int, report: bool) -> Result:
        """Rank 0 of `world` on a fresh card; `report`: call on_start/on_trial as it goes."""
        card = resolve_device("simulated", config)
        assert isinstance(card, SimulatedDevice)
        card.description += f", rank 0 of {world} (FSDP2)"
        with _fake_world(world) as mesh:
            with card.build_mode():  # the model's tensors and this rank's shards: fakes of the card
                sharded = _structure(model)
                if checkpointing:
                    enable_checkpointing(sharded)
                (shard or default_shard)(sharded, mesh, mp_policy)
            return find_batch_size(
                sharded, sample, optimizer=optimizer, loss_fn=loss_fn, step=step, device=card, config=local_config,
                on_start=on_start if report else None, on_trial=on_trial if report else None,
            )  # fmt: skip

    start = time.perf_counter()
    results: dict[int, Result] = {}
    for world, local in zip(world_sizes, _each(one, list(world_sizes), on_start, on_trial), strict=True):
        notes = [
            "FSDP2 over N ranks (torch's fake process group): memory of rank 0, whose shard is as large as "
            "any rank's; collectives' buffers counted, their time not",
            *local.notes,
        ]
        results[world] = replace(finish(local, config, optimizer, [], world_size=world), notes=notes)
    return ShardedEstimate(results, _policy_name(mp_policy), checkpointing, time.perf_counter() - start)


def _each(
    one: Callable[[int, bool], Result],
    worlds: list[int],
    on_start: Callable[[Any], None] | None,
    on_trial: Callable[[Any], None] | None,
) -> list[Result]:
    """`one(world)` for every world size: side by side in forked processes where this machine has
    the cores (each is single-threaded fake-tensor dispatch), else one after another.

    A forked child inherits the model and the callables as they are (nothing is pickled but the
    results); the progress of each world is reported in order once it is back.
    """
    workers = min(len(worlds), os.cpu_count() or 1)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [one(world, True) for world in worlds]
    from concurrent.futures import ProcessPoolExecutor

    global _ONE
    _ONE = one
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_run_one, worlds))
    except RuntimeError as error:
        # A process that has run a backward pass cannot fork one that runs another (autograd's
        # threads; torch says so at the child's first backward): one after another, here, then.
        if "Autograd-and-Fork" not in str(error):
            raise
        return [one(world, True) for world in worlds]
    finally:
        _ONE = None
    for result in results:
        if on_start is not None:
            on_start(_Described(result.device))
        if on_trial is not None:
            for trial in result.trials:
                on_trial(trial)
    return results


_ONE: Callable[[int, bool], Result] | None = None
"""The per-world estimate a forked worker runs (a module global: fork copies it, nothing is pickled)."""


def _run_one(world: int) -> Result:
    assert _ONE is not None
    return _ONE(world, False)


@dataclass(frozen=True)
class _Described:
    """What on_start reads of a device (its description), for a world estimated in another process."""

    description: str
    caveat: str | None = None


def _structure(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """A copy of `model` whose tensors are empty CPU tensors of the active (fake) mode: its
    structure without its memory. A factory is called on the meta device first."""
    if not isinstance(model, nn.Module):
        with torch.device("meta"):
            made = model()
        if not isinstance(made, nn.Module):
            raise ValueError(f"the model factory returned {type(made).__name__}, not a torch.nn.Module")
        model = made
    if fsdp_modules(model):
        raise ValueError(
            "the model is sharded already: pass it unsharded (or a factory) and shard= the function that "
            "shards it; the estimate shards a copy for each world size"
        )
    return structure_copy(model, lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))


@contextlib.contextmanager
def _fake_world(world: int) -> Iterator[Any]:
    """torch's fake process group of `world` ranks and a 1-D device mesh over it, closed after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        raise ValueError(f"torch {torch.__version__} was built without torch.distributed: no FSDP2")
    if dist.is_initialized():
        raise ValueError(
            "a process group is already initialised: run the sharded estimate in a process of its own "
            "(it stands for every rank through torch's fake process group)"
        )
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def mixed_precision(param_dtype: str) -> Any:
    """FSDP's MixedPrecisionPolicy for 'bf16' / 'fp16' (gradients reduced in fp32); None for 'fp32'."""
    if param_dtype == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[param_dtype]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _policy_name(mp_policy: Any) -> str:
    if mp_policy is None:
        return "parameters in their own dtype"
    param = str(getattr(mp_policy, "param_dtype", None) or "own dtype").replace("torch.", "")
    reduce = str(getattr(mp_policy, "reduce_dtype", None) or param).replace("torch.", "")
    return f"MixedPrecisionPolicy(param {param}, reduce {reduce})"
