"""Ranks agree over torch.distributed (gloo on CPU): separate processes, different capacities."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(worker_args: list[str], world: int, target: int = 0, timeout: float = 120, worker: Path = WORKER):
    """Start one process per rank with torchrun's variables; return (exit codes, last lines, seconds)."""
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TARGET": str(target),
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), *worker_args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        outputs.append(json.loads(lines[-1]) if lines else {"stderr": err[-2000:]})
    return [p.returncode for p in procs], outputs, time.monotonic() - start


def probe(capacities_mib: list[int], fail_rank: int = -1, target: int = 0):
    """Each rank probes a simulated card of its own capacity."""
    args = [",".join(map(str, capacities_mib)), str(fail_rank)]
    return launch(args, len(capacities_mib), target=target)


def test_every_rank_gets_the_smallest_cards_answer():
    codes, outputs, _ = probe([64, 16, 32])
    assert codes == [0, 0, 0], outputs
    per_device = {o["per_device"] for o in outputs}
    assert len(per_device) == 1
    smallest = next(o for o in outputs if o["rank"] == 1)["local"]
    assert per_device == {smallest}
    assert all(o["local"] >= smallest for o in outputs)
    assert outputs[0]["global"] == smallest * 3
    assert outputs[0]["lr"] == pytest.approx(0.1 * smallest * 3 / 256)  # scaled on the global batch


def test_target_global_batch_sets_accumulation():
    codes, outputs, _ = probe([16, 32], target=65536)
    assert codes == [0, 0], outputs
    o = outputs[0]
    assert o["per_device"] * 2 * o["accumulation"] == 65536 and o["accumulation"] > 1


def test_a_failing_rank_makes_every_rank_fail_quickly():
    codes, outputs, seconds = probe([64, 64, 64], fail_rank=2)
    assert all(code != 0 for code in codes), outputs
    assert all(o.get("error") == "DistributedProbeError" for o in outputs), outputs
    assert all("rank 2" in o["message"] and "batch_size=4" in o["message"] for o in outputs)  # the first size
    assert seconds < 60


def test_noise_scale_uses_the_ranks_as_small_batches():
    codes, outputs, _ = launch(["noise"], world=4)
    assert codes == [0, 0, 0, 0], outputs
    values = {round(o["b_simple"], 6) for o in outputs}
    assert len(values) == 1  # every rank computes the same estimate from the all-reduced norms
    assert outputs[0]["b_simple"] == pytest.approx(101, rel=0.2)
    assert outputs[0]["big"] == 4 * 32
