"""When a batch does not fit: what each lever (precision, checkpointing, optimizer state, frozen
weights, accumulation, shorter sequences) buys, priced by simulated runs of that variant.

Every number in the table comes from trials of the changed model on the simulated device: no
factor is written by hand. Each variant is applied to the user's model for its trials only and
undone in `finally` (training flags, `requires_grad`, checkpointed forwards).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from batchfit.changes import (
    Change,
    enable_checkpointing,
    freeze_base,
    meta_copy,
    sequence_length,
    shorten,
    with_lora,
)
from batchfit.config import Precision, ProbeConfig, check_positive_int
from batchfit.device import Device, SimulatedDevice, resolve_device, timer
from batchfit.lever.pricing import Pricer, line_of
from batchfit.lever.records import Lever, LeverTable
from batchfit.lever.sharding import sharding_rows
from batchfit.memory import budget as memory_budget
from batchfit.optimizers import DEFAULT_SGD, OPTIMIZERS
from batchfit.plan import plan_global_batch
from batchfit.result import Trial
from batchfit.samples import choose
from batchfit.trial import TrialError, loss_for

LORA_RANK = 8


def _optimizers() -> dict[str, tuple[Callable[..., torch.optim.Optimizer] | None, str]]:
    """The optimizer rows: name -> (factory, cost); None where this torch lacks it."""
    adafactor = getattr(torch.optim, "Adafactor", None)
    return {
        "SGD momentum": (DEFAULT_SGD, "one state tensor a weight; a different optimizer: re-tune the rate"),
        "AdamW": (OPTIMIZERS["adamw"], "two state tensors a weight"),
        "AdamW foreach=False": (
            functools.partial(OPTIMIZERS["adamw"], foreach=False),
            "slower step (a loop over tensors), no foreach temporaries",
        ),
        "Adafactor": (
            functools.partial(adafactor, lr=1e-2) if adafactor else None,
            "factored second moment; different dynamics: re-tune the rate",
        ),
    }


GROUPS = ("precision", "checkpointing", "optimizer", "frozen", "accumulation", "sequence", "combination")


def levers(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    *,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    device: Device | str | None = None,
    config: ProbeConfig | None = None,
    groups: tuple[str, ...] = GROUPS,
    on_lever: Callable[[Lever], None] | None = None,
    world_sizes: tuple[int, ...] = (),
    **options: Any,
) -> LeverTable:
    """Price each lever for training `model` at `batch_size`, on a simulated card.

    The card is `config.gpu` / `config.memory`, or the capacity of `device` (a CUDA GPU's
    usable memory). Each row comes from trials of that variant: the largest batch within the
    margin (by its memory line, verified by a trial) and the peak at `batch_size`. The first
    row is the run as asked; `groups` picks the levers (all of GROUPS by default). `on_lever(row)`
    hears each row as it is priced (a caller interrupted midway keeps those).
    `world_sizes` adds rows for FSDP2 over that many GPUs (alone and with checkpointing), batch per GPU.
    """
    check_positive_int("batch_size", batch_size)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"groups {sorted(unknown)} are not among {', '.join(GROUPS)}")
    config = ProbeConfig.from_options(config, options)
    if config.mode != "train":
        raise ValueError("levers price training; mode= does not apply")
    start = timer()
    cards = _cards(device, config)
    planned = cards()
    budget = memory_budget(planned.capacity, config.margin)
    table = _Table(
        Pricer(cards, budget, batch_size),
        model,
        choose(sample, config.scan_items).sample,
        optimizer,
        loss_for(loss_fn, step),
        config,
    )
    rows: list[Lever] = []
    heard = on_lever or (lambda row: None)
    for group in ("baseline", *GROUPS):
        if group == "baseline" or group in groups:
            made = table.baseline if group == "baseline" else getattr(table, group)()
            for row in made if isinstance(made, list) else [made]:
                rows.append(row)
                heard(row)
    if world_sizes:
        for row in sharding_rows(
            model, table.sample, batch_size, world_sizes, optimizer=optimizer, loss_fn=table.loss_fn,
            config=config, capacity=planned.capacity,
        ):  # fmt: skip
            rows.append(row)
            heard(row)
    return LeverTable(
        batch_size=batch_size,
        capacity_bytes=planned.capacity,
        budget_bytes=budget,
        device=planned.description,
        levers=rows,
        elapsed_s=timer() - start,
    )


class _Table:
    """The rows of the lever table, one method per lever group; the first row is the run as asked."""

    def __init__(
        self, pricer: Pricer, model: nn.Module, sample: Any, optimizer: Any, loss_fn: Any, config: ProbeConfig
    ) -> None:
        self.pricer, self.model, self.sample = pricer, model, sample
        self.user_optimizer, self.loss_fn, self.config = optimizer, loss_fn, config
        card = config.card
        self.low: Precision = "fp16" if card is not None and not card.bf16 else "bf16"
        self.baseline = self._priced("as asked", "baseline", _describe(config, optimizer))

    def _priced(self, name: str, group: str, cost: str, detail: str = "", **change: Any) -> Lever:
        """The row of the run as asked with `change` (model=, optimizer=, config=) made."""
        model = change.get("model", self.model)
        optimizer, config = change.get("optimizer", self.user_optimizer), change.get("config", self.config)
        try:
            fits, peak, trials = self.pricer.price(model, self.sample, optimizer, self.loss_fn, config)
        except TrialError as error:
            if group == "baseline":
                raise
            reason = (
                "its step reads tensor values (.item()), which the simulated device's fake tensors do not have"
                if "_local_scalar_dense" in str(error)
                else str(error)
            )
            return _not_applicable(name, group, cost, f"cannot run on the simulated device: {reason}")
        predicted = None
        if peak is None:
            line = line_of(trials)
            predicted = round(line.predict(self.pricer.batch_size)) if line else None
        return Lever(name, group, cost, fits, peak, predicted, detail, True, trials)

    def _variant(self, name: str, group: str, cost: str, change: Change, **more: Any) -> Lever:
        """The row of a lever applied to the model in place, undone after; says so if it cannot apply."""
        try:
            detail, undo = change(self.model)
        except ValueError as error:
            return _not_applicable(name, group, cost, str(error))
        try:
            return self._priced(name, group, cost, detail, **more)
        finally:
            undo()

    def _one(self, sample: Any, batch_size: int) -> Trial:
        """One trial of the run as asked, on another sample or at another batch size."""
        return self.pricer.price_one(self.model, sample, self.user_optimizer, self.loss_fn, self.config, batch_size)

    def precision(self) -> Lever:
        name = f"{self.low} autocast"
        cost = (
            "numerics: bf16 activations and matmuls, fp32 weights"
            if self.low == "bf16"
            else "numerics: fp16 needs loss scaling (GradScaler); this card has no bf16"
        )
        if self.config.precision in ("bf16", "fp16"):
            return _not_applicable(name, "precision", cost, f"already {self.config.precision}")
        return self._priced(name, "precision", cost, config=replace(self.config, precision=self.low))

    def checkpointing(self) -> Lever:
        cost = "roughly one extra forward per step"
        return self._variant("activation checkpointing", "checkpointing", cost, enable_checkpointing)

    def optimizer(self) -> list[Lever]:
        """One row per optimizer; the one asked for is the first row's run, not run again."""
        rows = []
        for name, (factory, cost) in _optimizers().items():
            if factory is None:
                rows.append(_not_applicable(name, "optimizer", cost, f"torch {torch.__version__} has no {name}"))
            elif _same_optimizer(factory, self.user_optimizer):
                asked = cost.split(";")[0]  # not "a different optimizer" when it is the one asked
                rows.append(
                    replace(self.baseline, name=name, group="optimizer", cost=asked, detail="the optimizer asked")
                )
            else:
                rows.append(self._priced(name, "optimizer", cost, optimizer=factory))
        return rows

    def frozen(self) -> list[Lever]:
        """A hand-frozen base, and LoRA adapters (peft) on a weightless copy of the model."""
        rows = [self._variant("frozen base", "frozen", "trains the head only: a different fine-tuning", freeze_base)]
        name, cost = f"LoRA r={LORA_RANK} (peft)", "trains adapters only: a different fine-tuning"
        try:
            adapted = with_lora(meta_copy(self.model), LORA_RANK)
        except ValueError as error:
            return [*rows, _not_applicable(name, "frozen", cost, str(error))]
        trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        detail = f"{trained:,} adapter parameters on every linear layer"
        return [*rows, self._priced(name, "frozen", cost, detail, model=adapted)]

    def accumulation(self) -> Lever:
        """The global batch asked, in accumulation steps of a per-device batch that fits."""
        name, cost = (
            "gradient accumulation",
            "more forward/backward passes per optimizer step; same global batch and rate",
        )
        asked, fits = self.pricer.batch_size, self.baseline.fits
        if fits and fits >= asked:
            return _not_applicable(name, "accumulation", cost, "the batch fits")
        if not fits:
            return _not_applicable(name, "accumulation", cost, "not even the smallest batch fits")
        plan = plan_global_batch(fits, 1, asked)
        ran = [t for t in self.baseline.trials if t.batch_size == plan.per_device]
        at = ran[0] if ran else self._one(self.sample, plan.per_device)
        detail = f"{plan.accumulation} steps of {plan.per_device}; the peak column is at {plan.per_device}"
        peak = at.peak_reserved if at.ok else None
        return Lever(name, "accumulation", cost, plan.per_device, peak, None, detail, True, [at])

    def sequence(self) -> Lever:
        """The longest sequence at which the batch asked fits, by halving and then bisecting."""
        name, cost = "shorter sequences", "the model sees shorter contexts: truncate or pack the data"
        full = sequence_length(self.sample)
        if full is None:
            return _not_applicable(name, "sequence", cost, "not a text sample (no 1-D input_ids)")
        if self.baseline.peak_at_batch is not None and self.baseline.peak_at_batch <= self.pricer.budget:
            return _not_applicable(name, "sequence", cost, "the batch fits at full length")
        tried: dict[int, Trial] = {}

        def fits_at(length: int) -> bool:
            trial = self._one(shorten(self.sample, length), self.pricer.batch_size)
            tried[length] = trial
            return self.pricer.within(trial)

        good, bad, length = 0, full, full
        while length > 1 and not good:
            length //= 2
            if fits_at(length):
                good = length
            else:
                bad = length
        if not good:
            return _not_applicable(name, "sequence", cost, "no length fits the batch asked")
        while bad - good > max(1, full // 32):
            middle = (good + bad) // 2
            if fits_at(middle):
                good = middle
            else:
                bad = middle
        detail = f"seq ≤ {good} of {full}; the peak column is at {good}"
        peak = tried[good].peak_reserved
        return Lever(name, "sequence", cost, self.pricer.batch_size, peak, None, detail, True, list(tried.values()))

    def combination(self) -> list[Lever]:
        """Precision and checkpointing together (the two that keep the training task as it is),
        and LoRA with checkpointing (the usual recipe for fine-tuning a large model on one card)."""
        name = f"{self.low} + checkpointing"
        if self.config.precision in ("bf16", "fp16"):
            low = _not_applicable(name, "combination", "both costs", f"already {self.config.precision}")
        else:
            config = replace(self.config, precision=self.low)
            low = self._variant(name, "combination", "both costs", enable_checkpointing, config=config)
        return [low, self._lora_checkpointing()]

    def _lora_checkpointing(self) -> Lever:
        """LoRA adapters on a weightless copy, its repeated blocks checkpointed."""
        name, cost = f"LoRA r={LORA_RANK} + checkpointing", "a different fine-tuning, and one extra forward per step"
        try:
            adapted = with_lora(meta_copy(self.model), LORA_RANK)
            detail, _ = enable_checkpointing(adapted)  # the copy is ours: no undo needed
        except ValueError as error:
            return _not_applicable(name, "combination", cost, str(error))
        return self._priced(name, "combination", cost, detail, model=adapted)


def _not_applicable(name: str, group: str, cost: str, why: str) -> Lever:
    return Lever(name, group, cost, detail=f"does not apply: {why}", applies=False)


def _cards(device: Device | str | None, config: ProbeConfig) -> Callable[[], SimulatedDevice]:
    """Fresh simulated cards to price on, all alike: the one planned for (a name or a size), or
    one the size of `device` (a CUDA GPU's usable memory), which is asked once."""
    if config.capacity_bytes is not None:
        return lambda: resolve_device("simulated", config)  # type: ignore[return-value]
    resolved = device if isinstance(device, Device) else resolve_device(device, config)
    if isinstance(resolved, SimulatedDevice):
        capacity, workspaces, caveat = resolved.capacity, resolved.workspaces, resolved.caveat
        capability = resolved.capability
        return lambda: SimulatedDevice(capacity, workspaces=workspaces, caveat=caveat, capability=capability)
    capacity, name = resolved.capacity, resolved.description.split(" (")[0]
    # A CUDA GPU's compute capability, for its attention kernels' rules.
    cuda = resolved.torch_device.type == "cuda"
    capability = torch.cuda.get_device_capability(resolved.torch_device) if cuda else None
    return lambda: SimulatedDevice(capacity, name=name, capability=capability)


def _same_optimizer(factory: Any, optimizer: Any) -> bool:
    """Whether a row's optimizer is the one asked for (the default is SGD momentum, foreach)."""
    asked = optimizer if optimizer is not None else DEFAULT_SGD
    if not (isinstance(factory, functools.partial) and isinstance(asked, functools.partial)):
        return False
    return factory.func is asked.func and factory.args == asked.args and factory.keywords == asked.keywords


def _describe(config: ProbeConfig, optimizer: Any) -> str:
    """'fp32, AdamW': the precision and the optimizer's class (an instance's, or a partial's)."""
    made = getattr(optimizer, "func", optimizer)
    if optimizer is None:
        label = "SGD momentum (default)"
    elif isinstance(made, torch.optim.Optimizer):
        label = type(made).__name__
    else:
        label = getattr(made, "__name__", "custom optimizer")
    return f"{config.precision or 'fp32'}, {label}"
