"""batchfit: the largest batch that trains safely on a GPU, and the learning rate that goes with it."""

from importlib.metadata import PackageNotFoundError, version

from batchfit.config import ProbeConfig
from batchfit.devices import CudaDevice, Device, SimulatedDevice
from batchfit.lr import LRScaling, scale_lr
from batchfit.memory import format_size, parse_size
from batchfit.probe import CheckResult, DoesNotFitError, find_batch_size, preflight
from batchfit.result import Result, Trial
from batchfit.trial import TrialError

try:
    __version__ = version("batchfit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = (
    "CheckResult",
    "CudaDevice",
    "Device",
    "DoesNotFitError",
    "LRScaling",
    "ProbeConfig",
    "Result",
    "SimulatedDevice",
    "Trial",
    "TrialError",
    "__version__",
    "find_batch_size",
    "format_size",
    "parse_size",
    "preflight",
    "scale_lr",
)
