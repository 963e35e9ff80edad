"""The lever table: what precision, checkpointing, optimizer state, a frozen base, accumulation and
shorter sequences buy, each priced by simulated runs of that variant (issue 13)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import WORKSPACES, card, linear_stack, needs_hf, needs_peft, needs_plot, needs_vision, run_cli
from torch import nn

import batchfit
from batchfit.changes import (
    checkpointing,
    frozen_base,
    meta_copy,
    repeated_blocks,
    sequence_length,
    shorten,
    with_lora,
)
from batchfit.optimizers import OPTIMIZERS


def tiny_gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers as hf

    config = hf.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=256)
    with torch.device("meta"):
        model = hf.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 1000, (256,))
    return model, {"input_ids": ids, "labels": ids.clone()}


def _rows(table: batchfit.LeverTable) -> dict[str, batchfit.Lever]:
    return {lever.name: lever for lever in table.levers}


@pytest.fixture(scope="module")
def gpt2_table():
    model, sample = tiny_gpt2()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    groups = ("precision", "checkpointing", "frozen", "accumulation", "sequence", "combination")
    table = batchfit.levers(model, sample, 64, memory=card(160), groups=groups)  # optimizers: below
    return model, flags, table


@needs_hf
def test_the_orderings_that_must_hold(gpt2_table):
    _, _, table = gpt2_table
    rows = _rows(table)
    asked = rows["as asked"]
    assert asked.peak_at_batch is None and asked.predicted_peak > table.budget_bytes  # 64 does not fit
    assert 1 <= asked.fits < 64
    assert rows["activation checkpointing"].fits > asked.fits
    assert rows["bf16 autocast"].fits > asked.fits
    assert rows["frozen base"].fits > asked.fits
    assert rows["bf16 + checkpointing"].fits >= rows["activation checkpointing"].fits
    # Every number comes from trials of that variant, each within the budget where it says so.
    for lever in table.levers:
        if lever.applies and lever.group not in ("accumulation", "sequence"):
            ran = [t for t in lever.trials if t.ok and t.peak_reserved <= table.budget_bytes]
            assert lever.fits in {t.batch_size for t in ran}, lever.name


@needs_hf
def test_accumulation_and_shorter_sequences_reach_the_batch_asked(gpt2_table):
    _, _, table = gpt2_table
    rows = _rows(table)
    accumulation = rows["gradient accumulation"]
    steps = int(accumulation.detail.split(" steps")[0])
    assert steps * accumulation.fits == 64 and accumulation.fits <= rows["as asked"].fits
    assert accumulation.peak_at_batch <= table.budget_bytes
    shorter = rows["shorter sequences"]
    assert shorter.fits == 64 and shorter.peak_at_batch <= table.budget_bytes
    length = int(shorter.detail.split("≤ ")[1].split(" ")[0])
    assert 1 <= length < 256
    # The length found trains the batch asked; 1/32 of the full length more does not.
    model, sample = tiny_gpt2()
    fits = batchfit.preflight(model, shorten(sample, length), 64, memory=card(160))
    assert fits.fits
    with pytest.raises(batchfit.DoesNotFitError):
        batchfit.preflight(model, shorten(sample, length + 256 // 32 + 1), 64, memory=card(160))


@needs_hf
def test_levers_leave_the_model_as_it_was(gpt2_table):
    model, flags, _ = gpt2_table
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.config.use_cache is True


def test_optimizer_state_orders_on_a_model_of_large_weights():
    """Four Linear(1024, 1024): 16 MiB of weights, 16 KiB of activations a sample. SGD keeps one
    state tensor a weight, AdamW two, so SGD fits more."""
    model = linear_stack(4, 1024)
    table = batchfit.levers(
        model, torch.randn(1024), 4096, optimizer=OPTIMIZERS["adamw"], memory=card(96), groups=("optimizer",)
    )
    rows = _rows(table)
    assert rows["AdamW"].detail == "the optimizer asked" and rows["AdamW"].fits == rows["as asked"].fits
    assert rows["SGD momentum"].fits > rows["AdamW"].fits
    assert rows["AdamW foreach=False"].fits >= rows["AdamW"].fits
    adafactor = rows["Adafactor"]
    assert not adafactor.applies and adafactor.fits is None and "does not apply" in adafactor.detail


def test_levers_that_cannot_apply_say_so():
    model = nn.Linear(64, 64)  # one part: no repeated blocks, no head apart from a base
    table = batchfit.levers(model, torch.randn(64), 8, memory=card(32), precision="bf16")
    rows = _rows(table)
    for name, why in {
        "bf16 autocast": "already bf16",
        "activation checkpointing": "no repeated blocks",
        "frozen base": "no head",
        "gradient accumulation": "the batch fits",
        "shorter sequences": "not a text sample",
        "bf16 + checkpointing": "already bf16",
    }.items():
        assert not rows[name].applies and rows[name].fits is None and why in rows[name].detail, name
        assert why in str(table)


def test_frozen_parameters_keep_no_gradient_or_optimizer_state():
    """L bias-free Linear(d, d), only the last trainable, AdamW: fixed memory is the L weights,
    one gradient and two state tensors, (L + 3)·d²·4 bytes; nothing before the last layer keeps
    a graph, so a sample costs its input, one layer output and the output's gradient: 3·d·4."""
    layers, width = 4, 512
    model = linear_stack(layers, width)
    for param in model[:-1].parameters():
        param.requires_grad_(False)
    result = batchfit.find_batch_size(
        model, torch.randn(width), optimizer=OPTIMIZERS["adamw"], memory="1GiB", max_batch_size=8192
    )
    assert result.fixed_allocated_bytes == pytest.approx((layers + 3) * width * width * 4 + WORKSPACES, rel=0.01)
    assert result.per_sample_allocated_bytes == pytest.approx(3 * width * 4, rel=0.01)


