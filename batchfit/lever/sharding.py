"""The sharding rows of the lever table: what FSDP2 over N GPUs buys each GPU, alone and with
activation checkpointing, priced by the offline sharded estimate (batchfit.sharded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from batchfit.changes import repeated_blocks
from batchfit.config import ProbeConfig
from batchfit.lever.records import Lever
from batchfit.result import Result

COST = "N GPUs; each step all-gathers the weights and reduce-scatters the gradients"


def sharding_rows(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    world_sizes: Sequence[int],
    *,
    optimizer: Any,
    loss_fn: Any,
    config: ProbeConfig,
    capacity: int,
) -> list[Lever]:
    """'FSDP over N' and 'FSDP over N + checkpointing' for each N: the per-GPU batch within the
    margin on a card of `capacity` (no rounding) and the peak at `batch_size` per GPU."""
    from batchfit.sharded import estimate_sharded

    # The card as planned, the answer unrounded: a lever row's 'fits' is the largest within the budget.
    planned = replace(config, gpu=None, memory=capacity, rounding="none", max_batch_size=None)
    rows = []
    for world in world_sizes:
        for checkpointing in (False, True):
            name = f"FSDP over {world}" + (" + checkpointing" if checkpointing else "")
            if checkpointing and not repeated_blocks(model):
                rows.append(Lever(name, "sharding", COST, detail="does not apply: no repeated blocks", applies=False))
                continue
            result = estimate_sharded(
                model, sample, [world], optimizer=optimizer, loss_fn=loss_fn, config=planned,
                checkpointing=checkpointing,
            ).results[world]  # fmt: skip
            rows.append(_row(name, result, batch_size, world))
    return rows


def _row(name: str, result: Result, batch_size: int, world: int) -> Lever:
    at = next((t for t in result.trials if t.batch_size == batch_size and t.ok), None)
    predicted = None
    if at is None and result.per_sample_bytes is not None and result.fixed_bytes is not None:
        predicted = round(result.fixed_bytes + result.per_sample_bytes * batch_size)
    detail = f"per GPU; global batch {result.recommended_batch_size * world} at that size"
    return Lever(
        name,
        "sharding",
        COST,
        fits=result.memory_batch_size or result.recommended_batch_size,
        peak_at_batch=at.peak_reserved if at else None,
        predicted_peak=predicted,
        detail=detail,
        trials=result.trials,
    )
