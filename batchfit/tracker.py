"""The simulated device's memory tracker: live tensor-storage bytes, peaks and a capacity.

A TorchDispatchMode sees every tensor an operator creates; storages are counted once,
released through `weakref.finalize`, and rounded the way the CUDA caching allocator
rounds them, so the peak lands within a few percent of real CUDA peak allocated memory.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# c10/cuda/CUDACachingAllocator.cpp: every block is a multiple of 512 bytes (kMinBlockSize).
# Requests up to 1 MiB share 2 MiB segments and requests below 10 MiB (kMinLargeAlloc) share
# 20 MiB ones, so both cost about their own size; larger ones get a segment of their own,
# rounded up to 2 MiB (kRoundLarge). Fragmentation and cached free blocks are not modelled.
_BLOCK = 512
_OWN_SEGMENT = 10 * 1024**2
_LARGE_ROUND = 2 * 1024**2


def allocated_size(nbytes: int) -> int:
    """Bytes the CUDA allocator hands out for a request of `nbytes`."""
    return max(_BLOCK, -(-nbytes // _BLOCK) * _BLOCK)


def reserved_size(nbytes: int) -> int:
    """Bytes of segment a request ties up: large blocks in 2 MiB granules."""
    size = allocated_size(nbytes)
    return size if size < _OWN_SEGMENT else -(-size // _LARGE_ROUND) * _LARGE_ROUND


class MemoryTracker(TorchDispatchMode):
    """Count live storage bytes; raise torch.OutOfMemoryError past `capacity` (reserved)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_ooms = 0  # as CUDA's memory_stats()["num_ooms"]
        self._live: dict[int, tuple[int, int]] = {}

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage if it is not counted yet."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        alloc = allocated_size(storage.nbytes())
        reserve = reserved_size(storage.nbytes())
        if self.reserved + reserve > self.capacity:
            self.num_ooms += 1
            raise torch.OutOfMemoryError(
                # Worded as CUDA's own message, so other tools' OOM checks recognise it too.
                f"CUDA out of memory. Tried to allocate {alloc} bytes with {self.reserved} of "
                f"{self.capacity} bytes reserved (simulated device)"
            )
        self._live[key] = (alloc, reserve)
        self.allocated += alloc
        self.reserved += reserve
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        weakref.finalize(storage, self._free, key)

    def is_tracked(self, tensor: torch.Tensor) -> bool:
        return id(tensor.untyped_storage()) in self._live

    def _free(self, key: int) -> None:
        alloc, reserve = self._live.pop(key, (0, 0))
        self.allocated -= alloc
        self.reserved -= reserve

    def reset_peak(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Outputs that alias an input (views, in-place ops) allocate nothing; skipping them also
        # keeps views of tensors made before tracking (a dataset in host memory) off the device.
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and id(item.untyped_storage()) not in inputs:
                self.track(item)
        return out


class CudaKernelRouting(TorchFunctionMode):
    """Route attention to the kernel whose memory CUDA would show.

    CUDA's flash and memory-efficient SDPA kernels keep O(T) state with or without
    dropout (a Philox seed, not a mask). CPU flash refuses dropout, and the math
    fallback keeps O(T²) attention weights, so attention dropout is dropped here:
    memory as on CUDA, at the cost of dropout inside attention in simulated runs.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)