def test_frozen_base_trains_the_head_only_and_restores_flags():
    model = nn.Sequential(linear_stack(3, 32), nn.Linear(32, 4))
    model[0][1].weight.requires_grad_(False)  # the user's own choice survives
    with frozen_base(model) as which:
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.weight", "1.bias"]
        assert which == "only 1 trains: 132 of 3,204 parameters"
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True]


@needs_vision
def test_torchvision_resnet_blocks_are_checkpointed():
    from torchvision.models import resnet18

    assert repeated_blocks(resnet18())[:3] == ["layer1.0", "layer1.1", "layer2.0"]


def test_which_blocks_are_checkpointed():
    assert repeated_blocks(linear_stack(3, 8)) == ["0", "1", "2"]
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []
    model = linear_stack(3, 8)
    with checkpointing(model) as wrapped:
        assert wrapped == "3 blocks: 0-2"
        out = model(torch.randn(2, 8, requires_grad=True))
        assert out.grad_fn is not None
    assert all("forward" not in vars(m) for m in model.modules())


def test_sequence_helpers():
    sample = {"input_ids": torch.arange(10), "labels": torch.arange(10), "flag": torch.tensor(1)}
    assert sequence_length(sample) == 10 and sequence_length(torch.randn(3)) is None
    short = shorten(sample, 4)
    assert short["input_ids"].tolist() == [0, 1, 2, 3] and short["labels"].shape == (4,) and short["flag"] == 1


def test_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        batchfit.levers(nn.Linear(4, 4), torch.randn(4), 0, memory=card(8))
    with pytest.raises(ValueError, match="groups"):
        batchfit.levers(nn.Linear(4, 4), torch.randn(4), 2, memory=card(8), groups=("speed",))
    with pytest.raises(ValueError, match="levers price training"):
        batchfit.levers(nn.Linear(4, 4), torch.randn(4), 2, memory=card(8), mode="eval")


def test_cli_check_prints_the_table_when_it_does_not_fit(tmp_path):
    path = tmp_path / "stack.py"
    path.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(4)])\n"
    )
    args = ["check", "--model", f"{path}:make", "--input-shape", "256", "--memory", f"{card(8)}B", "--batch-size"]
    result = run_cli(*args, "4096")
    assert result.exit_code == 1, result.output
    assert "does not fit" in result.stderr and "activation checkpointing" in result.stderr
    assert "gradient accumulation" in result.stderr and "Traceback" not in result.stderr
    quiet = run_cli(*args, "4096", "--no-levers")
    assert quiet.exit_code == 1 and "activation checkpointing" not in quiet.stderr
    fits = run_cli(*args, "8", "--levers", "--json", "-")
    assert fits.exit_code == 0, fits.stderr
    data = json.loads(fits.stdout)
    levers = data["levers"]["levers"]
    assert data["fits"] and levers[0]["lever"] == "as asked" and levers[0]["fits"] >= 8
    assert {row["lever"] for row in levers} >= {"bf16 autocast", "frozen base", "shorter sequences"}
    assert all({"lever", "fits", "peak_at_batch_bytes", "cost", "applies"} <= row.keys() for row in levers)
    refused = run_cli(*args, "8", "--levers", "--mode", "eval")
    assert refused.exit_code == 2 and "--levers price training" in refused.stderr


