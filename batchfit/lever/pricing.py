"""Pricing one variant: its trials on a fresh simulated card through the search's pricing variant
(`search.price`): down to a batch within the budget, then the variant's memory line refined
inside the bracket of what fits and what does not; the cards priced on, and the optimizer rows."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchfit.config import ProbeConfig
from batchfit.device import Device, SimulatedDevice, resolve_device
from batchfit.memory import MemoryLine, fit_line
from batchfit.optimizers import DEFAULT_SGD, OPTIMIZERS
from batchfit.result import Trial
from batchfit.search import price
from batchfit.session import has_batchnorm, holding, needs_more_than


@dataclass
class Pricer:
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
        ran: dict[int, Trial] | None = None,
    ) -> tuple[int, int | None, list[Trial]]:
        """(largest batch within the budget, peak at the batch asked or None on OOM, the trials).

        The search's pricing variant (`search.price`): from the batch asked down by halves to one
        within the budget, a second point for the variant's memory line, then the line's answer
        verified by a trial and refined (three times at most, to within 1/16). `ran`: trials of
        this variant already run on a card like these (the check's), not run again. A size the
        trials run so far show exactly is replayed, not run (`SimulatedDevice.replaying`); a model
        that needs more than the budget before any batch tries the smallest size first (`over`).
        """
        ran = ran or {}
        smallest = 2 if has_batchnorm(model) else 1
        card = self.card()
        with holding(model, sample, card, optimizer, loss_fn, config, None) as probe:
            # A compiled step recompiles between sizes: every one of its trials is run.
            run = probe.run if config.compile else card.replaying(probe.run)
            over = needs_more_than(model, optimizer, card, self.budget)
            ledger = price(run, self.budget, self.batch_size, smallest, over=over, ran=ran)
        asked = ledger.trials.get(self.batch_size)  # not run where the smallest size ran out of memory
        return ledger.verified(), asked.peak_reserved if asked is not None and asked.ok else None, ledger.order

    def within(self, trial: Trial) -> bool:
        return trial.within(self.budget)


def line_of(trials: list[Trial]) -> MemoryLine | None:
    """The reserved-memory line through the two largest batches that ran."""
    ran = {t.batch_size: t for t in trials if t.ok}
    if len(ran) < 2:
        return None
    top = [ran[b] for b in sorted(ran)[-2:]]
    return fit_line([(t.batch_size, t.peak_reserved) for t in top])


READS_VALUES = "its step reads tensor values (.item()), which the simulated device's fake tensors do not have"


def reads_values(factory: Callable[..., torch.optim.Optimizer]) -> bool:
    """Whether the optimizer's step reads tensor values (Adafactor's `.item()`), which no trial on
    fake tensors can give, whatever the batch: found by one step on a 4 x 4 stand-in, in
    milliseconds, not by trials that run a whole step each before they fail."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        weight = torch.zeros(4, 4, requires_grad=True)
        weight.grad = torch.zeros(4, 4)
        try:
            factory([weight]).step()
        except DataDependentOutputException:
            return True
        except Exception:  # anything else is for the trials to find and report
            return False
    return False


def optimizers() -> dict[str, tuple[Callable[..., torch.optim.Optimizer] | None, str]]:
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


def cards_for(device: Device | str | None, config: ProbeConfig) -> Callable[[], SimulatedDevice]:
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


def same_optimizer(factory: Any, optimizer: Any) -> bool:
    """Whether a row's optimizer is the one asked for (the default is SGD momentum, foreach)."""
    asked = optimizer if optimizer is not None else DEFAULT_SGD
    if not (isinstance(factory, functools.partial) and isinstance(asked, functools.partial)):
        return False
    return factory.func is asked.func and factory.args == asked.args and factory.keywords == asked.keywords


def describe(config: ProbeConfig, optimizer: Any) -> str:
    """'fp32, AdamW': the precision and the optimizer's class (an instance's, or a partial's)."""
    made = getattr(optimizer, "func", optimizer)
    if optimizer is None:
        label = "SGD momentum (default)"
    elif isinstance(made, torch.optim.Optimizer):
        label = type(made).__name__
    else:
        label = getattr(made, "__name__", "custom optimizer")
    return f"{config.precision or 'fp32'}, {label}"
