"""The simulated device's memory tracker: every tensor storage, fed to the allocator model.

A TorchDispatchMode sees every tensor an operator creates; storages are counted once and
released through `weakref.finalize`, and the model of CUDA's caching allocator
(allocator.py) turns that malloc/free stream into allocated and reserved bytes and OOMs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from batchfit import interrupts
from batchfit.device.sim.allocator import AllocatorOutOfMemory, Block, CachingAllocator
from batchfit.device.watch import run_tracking_new
from batchfit.internals import is_dtensor_op, local_shard, propagation_marked, resizes_followed
from batchfit.memory import format_size

_DEVICE = torch.ops.prim.device.default


def _device(tensor: torch.Tensor) -> torch.device:
    """A tensor's device, as FakeTensor itself answers `prim.device` outside its kernels (its
    `fake_device`), read directly: the same answer 1 s sooner per 7B LoRA + checkpointing trial
    (84,000 calls) than through FakeTensorMode; any other tensor, or a torch without those
    attributes, goes through the dispatch."""
    fake = getattr(tensor, "fake_device", None)
    mode = getattr(tensor, "fake_mode", None)
    if fake is not None and mode is not None and not getattr(mode, "in_kernel_invocation", True):
        return fake
    return _DEVICE(tensor)


class MemoryTracker(TorchDispatchMode):
    """Feed every new tensor storage to a model of the CUDA caching allocator.

    Storages are counted once and freed through `weakref.finalize`; the allocator model
    decides reserved memory and raises a CUDA-worded torch.OutOfMemoryError where a card would.
    A sharded (DTensor) tensor is one rank's memory: its local shard.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.allocator = CachingAllocator(capacity)
        self._live: dict[int, Block | None] = {}
        self._depth = 0
        self._resizes: contextlib.ExitStack | None = None
        self._propagating = [0]
        self.deferring = False
        """Lockstep trials: an allocation past the capacity is recorded, not raised, so the step (and
        its collectives) can finish on every rank; `deferred` holds the error until the trial ends."""
        self.deferred: torch.OutOfMemoryError | None = None

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this dynamo skips every frame while the tracker is active: a compiled model
        # would silently run eager. With it, the tracker is off while dynamo traces and on for
        # the compiled graph's own operators.
        return True

    @property
    def allocated(self) -> int:
        return self.allocator.allocated

    def reserve(self, nbytes: int) -> Block:
        """Allocate bytes no tensor holds (a library's workspace); they stay until `release`."""
        return self._malloc(nbytes)

    def release(self, block: Block) -> None:
        self.allocator.free(block)

    def _malloc(self, nbytes: int) -> Block:
        try:
            return self.allocator.malloc(nbytes)
        except AllocatorOutOfMemory as error:
            oom = torch.OutOfMemoryError(
                # Worded as CUDA's own message, so other tools' OOM checks recognise it too.
                f"CUDA out of memory. Tried to allocate {format_size(error.size)}. Simulated GPU of "
                f"{format_size(error.capacity)}: {format_size(error.allocated)} allocated, "
                f"{format_size(error.reserved)} reserved by the caching allocator"
            )
            if not self.deferring:
                raise oom from None
        # Past the capacity in a lockstep trial: go on as if the card were larger, and say so later.
        self.deferred = self.deferred or oom
        capacity, self.allocator.capacity = self.allocator.capacity, 2**62
        try:
            return self.allocator.malloc(nbytes)
        finally:
            self.allocator.capacity = capacity

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage if it is not counted yet."""
        storage = local_shard(tensor).untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        # CUDA hands out no block for an empty storage.
        self._live[key] = self._malloc(storage.nbytes()) if storage.nbytes() else None
        weakref.finalize(storage, self._free, key)

    def is_tracked(self, tensor: torch.Tensor) -> bool:
        return id(local_shard(tensor).untyped_storage()) in self._live

    def resized(self, storage: torch.UntypedStorage) -> None:
        """Follow `storage.resize_(n)`: its old block is freed and one of the new size allocated."""
        key, nbytes = id(storage), storage.nbytes()
        if key not in self._live:
            if nbytes:
                self._live[key] = self._malloc(nbytes)
                weakref.finalize(storage, self._free, key)
            return
        block, self._live[key] = self._live[key], None  # cleared first: an OOM must not free it twice
        if block is not None:
            self.allocator.free(block)
        if nbytes:
            self._live[key] = self._malloc(nbytes)

    def _free(self, key: int) -> None:
        try:
            block = self._live.pop(key, None)
            if block is not None:
                self.allocator.free(block)
        except KeyboardInterrupt:
            # Python prints and drops what a finalizer raises: raised again by the next operator,
            # or when the tracker is left (batchfit.interrupts).
            interrupts.lost()

    def reset_peak(self) -> None:
        self.allocator.reset_peaks()

    def __enter__(self) -> MemoryTracker:
        if self._depth == 0:
            self._resizes = contextlib.ExitStack()
            self._resizes.enter_context(resizes_followed(self.resized))
            self._resizes.enter_context(propagation_marked(self._propagating))
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._resizes is not None:
                self._resizes.close()
                self._resizes = None
            if exc[0] is None:
                interrupts.check()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # A mode sees an op before its tensor subclasses do. Declining DTensor's ops lets DTensor
        # run them as ops on local shards, which come back here and are counted at shard size.
        if func is _DEVICE:  # tensor.device: asked tens of thousands of times a step, allocates nothing
            return _device(args[0])
        interrupts.check()
        if is_dtensor_op(types):
            return NotImplemented
        if self._propagating[0]:  # DTensor's metadata pass on global-shape stand-ins: no rank's memory
            return func(*args, **(kwargs or {}))
        return run_tracking_new(func, args, kwargs, self.track)


def _fused_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Dropout as CUDA runs it: `native_dropout`, which saves a bool mask for backward.

    CPU's dropout multiplies by a noise tensor of the input's dtype and saves that (2-4x
    the bytes). ATen takes the fused kernel for CUDA tensors with 0 < p < 1 (Dropout.cpp).
    """
    if not training or not 0 < p < 1 or input.numel() == 0:
        return torch.nn.functional.dropout(input, p, training, inplace)
    out = torch.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


class CudaKernelRouting(TorchFunctionMode):
    """Route dropout and attention to the kernels whose memory CUDA would show.

    With `attention` (sdpa.AttentionRouter), each SDPA call runs on the backend CUDA would
    pick and keeps what that backend keeps. Without it, attention dropout is dropped: CPU
    flash refuses dropout, and CUDA's fused kernels keep a Philox seed, not a mask.
    """

    def __init__(self, attention: Callable[..., torch.Tensor] | None = None) -> None:
        super().__init__()
        self.attention = attention

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:
            return _fused_dropout(*args, **kwargs)
        sdpa = func is torch.nn.functional.scaled_dot_product_attention
        # Dynamo traces this mode: a compiled step keeps torch's own choice (and no graph break).
        if sdpa and self.attention is not None and not torch.compiler.is_compiling():
            return self.attention(*args, **kwargs)
        if sdpa:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)
