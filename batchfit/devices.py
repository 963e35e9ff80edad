"""Where trials run: a CUDA GPU or the simulated device, behind one interface.

This is the only module that touches torch.cuda, pynvml and psutil. The probe asks a
device to hold the model, build a batch and measure a trial; it never asks which one it has.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfit.autocast import CudaAutocastPolicy
from batchfit.config import ProbeConfig, check_device_name
from batchfit.gpus import CUDA_CONTEXT_BYTES, HOPPER_WORKSPACES
from batchfit.memory import format_size
from batchfit.oom import is_oom
from batchfit.tracker import AllocationWatch, CudaKernelRouting, MemoryTracker

log = logging.getLogger(__name__)


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
        yield _named_tensors(model)

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


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


class CudaDevice(Device):
    """A real CUDA GPU; capacity is what the driver says is free for this process."""

    def __init__(self, index: int | None = None, memory: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
        self.torch_device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        free, total = torch.cuda.mem_get_info(self.torch_device)
        # Our own cached-but-unused blocks count as free for the probe.
        cached = torch.cuda.memory_reserved(self.torch_device) - torch.cuda.memory_allocated(self.torch_device)
        available = free + cached + torch.cuda.memory_allocated(self.torch_device)
        self.total = total
        self.cap = memory
        self.capacity = min(available, memory) if memory else available
        name = gpu_name(self.torch_device.index if self.torch_device.index is not None else 0)
        capped = f", capped at {format_size(memory)}" if memory else ""
        self.description = (
            f"{name} ({self.torch_device}, {format_size(total)} total, {format_size(available)} usable{capped})"
        )

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        if not self.cap:
            yield
            return
        before = torch.cuda.get_per_process_memory_fraction(self.torch_device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap / self.total), self.torch_device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(before, self.torch_device)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.torch_device)
        before = torch.cuda.memory_stats(self.torch_device).get("num_alloc_retries", 0)
        result = Measurement()
        try:
            yield result
        finally:
            self.synchronize()
            stats = torch.cuda.memory_stats(self.torch_device)
            result.peak_allocated = stats.get("allocated_bytes.all.peak", 0)
            result.peak_reserved = stats.get("reserved_bytes.all.peak", 0)
            result.peak_inactive_split = stats.get("inactive_split_bytes.all.peak", 0)
            result.alloc_retries = stats.get("num_alloc_retries", 0) - before

    @contextlib.contextmanager
    def first_step(self, measurement: Measurement) -> Iterator[None]:
        # The allocator's statistics have no largest request; watch the step's new storages.
        watch = AllocationWatch()
        try:
            with watch:
                yield
        finally:
            measurement.largest_alloc = max(measurement.largest_alloc, watch.largest)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def empty_cache(self) -> None:
        try:
            torch.cuda.empty_cache()
        except RuntimeError as error:
            # Handing cached blocks back can itself fail with an OOM (the driver needs memory to
            # unmap; Lightning has seen it too). Nothing was freed then, and that is all: the next
            # trial measures from what is live. Anything else is a real failure.
            if not is_oom(error):
                raise
            log.info("empty_cache() ran out of memory; the cache stays as it is")

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.torch_device)

    def num_ooms(self) -> int:
        return int(torch.cuda.memory_stats(self.torch_device).get("num_ooms", 0))


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
        self._workspace_blocks: list[Any] = []
        self._fake_mode: Any = None
        self._policy = CudaAutocastPolicy()
        label = name or format_size(capacity)
        kind = "estimate, no real compute" if compute == "fake" else "real CPU compute"
        self.description = f"simulated {label} GPU ({kind})"
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
        self.notes = (*([caveat] if caveat else []), *extra)

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
        from torch._subclasses.fake_tensor import FakeTensorMode

        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
        # FakeTensorMode logs a traceback for every kernel that raises; the probe re-raises
        # real errors itself, naming the batch size, so that log is noise here.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        was_disabled, fake_log.disabled = fake_log.disabled, True
        try:
            yield
        finally:
            self._fake_mode = None
            fake_log.disabled = was_disabled

    @contextlib.contextmanager
    def hold(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        named = _named_tensors(model.to(self.torch_device) if self.compute == "real" else model)
        if self._fake_mode is not None:
            # Fake copies stand in for the user's weights, which are never touched.
            memo: dict[int, torch.Tensor] = {}
            named = {k: memo.setdefault(id(t), self._fake(t)) for k, t in named.items()}
        for tensor in named.values():
            self.tracker.track(tensor)
        yield named

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
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
            stack.enter_context(CudaKernelRouting())
            retries = self.tracker.allocator.num_alloc_retries
            try:
                self._hold_workspaces()
                yield result
            finally:
                allocator = self.tracker.allocator
                result.peak_allocated = allocator.peak_allocated
                result.peak_reserved = allocator.peak_reserved
                result.peak_inactive_split = allocator.peak_inactive_split
                result.largest_alloc = allocator.largest_request
                result.alloc_retries = allocator.num_alloc_retries - retries

    def _hold_workspaces(self) -> None:
        # CUDA creates them at the first matmul of the first step, then keeps them: inside a
        # trial, so a card too small even for them runs out of memory like any trial.
        for nbytes in self.workspaces[len(self._workspace_blocks) :]:
            self._workspace_blocks.append(self.tracker.reserve(nbytes))

    def empty_cache(self) -> None:
        self.tracker.allocator.empty_cache()

    def allocated(self) -> int:
        return self.tracker.allocated

    def num_ooms(self) -> int:
        return self.tracker.allocator.num_ooms


def device_kind(device: str | None) -> str:
    """'cuda', 'simulated' or 'cpu': where a probe asked for `device` would run, without starting it.

    None means the CUDA GPU when torch sees one, else the simulated device. Asking for CUDA
    where there is none is a ValueError, before any model is built.
    """
    if device is None:
        return "cuda" if cuda_available() else "simulated"
    check_device_name(device)
    if device.startswith("cuda"):
        if not cuda_available():
            raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA GPU")
        return "cuda"
    return device


def resolve_device(device: Device | str | None, config: ProbeConfig) -> Device:
    """The Device a probe runs on, from what the user passed; the one place this is decided.

    None picks the current CUDA GPU when there is one, else the simulated device, sized by
    `config.memory` or `config.gpu`, or by this machine's free RAM when neither is given.
    'cuda[:N]' is a real GPU (capped at the planned capacity), 'simulated' the offline
    estimate, 'cpu' the simulated device with real CPU arithmetic.
    """
    if isinstance(device, Device):
        return device
    capacity, card = config.capacity_bytes, config.card
    kind = device_kind(device)
    if kind == "cuda":
        return CudaDevice(int(device.split(":", 1)[1]) if device and ":" in device else None, capacity)
    if capacity is None:
        if device is None:
            free = host_available_memory()
            caveat = (
                f"no CUDA GPU here: simulating a GPU the size of this machine's free RAM ({format_size(free)}); "
                "use --gpu NAME or --memory SIZE (gpu=, memory=) to plan for a GPU"
            )
            return SimulatedDevice(free, name="this machine's free RAM", caveat=caveat)
        raise ValueError(
            f"device={device!r} needs a capacity: pass memory='24GiB' or gpu='A10G' (no CUDA GPU to measure)"
        )
    return SimulatedDevice(
        capacity,
        compute="fake" if kind == "simulated" else "real",
        name=card.name if card else None,
        # Without a card named, Hopper's workspaces: the largest default, so never optimistic.
        workspaces=card.workspaces if card else HOPPER_WORKSPACES,
        context_bytes=CUDA_CONTEXT_BYTES if card else None,
    )


def gpu_name(index: int) -> str:
    """The card's name from NVML (matched by UUID: CUDA_VISIBLE_DEVICES renumbers), else torch's."""
    try:
        import pynvml

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            name = pynvml.nvmlDeviceGetName(handle)
            return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing, NVML unreachable, or an AMD card: torch still knows the name.
        return torch.cuda.get_device_name(index)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def host_available_memory() -> int:
    """RAM this machine can still give, for a probe with nothing else to go on."""
    import psutil

    return int(psutil.virtual_memory().available)


def timer() -> float:
    return time.perf_counter()


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """CPU and (if initialised) CUDA generator states: a probe must not advance the user's RNG."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def select_cuda(index: int) -> None:
    """Pin this process to one GPU (a rank under torchrun)."""
    torch.cuda.set_device(index)


def cuda_count() -> int:
    return max(1, torch.cuda.device_count())
