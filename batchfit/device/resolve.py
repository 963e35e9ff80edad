"""Which device a probe runs on, from what the user passed: the one place this is decided."""

from __future__ import annotations

from batchfit.config import ProbeConfig, check_device_name
from batchfit.device.base import Device
from batchfit.device.cuda import CudaDevice, cuda_available
from batchfit.device.simulated import FREE_RAM, SimulatedDevice
from batchfit.gpus import CUDA_CONTEXT_BYTES, HOPPER_WORKSPACES
from batchfit.memory import format_size


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
            return SimulatedDevice(free, name=FREE_RAM, caveat=caveat)
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
        capability=card.capability if card else None,
    )


def host_available_memory() -> int:
    """RAM this machine can still give, for a probe with nothing else to go on."""
    import psutil

    return int(psutil.virtual_memory().available)
