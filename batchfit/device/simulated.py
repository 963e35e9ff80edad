"""A GPU simulated on the CPU: fake (or real CPU) tensors, every storage fed to a model of
CUDA's caching allocator, and CUDA's autocast and kernel choices where memory depends on them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfit.device.base import Device, Measurement, named_tensors
from batchfit.device.sim.attention import CudaBuild
from batchfit.device.sim.autocast import CudaAutocastPolicy
from batchfit.device.sim.sdpa import AttentionRouter
from batchfit.device.sim.steps import StepReplay
from batchfit.device.sim.stream import Replay
from batchfit.device.sim.tracker import CudaKernelRouting, MemoryTracker
from batchfit.gpus import HOPPER_WORKSPACES
from batchfit.internals import local_shard
from batchfit.memory import format_size
from batchfit.result import Trial

FREE_RAM = "this machine's free RAM"
"""The name of a simulated card sized by the free RAM (no --memory, --gpu or CUDA GPU)."""


class SimulatedDevice(Device):
    """A GPU of `capacity` bytes, simulated on the CPU by the memory tracker.

    compute='fake' runs on FakeTensorMode (no real memory or arithmetic: the offline
    estimate); compute='real' runs real CPU arithmetic with the capacity enforced, so
    other tools' OOM handling can be compared on a machine without a GPU.
    """

    is_estimate = True
    # Inductor's kernels allocate their buffers outside the dispatcher, where the tracker cannot
    # see them (a compiled MLP's step showed 512 B). This backend runs AOTAutograd's graph as
    # inductor partitions it (what is saved for backward) with eager, visible kernels.
    compile_backend = "aot_eager_decomp_partition"

    def __init__(
        self,
        capacity: int,
        compute: str = "fake",
        name: str | None = None,
        workspaces: tuple[int, ...] = HOPPER_WORKSPACES,
        context_bytes: int | None = None,
        caveat: str | None = None,
        capability: tuple[int, int] | None = None,
    ) -> None:
        if compute not in ("fake", "real"):
            raise ValueError(f"compute={compute!r} is not one of 'fake', 'real'")
        self.capacity = capacity
        self.compute = compute
        self.real_timing = compute == "real"
        self.trains_in_place = compute == "real"
        self.torch_device = torch.device("cpu")
        self.tracker = MemoryTracker(capacity)
        self.workspaces = workspaces
        self.fixed_bytes = sum(workspaces)
        self._workspace_blocks: list[Any] = []
        self._fake_mode: Any = None
        self._mode: Any = None
        self._policy = CudaAutocastPolicy()
        # Attention runs on the SDPA backend CUDA would pick on this card (a Hopper's when unnamed).
        self.capability = capability
        self.attention = AttentionRouter(CudaBuild.installed(capability))
        self._steps = StepReplay()
        label = name or format_size(capacity)
        kind = "estimate, no real compute" if compute == "fake" else "real CPU compute"
        self.description = f"simulated {label} GPU ({kind})"
        if name == FREE_RAM:  # not "simulated this machine's free RAM GPU"
            self.description = f"simulated GPU the size of this machine's free RAM, {format_size(capacity)} ({kind})"
        source = "measured on an H200, torch 2.11" if workspaces == HOPPER_WORKSPACES else "torch's default"
        extra = ["simulated device: memory is an estimate from a model of CUDA's caching allocator"]
        if workspaces:
            extra.append(
                f"fixed memory no tensor shows is added: {format_size(sum(workspaces))} of cuBLAS/cuBLASLt "
                f"workspaces ({source}); cuDNN's per-call workspaces are not modelled"
            )
        if context_bytes:
            extra.append(
                f"capacity is the card's total less {format_size(context_bytes)} of CUDA context, which "
                "lives outside the caching allocator (measured on Hopper cards, CUDA 12)"
            )
        self.caveat = caveat
        self._notes = (*([caveat] if caveat else []), *extra)

    @property
    def notes(self) -> tuple[str, ...]:  # type: ignore[override]
        """The fixed notes, then which attention backends the trials assumed."""
        attention = self.attention.summary()
        if attention and self.capability is None:
            attention += " (the card's compute capability unknown: a Hopper's)"
        return (*self._notes, *([attention] if attention else []))

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        try:
            with self._policy.installed(), self._compute():
                yield
        finally:
            for block in self._workspace_blocks:
                self.tracker.release(block)
            self._workspace_blocks = []
            self.tracker.allocator.empty_cache()

    @contextlib.contextmanager
    def autocast(self, dtype: torch.dtype | None) -> Iterator[None]:
        try:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                yield
        finally:
            self._policy.clear_cache()

    @contextlib.contextmanager
    def _compute(self) -> Iterator[None]:
        if self.compute == "real":
            yield
            return
        self._fake_mode = self._own_mode()
        # FakeTensorMode logs a traceback for every kernel that raises; the probe re-raises
        # real errors itself, naming the batch size, so that log is noise here.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        was_disabled, fake_log.disabled = fake_log.disabled, True
        try:
            yield
        finally:
            self._fake_mode = None
            fake_log.disabled = was_disabled

    def _own_mode(self) -> Any:
        """This card's FakeTensorMode, one for its lifetime: a model built in it is the card's own."""
        if self._mode is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            self._mode = FakeTensorMode(allow_non_fake_inputs=False)
        return self._mode

    def build_mode(self) -> contextlib.AbstractContextManager[Any]:
        """Where to build a model whose tensors live on this card from the start (a model sharded
        by fully_shard, which owns its parameter objects): its fake mode; real compute: nothing."""
        return self._own_mode() if self.compute == "fake" else contextlib.nullcontext()

    def _ours(self, tensor: torch.Tensor) -> bool:
        return self._mode is not None and self._mode.is_our_fake(local_shard(tensor))

    def holds_in_place(self, model: nn.Module) -> bool:
        return self.trains_in_place or any(self._ours(t) for t in named_tensors(model).values())

    @contextlib.contextmanager
    def hold(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        named = named_tensors(model.to(self.torch_device) if self.compute == "real" else model)
        if self._fake_mode is not None:
            # Fake copies stand in for the user's weights, which are never touched; tensors built
            # on this card (build_mode) are its own already and train in place.
            memo: dict[int, torch.Tensor] = {}
            named = {k: t if self._ours(t) else memo.setdefault(id(t), self._fake(t)) for k, t in named.items()}
        for tensor in named.values():
            self.tracker.track(tensor)
        self._steps = StepReplay()  # shown exact per model
        yield named

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        if local_shard(tensor) is not tensor:
            raise ValueError(
                "a model sharded with fully_shard runs on the simulated device only when it was built and "
                "sharded there: use batchfit.estimate_sharded (or device='cpu' for real CPU compute)"
            )
        # Shape, strides and dtype are all a fake tensor needs; the values are never read, so
        # a model built on the meta device (no memory, no init time) works as well as a real one.
        with self._fake_mode:
            fake = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu")
        return fake.requires_grad_(tensor.requires_grad)

    def put(self, tree: Any) -> Any:
        mode = self._fake_mode

        def convert(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if mode is not None and not mode.is_our_fake(t):
                t = self._fake(t)  # a CUDA or meta sample becomes a CPU stand-in like the weights
            elif mode is None and not self.tracker.is_tracked(t):
                t = t.clone()  # the copy `.to("cuda")` makes: it dies with the trial, the user's does not
            self.tracker.track(t)
            return t

        return tree_map(convert, tree)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        self.tracker.reset_peak()
        result = Measurement()
        with contextlib.ExitStack() as stack:
            if self._fake_mode is not None:
                stack.enter_context(self._fake_mode)
            stack.enter_context(self.tracker)
            self.attention.start()
            stack.enter_context(CudaKernelRouting(self.attention))
            retries = self.tracker.allocator.num_alloc_retries
            self.tracker.deferred = None
            try:
                self._hold_workspaces()
                yield result
                self.attention.finish(len(result.step_seconds))
            finally:
                peaks = self.tracker.allocator.peaks()
                result.peak_allocated, result.peak_reserved = peaks.allocated, peaks.reserved
                result.peak_inactive_split, result.largest_alloc = peaks.inactive_split, peaks.largest_request
                result.alloc_retries = peaks.alloc_retries - retries
            deferred, self.tracker.deferred = self.tracker.deferred, None
            if deferred is not None:
                raise deferred

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        # A step that runs out of memory goes on to its end (counting past the capacity) and then
        # raises: every rank joins every collective of the step, whichever ran out.
        self.tracker.deferring = True
        try:
            yield
        finally:
            self.tracker.deferring = False

    def _hold_workspaces(self) -> None:
        # CUDA creates them at the first matmul of the first step, then keeps them: inside a
        # trial, so a card too small even for them runs out of memory like any trial.
        for nbytes in self.workspaces[len(self._workspace_blocks) :]:
            self._workspace_blocks.append(self.tracker.reserve(nbytes))

    @contextlib.contextmanager
    def step(self, index: int) -> Iterator[None]:
        if self.compute != "fake":  # real arithmetic: the steps are timed, so each one runs
            yield
            return
        before = Counter(self.attention.counts)
        with self._steps.recording(self.tracker.allocator, index):
            yield
        self._steps.attention = Counter(self.attention.counts) - before

    def repeat_step(self) -> bool:
        # sim/steps.py: the step's allocator stream again, where a trial of this model showed it
        # exact (never with real compute: `step` records nothing there).
        if not self._steps.repeat(self.tracker.reserve, self.tracker.release):
            return False
        self.attention.counts.update(self._steps.attention)
        return True

    def replaying(self, run: Callable[[int], Trial]) -> Callable[[int], Trial]:
        """`run` (the trials of one model held on this card) with each size that the trials run
        so far show exactly replayed through the allocator model instead (sim/stream.py)."""
        if self.compute != "fake":
            return run
        return functools.partial(Replay().run, allocator=self.tracker.allocator, real=run)

    def empty_cache(self) -> None:
        self.tracker.allocator.empty_cache()

    def allocated(self) -> int:
        return self.tracker.allocated

    def num_ooms(self) -> int:
        return self.tracker.allocator.num_ooms
