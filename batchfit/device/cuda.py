"""A real CUDA GPU: the only module that touches torch.cuda and pynvml.

Capacity is what the driver says is free for this process; the allocator's own statistics
measure each trial.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from batchfit.device.base import Device, Measurement
from batchfit.device.watch import AllocationWatch
from batchfit.memory import format_size
from batchfit.oom import is_oom

log = logging.getLogger(__name__)


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
