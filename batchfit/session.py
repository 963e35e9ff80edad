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

from torch import nn

from batchfit import compiled
from batchfit.config import ProbeConfig
from batchfit.device import Device
from batchfit.internals import fsdp_modules
from batchfit.memory import format_size
from batchfit.optimizers import optimizer_factory
from batchfit.result import Trial
from batchfit.snapshot import ModelSnapshot
from batchfit.trial import Workload, check_sample, default_loss, run_trial, trainable

log = logging.getLogger(__name__)


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm cannot train on one example ("Expected more than 1 value per channel")."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class Session:
    """A model held on a device, ready to run trials; undone on exit."""

    device: Device
    workload: Workload
    steps: int
    held: dict[str, Any]
    params: list[Any]
    on_trial: Callable[[Trial], None] | None
    on_trial_start: Callable[[int], None] | None

    def run(self, batch_size: int) -> Trial:
        log.debug("trial at batch_size=%d", batch_size)
        if self.on_trial_start is not None:
            self.on_trial_start(batch_size)
        trial = run_trial(self.device, self.workload, self.held, self.params, batch_size, self.steps)
        log.info(
            "batch %d: %s, peak reserved %s",
            batch_size,
            "fitted" if trial.ok else "OOM",
            format_size(trial.peak_reserved),
        )
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial


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
    try:
        snapshot.set_grads_aside()
        with device.session(), device.hold(model) as held:
            model.train(config.mode != "eval")
            probe = Session(
                device, workload, config.steps_per_trial, held, trainable(model, held), on_trial, on_trial_start
            )
            yield probe
    finally:
        if probe is not None:  # the caller may keep the probe object; its device tensors must go now
            probe.held.clear()
            probe.params.clear()
        snapshot.restore()
        if workload.compiled:
            compiled.reset()
        gc.collect()  # one full collection at the end, not per trial: it costs ~0.1 s in a big process
        device.empty_cache()
