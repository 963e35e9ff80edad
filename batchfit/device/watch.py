"""Watching a step's new tensor storages as operators create them: both cards use it.

The CUDA card watches for its largest single allocation (the allocator's statistics have no
such figure); the simulated card feeds each new storage to its allocator model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchfit.memory import round_size


class AllocationWatch(TorchDispatchMode):
    """The largest single allocation while active: what the limit model needs from a real GPU.

    The caching allocator's statistics have no such figure; a huge request (GPT-2's fp32
    logits) can fail while gigabytes lie free in smaller holes, so predict_limit uses it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return run_tracking_new(func, args, kwargs, self._see)

    def _see(self, tensor: torch.Tensor) -> None:
        self.largest = max(self.largest, round_size(tensor.untyped_storage().nbytes()))


def run_tracking_new(func: Any, args: Any, kwargs: Any, on_new: Any) -> Any:
    """Run `func`, calling `on_new` on each output whose storage is new.

    Outputs that alias an input (views, in-place ops) allocate nothing; skipping them also
    keeps views of tensors made before tracking (a dataset in host memory) off the device.
    """
    found: list[torch.Tensor] = []
    _tensors(args, found)
    if kwargs:
        _tensors(kwargs.values(), found)
    inputs = {id(t.untyped_storage()) for t in found}
    out = func(*args, **(kwargs or {}))
    found.clear()
    _tensors((out,), found)
    for item in found:
        if id(item.untyped_storage()) not in inputs:
            on_new(item)
    return out


def _tensors(items: Any, found: list[torch.Tensor]) -> None:
    """The tensors in an operator's arguments or results (tensors, and lists and tuples of them,
    as ATen's schemas have them): torch's generic tree_flatten cost 16% of a simulated trial."""
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            _tensors(item, found)
