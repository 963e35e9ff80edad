"""Hugging Face Trainer: set per-device batch, accumulation and learning rate from a probe.

Call before building the Trainer (its data loaders are made from these arguments).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfit.probe import find_batch_size
from batchfit.result import Result

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
    **options: Any,
) -> Result:
    """Probe `model` and set `per_device_train_batch_size`, `gradient_accumulation_steps` and
    `learning_rate` on `args` in place. The learning rate in `args` is taken as right for the
    global batch `args` describes now, and scaled (square root for AdamW) to the new one."""
    if sample is None:
        if train_dataset is None:
            raise ValueError("fit_training_args needs sample= (one example) or train_dataset=")
        sample = example_from_dataset(train_dataset, data_collator)
    current_global = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    options.setdefault("precision", "bf16" if args.bf16 else "fp16" if args.fp16 else None)
    result = find_batch_size(
        model,
        sample,
        optimizer=_optimizer(args),
        base_lr=args.learning_rate,
        base_batch_size=current_global,
        target_global_batch=target_global_batch,
        **options,
    )
    args.per_device_train_batch_size = result.recommended_batch_size
    args.gradient_accumulation_steps = result.gradient_accumulation_steps
    if result.learning_rate is not None:
        args.learning_rate = result.learning_rate
    return result