@needs_plot
def test_cli_levers_plot(tmp_path):
    path = tmp_path / "stack.py"
    path.write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))\n"
    )
    png = tmp_path / "levers.png"
    result = run_cli(
        "check",
        "--model",
        f"{path}:make",
        "--input-shape",
        "64",
        "--memory",
        f"{card(8)}B",
        "--batch-size",
        "8",
        "--plot",
        str(png),
    )
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_hf
@needs_peft
def test_lora_is_priced_on_a_weightless_copy(gpt2_table):
    model, _, table = gpt2_table
    lora = _rows(table)["LoRA r=8 (peft)"]
    assert lora.applies and lora.fits >= _rows(table)["as asked"].fits
    assert lora.detail.endswith("adapter parameters on every linear layer")
    assert not any("lora" in name for name, _ in model.named_modules())  # the user's model has no adapters


def test_lora_needs_a_hugging_face_model_and_peft(monkeypatch):
    with pytest.raises(ValueError, match="Hugging Face models"):
        with_lora(nn.Linear(4, 4), 8)
    table = batchfit.levers(linear_stack(2, 16), torch.randn(16), 2, memory=card(8), groups=("frozen",))
    assert "Hugging Face models" in _rows(table)["LoRA r=8 (peft)"].detail


def test_meta_copy_keeps_structure_ties_and_flags_not_memory():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied, as a language model's head
    model[1].bias.requires_grad_(False)
    copy = meta_copy(model)
    assert all(p.device.type == "meta" for p in copy.parameters())
    assert copy[1].weight is copy[0].weight and not copy[1].bias.requires_grad
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_zoo_variants_from_the_cli(tmp_path):
    path = tmp_path / "blocks.py"
    path.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    block = lambda: nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))\n"
        "    return nn.Sequential(*[block() for _ in range(6)])\n"
    )
    base = ["estimate", "--model", f"{path}:make", "--input-shape", "256", "--memory", f"{card(64)}B", "--json", "-"]
    plain = json.loads(run_cli(*base).stdout)
    result = run_cli(*base, "--checkpointing")
    assert result.exit_code == 0, result.stderr
    checkpointed = json.loads(result.stdout)
    assert "checkpointed (6 blocks: 0-5)" in checkpointed["model"]
    assert checkpointed["per_sample_allocated_bytes"] < 0.5 * plain["per_sample_allocated_bytes"]
    refused = run_cli(*base, "--lora", "8")
    assert refused.exit_code == 2 and "Hugging Face models" in refused.stderr


def test_levers_leave_a_real_model_and_its_optimizer_bitwise_as_they_were():
    """Every lever is applied to the user's model in place and undone: weights, buffers, gradients,
    requires_grad flags, forwards, training mode and the optimizer's state come back as they were."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(2)])
    model = nn.Sequential(blocks, nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 32)).sum().backward()
    optimizer.step()
    model[0][0][0].bias.requires_grad_(False)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    table = batchfit.levers(model, torch.randn(32), 64, optimizer=optimizer, memory=card(8))
    assert _rows(table)["activation checkpointing"].applies and _rows(table)["frozen base"].applies
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if n in grads)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training and all("forward" not in vars(m) for m in model.modules())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k][n], after[k][n]) for k in saved for n in saved[k])


def test_a_zoo_variant_that_cannot_apply_is_one_line(tmp_path):
    path = tmp_path / "one.py"
    path.write_text("from torch import nn\ndef make():\n    return nn.Linear(16, 4)\n")
    result = run_cli(
        "estimate", "--model", f"{path}:make", "--input-shape", "16", "--memory", "64MiB", "--checkpointing"
    )
    assert result.exit_code == 2 and "no repeated blocks" in result.stderr
    assert "Traceback" not in result.stderr


@needs_hf
@needs_peft
def test_lora_with_checkpointing_is_a_row_of_its_own(gpt2_table):
    """Issue 18 case 10: the usual recipe for a large fine-tune on one card has its row."""
    model, _, table = gpt2_table
    rows = _rows(table)
    both = rows["LoRA r=8 + checkpointing"]
    assert both.applies and both.fits >= rows["LoRA r=8 (peft)"].fits and both.fits > rows["as asked"].fits
    assert both.detail.startswith("4 blocks")
    assert not any("lora" in name for name, _ in model.named_modules())


def test_lora_with_checkpointing_says_why_it_does_not_apply():
    table = batchfit.levers(linear_stack(2, 16), torch.randn(16), 2, memory=card(8), groups=("combination",))
    assert "Hugging Face models" in _rows(table)["LoRA r=8 + checkpointing"].detail


@needs_hf
@needs_peft
def test_lora_warns_nothing_from_other_packages():
    """Issue 18 case 11: peft's read of a deprecated transformers flag printed a FutureWarning."""
    import warnings

    model, _ = tiny_gpt2()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with_lora(meta_copy(model), 8)
    assert not seen, [str(w.message) for w in seen]


