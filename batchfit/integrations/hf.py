"""Hugging Face Trainer: set per-device batch, accumulation and learning rate from a probe.

Call before building the Trainer (its data loaders are made from these arguments).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfit.probe import add_evaluation, find_batch_size
from batchfit.result import Result

log = logging.getLogger(__name__)

try:
    from transformers import TrainingArguments, default_data_collator
except ImportError as error:
    raise ImportError("batchfit.integrations.hf needs transformers: pip install 'batchfit[hf]'") from error


def _optimizer(args: TrainingArguments) -> Any:
    """The optimizer the Trainer will build, for its state's memory: AdamW unless told SGD."""
    if "sgd" in str(args.optim).lower():
        return functools.partial(torch.optim.SGD, lr=args.learning_rate, foreach=True)
    return functools.partial(
        torch.optim.AdamW,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        foreach=True,
    )


def example_from_dataset(dataset: Any, data_collator: Any = None) -> dict[str, torch.Tensor]:
    """One collated example without the batch dimension, as the probe wants it."""
    batch = (data_collator or default_data_collator)([dataset[0]])
    return tree_map(lambda t: t[0] if isinstance(t, torch.Tensor) else t, dict(batch))


def fit_training_args(
    args: TrainingArguments,
    model: nn.Module,
    sample: Any = None,
    *,
    train_dataset: Any = None,
    data_collator: Any = None,
    target_global_batch: int | None = None,
    scale_lr: bool = False,
    eval_batch: bool = False,
    **options: Any,
) -> Result:
    """Probe `model` and set `per_device_train_batch_size` and `gradient_accumulation_steps` on
    `args` in place, keeping the global batch (per device × accumulation × world size) that
    `args` describes now, or reaching `target_global_batch`.

    The learning rate is left alone unless `scale_lr=True`: then the rate in `args` is taken as
    right for the global batch `args` describes now and scaled to the new global batch (square
    root for AdamW), the same meaning the Lightning callback gives its base batch. `eval_batch=True`
    also sizes evaluation (a forward in inference mode) and sets `per_device_eval_batch_size`.
    Every change is logged and listed in the returned result's notes.
    """
    if sample is None:
        if train_dataset is None:
            raise ValueError("fit_training_args needs sample= (one example) or train_dataset=")
        sample = example_from_dataset(train_dataset, data_collator)
    before = {name: getattr(args, name) for name in _CHANGED}
    current_global = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    examples = len(train_dataset) if hasattr(train_dataset, "__len__") else None
    larger = None
    if target_global_batch is None and examples is not None and current_global > examples:
        # HF's idiom: a large per-device batch and a finder to shrink it (auto_find_batch_size).
        # A global batch beyond the dataset is not one to keep: as large as fits, at most the data.
        larger = (
            f"the global batch args describe ({current_global}) is more than the {examples} examples of "
            f"train_dataset: read as 'as large as fits', at most {examples}, without accumulation"
        )
        log.warning("fit_training_args: %s", larger)
        options.setdefault("max_batch_size", max(1, examples // args.world_size))
    options.setdefault("precision", "bf16" if args.bf16 else "fp16" if args.fp16 else None)
    result = find_batch_size(
        model,
        sample,
        optimizer=_optimizer(args),
        base_lr=args.learning_rate if scale_lr else None,
        base_batch_size=current_global if scale_lr else None,
        target_global_batch=target_global_batch or (None if larger else current_global),
        **options,
    )
    args.per_device_train_batch_size = result.recommended_batch_size
    args.gradient_accumulation_steps = result.gradient_accumulation_steps
    if eval_batch:
        result = add_evaluation(result, model, sample, **options)
        assert result.eval_batch_size is not None
        args.per_device_eval_batch_size = result.eval_batch_size
    if scale_lr and result.learning_rate is not None:
        args.learning_rate = result.learning_rate
    changes = [
        f"{name} {before[name]} -> {getattr(args, name)}" for name in _CHANGED if getattr(args, name) != before[name]
    ]
    said = "fit_training_args: " + ("; ".join(changes) or "nothing changed")
    said += f" (global batch {result.global_batch_size}" + (", learning rate left alone)" if not scale_lr else ")")
    log.info(said)
    return replace(result, notes=[*result.notes, *([larger] if larger else []), said])


_CHANGED = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "per_device_eval_batch_size")
