"""A Lightning callback that probes before fit and sets the batch size and learning rate.

Unlike Lightning's own finder it works under DDP: every rank probes its device and the
ranks agree (batchfit.distributed), and it trains through the module's real `training_step`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfit.probe import find_batch_size
from batchfit.result import Result

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError("batchfit.integrations.lightning needs Lightning: pip install lightning") from error

log = logging.getLogger(__name__)

_PRECISIONS = {"bf16-mixed": "bf16", "16-mixed": "fp16", "bf16": "bf16", "16": "fp16"}
_LR_ATTRS = ("lr", "learning_rate")


class _TrainingStep(nn.Module):
    """Presents `training_step(batch, 0)` as a forward, so the probe trains what fit will train."""

    def __init__(self, module: pl.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> Any:
        out = self.module.training_step(batch, 0)
        return out["loss"] if isinstance(out, Mapping) else out


def _first_optimizer(value: Any) -> torch.optim.Optimizer | None:
    if isinstance(value, torch.optim.Optimizer):
        return value
    if isinstance(value, Mapping):
        return _first_optimizer(value.get("optimizer"))
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_optimizer(item)
            if found is not None:
                return found
    return None


def _owner(trainer: pl.Trainer, module: pl.LightningModule, name: str) -> Any:
    """Where `name` lives: the datamodule, the module, or the module's hparams (as Lightning looks)."""
    for obj in (getattr(trainer, "datamodule", None), module):
        if obj is not None and hasattr(obj, name):
            return obj
    if name in getattr(module, "hparams", {}):
        return module.hparams
    return None


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def _set(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[name] = value
    else:
        setattr(obj, name, value)


class BatchfitCallback(pl.Callback):
    """Probe in `setup("fit")` and set `batch_arg_name` (and the learning rate) on the module.

    The learning rate already on the module (`lr` or `learning_rate`) is taken as right for
    the batch size already there and scaled to the new one, unless `base_lr` is given.
    Options are those of `batchfit.find_batch_size` (e.g. `memory="24GiB"`, `margin=0.2`).
    """

    def __init__(
        self, *, batch_arg_name: str = "batch_size", sample: Any = None, scale_lr: bool = True, **options: Any
    ) -> None:
        super().__init__()
        self.batch_arg_name = batch_arg_name
        self.sample = sample
        self.scale_lr = scale_lr
        self.options = options
        self.result: Result | None = None

    def _sample(self, trainer: pl.Trainer, module: pl.LightningModule) -> Any:
        if self.sample is not None:
            return self.sample
        source = getattr(trainer, "datamodule", None) or module
        try:
            batch = next(iter(source.train_dataloader()))
        except Exception as error:
            raise ValueError(
                "BatchfitCallback could not draw a batch from train_dataloader(); pass sample= "
                f"(one batch element without the batch dimension): {type(error).__name__}: {error}"
            ) from error
        return tree_map(lambda t: t[0] if isinstance(t, torch.Tensor) else t, batch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = _owner(trainer, pl_module, self.batch_arg_name)
        if owner is None:
            raise ValueError(
                f"BatchfitCallback: neither the datamodule nor the module has {self.batch_arg_name!r} "
                "to set; name it with batch_arg_name="
            )
        options = dict(self.options)
        lr_owner, lr_attr = next(
            ((o, a) for a in _LR_ATTRS if (o := _owner(trainer, pl_module, a)) is not None), (None, None)
        )
        if self.scale_lr and lr_attr and "base_lr" not in options:
            options["base_lr"] = float(_get(lr_owner, lr_attr))
            options["base_batch_size"] = int(_get(owner, self.batch_arg_name))
        options.setdefault("precision", _PRECISIONS.get(str(trainer.precision)))
        try:
            optimizer = _first_optimizer(pl_module.configure_optimizers())
        except Exception as error:  # may need trainer state that does not exist before fit
            log.info("configure_optimizers() failed before fit (%s); probing with SGD", error)
            optimizer = None
        sample = (self._sample(trainer, pl_module),)
        with mock.patch.object(pl_module, "log"), mock.patch.object(pl_module, "log_dict"):
            self.result = find_batch_size(_TrainingStep(pl_module), sample, optimizer=optimizer, **options)
        _set(owner, self.batch_arg_name, self.result.recommended_batch_size)
        message = f"batchfit: set {self.batch_arg_name}={self.result.recommended_batch_size}"
        if self.result.learning_rate is not None and lr_attr and self.scale_lr:
            _set(lr_owner, lr_attr, self.result.learning_rate)
            message += f", {lr_attr}={self.result.learning_rate:.6g}"
        log.info("%s (%s)", message, self.result.device)
        pl.utilities.rank_zero_info(message)
