"""The probe: real training steps at growing batch sizes, and the answer with its evidence.

`find_batch_size` is the library's front door; `preflight` answers "does batch N fit?" for
pipelines. Both leave the user's model exactly as they found it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from batchfit import devices, distributed
from batchfit.config import ProbeConfig
from batchfit.devices import CudaDevice, Device, SimulatedDevice
from batchfit.lr import scale_lr
from batchfit.memory import format_size
from batchfit.plan import plan_global_batch
from batchfit.result import Result, Trial
from batchfit.search import SearchOutcome, search
from batchfit.trial import (
    ModelSnapshot,
    Workload,
    check_sample,
    default_loss,
    optimizer_factory,
    run_trial,
    trainable,
)

log = logging.getLogger(__name__)

# Pollux (Qiao et al. 2021): the knee is the smallest batch within 95% of the best throughput.
KNEE_FRACTION = 0.95


class DoesNotFitError(RuntimeError):
    """The batch (or any batch) does not train within the memory budget."""

    def __init__(self, message: str, check: CheckResult | None = None) -> None:
        super().__init__(message)
        self.check = check


def resolve_device(device: Device | str | None, memory: int | None) -> Device:
    """A Device from what the user passed: None picks CUDA when present, else the simulation."""
    if isinstance(device, Device):
        return device
    if device is None:
        device = "cuda" if devices.cuda_available() else "simulated"
    if not isinstance(device, str):
        raise ValueError(f"device={device!r} must be 'cuda', 'cuda:N', 'simulated', 'cpu' or a Device")
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else None
        return CudaDevice(index, memory)
    if device in ("simulated", "cpu"):
        if memory is None:
            raise ValueError(f"device={device!r} needs a capacity: pass memory='24GiB' (no CUDA GPU to measure)")
        return SimulatedDevice(memory, compute="fake" if device == "simulated" else "real")
    raise ValueError(f"device={device!r} is not 'cuda', 'cuda:N', 'simulated' or 'cpu'")


def _has_batchnorm(model: nn.Module) -> bool:
    # BatchNorm cannot train on one example ("Expected more than 1 value per channel").
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class _Probe:
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
def _held(
    model: nn.Module,
    sample: Any,
    device: Device,
    optimizer: Any,
    loss_fn: Any,
    config: ProbeConfig,
    on_trial: Callable[[Trial], None] | None,
    on_trial_start: Callable[[int], None] | None = None,
) -> Iterator[_Probe]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_sample(sample)
    workload = Workload(
        model=model,
        sample=sample,
        loss_fn=loss_fn or default_loss,
        make_optimizer=optimizer_factory(optimizer),
        amp_dtype=config.amp_dtype,  # type: ignore[arg-type]
    )
    snapshot = ModelSnapshot(model, copy_weights=device.trains_in_place)
    probe = None
    try:
        snapshot.set_grads_aside()
        with device.session(), device.hold(model) as held:
            model.train()
            probe = _Probe(
                device, workload, config.steps_per_trial, held, trainable(model, held), on_trial, on_trial_start
            )
            yield probe
    finally:
        if probe is not None:  # the caller may keep the probe object; its device tensors must go now
            probe.held.clear()
            probe.params.clear()
        snapshot.restore()
        gc.collect()  # one full collection at the end, not per trial: it costs ~0.1 s in a big process
        device.empty_cache()


def find_batch_size(
    model: nn.Module,
    sample: Any,
    *,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    device: Device | str | None = None,
    config: ProbeConfig | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    on_trial_start: Callable[[int], None] | None = None,
    **options: Any,
) -> Result:
    """Find the largest batch that trains `model` within the memory budget, and its learning rate.

    `sample` is one example without a batch dimension (tensor, tuple/list or dict) or a
    callable `batch_size -> batch`. Options are those of `ProbeConfig`; `on_trial_start(B)`
    and `on_trial(trial)` report progress. Under
    torch.distributed every rank probes its own device and all return the same answer.
    """
    config = config or ProbeConfig(**options)
    group = distributed.setup(config.dist_timeout_s)
    if group is None:
        local = _probe_here(model, sample, optimizer, loss_fn, device, config, on_trial, on_trial_start)
        return _finish(local, config, optimizer, [])
    rank = distributed.rank(group)
    try:
        local = _probe_here(model, sample, optimizer, loss_fn, device, config, on_trial, on_trial_start)
        report = distributed.RankReport(rank, local.recommended_batch_size, local.device, local.capacity_bytes)
        failure: Exception | None = None
    except Exception as error:  # every rank must join the agreement, failed or not
        report = distributed.RankReport(rank, None, "", 0, f"{type(error).__name__}: {error}")
        failure = error
    try:
        reports = distributed.agree(group, report)
    except distributed.DistributedProbeError as error:
        raise error from failure
    return _finish(local, config, optimizer, reports)


def _probe_here(
    model: nn.Module,
    sample: Any,
    optimizer: Any,
    loss_fn: Any,
    device: Device | str | None,
    config: ProbeConfig,
    on_trial: Callable[[Trial], None] | None,
    on_trial_start: Callable[[int], None] | None = None,
) -> Result:
    """The probe on this process's device, before any agreement between ranks."""
    dev = resolve_device(device, config.capacity_bytes)
    timer_start = devices.timer()
    with _held(model, sample, dev, optimizer, loss_fn, config, on_trial, on_trial_start) as probe:
        outcome = search(
            probe.run,
            dev.capacity,
            margin=config.margin,
            start=2 if _has_batchnorm(model) else 1,
            max_batch_size=config.max_batch_size,
            rounding=config.rounding,
            exact=config.exact,
            max_trials=config.max_trials,
        )
    if outcome.recommended == 0:
        first = outcome.trials[0]
        raise DoesNotFitError(
            f"no batch size trains within {1 - config.margin:.0%} of {format_size(dev.capacity)} "
            f"on {dev.description}: batch_size={first.batch_size} "
            + ("ran out of memory" if not first.ok else f"peaked at {format_size(first.peak_reserved)}")
        )
    return _result(outcome, dev, config, devices.timer() - timer_start)


