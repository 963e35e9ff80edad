"""batchfit: the largest batch that trains safely on a GPU, and the learning rate that goes with it.

Names load on first use, so `batchfit --help` does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("batchfit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"

_EXPORTS = {
    "CheckResult": "batchfit.probe",
    "CudaDevice": "batchfit.devices",
    "Device": "batchfit.devices",
    "DoesNotFitError": "batchfit.probe",
    "LRScaling": "batchfit.lr",
    "NoiseScale": "batchfit.noise",
    "ProbeConfig": "batchfit.config",
    "Result": "batchfit.result",
    "SimulatedDevice": "batchfit.devices",
    "Trial": "batchfit.result",
    "TrialError": "batchfit.trial",
    "find_batch_size": "batchfit.probe",
    "format_size": "batchfit.memory",
    "noise_scale": "batchfit.noise",
    "parse_size": "batchfit.memory",
    "predict_limit": "batchfit.limit",
    "preflight": "batchfit.probe",
    "scale_lr": "batchfit.lr",
}

__all__ = ("__version__", *sorted(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'batchfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
