"""Where trials run: a CUDA GPU or the simulated one, behind one interface (base.Device).

cuda.py is the only module that touches torch.cuda and pynvml; sim/ holds the simulated card's
private parts (the tensor tracker, the caching-allocator model, CUDA's autocast policy).
"""

from batchfit.device.base import Device, Measurement, timer
from batchfit.device.cuda import (
    CudaDevice,
    cuda_available,
    cuda_count,
    gpu_name,
    rng_state,
    select_cuda,
    set_rng_state,
)
from batchfit.device.resolve import device_kind, host_available_memory, resolve_device
from batchfit.device.simulated import SimulatedDevice

__all__ = (
    "CudaDevice",
    "Device",
    "Measurement",
    "SimulatedDevice",
    "cuda_available",
    "cuda_count",
    "device_kind",
    "gpu_name",
    "host_available_memory",
    "resolve_device",
    "rng_state",
    "select_cuda",
    "set_rng_state",
    "timer",
)
