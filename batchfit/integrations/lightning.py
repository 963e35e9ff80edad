"""A Lightning callback that probes before fit and sets the batch size and learning rate.

Unlike Lightning's own finder it works under DDP: every rank probes its device and the
ranks agree (batchfit.distributed), and it trains through the module's real `training_step`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from batchfit.lr import LRScaling, scale_lr
from batchfit.probe import add_evaluation, find_batch_size
from batchfit.result import Result

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError("batchfit.integrations.lightning needs Lightning: pip install lightning") from error

# Lightning's own attribute lookup: module, module.hparams, datamodule, datamodule.hparams.
_parsing = importlib.import_module(f"{pl.__name__}.utilities.parsing")
lightning_getattr, lightning_hasattr, lightning_setattr = (
    _parsing.lightning_getattr,
    _parsing.lightning_hasattr,
    _parsing.lightning_setattr,
)
rank_zero_warn = importlib.import_module(f"{pl.__name__}.utilities.rank_zero").rank_zero_warn

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


class _ValidationStep(nn.Module):
    """Presents `validation_step(batch, 0)` as a forward: what evaluation runs, for its memory."""

    def __init__(self, module: pl.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        out = self.module.validation_step(batch, 0)
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return tensors[0] if tensors else torch.zeros(())  # validation_step may return nothing


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


class BatchfitCallback(pl.Callback):
    """Probe in `setup("fit")` and set `batch_arg_name` (and the learning rate) on the module.

    The size is found and written as Lightning's BatchSizeFinder does it: in the module, the
    datamodule and their hparams (every holder, with Lightning's warning when the module has it
    twice), never larger than the training set, and held at each trial's size while the trial
    runs. `max_trials=0` keeps the size; a search cut short never lowers it without evidence.
    `eval_batch_arg_name=` also sizes `validation_step` (inference mode, the val loader's sample).
    The learning rate already on the module (`lr` or `learning_rate`) is taken as right for the
    global batch it trains at now (batch size × ranks × accumulate_grad_batches) and scaled to the
    new global batch, unless `base_lr` is given.
    Options are those of `batchfit.find_batch_size` (e.g. `memory="24GiB"`, `margin=0.2`).
    """

    def __init__(
        self,
        *,
        batch_arg_name: str = "batch_size",
        eval_batch_arg_name: str | None = None,
        sample: Any = None,
        scale_lr: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        if "mode" in options:  # one callback, one meaning: training_step's size, evaluation's beside it
            raise ValueError(
                "BatchfitCallback sizes training_step: mode= does not apply; eval_batch_arg_name='val_batch_size' "
                "also sizes validation_step (inference mode) and sets that field"
            )
        self.batch_arg_name = batch_arg_name
        self.eval_batch_arg_name = eval_batch_arg_name
        self.sample = sample
        self.scale_lr = scale_lr
        self.options = options
        self.result: Result | None = None
        self.lr_scaling: LRScaling | None = None

    def _sample(
        self, trainer: pl.Trainer, module: pl.LightningModule, loader_name: str = "train_dataloader"
    ) -> tuple[Any, int | None]:
        """One batch element from the loader (or `sample=`), and the dataset's length if known.

        Iterating a DataLoader draws a seed from the global RNG; the caller restores it.
        """
        source = getattr(trainer, "datamodule", None) or module
        try:
            loader = getattr(source, loader_name)()
            dataset = getattr(loader, "dataset", None)
            size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
            if self.sample is not None:
                return self.sample, size
            batch = next(iter(loader))
        except Exception as error:
            if self.sample is not None:
                return self.sample, None
            raise ValueError(
                f"BatchfitCallback could not draw a batch from {loader_name}(); pass sample= "
                f"(one batch element without the batch dimension): {type(error).__name__}: {error}"
            ) from error
        return tree_map(lambda t: t[0] if isinstance(t, torch.Tensor) else t, batch), size

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = self.batch_arg_name
        # As Lightning's own BatchSizeFinder: a size can only be applied to loaders Lightning builds.
        if not trainer.fit_loop._data_source.is_module():
            raise ValueError(
                "BatchfitCallback cannot set the batch size of dataloaders passed directly to trainer.fit(); "
                "build them in the LightningModule's or LightningDataModule's train_dataloader()"
            )
        if not lightning_hasattr(pl_module, name):
            raise ValueError(
                f"BatchfitCallback: {name!r} is in neither the module, the datamodule, nor their hparams; "
                "name the field with batch_arg_name="
            )
        if hasattr(pl_module, name) and name in getattr(pl_module, "hparams", {}):
            rank_zero_warn(
                f"Field `model.{name}` and `model.hparams.{name}` are mutually exclusive! `model.{name}` "
                "will be used as the initial batch size for scaling. If this is not the intended behavior, "
                "please remove either one."
            )
        current = int(lightning_getattr(pl_module, name))
        options = dict(self.options)
        if options.get("max_trials") == 0:  # Lightning's meaning: no search; the size stays
            pl.utilities.rank_zero_info(f"batchfit: max_trials=0, kept {name}={current}")
            return
        lr_attr = next((a for a in _LR_ATTRS if lightning_hasattr(pl_module, a)), None)
        options.setdefault("precision", _PRECISIONS.get(str(trainer.precision)))
        rng = torch.get_rng_state()  # drawing a batch and building the optimizer must not move it
        try:
            try:
                optimizer = _first_optimizer(pl_module.configure_optimizers())
            except Exception as error:  # may need trainer state that does not exist before fit
                log.info("configure_optimizers() failed before fit (%s); probing with SGD", error)
                optimizer = None
            sample, dataset_size = self._sample(trainer, pl_module)
        finally:
            torch.set_rng_state(rng)
        if dataset_size:  # as Lightning: never a batch larger than the data
            options["max_batch_size"] = min(options.get("max_batch_size") or dataset_size, dataset_size)

        def during_trial(batch_size: int) -> None:
            # A module may size things by its batch attribute (Lightning's own tests' models do).
            lightning_setattr(pl_module, name, batch_size)

        try:
            with mock.patch.object(pl_module, "log"), mock.patch.object(pl_module, "log_dict"):
                self.result = find_batch_size(
                    _TrainingStep(pl_module), (sample,), optimizer=optimizer, on_trial_start=during_trial, **options
                )
        finally:
            lightning_setattr(pl_module, name, current)
        answer = self._answer(self.result, current, options)
        if answer != self.result.recommended_batch_size:  # one answer: the callback's and its result's
            kept = (
                f"kept {name}={answer}: the search, cut short by max_trials, did not refute it "
                f"(its own answer was {self.result.recommended_batch_size})"
            )
            self.result = dataclasses.replace(
                self.result, recommended_batch_size=answer, notes=[*self.result.notes, kept]
            )
        lightning_setattr(pl_module, name, answer)  # every holder Lightning would write
        message = f"batchfit: set {name}={answer}"
        new_lr = self.result.learning_rate  # from the user's own base_lr/base_batch_size, if given
        if lr_attr and self.scale_lr and answer != current and "base_lr" not in options:
            # The rate goes with the global batch it trains at (batch × ranks × accumulation), the
            # meaning fit_training_args gives it too, and moves to the new global batch.
            steps = trainer.world_size * trainer.accumulate_grad_batches
            self.lr_scaling = scale_lr(
                float(lightning_getattr(pl_module, lr_attr)),
                current * steps,
                answer * steps,
                rule=options.get("lr_rule", "auto"),
                optimizer=optimizer if optimizer is not None else "sgd",
                noise_scale=options.get("noise_scale"),
            )
            new_lr = self.lr_scaling.learning_rate
        if new_lr is not None and lr_attr and self.scale_lr and answer != current:
            lightning_setattr(pl_module, lr_attr, new_lr)
            message += f", {lr_attr}={new_lr:.6g}"
        if self.eval_batch_arg_name is not None:
            message += self._size_evaluation(trainer, pl_module, {**self.options, "precision": options["precision"]})
        log.info("%s (%s)", message, self.result.device)
        pl.utilities.rank_zero_info(message)

    def _size_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, options: dict[str, Any]) -> str:
        """Size `validation_step` in inference mode and set `eval_batch_arg_name`; the message part.

        `options` are the callback's own (the training probe's, less the training set's size)."""
        name = self.eval_batch_arg_name
        assert name is not None
        if not lightning_hasattr(pl_module, name):
            raise ValueError(
                f"BatchfitCallback: {name!r} (eval_batch_arg_name) is in neither the module nor the datamodule"
            )
        rng = torch.get_rng_state()
        try:
            sample, size = self._sample(trainer, pl_module, "val_dataloader")
        finally:
            torch.set_rng_state(rng)
        if size:  # never a batch larger than the validation set
            options = {**options, "max_batch_size": min(options.get("max_batch_size") or size, size)}
        assert self.result is not None
        with mock.patch.object(pl_module, "log"), mock.patch.object(pl_module, "log_dict"):
            self.result = add_evaluation(self.result, _ValidationStep(pl_module), (sample,), **options)
        lightning_setattr(pl_module, name, self.result.eval_batch_size)
        return f", {name}={self.result.eval_batch_size}"

    @staticmethod
    def _answer(result: Result, current: int, options: dict[str, Any]) -> int:
        """The recommendation, unless a search cut short by max_trials never reached `current`.

        A size is lowered only on evidence: a trial at or below it that failed or broke the budget.
        """
        cut_short = "max_trials" in options and len(result.trials) >= options["max_trials"]
        refuted = any(not t.within(result.budget_bytes) and t.batch_size <= current for t in result.trials)
        if result.recommended_batch_size < current and cut_short and not refuted:
            return current
        return result.recommended_batch_size