def _finish(local: Result, config: ProbeConfig, optimizer: Any, reports: list[Any]) -> Result:
    """Agree across ranks (the smallest card decides), plan the global batch, scale the rate on it."""
    per_device = min([local.recommended_batch_size] + [r.recommended for r in reports])
    plan = plan_global_batch(per_device, max(1, len(reports)), config.target_global_batch)
    notes = list(local.notes)
    if plan.per_device < local.recommended_batch_size:
        notes.append(
            f"per-device batch {plan.per_device} is below this device's verified "
            f"{local.recommended_batch_size} (another rank's card or the global target decided); "
            "memory only falls with the batch"
        )
    lr = None
    if config.base_lr is not None:
        lr = scale_lr(
            config.base_lr,
            config.base_batch_size or plan.global_batch,
            plan.global_batch,
            rule=config.lr_rule,
            optimizer=optimizer if optimizer is not None else "sgd",
            noise_scale=config.noise_scale,
        )
    return replace(
        local,
        recommended_batch_size=plan.per_device,
        world_size=plan.world_size,
        gradient_accumulation_steps=plan.accumulation,
        global_batch_size=plan.global_batch,
        ranks=[r.to_dict() for r in reports],
        learning_rate=lr.learning_rate if lr else None,
        lr_advice=lr.to_dict() if lr else None,
        notes=notes,
    )


def _result(outcome: SearchOutcome, dev: Device, config: ProbeConfig, elapsed: float) -> Result:
    budget = (1 - config.margin) * dev.capacity
    within = [t for t in outcome.trials if t.ok and t.peak_reserved <= budget]
    knee = throughput_knee(within) if dev.real_timing else None
    goodput = goodput_batch_size(within, config.noise_scale) if dev.real_timing and config.noise_scale else None
    recommended = outcome.recommended
    notes = []
    if config.objective == "throughput" and knee is not None:
        recommended = knee
    elif config.objective == "goodput" and goodput is not None:
        recommended = goodput
    elif config.objective != "memory":
        notes.append(
            f"objective={config.objective!r} needs real step times; {dev.description} has none, "
            "so the memory answer stands"
        )
    notes.extend(dev.notes)
    chosen = next((t for t in outcome.trials if t.batch_size == recommended and t.ok), None)
    if chosen is not None and chosen.alloc_retries:
        # The allocator had to free its cache and retry: the batch fits, but only just.
        notes.append(
            f"batch {recommended} needed {chosen.alloc_retries} allocator retries (cache flushes): it fits "
            "only just; consider a larger margin"
        )
    line, line_alloc = outcome.line, outcome.line_allocated
    return Result(
        recommended_batch_size=recommended,
        largest_batch_ran=outcome.largest_ran,
        predicted_limit=outcome.predicted_limit,
        per_sample_bytes=line.per_sample if line else None,
        fixed_bytes=line.fixed if line else None,
        per_sample_allocated_bytes=line_alloc.per_sample if line_alloc else None,
        fixed_allocated_bytes=line_alloc.fixed if line_alloc else None,
        capacity_bytes=dev.capacity,
        margin=config.margin,
        device=dev.description,
        is_estimate=dev.is_estimate,
        trials=outcome.trials,
        elapsed_s=elapsed,
        exact_limit=outcome.exact_limit,
        throughput_knee=knee,
        goodput_batch_size=goodput,
        memory_batch_size=outcome.recommended,
        objective=config.objective,
        timing_is_real=dev.real_timing,
        notes=notes,
    )