@needs_hf
@needs_peft
def test_an_oom_in_a_checkpointed_backward_leaves_nothing_behind():
    """Found pricing LoRA + checkpointing: the autograd engine kept a failed backward (and the
    activations a checkpointed block had recomputed) until the next backward ran, so the trials
    after an OOM peaked 124 MiB high and the row said 3 where 16 fits (oom.release runs one)."""
    from batchfit.changes import enable_checkpointing
    from batchfit.config import ProbeConfig
    from batchfit.device import resolve_device
    from batchfit.session import holding

    model, sample = tiny_gpt2()
    adapted = with_lora(meta_copy(model), 8)
    enable_checkpointing(adapted)
    config = ProbeConfig(memory=card(160))
    device = resolve_device("simulated", config)
    with holding(adapted, sample, device, None, None, config, None) as probe:
        fresh = probe.run(16)
        assert not probe.run(32).ok
        after = probe.run(16)
    assert fresh.ok and after.ok and after.peak_allocated == fresh.peak_allocated


def test_a_model_over_the_budget_before_any_batch_costs_one_trial_a_row(monkeypatch):
    """Weights, gradients and AdamW state of 16 MiB of weights: 64 MiB on a 32 MiB card. A row
    tries the smallest size, which runs out of memory: so would the batch asked (not run)."""
    model, sample = linear_stack(4, 1024), torch.randn(1024)
    priced = batchfit.levers(model, sample, 64, memory=card(32), optimizer=OPTIMIZERS["adamw"], groups=("optimizer",))
    rows = [row for row in priced.levers if row.applies]
    assert [row.fits for row in rows] == [0] * len(rows) and len(rows) >= 3
    assert all([(t.batch_size, t.ok) for t in row.trials] == [(1, False)] for row in rows)
    assert all(row.peak_at_batch is None for row in rows)
    import batchfit.lever.pricing as pricing

    monkeypatch.setattr(pricing, "needs_more_than", lambda *args: False)  # as if the bound were unknown
    halving = batchfit.levers(model, sample, 64, memory=card(32), optimizer=OPTIMIZERS["adamw"], groups=("optimizer",))
    assert [(r.name, r.fits, r.peak_at_batch) for r in halving.levers] == [
        (r.name, r.fits, r.peak_at_batch) for r in priced.levers
    ]
    assert [t.batch_size for t in halving.levers[0].trials] == [64, 32, 16, 8, 4, 2, 1]


def test_a_model_over_the_budget_comes_out_of_its_rows_as_it_went_in():
    """The smallest-first rows (one trial each, out of memory) leave the user's weights, their
    gradients and requires_grad bitwise as they were."""
    model, sample = linear_stack(4, 1024), torch.randn(1024)
    model(sample.unsqueeze(0)).sum().backward()
    model[0].weight.requires_grad_(False)
    before = {n: (p.detach().clone(), p.grad.clone(), p.requires_grad) for n, p in model.named_parameters()}
    batchfit.levers(model, sample, 64, memory=card(32), optimizer=OPTIMIZERS["adamw"], groups=("optimizer",))
    for name, p in model.named_parameters():
        weight, grad, trains = before[name]
        assert torch.equal(p.detach(), weight) and torch.equal(p.grad, grad) and p.requires_grad == trains, name


@needs_hf
def test_no_sequence_length_fits_a_model_over_the_budget_after_one_trial(monkeypatch):
    import transformers as hf

    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=30000, n_positions=256))
    ids = torch.randint(0, 1000, (256,))
    sample = {"input_ids": ids, "labels": ids.clone()}  # 4.2M weights: 67 MiB with AdamW before any batch
    from batchfit.lever.table import prepare

    table = prepare(model, sample, 8, memory=card(48), optimizer=OPTIMIZERS["adamw"])
    table.baseline = batchfit.lever.records.Lever("as asked", "baseline", "", 0, None)
    shortest: list[int] = []
    one = type(table)._one
    monkeypatch.setattr(type(table), "_one", lambda self, s, b: shortest.append(len(s["input_ids"])) or one(self, s, b))
    row = table.sequence()
    assert row.detail == "does not apply: no length fits the batch asked" and shortest == [1]


def test_an_optimizer_whose_step_reads_values_is_found_without_a_trial(monkeypatch):
    from batchfit.lever import pricing
    from batchfit.lever.table import prepare

    factories = {name: factory for name, (factory, _) in pricing.optimizers().items() if factory}
    assert [name for name, f in factories.items() if pricing.reads_values(f)] == ["Adafactor"]
    table = prepare(nn.Linear(64, 64), torch.randn(64), 8, memory=card(32))
    monkeypatch.setattr(pricing.Pricer, "price", lambda *args, **kwargs: pytest.fail("a trial ran"))
    row = table.optimizer("Adafactor")
    assert not row.applies and "its step reads tensor values (.item())" in row.detail
