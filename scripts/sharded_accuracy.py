"""Per-rank peak of the offline sharded (FSDP2) estimate against torch's own FSDPMemTracker.

    python scripts/sharded_accuracy.py            # tiny GPT-2, world 2 and 8, fp32 and bf16 policy
    python scripts/sharded_accuracy.py --gpt2     # also GPT-2 small at seq 1024, world 8 (slow)

Both count one rank's memory under torch's fake process group on fake tensors, the same
training (two steps of forward, backward and AdamW); batchfit's peak is its caching-allocator
model's allocated bytes (whole blocks, as CUDA counts them) less the card's cuBLAS workspaces,
FSDPMemTracker's the sum of live storages. Prints a Markdown table (docs/accuracy.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from batchfit.device.sim.tracker import CudaKernelRouting
from batchfit.gpus import HOPPER_WORKSPACES
from batchfit.internals import fake_store
from batchfit.sharded import default_shard, estimate_sharded, mixed_precision

MIB = 2**20


def gpt2(n_embd: int, n_layer: int, seq: int):
    import transformers as hf

    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=seq))
    model.loss_type = "ForCausalLM"
    return model


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def reference(factory, sample, world: int, policy, batch: int) -> int:
    """Peak bytes one rank holds by torch's FSDPMemTracker: two steps of forward, backward and
    AdamW on a fresh model from `factory`, sharded as batchfit shards it, in a fake group of
    `world` ranks (tests/test_sharded.py holds the estimate to it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with FakeTensorMode():
            model = factory()
            default_shard(model, mesh, policy)
            optimizer = adamw(list(model.parameters()))
            tracker = FSDPMemTracker(model, optimizer)
            with tracker, CudaKernelRouting():
                ids = torch.zeros(batch, sample["input_ids"].shape[0], dtype=torch.long)  # a fake, as the model's
                data = {"input_ids": ids, "labels": ids.clone()}
                for _ in range(2):
                    tracker.reset_mod_stats()
                    model(**data).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2", action="store_true", help="also GPT-2 small, seq 1024, world 8")
    args = parser.parse_args()
    cases = [("tiny GPT-2 (2 layers, 64 wide, seq 128)", lambda: gpt2(64, 2, 128), 128, (2, 8), (2, 4))]
    if args.gpt2:
        cases.append(("GPT-2 small, seq 1024", lambda: gpt2(768, 12, 1024), 1024, (8,), (1, 2)))
    print("| model | world | FSDP policy | batch | batchfit MiB | FSDPMemTracker MiB | difference |")
    print("|---|---|---|---|---|---|---|")
    for label, factory, seq, worlds, batches in cases:
        ids = torch.arange(seq) % 1000
        sample = {"input_ids": ids, "labels": ids.clone()}
        for world in worlds:
            for precision in ("fp32", "bf16"):
                policy = mixed_precision(precision)
                start = time.perf_counter()
                estimate = estimate_sharded(
                    factory, sample, [world], mp_policy=policy, optimizer=adamw, memory="80GiB",
                    max_batch_size=max(batches),
                )  # fmt: skip
                trials = {t.batch_size: t for t in estimate.results[world].trials}
                for batch in batches:
                    ours = trials[batch].peak_allocated - sum(HOPPER_WORKSPACES)
                    theirs = reference(factory, sample, world, policy, batch)
                    print(
                        f"| {label} | {world} | {precision} | {batch} | {ours / MIB:.2f} | {theirs / MIB:.2f} "
                        f"| {100 * (ours - theirs) / theirs:+.2f}% |",
                        flush=True,
                    )
                print(f"<!-- {label} world {world} {precision}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
