"""When a batch does not fit: what each lever (precision, checkpointing, optimizer state, frozen
weights, accumulation, shorter sequences) buys, priced by simulated runs of that variant.

Every number in the table comes from trials of the changed model on the simulated device: no
factor is written by hand. Each variant is applied to the user's model for its trials only and
undone in `finally` (training flags, `requires_grad`, checkpointed forwards).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from batchfit import devices
from batchfit.config import Precision, ProbeConfig, check_positive_int
from batchfit.devices import Device, SimulatedDevice
from batchfit.memory import MemoryLine, fit_line, format_size
from batchfit.memory import budget as memory_budget
from batchfit.models import OPTIMIZERS
from batchfit.plan import plan_global_batch
from batchfit.probe import has_batchnorm, holding
from batchfit.result import Trial
from batchfit.samples import choose
from batchfit.trial import DEFAULT_SGD, TrialError, loss_for

REFINE_TRIES = 3
PRECISION = 16
LORA_RANK = 8
GROWTH = 8


@dataclass(frozen=True)
class Lever:
    """One row: a change to the training run, and what it buys at the batch asked."""

    name: str
    group: str
    cost: str
    fits: int | None = None
    """Largest batch within the margin with this lever (by its memory line, verified by a trial)."""
    peak_at_batch: int | None = None
    """Peak reserved bytes at the batch asked; None when it ran out of memory there."""
    predicted_peak: int | None = None
    """When the batch asked ran out of memory: its peak by the variant's memory line."""
    detail: str = ""
    applies: bool = True
    """False: the lever does not apply to this model; `detail` says why and no number is given."""
    trials: list[Trial] = field(default_factory=list)

    def reaches(self, batch_size: int) -> bool:
        """Whether the lever trains the batch asked (accumulation: as a global batch)."""
        return self.applies and ((self.fits or 0) >= batch_size or self.group == "accumulation")

    def to_dict(self) -> dict[str, Any]:
        return {
            "lever": self.name,
            "group": self.group,
            "applies": self.applies,
            "fits": self.fits,
            "peak_at_batch_bytes": self.peak_at_batch,
            "predicted_peak_bytes": self.predicted_peak,
            "cost": self.cost,
            "detail": self.detail,
            "trials": [t.to_dict() for t in self.trials],
        }


@dataclass(frozen=True)
class LeverTable:
    """The levers priced for one model and batch size on one (simulated) card."""

    batch_size: int
    capacity_bytes: int
    budget_bytes: int
    device: str
    levers: list[Lever]
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "capacity_bytes": self.capacity_bytes,
            "budget_bytes": self.budget_bytes,
            "device": self.device,
            "levers": [lever.to_dict() for lever in self.levers],
            "elapsed_s": self.elapsed_s,
        }

    def __str__(self) -> str:
        lines = [
            f"levers for batch {self.batch_size} on {self.device} "
            f"(budget {format_size(self.budget_bytes)} of {format_size(self.capacity_bytes)}):",
            f"  {'lever':<30} {'fits':>6} {f'peak at {self.batch_size}':>16}  cost",
        ]
        for lever in self.levers:
            if not lever.applies:
                lines.append(f"  {lever.name:<30} {'-':>6} {'-':>16}  {lever.detail}")
                continue
            peak = format_size(lever.peak_at_batch) if lever.peak_at_batch is not None else "OOM"
            if lever.peak_at_batch is None and lever.predicted_peak:
                peak = f"OOM ~{format_size(lever.predicted_peak)}"
            if lever.peak_at_batch is not None and lever.peak_at_batch > self.budget_bytes:
                peak += "!"
            detail = f" [{lever.detail}]" if lever.detail else ""
            lines.append(f"  {lever.name:<30} {lever.fits or 0:>6} {peak:>16}  {lever.cost}{detail}")
        lines.append(
            "  (fits: largest batch within the margin; '!': over the budget at the batch asked; "
            "'OOM ~': out of memory, peak by the lever's memory line)"
        )
        lines.append(f"elapsed: {self.elapsed_s:.1f} s")
        return "\n".join(lines)