def throughput_knee(trials: list[Trial]) -> int | None:
    """Smallest batch whose samples/s is within 95% of the best measured."""
    rates = [(t.batch_size, t.samples_per_s) for t in trials if t.samples_per_s]
    if not rates:
        return None
    best = max(r for _, r in rates)
    return min(b for b, r in rates if r >= KNEE_FRACTION * best)


def goodput_batch_size(trials: list[Trial], noise_scale: float) -> int | None:
    """Batch maximising throughput × statistical efficiency (φ + B₀)/(φ + B) (Pollux).

    B₀ only scales every candidate by the same constant, so it does not move the argmax.
    """
    rates = [(t.batch_size, t.samples_per_s) for t in trials if t.samples_per_s]
    if not rates:
        return None
    return max(rates, key=lambda br: br[1] / (noise_scale + br[0]))[0]


@dataclass(frozen=True)
class CheckResult:
    """Whether one batch size trains within the budget, measured by a real trial."""

    batch_size: int
    fits: bool
    peak_reserved_bytes: int | None
    budget_bytes: float
    capacity_bytes: int
    margin: float
    device: str
    largest_fitting: int | None = None

    @property
    def overshoot_bytes(self) -> float | None:
        if self.peak_reserved_bytes is None:
            return None
        return self.peak_reserved_bytes - self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "fits": self.fits,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "budget_bytes": self.budget_bytes,
            "overshoot_bytes": self.overshoot_bytes,
            "capacity_bytes": self.capacity_bytes,
            "margin": self.margin,
            "device": self.device,
            "largest_fitting": self.largest_fitting,
        }

    def __str__(self) -> str:
        if self.fits:
            return (
                f"batch_size={self.batch_size} fits: peak {format_size(self.peak_reserved_bytes or 0)} "
                f"within {format_size(self.budget_bytes)} ({1 - self.margin:.0%} of "
                f"{format_size(self.capacity_bytes)}) on {self.device}"
            )
        how = (
            "runs out of memory"
            if self.peak_reserved_bytes is None
            else f"peaks at {format_size(self.peak_reserved_bytes)}, "
            f"{format_size(self.overshoot_bytes or 0)} over the budget"
        )
        return (
            f"batch_size={self.batch_size} does not fit: it {how} of {format_size(self.budget_bytes)} "
            f"({1 - self.margin:.0%} of {format_size(self.capacity_bytes)}) on {self.device}; "
            f"largest that fits: {self.largest_fitting}"
        )


def preflight(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    *,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    device: Device | str | None = None,
    **options: Any,
) -> CheckResult:
    """Check that `batch_size` trains within the budget on this device; raise DoesNotFitError if not.

    One real trial decides. When it fails, a probe finds the largest size that fits, so the
    error says what to use instead.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    config = ProbeConfig(**options)
    dev = resolve_device(device, config.capacity_bytes)
    budget = (1 - config.margin) * dev.capacity
    with _held(model, sample, dev, optimizer, loss_fn, config, None) as probe:
        trial = probe.run(batch_size)
    fits = trial.ok and trial.peak_reserved <= budget
    check = CheckResult(
        batch_size=batch_size,
        fits=fits,
        peak_reserved_bytes=trial.peak_reserved if trial.ok else None,
        budget_bytes=budget,
        capacity_bytes=dev.capacity,
        margin=config.margin,
        device=dev.description,
    )
    if fits:
        return check
    try:
        narrower = ProbeConfig(**{**options, "rounding": "none", "max_batch_size": batch_size - 1})
        # This rank's own answer: a pre-flight check is per device, with no agreement between ranks.
        found = _probe_here(model, sample, optimizer, loss_fn, dev, narrower if batch_size > 1 else config, None)
        largest = found.recommended_batch_size
    except DoesNotFitError:
        largest = 0
    check = CheckResult(**{**check.__dict__, "largest_fitting": largest})
    raise DoesNotFitError(str(check), check)
