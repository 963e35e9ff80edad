"""From the per-device batch that fits to a global batch: world size and gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """per_device × world_size × accumulation = global_batch."""

    per_device: int
    world_size: int
    accumulation: int
    global_batch: int


def plan_global_batch(per_device_max: int, world_size: int = 1, target_global_batch: int | None = None) -> BatchPlan:
    """The plan reaching `target_global_batch` exactly with the fewest accumulation steps.

    Without a target: the largest per-device batch, no accumulation. With one: the target
    must split evenly over the ranks; accumulation grows until the per-device share fits.
    """
    if per_device_max < 1 or world_size < 1:
        raise ValueError(f"per_device_max={per_device_max} and world_size={world_size} must be positive")
    if target_global_batch is None:
        return BatchPlan(per_device_max, world_size, 1, per_device_max * world_size)
    if target_global_batch < 1 or target_global_batch % world_size:
        raise ValueError(
            f"target_global_batch={target_global_batch} must be a positive multiple of the world size {world_size}"
        )
    per_rank = target_global_batch // world_size
    accumulation = -(-per_rank // per_device_max)
    while per_rank % accumulation:
        accumulation += 1
    return BatchPlan(per_rank // accumulation, world_size, accumulation, target_global_batch)
