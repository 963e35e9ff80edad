"""The optimizers a probe builds: the defaults, the CLI's named ones, and fresh ones like the user's.

One home for optimizer choices: the CLI's names come from config.OPTIMIZER_NAMES (no torch
import for `--help`), the factories from here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

# The optimizer when none is given: SGD with momentum as in Goyal et al., foreach as CUDA defaults.
DEFAULT_SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, foreach=True)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # The probe's defaults: SGD as in Goyal et al.; AdamW/Adam at common transformer settings.
    "sgd": DEFAULT_SGD,
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01, foreach=True),
    "adam": functools.partial(torch.optim.Adam, lr=1e-3, foreach=True),
}
"""The optimizers the CLI names (config.OPTIMIZER_NAMES)."""


def optimizer_factory(optimizer: Any) -> OptimizerFactory:
    """A factory for fresh optimizers like the user's, over whatever parameters a trial holds.

    A fresh optimizer of the user's class and hyperparameters has the same state memory
    without ever stepping the user's own. CUDA optimizers default to foreach=True and CPU
    ones do not, so foreach is made explicit to keep the simulated device honest.
    """
    if optimizer is None:
        return DEFAULT_SGD
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        accepted = inspect.signature(cls.__init__).parameters
        # `defaults` can hold derived keys the constructor refuses (AdamW's decoupled_weight_decay).
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        if "foreach" in defaults and defaults["foreach"] is None and not defaults.get("fused"):
            defaults["foreach"] = True
        return lambda params: cls(params, **defaults)
    if callable(optimizer):
        return optimizer
    raise ValueError(f"optimizer={optimizer!r} is neither a torch.optim.Optimizer nor a factory params -> optimizer")
