"""batchfit: the largest batch that trains safely on a GPU, and the learning rate that goes with it.

Names load on first use, so `batchfit --help` does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers see the real names; at run time they load on first use
    from batchfit.compiled import CompileError
    from batchfit.config import ProbeConfig
    from batchfit.device import CudaDevice, Device, SimulatedDevice, device_kind
    from batchfit.distributed import DistributedProbeError
    from batchfit.lever import Lever, LeverTable, levers
    from batchfit.limit import predict_limit
    from batchfit.lr import LRScaling, scale_lr
    from batchfit.memory import format_size, parse_size
    from batchfit.noise import NoiseScale, noise_scale
    from batchfit.probe import find_batch_size, preflight
    from batchfit.result import CheckResult, DoesNotFitError, Result, Trial
    from batchfit.trial import TrialError

try:
    __version__ = version("batchfit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"

_EXPORTS = {
    "CheckResult": "batchfit.result",
    "CompileError": "batchfit.compiled",
    "CudaDevice": "batchfit.device",
    "Device": "batchfit.device",
    "DistributedProbeError": "batchfit.distributed",
    "DoesNotFitError": "batchfit.result",
    "LRScaling": "batchfit.lr",
    "Lever": "batchfit.lever",
    "LeverTable": "batchfit.lever",
    "NoiseScale": "batchfit.noise",
    "ProbeConfig": "batchfit.config",
    "Result": "batchfit.result",
    "SimulatedDevice": "batchfit.device",
    "Trial": "batchfit.result",
    "TrialError": "batchfit.trial",
    "device_kind": "batchfit.device",
    "find_batch_size": "batchfit.probe",
    "format_size": "batchfit.memory",
    "levers": "batchfit.lever",
    "noise_scale": "batchfit.noise",
    "parse_size": "batchfit.memory",
    "predict_limit": "batchfit.limit",
    "preflight": "batchfit.probe",
    "scale_lr": "batchfit.lr",
}

__all__ = (
    "CheckResult",
    "CompileError",
    "CudaDevice",
    "Device",
    "DistributedProbeError",
    "DoesNotFitError",
    "LRScaling",
    "Lever",
    "LeverTable",
    "NoiseScale",
    "ProbeConfig",
    "Result",
    "SimulatedDevice",
    "Trial",
    "TrialError",
    "__version__",
    "device_kind",
    "find_batch_size",
    "format_size",
    "levers",
    "noise_scale",
    "parse_size",
    "predict_limit",
    "preflight",
    "scale_lr",
)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'batchfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
