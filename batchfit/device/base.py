"""The interface every card offers the probe: hold a model, build a batch, measure a trial.

The probe asks a device for these and never asks which one it has.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfit.result import Trial


@dataclass
class Measurement:
    """What a device measured over one trial."""

    peak_allocated: int = 0
    peak_reserved: int = 0
    alloc_retries: int = 0
    largest_alloc: int = 0
    """The largest single allocation of the trial (the limit model needs it)."""
    peak_inactive_split: int = 0
    """Peak free bytes inside segments that also hold live blocks (fragmentation)."""
    step_seconds: list[float] = field(default_factory=list)


class Device:
    """A place to run trials. Subclasses fill in the hardware-specific parts."""

    description: str = ""
    capacity: int = 0
    is_estimate: bool = False
    real_timing: bool = True
    trains_in_place: bool = True
    """Whether trials step the user's own tensors (so the probe must copy them to restore)."""
    torch_device: torch.device = torch.device("cpu")
    notes: tuple[str, ...] = ()
    """What the measurements leave out or assume, said beside every result from this device."""
    caveat: str | None = None
    """What the user must hear before the probe starts (e.g. that no GPU was found)."""
    compile_backend: str = "inductor"
    """The torch.compile backend a compiled probe uses here."""
    fixed_bytes: int = 0
    """Memory the device holds beside every trial's tensors (workspaces), where it is known."""

    @property
    def autocast_type(self) -> str:
        return self.torch_device.type

    @contextlib.contextmanager
    def autocast(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Mixed precision for one step, with the casting rules of a CUDA GPU."""
        with torch.autocast(self.autocast_type, dtype=dtype, enabled=dtype is not None):
            yield

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Entered once for a whole probe (allocator caps, fake tensor modes)."""
        yield

    @contextlib.contextmanager
    def hold(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Put `model`'s parameters and buffers on the device; yield them by name."""
        model.to(self.torch_device)
        yield named_tensors(model)

    def holds_in_place(self, model: nn.Module) -> bool:
        """Whether trials train `model`'s own tensors (so a probe must copy them to restore)."""
        return self.trains_in_place

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Around the trials that ranks run in lockstep (sharded models): where the device can,
        a step that runs out of memory still runs to its end, so no rank waits in a collective."""
        yield

    def put(self, tree: Any) -> Any:
        """Move every tensor in `tree` to the device."""
        return tree_map(lambda t: t.to(self.torch_device) if isinstance(t, torch.Tensor) else t, tree)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        raise NotImplementedError

    @contextlib.contextmanager
    def first_step(self, measurement: Measurement) -> Iterator[None]:
        """Around a trial's first step (untimed): where per-allocation watching may cost time."""
        yield

    @contextlib.contextmanager
    def step(self, index: int) -> Iterator[None]:
        """Around step `index` of a trial, run for real: where a device records what a step did."""
        yield

    def repeat_step(self) -> bool:
        """The step just run, once more, where the device gives it exactly without running it (the
        simulated card: its allocator stream again); False: the caller runs it."""
        return False

    def replaying(self, run: Callable[[int], Trial]) -> Callable[[int], Trial]:
        """`run` (the trials of one model held here), or a stand-in that gives some sizes without
        running them where that is exact (the simulated card's replays); a real card runs every one."""
        return run

    def synchronize(self) -> None:
        """Wait for queued work so step times are real."""

    def empty_cache(self) -> None:
        """Hand cached blocks back, so the next trial's peak starts from what is really live."""

    def allocated(self) -> int:
        """Bytes allocated on the device right now."""
        return 0

    def num_ooms(self) -> int:
        """Out-of-memory errors the allocator has raised so far (a running count)."""
        return 0


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


def timer() -> float:
    return time.perf_counter()
