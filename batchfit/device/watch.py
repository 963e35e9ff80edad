"""Watching a step's new tensor storages as operators create them: both cards use it.

The CUDA card watches for its largest single allocation (the allocator's statistics have no
such figure); the simulated card feeds each new storage to its allocator model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
    inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    out = func(*args, **(kwargs or {}))
    for item in tree_flatten(out)[0]:
        if isinstance(item, torch.Tensor) and id(item.untyped_storage()) not in inputs:
            on_new(item)
    return out
