"""When a batch does not fit: what each lever (precision, checkpointing, optimizer state, frozen
weights, accumulation, shorter sequences) buys, priced by simulated runs of that variant.

Every number in the table comes from trials of the changed model on the simulated device: no
factor is written by hand. Each variant is applied to the user's model for its trials only and
undone in `finally` (training flags, `requires_grad`, checkpointed forwards).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
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
from batchfit.device import Device, SimulatedDevice, timer
from batchfit.lever import pricing
from batchfit.lever.parallel import Helper, Table, Unit, helping
from batchfit.lever.parallel import price as price_rows
from batchfit.lever.pricing import Pricer, cards_for, describe, line_of, optimizers, same_optimizer
from batchfit.lever.records import Lever, LeverTable
from batchfit.lever.sharding import sharding_rows
from batchfit.memory import budget as memory_budget
from batchfit.plan import plan_global_batch
from batchfit.result import Trial
from batchfit.samples import choose
from batchfit.session import collecting_new_objects_only, needs_more_than
from batchfit.trial import TrialError, loss_for

LORA_RANK = 8


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
    hears each row as it is priced, in table order (a caller interrupted midway keeps those).
    `world_sizes` adds rows for FSDP2 over that many GPUs (alone and with checkpointing), batch per GPU.
    Where this machine has two cores the rows are priced in two processes (lever/parallel.py).
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"groups {sorted(unknown)} are not among {', '.join(GROUPS)}")
    table = prepare(
        model, sample, batch_size, optimizer=optimizer, loss_fn=loss_fn, step=step, device=device, config=config,
        **options,
    )  # fmt: skip
    return table.price(groups, on_lever, world_sizes)


def prepare(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    *,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    device: Device | str | None = None,
    config: ProbeConfig | None = None,
    **options: Any,
) -> _Table:
    """The table before any trial (its card, budget and sample): what `levers` prices, and what
    a command holds while its check runs, its helper process forked before (`on_two_cores`)."""
    check_positive_int("batch_size", batch_size)
    config = ProbeConfig.from_options(config, options)
    if config.mode != "train":
        raise ValueError("levers price training; mode= does not apply")
    cards = cards_for(device, config)
    planned = cards()
    pricer = Pricer(cards, memory_budget(planned.capacity, config.margin), batch_size)
    sample = choose(sample, config.scan_items).sample
    return _Table(pricer, planned, model, sample, optimizer, loss_for(loss_fn, step), config)


class _Table(Table):
    """The rows of the lever table, one method per lever group; the first row is the run as asked."""

    def __init__(
        self,
        pricer: Pricer,
        planned: SimulatedDevice,
        model: nn.Module,
        sample: Any,
        optimizer: Any,
        loss_fn: Any,
        config: ProbeConfig,
    ) -> None:
        self.pricer, self.planned, self.model, self.sample = pricer, planned, model, sample
        self.user_optimizer, self.loss_fn, self.config = optimizer, loss_fn, config
        card = config.card
        self.low: Precision = "fp16" if card is not None and not card.bf16 else "bf16"
        self.helper: Helper | None = None

    @contextlib.contextmanager
    def on_two_cores(self, start: bool = False) -> Iterator[None]:
        """This table priced on two cores (`parallel.helping`); `start`: its helper starts now."""
        try:
            with helping(self, GROUPS if start else ()) as self.helper:
                yield
        finally:
            self.helper = None

    def price(
        self,
        groups: tuple[str, ...],
        on_lever: Callable[[Lever], None] | None,
        world_sizes: tuple[int, ...],
        asked: Trial | None = None,
    ) -> LeverTable:
        """The table: its first row, the rows of `groups`, then the sharding rows of `world_sizes`.
        `asked`: the trial at the batch asked, run already on a card like the table's (the check's)."""
        start = timer()
        heard = on_lever or (lambda row: None)
        ran = {asked.batch_size: asked} if asked is not None and asked.batch_size == self.pricer.batch_size else {}
        first = functools.partial(
            self._priced, "as asked", "baseline", describe(self.config, self.user_optimizer), ran=ran
        )
        helping = contextlib.nullcontext() if self.helper is not None else self.on_two_cores()
        with helping, collecting_new_objects_only():
            rows = price_rows(self, groups, first, heard, self.helper)
        if world_sizes:
            for row in sharding_rows(
                self.model, self.sample, self.pricer.batch_size, world_sizes, optimizer=self.user_optimizer,
                loss_fn=self.loss_fn, config=self.config, capacity=self.planned.capacity,
            ):  # fmt: skip
                rows.append(row)
                heard(row)
        return LeverTable(
            batch_size=self.pricer.batch_size,
            capacity_bytes=self.planned.capacity,
            budget_bytes=self.pricer.budget,
            device=self.planned.description,
            levers=rows,
            elapsed_s=timer() - start,
        )

    def units(self, groups: tuple[str, ...]) -> list[Unit]:
        """The rows past the first, one unit each, in table order."""
        made = {
            "precision": [Unit(self.precision)],
            "checkpointing": [Unit(self.checkpointing)],
            "optimizer": [
                Unit(functools.partial(self.optimizer, name), reads_baseline=self._asked(name)) for name in optimizers()
            ],
            "frozen": [Unit(self.frozen), Unit(self.lora)],
            "accumulation": [Unit(self.accumulation, reads_baseline=True)],
            "sequence": [Unit(self.sequence, reads_baseline=True)],
            "combination": [Unit(self.low_checkpointing), Unit(self.lora_checkpointing)],
        }
        return [unit for group in GROUPS if group in groups for unit in made[group]]

    def _priced(
        self, name: str, group: str, cost: str, detail: str = "", ran: dict[int, Trial] | None = None, **change: Any
    ) -> Lever:
        """The row of the run as asked with `change` (model=, optimizer=, config=) made; `ran`:
        its trials run already (the check's, for the first row)."""
        model = change.get("model", self.model)
        optimizer, config = change.get("optimizer", self.user_optimizer), change.get("config", self.config)
        try:
            fits, peak, trials = self.pricer.price(model, self.sample, optimizer, self.loss_fn, config, ran)
        except TrialError as error:
            if group == "baseline":
                raise
            reason = pricing.READS_VALUES if "_local_scalar_dense" in str(error) else str(error)
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

    def _asked(self, name: str) -> bool:
        factory = optimizers()[name][0]
        return factory is not None and same_optimizer(factory, self.user_optimizer)

    def optimizer(self, name: str) -> Lever:
        """The row of one optimizer; the one asked for is the first row's run, not run again."""
        factory, cost = optimizers()[name]
        if factory is None:
            return _not_applicable(name, "optimizer", cost, f"torch {torch.__version__} has no {name}")
        if self._asked(name):
            asked = cost.split(";")[0]  # not "a different optimizer" when it is the one asked
            return replace(self.baseline, name=name, group="optimizer", cost=asked, detail="the optimizer asked")
        if pricing.reads_values(factory):
            why = f"cannot run on the simulated device: {pricing.READS_VALUES}"
            return _not_applicable(name, "optimizer", cost, why)
        return self._priced(name, "optimizer", cost, optimizer=factory)

    def frozen(self) -> Lever:
        """A hand-frozen base."""
        return self._variant("frozen base", "frozen", "trains the head only: a different fine-tuning", freeze_base)

    def lora(self) -> Lever:
        """LoRA adapters (peft) on a weightless copy of the model."""
        name, cost = f"LoRA r={LORA_RANK} (peft)", "trains adapters only: a different fine-tuning"
        try:
            adapted = with_lora(meta_copy(self.model), LORA_RANK)
        except ValueError as error:
            return _not_applicable(name, "frozen", cost, str(error))
        trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        detail = f"{trained:,} adapter parameters on every linear layer"
        return self._priced(name, "frozen", cost, detail, model=adapted)

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
            if length not in tried:
                tried[length] = self._one(shorten(self.sample, length), self.pricer.batch_size)
            return self.pricer.within(tried[length])

        over = needs_more_than(self.model, self.user_optimizer, self.planned, self.pricer.budget)
        if over and not fits_at(1):  # the model alone needs more than the budget: the shortest first
            return _not_applicable(name, "sequence", cost, "no length fits the batch asked")
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

    def low_checkpointing(self) -> Lever:
        """Precision and checkpointing together (the two that keep the training task as it is)."""
        name = f"{self.low} + checkpointing"
        if self.config.precision in ("bf16", "fp16"):
            return _not_applicable(name, "combination", "both costs", f"already {self.config.precision}")
        config = replace(self.config, precision=self.low)
        return self._variant(name, "combination", "both costs", enable_checkpointing, config=config)

    def lora_checkpointing(self) -> Lever:
        """LoRA adapters on a weightless copy, its repeated blocks checkpointed: the usual recipe
        for fine-tuning a large model on one card."""
        name, cost = f"LoRA r={LORA_RANK} + checkpointing", "a different fine-tuning, and one extra forward per step"
        try:
            adapted = with_lora(meta_copy(self.model), LORA_RANK)
            detail, _ = enable_checkpointing(adapted)  # the copy is ours: no undo needed
        except ValueError as error:
            return _not_applicable(name, "combination", cost, str(error))
        return self._priced(name, "combination", cost, detail, model=adapted)


def _not_applicable(name: str, group: str, cost: str, why: str) -> Lever:
    return Lever(name, group, cost, detail=f"does not apply: {why}", applies=False)
