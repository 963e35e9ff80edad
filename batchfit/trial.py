"""One trial: a batch of size B, a few real training steps, measured, cleaned up."""

from __future__ import annotations

import contextlib
import statistics
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from batchfit import compiled
from batchfit.device import Device, Measurement, timer
from batchfit.internals import reset_after_failure
from batchfit.oom import is_oom, release
from batchfit.optimizers import OptimizerFactory
from batchfit.result import Trial

LossFn = Callable[[Any, Any], torch.Tensor]


class TrialError(RuntimeError):
    """A trial failed for a reason other than memory: a bug the user must see."""


def default_loss(output: Any, batch: Any) -> torch.Tensor:
    """`output.loss` when the model computes its own (Hugging Face style), else the output's mean."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"].float().mean()
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise TypeError(
            f"the model returned {type(output).__name__} with no floating-point tensor; pass loss_fn(output, batch)"
        )
    return tensors[0].float().mean()


def _as_tree(sample: Any) -> Any:
    """Tokenizer outputs are Mapping subclasses that pytree does not open; make them dicts."""
    if isinstance(sample, Mapping):
        return {k: _as_tree(v) for k, v in sample.items()}
    if isinstance(sample, list):
        return [_as_tree(v) for v in sample]
    if isinstance(sample, tuple):
        return tuple(_as_tree(v) for v in sample)
    return sample


def check_sample(sample: Any) -> None:
    """Fail early, in one line, on a sample the probe cannot replicate."""
    if callable(sample) and not isinstance(sample, torch.Tensor):
        return
    leaves = [t for t in tree_flatten(_as_tree(sample))[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError(
            f"sample of type {type(sample).__name__} holds no tensor; pass one example "
            "(tensor, tuple, dict) or a callable batch_size -> batch"
        )


@dataclass
class Workload:
    """What a trial trains: the model, how to build a batch of size B, the loss, the optimizer."""

    model: nn.Module
    sample: Any
    loss_fn: LossFn
    make_optimizer: OptimizerFactory
    amp_dtype: torch.dtype | None = None
    train: bool = True
    """False: evaluation, a forward under torch.inference_mode() and nothing else."""
    compile_backend: str | None = None
    """A torch.compile backend: the step is compiled once, on first use, and reused by every trial."""
    compilations: int = 0
    """Frames dynamo has compiled for this workload so far."""
    sharded: bool = False
    """An FSDP2 model: called itself, not through functional_call (its hooks swap its parameters
    between sharded and unsharded; stand-ins would be put over the unsharded ones), and reset after
    a step that failed."""
    _compiled: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    @property
    def compiled(self) -> bool:
        return self.compile_backend is not None

    def batch(self, device: Device, batch_size: int) -> Any:
        if callable(self.sample) and not isinstance(self.sample, torch.Tensor):
            batch = device.put(_as_tree(self.sample(batch_size)))
        else:
            batch = tree_map(
                lambda t: _repeat(t, batch_size) if isinstance(t, torch.Tensor) else t,
                device.put(_as_tree(self.sample)),
            )
        if self.compiled:
            compiled.mark_batch_dynamic(batch)
        return batch

    def loss(self, held: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The loss of one step, through the compiled step when compiling."""
        if self.compile_backend is None:
            return self._loss(held, batch)
        if self._compiled is None:
            self._compiled = compiled.compile_step(self._loss, self.compile_backend)
        return self._compiled(held, batch)

    def _loss(self, held: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        if isinstance(self.loss_fn, Step):
            return self.loss_fn.fn(self.model, batch) if self.sharded else self.loss_fn.loss(self.model, held, batch)
        return self.loss_fn(_call(self.model, None if self.sharded else held, batch), batch)


def _repeat(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    return example.unsqueeze(0).expand(batch_size, *example.shape).contiguous()


class Step:
    """A user's own training step, `step(model, batch) -> loss` (the form of Lightning's training_step).

    For samples the model does not take as its arguments, e.g. a dataset's `(inputs, target)`
    item: `step=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])`. The probe
    runs it with the device's stand-in weights in place of the model's own.
    """

    def __init__(self, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        if not callable(fn):
            raise ValueError(f"step={fn!r} must be a callable (model, batch) -> loss")
        self.fn = fn

    def loss(self, model: nn.Module, tensors: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        wrapper = _StepModule(model, self.fn)
        return functional_call(wrapper, {f"model.{k}": v for k, v in tensors.items()}, (batch,))


def loss_for(loss_fn: Any, step: Any) -> Any:
    """The loss of a trial: the user's `step(model, batch)`, or `loss_fn(output, batch)`, or the default."""
    if step is None:
        return loss_fn
    if loss_fn is not None:
        raise ValueError("pass step= (model, batch) -> loss or loss_fn= (output, batch) -> loss, not both")
    return Step(step)


class _StepModule(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


def _call(model: nn.Module, tensors: dict[str, torch.Tensor] | None, batch: Any) -> Any:
    """`model` on `batch`, with `tensors` in place of its own (None: its own)."""
    args, kwargs = (
        ((), dict(batch))
        if isinstance(batch, Mapping)
        else (tuple(batch), {})
        if isinstance(batch, (tuple, list))
        else ((batch,), {})
    )
    if tensors is None:
        return model(*args, **kwargs)
    return functional_call(model, tensors, args, kwargs)


def trainable(model: nn.Module, held: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The held tensors that are trainable parameters, each once (tied weights share)."""
    seen: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tensor = held[name]
        if param.requires_grad:
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


@dataclass
class Held:
    """A workload's model held on a device: what every trial of it runs on."""

    device: Device
    workload: Workload
    tensors: dict[str, torch.Tensor]
    """The model's parameters and buffers on the device, by name (the device's stand-ins)."""
    params: list[torch.Tensor]
    """The trainable ones among them, each once."""
    steps: int
    """Training steps a trial takes; 1: one step, the optimizer state made before it (`prime`)."""


def run_trial(held: Held, batch_size: int) -> Trial:
    """Train `held.steps` real steps at `batch_size`; an OOM is a result, any other error is raised."""
    device, workload = held.device, held.workload
    measurement = None
    steps = 0
    failure: Exception | None = None
    try:
        # Dynamo's counters only for a compiled step: importing them costs a second.
        counting = compiled.counting() if workload.compiled else contextlib.nullcontext(compiled.CompileCount())
        with counting as count, device.measure() as measurement:
            steps = _train(held, batch_size, measurement)
    except Exception as error:
        if workload.sharded:
            reset_after_failure(workload.model)
        if is_oom(error):
            release(error)
        else:
            failure = error
    finally:
        for param in held.params:
            param.grad = None
    if failure is not None:
        wrapped: Exception | None = compiled.compile_failure(failure)
        if wrapped is None:
            wrapped = _user_error(failure, batch_size)
        else:
            release(failure)
        del failure
        device.empty_cache()
        raise wrapped
    device.empty_cache()
    if measurement is None:  # out of memory before the first step (the device's fixed memory)
        measurement = Measurement()
    ok = steps > 0 and len(measurement.step_seconds) == steps
    if workload.compiled:
        workload.compilations += count.compilations
        if ok and not workload.compilations:
            # Dynamo skips frames silently (an active dispatch mode, a disabled config): an
            # answer measured on eager code must not be presented as the compiled model's.
            raise compiled.CompileError(
                "torch.compile compiled nothing: the step ran eager (dynamo skipped it), so no "
                "compiled answer can be given; run without compile"
            )
    times = measurement.step_seconds[1:] or measurement.step_seconds
    return Trial(
        batch_size=batch_size,
        ok=ok,
        peak_allocated=measurement.peak_allocated if ok else 0,
        peak_reserved=measurement.peak_reserved if ok else 0,
        # Host time under fake tensors is no GPU's step time; report none rather than a wrong one.
        seconds_per_step=statistics.median(times) if ok and times and device.real_timing else None,
        alloc_retries=measurement.alloc_retries,
        largest_alloc=measurement.largest_alloc if ok else 0,
        peak_inactive_split=measurement.peak_inactive_split if ok else 0,
        compilations=count.compilations,
        graph_breaks=count.graph_breaks,
    )


def _user_error(error: Exception, batch_size: int) -> TrialError:
    """Name the batch size; keep the traceback as text so its frames (activations) can go."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    link: BaseException | None = error
    while link is not None:  # the user's chain (`raise X from Y`) keeps each traceback as text
        if link.__traceback__ is not None:
            link.add_note("".join(traceback.format_tb(link.__traceback__)).rstrip())
        link = link.__cause__ or link.__context__
    release(error)
    wrapped = TrialError(
        f"batch_size={batch_size} failed with {type(error).__name__}: {first_line} (not an out-of-memory error)"
    )
    wrapped.__cause__ = error
    return wrapped


def _train(held: Held, batch_size: int, measurement: Measurement) -> int:
    """The steps themselves, in a frame of their own so their tensors die with it; returns how
    many it ran. One step is primed (the optimizer state made before it), or two where it cannot be."""
    device, workload, steps = held.device, held.workload, held.steps
    batch = workload.batch(device, batch_size)
    optimizer = workload.make_optimizer(held.params) if workload.train else None
    # An FSDP2 model's gradients are sharded DTensors, which one plain zero cannot stand for.
    if optimizer is not None and steps < 2 and (workload.sharded or not prime(optimizer, held.params)):
        steps = 2
    amp = workload.amp_dtype
    # A device may repeat a step without running it (device.repeat_step); not a compiled step
    # (dynamo's counters) or a sharded one (its collectives, in lockstep with other ranks).
    repeatable = not (workload.compiled or workload.sharded)
    for step in range(steps):
        start = timer()
        if step and repeatable and device.repeat_step():
            measurement.step_seconds.append(timer() - start)
            continue
        # The first step's allocation watch is a dispatch mode, under which dynamo would not
        # compile: a compiled step goes unwatched.
        watch = step == 0 and not workload.compiled
        recorded = device.step(step) if repeatable else contextlib.nullcontext()
        with recorded, device.first_step(measurement) if watch else contextlib.nullcontext():
            # Evaluation keeps no graph: activations die as soon as the next layer has used them.
            with device.autocast(amp), contextlib.nullcontext() if workload.train else torch.inference_mode():
                loss = workload.loss(held.tensors, batch)
            if optimizer is not None:
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                del loss
            device.synchronize()
        measurement.step_seconds.append(timer() - start)
    return steps


def prime(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Make the optimizer's state before the first step, so one step peaks as the second would.

    The state (momentum, Adam's moments) is made lazily by the first `step()`: a trial's first
    step peaks without it, so a trial runs two. One step on zero gradients makes it through the
    optimizer's own code (the same tensors, dtypes and sizes) without the forward and backward;
    weight decay moves the weights a little, as a trial's real steps do, and the probe puts them
    back as it does theirs. False where the optimizer cannot step so (one that needs a closure):
    the trial then runs two steps.
    """
    zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for param in params:
        # A zero-stride view of one scalar: the optimizer reads zeros without gradients' memory.
        key = (param.dtype, param.device)
        zero = zeros.setdefault(key, torch.zeros((), dtype=param.dtype, device=param.device))
        param.grad = zero.expand_as(param)
    try:
        optimizer.step()
    except TypeError:  # LBFGS and its kind: step(closure)
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
    return True