# ---- the variants: each changes the model or the options for its trials, and undoes it ----------


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of the outermost containers that repeat one block type
    (torchvision's `layerN`, a `ModuleList` of transformer layers): what checkpointing wraps."""
    found: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        kids = list(module.named_children())
        container = isinstance(module, (nn.Sequential, nn.ModuleList)) and len(kids) >= 2
        if container and len({type(k) for _, k in kids}) == 1 and any(True for _ in kids[0][1].parameters()):
            found.extend(f"{path}{name}" for name, _ in kids)
            return
        for name, child in kids:
            visit(child, f"{path}{name}.")

    visit(model, "")
    return found


def _checkpointed_forward(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`block`'s forward under non-reentrant checkpointing.

    The recompute runs in backward, after the trial's functional_call has put the module's own
    tensors back; on the simulated device those are not the stand-ins the trial trains. So the
    tensors in place now are captured and put in place again for the recompute.
    """
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils.checkpoint import checkpoint

    tensors = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    # Torch function modes active now (the simulated device's kernel routing) are not active
    # where autograd recomputes; without them attention took another kernel on recompute.
    modes = _get_current_function_mode_stack()

    def run(*inner: Any, **inner_kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            active = {id(mode) for mode in _get_current_function_mode_stack()}
            for mode in modes:
                if id(mode) not in active:
                    stack.enter_context(mode)
            stack.enter_context(_reparametrize_module(block, tensors))
            return forward(*inner, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module) -> tuple[str, Callable[[], None]]:
    """Checkpoint each repeated block of `model`: what was wrapped, and how to undo it.

    A block's forward is replaced on the instance (parameter names unchanged). Hugging Face
    models are done the same way, on the same per-layer blocks their own switch checkpoints
    (docs/design.md says why not through it). Raises ValueError when no block repeats.
    """
    names = repeated_blocks(model)
    if not names:
        raise ValueError("no repeated blocks (a Sequential or ModuleList of one block type) to checkpoint")
    blocks = [model.get_submodule(n) for n in names]
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)  # type: ignore[method-assign]
    # A key/value cache is written in forward, and again on recompute; transformers turns it off
    # under its own checkpointing, and so does this (an OOM inside a block also left it alive).
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False  # type: ignore[union-attr]

    def undo() -> None:
        for block in blocks:
            del block.forward
        if cached:
            config.use_cache = cached  # type: ignore[union-attr]

    return f"{len(names)} blocks: {_span(names)}", undo


Change = Callable[[nn.Module], tuple[str, Callable[[], None]]]
"""A lever applied to a model in place: what it did, and how to undo it (ValueError: cannot apply)."""


@contextlib.contextmanager
def applied(model: nn.Module, change: Change) -> Iterator[str]:
    """`change` applied to `model` while inside; yields what it did."""
    detail, undo = change(model)
    try:
        yield detail
    finally:
        undo()


def checkpointing(model: nn.Module) -> contextlib.AbstractContextManager[str]:
    """Activation checkpointing while inside; yields which blocks."""
    return applied(model, enable_checkpointing)


def frozen_base(model: nn.Module) -> contextlib.AbstractContextManager[str]:
    """Only the head trains while inside: the rest has requires_grad=False (restored after)."""
    return applied(model, freeze_base)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose weights are on the meta device: its structure without its memory."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    """`model` with LoRA adapters of `rank` on every linear layer (peft): only they train.

    peft changes the model it wraps; pass a copy to keep the original.
    """
    if not hasattr(model, "config"):
        raise ValueError("LoRA through peft applies to Hugging Face models here (target_modules='all-linear')")
    try:
        import peft
    except ImportError as error:
        raise ValueError("LoRA needs peft: pip install 'batchfit[lora]'") from error
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear"))


def _span(names: list[str]) -> str:
    """'layer1.0-2, layer2.0-3' for layer1.0, layer1.1, layer1.2, layer2.0, ..."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, dot, last = name.rpartition(".")
        groups.setdefault(parent + dot, []).append(last)
    return ", ".join(f"{p}{v[0]}-{v[-1]}" if len(v) > 1 else f"{p}{v[0]}" for p, v in groups.items())


def head_only(model: nn.Module) -> tuple[str, set[int], int, int]:
    """A hand-frozen base: the last top-level child that has parameters (the head), the ids of
    its parameters (a tied head shares its embedding's), and (trained, total) parameter counts."""
    params = list(model.parameters())
    heads = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    if len(heads) < 2:
        raise ValueError("no head to train apart from a base (the model has one top-level part with parameters)")
    name, head = heads[-1]
    trained = {id(p) for p in head.parameters()}
    count = sum(p.numel() for p in params if id(p) in trained)
    return name, trained, count, sum(p.numel() for p in params)


def freeze_base(model: nn.Module) -> tuple[str, Callable[[], None]]:
    """Freeze all but the head (requires_grad=False): what trains, and how to undo it."""
    name, trained, count, total = head_only(model)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(id(param) in trained)

    def undo() -> None:
        for param, flag in zip(params, was, strict=True):
            param.requires_grad_(flag)

    return f"only {name} trains: {count:,} of {total:,} parameters", undo


def shorten(sample: Any, length: int) -> Any:
    """A text sample cut to `length` tokens: every tensor whose first dimension is the sequence."""
    seq = sequence_length(sample)
    return {
        k: v[:length] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == seq else v
        for k, v in sample.items()
    }


def sequence_length(sample: Any) -> int | None:
    """The length of a text sample (a mapping with 1-D `input_ids`), else None."""
    if not isinstance(sample, Mapping):
        return None
    ids = sample.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] < 2:
        return None
    return int(ids.shape[0])


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


# ---- pricing --------------------------------------------------------------------------------


@dataclass
class _Pricer:
    """Runs a variant's trials on a fresh simulated card of the planned capacity."""

    card: Callable[[], Device]
    """A fresh simulated card for each variant, as each probe gets its own."""
    budget: int
    batch_size: int

    def price_one(
        self, model: nn.Module, sample: Any, optimizer: Any, loss_fn: Any, config: ProbeConfig, batch_size: int
    ) -> Trial:
        """One trial of the variant at `batch_size`."""
        with holding(model, sample, self.card(), optimizer, loss_fn, config, None) as probe:
            return probe.run(batch_size)

    def price(
        self,
        model: nn.Module,
        sample: Any,
        optimizer: Any,
        loss_fn: Any,
        config: ProbeConfig,
    ) -> tuple[int, int | None, list[Trial]]:
        """(largest batch within the budget, peak at the batch asked or None on OOM, the trials).

        From the batch asked down by halves to one within the budget, a second point for the
        variant's memory line, then the line's answer verified by a trial and refined (three times
        at most, to within 1/16).
        """
        trials: list[Trial] = []
        smallest = 2 if has_batchnorm(model) else 1
        with holding(model, sample, self.card(), optimizer, loss_fn, config, None) as probe:

            def run(b: int) -> Trial:
                trials.append(probe.run(b))
                return trials[-1]

            asked = run(self.batch_size)
            peak = asked.peak_reserved if asked.ok else None
            size = self.batch_size
            # Down by halves to a batch within the budget (when the asked one is not).
            while not self.within(trials[-1]) and size > smallest:
                size = max(smallest, size // 2)
                run(size)
            if not self.within(trials[-1]):
                return 0, peak, trials
            # A second point for the memory line.
            ran = [t for t in trials if t.ok]
            if len({t.batch_size for t in ran}) < 2:
                other = max(smallest, size // 2) if size > smallest else size * 2
                run(other)
            for _ in range(REFINE_TRIES):
                guess = self._next(trials)
                if guess is None:
                    break
                run(guess)
        return self._best(trials), peak, trials

    def within(self, trial: Trial) -> bool:
        return trial.ok and trial.peak_reserved <= self.budget

    def _next(self, trials: list[Trial]) -> int | None:
        """The next batch to try: where the memory line through the trials nearest the limit meets
        the budget, inside the bracket of the largest batch within it and the smallest beyond it;
        None once that bracket is within 1/PRECISION of the answer."""
        best = self._best(trials)
        beyond = [t for t in trials if t.batch_size > best]
        ceiling = min((t.batch_size for t in beyond), default=None)
        if ceiling is not None and ceiling - best <= max(1, best // PRECISION):
            return None
        ran = {t.batch_size: t for t in trials if t.ok}
        above = [b for b in sorted(ran) if b > best]
        below = [b for b in sorted(ran) if b < best]
        partner = above[0] if above else below[-1] if below else None
        if partner is None:
            return None
        line = fit_line([(b, ran[b].peak_reserved) for b in (best, partner)])
        # A flat line (a tiny model, whole 2 MiB blocks) predicts no end: grow by GROWTH at most.
        guess = min(line.max_batch(self.budget), GROWTH * best)
        if ceiling is not None:
            guess = min(guess, ceiling - 1)
        return None if guess <= best or any(t.batch_size == guess for t in trials) else guess

    def _best(self, trials: list[Trial]) -> int:
        return max((t.batch_size for t in trials if self.within(t)), default=0)


def _line(trials: list[Trial]) -> MemoryLine | None:
    """The reserved-memory line through the two largest batches that ran."""
    ran = {t.batch_size: t for t in trials if t.ok}
    if len(ran) < 2:
        return None
    top = [ran[b] for b in sorted(ran)[-2:]]
    return fit_line([(t.batch_size, t.peak_reserved) for t in top])


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
    **options: Any,
) -> LeverTable:
    """Price each lever for training `model` at `batch_size`, on a simulated card.

    The card is `config.gpu` / `config.memory`, or the capacity of `device` (a CUDA GPU's
    usable memory). Each row comes from trials of that variant: the largest batch within the
    margin (by its memory line, verified by a trial) and the peak at `batch_size`. The first
    row is the run as asked; `groups` picks the levers (all of GROUPS by default).
    """
    check_positive_int("batch_size", batch_size)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"groups {sorted(unknown)} are not among {', '.join(GROUPS)}")
    config = ProbeConfig.from_options(config, options)
    if config.mode != "train":
        raise ValueError("levers price training; mode= does not apply")
    start = devices.timer()
    cards = _cards(device, config)
    planned = cards()
    budget = memory_budget(planned.capacity, config.margin)
    table = _Table(
        _Pricer(cards, budget, batch_size),
        model,
        choose(sample, config.scan_items).sample,
        optimizer,
        loss_for(loss_fn, step),
        config,
    )
    rows = [table.baseline]
    for group in GROUPS:
        if group in groups:
            made = getattr(table, group)()
            rows.extend(made if isinstance(made, list) else [made])
    return LeverTable(
        batch_size=batch_size,
        capacity_bytes=planned.capacity,
        budget_bytes=budget,
        device=planned.description,
        levers=rows,
        elapsed_s=devices.timer() - start,
    )


class _Table:
    """The rows of the lever table, one method per lever group; the first row is the run as asked."""

    def __init__(
        self, pricer: _Pricer, model: nn.Module, sample: Any, optimizer: Any, loss_fn: Any, config: ProbeConfig
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
            line = _line(trials)
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
                rows.append(
                    replace(self.baseline, name=name, group="optimizer", cost=cost, detail="the optimizer asked")
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

    def combination(self) -> Lever:
        """Precision and checkpointing together: the two that keep the training task as it is."""
        name = f"{self.low} + checkpointing"
        if self.config.precision in ("bf16", "fp16"):
            return _not_applicable(name, "combination", "both costs", f"already {self.config.precision}")
        config = replace(self.config, precision=self.low)
        return self._variant(name, "combination", "both costs", enable_checkpointing, config=config)


def _not_applicable(name: str, group: str, cost: str, why: str) -> Lever:
    return Lever(name, group, cost, detail=f"does not apply: {why}", applies=False)


def _cards(device: Device | str | None, config: ProbeConfig) -> Callable[[], SimulatedDevice]:
    """Fresh simulated cards to price on, all alike: the one planned for (a name or a size), or
    one the size of `device` (a CUDA GPU's usable memory), which is asked once."""
    if config.capacity_bytes is not None:
        return lambda: devices.resolve_device("simulated", config)  # type: ignore[return-value]
    resolved = device if isinstance(device, Device) else devices.resolve_device(device, config)
    if isinstance(resolved, SimulatedDevice):
        capacity, workspaces, caveat = resolved.capacity, resolved.workspaces, resolved.caveat
        return lambda: SimulatedDevice(capacity, workspaces=workspaces, caveat=caveat)
    capacity, name = resolved.capacity, resolved.description.split(" (")[0]
    return lambda: SimulatedDevice(capacity, name=name)


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
