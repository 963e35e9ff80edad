"""A model held on a device for trials, and put back exactly as it was on exit.

The probe, the pre-flight check and the lever table all run their trials inside `holding`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchfit import compiled
from batchfit.config import ProbeConfig
from batchfit.device import Device
from batchfit.internals import fsdp_modules
from batchfit.memory import budget as memory_budget
from batchfit.memory import format_size
from batchfit.oom import is_oom, release
from batchfit.optimizers import optimizer_factory
from batchfit.result import DoesNotFitError, Trial
from batchfit.snapshot import ModelSnapshot
from batchfit.trial import Held, Workload, check_sample, default_loss, run_trial, trainable

log = logging.getLogger(__name__)


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm cannot train on one example ("Expected more than 1 value per channel")."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class Session(Held):
    """A model held on a device, ready to run trials and report them; undone on exit."""

    on_trial: Callable[[Trial], None] | None
    on_trial_start: Callable[[int], None] | None

    def run(self, batch_size: int) -> Trial:
        log.debug("trial at batch_size=%d", batch_size)
        if self.on_trial_start is not None:
            self.on_trial_start(batch_size)
        trial = run_trial(self, batch_size)
        log.info(
            "batch %d: %s, peak reserved %s",
            batch_size,
            "fitted" if trial.ok else "OOM",
            format_size(trial.peak_reserved),
        )
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial


def model_need(model: nn.Module, optimizer: Any, device: Device) -> tuple[int, str]:
    """What the model holds before any batch: weights and buffers, gradients, optimizer state
    (for the optimizers whose state is known: SGD momentum one tensor a weight, Adam(W) two) and
    the device's fixed workspaces; in bytes, with the parts named."""
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors(model)}.values())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = _state_tensors(optimizer)
    parts = [f"weights {format_size(weights)}", f"gradients {format_size(grads)}"]
    parts.append("optimizer state not known" if states is None else f"optimizer state {format_size(states * grads)}")
    if device.fixed_bytes:
        parts.append(f"workspaces {format_size(device.fixed_bytes)}")
    need = weights + grads + (states or 0) * grads + device.fixed_bytes
    return need, ", ".join(parts)


def needs_more_than(model: nn.Module, optimizer: Any, device: Device, budget: int) -> bool:
    """Whether the model alone (`model_need`: weights, gradients, optimizer state) needs more than
    `budget`: no batch can fit, and a search down from a batch asked may go to its smallest size."""
    return model_need(model, optimizer, device)[0] > budget


def _tensors(model: nn.Module) -> list[Any]:
    return [*model.parameters(), *model.buffers()]


def _state_tensors(optimizer: Any) -> int | None:
    """State tensors a weight of the optimizer's class, where the class is one whose state is known."""
    factory = optimizer_factory(optimizer)
    func, keywords = getattr(factory, "func", type(optimizer)), getattr(factory, "keywords", {})
    if isinstance(optimizer, torch.optim.Optimizer):
        keywords = optimizer.defaults
    name = getattr(func, "__name__", "")
    if name == "SGD":
        return 1 if keywords.get("momentum") else 0
    return 2 if name in ("Adam", "AdamW") else None


def does_not_fit_before_any_batch(model: nn.Module, optimizer: Any, device: Device, margin: float) -> str:
    """The line for a model the card cannot hold at all: what it needs against what the card has."""
    need, parts = model_need(model, optimizer, device)
    return (
        f"the model itself does not fit on {device.description}: before any batch it needs at least "
        f"{format_size(need)} ({parts}) against a budget of {format_size(memory_budget(device.capacity, margin))} "
        f"({1 - margin:.0%} of {format_size(device.capacity)}); `batchfit check --levers` prices what would make it fit"
    )


@contextlib.contextmanager
def _placed(device: Device, model: nn.Module, optimizer: Any, margin: float) -> Iterator[dict[str, Any]]:
    """`device.hold(model)`, where running out of memory means the model does not fit, not a crash."""
    placing = True
    try:
        with device.hold(model) as held:
            placing = False
            yield held
    except Exception as error:
        if not (placing and is_oom(error)):
            raise
        release(error)
        raise DoesNotFitError(does_not_fit_before_any_batch(model, optimizer, device, margin)) from None


@contextlib.contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """One full collection now, then every object alive left out of later ones (gc.freeze)
    until the end: the collections trials need (after an OOM, at a session's end) then scan
    what the trials made, not a big process's whole heap (0.17 s each with GPT-2's transformers
    imported, three a lever row). A heap frozen already (by a caller, or the user's own) stays so."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def holding(
    model: nn.Module,
    sample: Any,
    device: Device,
    optimizer: Any,
    loss_fn: Any,
    config: ProbeConfig,
    on_trial: Callable[[Trial], None] | None,
    on_trial_start: Callable[[int], None] | None = None,
) -> Iterator[Session]:
    """`model` held on `device`, ready to run trials (`probe.run(B)`); put back as it was on exit.

    The probe, the pre-flight check and the lever table all run their trials inside one.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_sample(sample)
    workload = Workload(
        model=model,
        sample=sample,
        loss_fn=loss_fn or default_loss,
        make_optimizer=optimizer_factory(optimizer),
        amp_dtype=config.amp_dtype,  # type: ignore[arg-type]
        train=config.mode != "eval",
        compile_backend=device.compile_backend if config.compile else None,
        sharded=bool(fsdp_modules(model)),
    )
    snapshot = ModelSnapshot(model, copy_weights=device.holds_in_place(model))
    probe = None
    with collecting_new_objects_only():
        try:
            snapshot.set_grads_aside()
            with device.session(), _placed(device, model, optimizer, config.margin) as held:
                model.train(config.mode != "eval")
                params = trainable(model, held)
                # A timing objective reads the second step's time: the first pays for first calls.
                steps = config.steps_per_trial if config.objective == "memory" else max(2, config.steps_per_trial)
                probe = Session(device, workload, held, params, steps, on_trial, on_trial_start)
                yield probe
        finally:
            if probe is not None:  # the caller may keep the probe object; its device tensors must go now
                probe.tensors.clear()
                probe.params.clear()
            snapshot.restore()
            if workload.compiled:
                compiled.reset()
            gc.collect()  # at the end, not per trial; of what the trials made only (above)
            device.empty_cache()
