"""Sharded training (FSDP2): the offline per-rank estimate against torch's own FSDPMemTracker."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import WORKSPACES, needs_hf

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import sharded_accuracy

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    needs_hf,
]

SEQ = 128


def tiny_gpt2():
    import transformers as hf

    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=SEQ))
    model.loss_type = "ForCausalLM"
    return model


def text_sample() -> dict[str, torch.Tensor]:
    ids = torch.arange(SEQ) % 1000
    return {"input_ids": ids, "labels": ids.clone()}


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def bf16_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def memtracker_peak(world: int, policy, batch: int) -> int:
    """Peak bytes one rank holds by torch's FSDPMemTracker, two steps of the same training, fake
    group: the reference scripts/sharded_accuracy.py prints against (one copy of it)."""
    return sharded_accuracy.reference(tiny_gpt2, text_sample(), world, policy, batch)


@pytest.mark.parametrize("world", [2, 8])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_per_rank_peak_agrees_with_torchs_fsdp_mem_tracker(world, precision):
    from batchfit.sharded import estimate_sharded

    policy = bf16_policy() if precision == "bf16" else None
    estimate = estimate_sharded(
        tiny_gpt2, text_sample(), [world], mp_policy=policy, optimizer=adamw, memory="4GiB", max_batch_size=4
    )
    compared = 0
    for trial in estimate.results[world].trials:
        if trial.ok and trial.batch_size >= 2:  # at batch 1 the allocator's whole blocks weigh more
            ours = trial.peak_allocated - WORKSPACES  # the card's cuBLAS workspaces: no tensor of the model
            theirs = memtracker_peak(world, policy, trial.batch_size)
            assert ours == pytest.approx(theirs, rel=0.02), (trial.batch_size, ours, theirs)
            compared += 1
    assert compared


def test_sharding_over_more_ranks_holds_less_per_rank_and_plans_the_global_batch():
    from batchfit.sharded import estimate_sharded

    estimate = estimate_sharded(
        tiny_gpt2,
        text_sample(),
        [2, 8],
        optimizer=adamw,
        memory="1GiB",
        base_lr=1e-3,
        base_batch_size=8,
        lr_rule="sqrt",
    )
    two, eight = estimate.results[2], estimate.results[8]
    assert eight.fixed_allocated_bytes < two.fixed_allocated_bytes
    assert eight.recommended_batch_size >= two.recommended_batch_size
    for world, result in estimate.results.items():
        assert result.world_size == world
        assert result.global_batch_size == result.recommended_batch_size * world
        assert result.learning_rate == pytest.approx(
            1e-3 * (result.global_batch_size / 8) ** 0.5
        )  # on the global batch
    assert not dist.is_initialized()  # the fake group is closed after each world size
    text = str(estimate)
    assert "world" in text and "per-GPU batch" in text


def test_the_users_model_is_not_touched_and_bad_input_is_one_line():
    from batchfit.sharded import estimate_sharded

    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_sharded(model, text_sample(), [2], optimizer=adamw, memory="1GiB", max_batch_size=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
    with pytest.raises(ValueError, match="plans for a card"):
        estimate_sharded(model, text_sample(), [2])
    with pytest.raises(ValueError, match="world size"):
        estimate_sharded(model, text_sample(), [0], memory="1GiB")
    with pytest.raises(ValueError, match="compile"):
        estimate_sharded(model, text_sample(), [2], memory="1GiB", compile=True)


def run_ranks(*args: str, world: int = 2, timeout: float = 240):
    from test_distributed import launch

    return launch(list(args), world, timeout=timeout, worker=Path(__file__).with_name("fsdp_worker.py"))


def test_real_gloo_ranks_agree_with_the_offline_estimate():
    from batchfit.sharded import estimate_sharded

    codes, outputs, _ = run_ranks("peak")
    assert codes == [0, 0], outputs
    estimate = estimate_sharded(
        tiny_gpt2, text_sample(), [2], optimizer=adamw, memory="4GiB", max_batch_size=4
    ).results[2]
    fake = next(t for t in estimate.trials if t.batch_size == 4).peak_allocated - WORKSPACES
    for out in outputs:
        assert out["peak_allocated"] == pytest.approx(fake, rel=0.02), (out, fake)
        assert out["bitwise"] and out["group_works"]


def test_ranks_on_unequal_cards_probe_in_lockstep_and_the_model_trains_on_as_before():
    codes, outputs, _ = run_ranks("lockstep", "400,1500")
    assert codes == [0, 0], outputs
    assert outputs[0]["sizes"] == outputs[1]["sizes"]  # the same trials on every rank
    assert len(outputs[0]["sizes"]) >= 2
    assert outputs[0]["answer"] == outputs[1]["answer"] >= 1
    assert all(o["bitwise"] and o["group_works"] for o in outputs)


def test_a_real_oom_on_one_rank_ends_every_rank_within_the_timeout():
    codes, outputs, _ = run_ranks("oom", "4000,4000")
    assert codes == [0, 0], outputs  # the worker reports the error as JSON
    assert all(o.get("error") == "DistributedProbeError" for o in outputs), outputs
    assert all("batch_size=4" in o["message"] for o in outputs), outputs
    assert all(o["seconds"] < 15 + 30 for o in outputs), outputs  # dist_timeout_s bounds the wait
    assert all(o["bitwise"] and o["group_works"] for o in outputs), outputs


def test_dtensors_metadata_pass_on_global_shapes_is_no_ranks_memory():
    """DTensor works out output metadata on global-shape stand-ins in the first step (cached after):
    counted, batch 1 read 123 MiB against 88 at batch 2 on this model of large weights."""
    from torch import nn

    from batchfit.sharded import estimate_sharded

    def wide():
        return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])

    estimate = estimate_sharded(wide, torch.randn(1024), [8], optimizer=adamw, memory="8GiB", max_batch_size=8)
    peaks = [t.peak_allocated for t in sorted(estimate.results[8].trials, key=lambda t: t.batch_size)]
    assert len(peaks) >= 2
    assert all(a <= b * 1.001 for a, b in itertools.pairwise(peaks)), peaks  # the first trial is not inflated


def test_unsupported_sharding_is_refused_in_one_line():
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    import batchfit
    from batchfit.internals import fake_store

    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=4)
    try:
        hsdp = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        fully_shard(hsdp, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
        with pytest.raises(ValueError, match="2-D device mesh"):
            batchfit.find_batch_size(hsdp, torch.randn(8), memory="1GiB")
        flat = nn.Sequential(nn.Linear(8, 8))
        fully_shard(flat, mesh=init_device_mesh("cpu", (4,)))
        with pytest.raises(ValueError, match="compile"):
            batchfit.find_batch_size(flat, torch.randn(8), memory="1GiB", compile=True)
    finally:
        dist.destroy_process_group()
    # FSDP1 needs an accelerator to wrap; an instance made without its __init__ stands for one.
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapped = nn.Sequential(nn.Linear(8, 8), wrapper)
    fully_shard_marker = nn.Sequential(nn.Linear(8, 8))
    from batchfit.config import ProbeConfig
    from batchfit.sharded import refuse_unsupported

    with pytest.raises(ValueError, match="FSDP1"):
        refuse_unsupported(wrapped, ProbeConfig())
    refuse_unsupported(fully_shard_marker, ProbeConfig())  # an unsharded model passes


def test_cli_estimates_each_world_size_in_processes_side_by_side(tmp_path):
    """A fresh `batchfit` process forks one worker per world size; the answers are those of the
    same estimate run one world after another in this process (which has run backward: no fork)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import module_file, run_cli

    from batchfit.sharded import estimate_sharded

    path = module_file(
        tmp_path,
        "mlp",
        "import torch\nfrom torch import nn\n\n"
        "def mlp():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)]), torch.randn(512)\n",
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    command = [sys.executable, "-m", "batchfit", "estimate", "--model", f"{path}:mlp", "--memory", "1GiB",
               "--fsdp", "2,8", "--optimizer", "adamw", "--json", "-"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)["fsdp"]["world_sizes"]
    assert set(data) == {"2", "8"} and data["8"]["world_size"] == 8
    assert "rank 0 of 8" in done.stderr  # progress names the world it belongs to

    from torch import nn

    from batchfit.optimizers import OPTIMIZERS

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    here = estimate_sharded(model, torch.randn(512), [2, 8], optimizer=OPTIMIZERS["adamw"], memory="1GiB")
    for world, result in here.results.items():
        theirs = data[str(world)]
        assert theirs["recommended_batch_size"] == result.recommended_batch_size
        assert [t["peak_allocated_bytes"] for t in theirs["trials"]] == [t.peak_allocated for t in result.trials]
    bad = run_cli("estimate", "--model", f"{path}:mlp", "--memory", "1GiB", "--fsdp", "2,x")
    assert bad.exit_code == 2 and "list of GPU counts" in bad.output


def test_the_lever_table_prices_sharding_where_weights_dominate():
    from torch import nn

    import batchfit

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    table = batchfit.levers(
        model, torch.randn(1024), 4096, optimizer=adamw, memory="200MiB", groups=(), world_sizes=(8,)
    )
    asked, sharded, both = table.levers
    assert (sharded.name, both.name) == ("FSDP over 8", "FSDP over 8 + checkpointing")
    assert sharded.fits > asked.fits  # weights, gradients and AdamW state split eight ways
    assert all(t.ok and t.peak_reserved <= table.budget_bytes for t in sharded.trials if t.batch_size == sharded.fits)


def test_the_estimate_matches_the_h200s_sharded_trials():
    """The recorded H200 run (world 2 over gloo, each rank capped at half the card): the offline
    estimate's per-rank peak allocated at the same batch sizes within 2%."""
    import json

    from batchfit.models import build
    from batchfit.optimizers import OPTIMIZERS
    from batchfit.sharded import estimate_sharded

    trace = json.loads((Path(__file__).parent / "data/calibration/h200_fsdp_gpt2_seq1024_adamw.json").read_text())
    rank0 = trace["ranks"]["fsdp_rank0_world2"]["result"]
    real = {t["batch_size"]: t["peak_allocated_bytes"] for t in rank0["trials"] if t["status"] == "fitted"}
    spec = build("gpt2", seq_len=1024, on_meta=True)
    estimate = estimate_sharded(
        spec.model, spec.sample, [2], optimizer=OPTIMIZERS["adamw"], memory=rank0["capacity_bytes"],
        max_batch_size=4,
    ).results[2]  # fmt: skip
    compared = [t for t in estimate.trials if t.ok and t.batch_size in real]
    assert compared
    for trial in compared:
        assert trial.peak_allocated == pytest.approx(real[trial.batch_size], rel=0.02), trial.batch_size
