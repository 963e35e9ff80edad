"""Sharded training (FSDP2) on a real card, beside the offline estimate: gpu_check.py --fsdp.

Two measurements, each with the estimate for the same world size and capacity:
  world 1  this process, the card itself (nccl; gloo with --smoke on CPU): find_batch_size on a
           GPT-2 sharded with fully_shard, its per-rank memory line and answer;
  world 2  two processes over gloo sharing the card, each capped at half of it: the lockstep probe
           (both ranks run the same sizes), its answer and line. gloo on CUDA tensors may refuse
           FSDP's collectives on some builds; the error is then recorded, not hidden.
Writes fsdp_check.json (per-rank Result.to_dict(): the trials as tests/data/calibration holds them).

    python scripts/fsdp_check.py --out $OUT            # on a GPU machine (called by gpu_check.py --fsdp)
    python scripts/fsdp_check.py --smoke --out /tmp/f  # the same script on CPU, a tiny GPT-2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import batchfit  # noqa: E402
from batchfit.optimizers import OPTIMIZERS  # noqa: E402
from batchfit.sharded import default_shard, estimate_sharded  # noqa: E402

MIB = 2**20


def model_and_sample(smoke: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    import transformers as hf

    seq = 128 if smoke else 1024
    config = hf.GPT2Config(n_positions=seq, **({"n_layer": 2, "n_embd": 64, "n_head": 4} if smoke else {}))
    torch.manual_seed(0)
    model = hf.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    ids = torch.arange(seq) % 1000
    return model, {"input_ids": ids, "labels": ids.clone()}


def line(result: Any) -> dict[str, Any]:
    return {
        "answer": result.recommended_batch_size,
        "predicted_limit": result.predicted_limit,
        "per_sample_alloc_mib": (result.per_sample_allocated_bytes or 0) / MIB,
        "fixed_alloc_mib": (result.fixed_allocated_bytes or 0) / MIB,
        "trials": [t.batch_size for t in result.trials],
    }


def rank_main(smoke: bool, capacity: int, out: Path) -> None:
    """One rank: shard, probe (lockstep when world > 1), write its result."""
    cuda = torch.cuda.is_available() and not smoke
    backend = "nccl" if cuda and int(os.environ["WORLD_SIZE"]) == 1 else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    model, sample = model_and_sample(smoke)
    if cuda:
        model = model.cuda()
    default_shard(model, mesh, None)
    device: Any = "cuda" if cuda else batchfit.SimulatedDevice(capacity, compute="real", workspaces=())
    start = time.perf_counter()
    result = batchfit.find_batch_size(
        model, sample, optimizer=OPTIMIZERS["adamw"], device=device, memory=capacity if cuda else None,
        dist_timeout_s=120,
    )  # fmt: skip
    row = {"rank": dist.get_rank(), "seconds": time.perf_counter() - start, **line(result)}
    (out / f"fsdp_rank{dist.get_rank()}_world{dist.get_world_size()}.json").write_text(
        json.dumps({"row": row, "result": result.to_dict()}, indent=2, default=str) + "\n"
    )
    dist.destroy_process_group()


def launch(world: int, smoke: bool, capacity: int, out: Path, timeout: float) -> list[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        args = [sys.executable, __file__, "--rank", "--capacity", str(capacity), "--out", str(out)]
        procs.append(subprocess.Popen(args + (["--smoke"] if smoke else []), env=env))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(-9)
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="/tmp/fsdp_check")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rank:
        rank_main(args.smoke, args.capacity, out)
        return
    card = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() and not args.smoke else 3 * 2**30
    model, sample = model_and_sample(args.smoke)
    rows: list[dict[str, Any]] = []
    deadline = time.perf_counter() + args.budget_s
    for world in (1, 2):
        capacity = card // world  # two ranks share the card: each plans with half of it
        if time.perf_counter() > deadline:
            rows.append({"world": world, "skipped": "time budget"})
            continue
        codes = launch(world, args.smoke, capacity, out, timeout=max(30.0, deadline - time.perf_counter()))
        real = [json.loads(p.read_text())["row"] for p in sorted(out.glob(f"fsdp_rank*_world{world}.json"))]
        estimate = estimate_sharded(model, sample, [world], optimizer=OPTIMIZERS["adamw"], memory=capacity)
        rows.append({"world": world, "exit_codes": codes, "real": real, "estimate": line(estimate.results[world])})
        (out / "fsdp_check.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"\ntorch {torch.__version__}; FSDP2 GPT-2, AdamW, card {card / MIB:.0f} MiB")
    print("| world | rank | answer | est answer | per sample MiB | est per sample | fixed MiB | est fixed | trials |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        est = row.get("estimate", {})
        for r in row.get("real", []) or [{"rank": "-"}]:
            print(
                f"| {row['world']} | {r['rank']} | {r.get('answer', '-')} | {est.get('answer', '-')} | "
                f"{r.get('per_sample_alloc_mib', 0):.1f} | {est.get('per_sample_alloc_mib', 0):.1f} | "
                f"{r.get('fixed_alloc_mib', 0):.1f} | {est.get('fixed_alloc_mib', 0):.1f} | {r.get('trials', '-')} |"
            )
        if row.get("exit_codes") and any(row["exit_codes"]):
            print(f"  world {row['world']}: exit codes {row['exit_codes']} (see the ranks' stderr above)")


if __name__ == "__main__":
    main()
