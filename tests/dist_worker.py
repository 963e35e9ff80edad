"""One rank of the distributed tests: probes a simulated device whose size depends on its rank.

Run by tests/test_distributed.py with torchrun's variables set (RANK, WORLD_SIZE, MASTER_*);
prints the agreed result as JSON, or the error's class and message, on its last line.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

import batchfit


def noise() -> int:
    """Least squares with B_simple = (d + 1) + dσ²/|δ|² = 101 (see test_noise.py); per-rank data."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    d, sigma = 10, 3.0
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.ones(1, d) / d**0.5)
    gen = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(200):
        x = torch.randn(32, d, generator=gen)
        batches.append((x, (sigma * torch.randn(32, generator=gen)).unsqueeze(1)))
    result = batchfit.noise_scale(model, batches, nn.MSELoss(), ema=0.99)
    torch.distributed.destroy_process_group()
    assert result.small_batch_size == 32
    print(json.dumps({"rank": rank, "b_simple": result.b_simple, "big": result.big_batch_size}))
    return 0


def main() -> int:
    if sys.argv[1] == "noise":
        return noise()
    rank = int(os.environ["RANK"])
    capacities = [int(c) for c in sys.argv[1].split(",")]
    fail_rank = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    if rank == fail_rank:
        model[2] = nn.Linear(128, 256)  # a shape bug on this rank only
    device = batchfit.SimulatedDevice(capacities[rank] * 2**20, workspaces=())  # cards of a few MiB: no room for them
    try:
        result = batchfit.find_batch_size(
            model,
            torch.randn(256),
            device=device,
            dist_timeout_s=60,
            base_lr=0.1,
            base_batch_size=256,
            target_global_batch=int(os.environ.get("TARGET", "0")) or None,
        )
    except Exception as error:
        print(json.dumps({"rank": rank, "error": type(error).__name__, "message": str(error)}))
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert result.world_size == int(os.environ["WORLD_SIZE"])
    local = min(r["recommended"] for r in result.ranks if r["rank"] == rank)
    print(
        json.dumps(
            {
                "rank": rank,
                "per_device": result.recommended_batch_size,
                "local": local,
                "global": result.global_batch_size,
                "accumulation": result.gradient_accumulation_steps,
                "lr": result.learning_rate,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
