"""Evaluation and inference batch sizes: mode='eval' and mode='both' (issue 12, part 1)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import card, linear_stack, run_cli
from torch import nn

import batchfit


def test_eval_keeps_no_graph_so_its_batch_is_larger():
    """L bias-free Linear(d, d) layers: training saves every layer's input for backward,
    (L + 2)·d·4 bytes a sample; evaluation holds the batch and one layer's input and output at
    once (from the second layer on), 3·d·4."""
    layers, width = 4, 512
    model = linear_stack(layers, width)
    train = batchfit.find_batch_size(model, torch.randn(width), memory="1GiB", max_batch_size=8192)
    evaluation = batchfit.find_batch_size(model, torch.randn(width), memory="1GiB", max_batch_size=8192, mode="eval")
    assert train.per_sample_allocated_bytes == pytest.approx((layers + 2) * width * 4, rel=0.02)
    assert evaluation.per_sample_allocated_bytes == pytest.approx(3 * width * 4, rel=0.02)
    assert evaluation.mode == "eval" and evaluation.eval_batch_size == evaluation.recommended_batch_size


def test_eval_runs_the_model_in_eval_mode_without_gradients_and_restores_it():
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return self.drop(self.fc(x))

    model = Probe().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batchfit.find_batch_size(model, torch.randn(16), memory="256MiB", mode="eval", device="cpu")
    assert seen and all(not training and inference for training, inference in seen)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_both_sizes_in_one_call():
    model = linear_stack(4, 256)
    result = batchfit.find_batch_size(model, torch.randn(256), memory="512MiB", mode="both", max_batch_size=2**16)
    data = result.to_dict()
    assert result.mode == "both" and result.eval_batch_size > result.recommended_batch_size
    assert data["eval_trials"] and data["eval_batch_size"] == result.eval_batch_size
    assert "evaluation batch size:" in str(result) and "evaluation (forward only)" in str(result)


def test_both_is_built_by_add_evaluation_with_the_training_options():
    """mode='both' and the integrations build "both" in one function, from the training probe's
    own options: the training-only ones (rate, noise scale, global batch, objective) are dropped."""
    from batchfit.probe import add_evaluation

    model, sample = linear_stack(4, 256), torch.randn(256)
    options = {"memory": "512MiB", "max_batch_size": 2**16, "base_lr": 0.1, "base_batch_size": 32}
    options |= {"noise_scale": 500.0, "target_global_batch": 4096}
    both = batchfit.find_batch_size(model, sample, mode="both", **options)
    trained = batchfit.find_batch_size(model, sample, **options)
    added = add_evaluation(trained, model, sample, **options)
    assert added.mode == both.mode == "both" and added.learning_rate == both.learning_rate == trained.learning_rate
    assert added.eval_batch_size == both.eval_batch_size > added.recommended_batch_size
    assert [t.batch_size for t in added.eval_trials] == [t.batch_size for t in both.eval_trials]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mode": "eval", "base_lr": 0.1, "base_batch_size": 256}, "apply to training only"),
        ({"mode": "eval", "objective": "throughput"}, "apply to training only"),
        ({"mode": "eval", "optimizer": torch.optim.SGD}, "optimizer= does not apply"),
        ({"mode": "test"}, "mode='test' is not one of"),
    ],
)
def test_bad_mode_combinations_fail_before_any_trial(options, match):
    with pytest.raises(ValueError, match=match):
        batchfit.find_batch_size(linear_stack(1, 8), torch.randn(8), memory="1GiB", **options)


def test_cli_mode(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch\nfrom torch import nn\ndef mlp():\n    return nn.Linear(64, 8), torch.randn(64)\n")
    both = run_cli("estimate", "--model", f"{path}:mlp", "--memory", "1GiB", "--mode", "both", "--json", "-")
    data = json.loads(both.stdout)
    assert both.exit_code == 0 and data["mode"] == "both" and data["eval_batch_size"] >= data["recommended_batch_size"]
    refused = run_cli(
        "estimate", "--model", f"{path}:mlp", "--memory", "1GiB", "--mode", "eval", "--optimizer", "adamw"
    )
    assert refused.exit_code == 2 and "--optimizer does not apply" in refused.stderr


# The worst input, not the first (issue 12, part 2).
class Tokens(torch.utils.data.Dataset):
    """Sequences of varying length; item 37 is the longest."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.lengths = [8] + [int(x) for x in torch.randint(8, 256, (99,), generator=generator)]
        self.lengths[37] = 512

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int):
        return (torch.randint(0, 100, (self.lengths[index],)),)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(100, 256), nn.Linear(256, 256)

    def forward(self, ids):
        return self.fc(self.embed(ids)).relu().mean(dim=1)


def test_data_is_probed_with_its_largest_item_and_that_answer_trains_every_item():

    data, model = Tokens(), Pooled()
    result = batchfit.find_batch_size(model, data, memory=card(64), rounding="none")
    assert result.sample_index == 37 and "largest of 100 scanned" in result.notes[0]
    first = batchfit.find_batch_size(model, data[0], memory=card(64), rounding="none")
    assert first.recommended_batch_size > result.recommended_batch_size
    longest = data[37]
    assert batchfit.preflight(model, longest, result.recommended_batch_size, memory=card(64)).fits
    with pytest.raises(batchfit.DoesNotFitError):  # the size found on the first, short item
        batchfit.preflight(model, longest, first.recommended_batch_size, memory=card(64))


def test_which_samples_are_data():
    from batchfit.samples import choose, is_collection

    x = torch.randn(4)
    assert not is_collection(x) and not is_collection((x, x)) and not is_collection({"a": x})
    assert not is_collection(((x, x),))  # one argument that is a pair (the Lightning callback's form)
    assert is_collection([(x,), (x,)]) and is_collection([{"a": x}]) and is_collection(Tokens())
    picked = choose([{"a": torch.ones(3)}, {"a": torch.ones(9)}, {"a": torch.ones(5)}], scan_items=2)
    assert picked.index == 1 and "2 scanned of 3" in picked.note
    with pytest.raises(ValueError, match="scan_items=0"):
        batchfit.find_batch_size(linear_stack(1, 8), torch.randn(8), memory="1GiB", scan_items=0)


def test_preflight_in_eval_mode_and_not_both():
    model = linear_stack(4, 512)
    assert batchfit.preflight(model, torch.randn(512), 16384, memory="256MiB", mode="eval").fits
    with pytest.raises(batchfit.DoesNotFitError):  # the same batch, trained, does not fit
        batchfit.preflight(model, torch.randn(512), 16384, memory="256MiB")
    with pytest.raises(ValueError, match="one batch size for one use"):
        batchfit.preflight(model, torch.randn(512), 8, memory="256MiB", mode="both")


def test_an_inputs_target_item_trains_through_step():
    model = nn.Linear(16, 4)
    item = (torch.randn(16), torch.tensor(2))  # a dataset's (inputs, target)
    with pytest.raises(batchfit.TrialError, match="positional argument"):  # forward(x, y): not how it is called
        batchfit.find_batch_size(model, item, memory="256MiB")
    result = batchfit.find_batch_size(
        model, item, memory="256MiB", step=lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])
    )
    assert result.recommended_batch_size > 1
    with pytest.raises(ValueError, match="not both"):
        batchfit.find_batch_size(model, item, memory="256MiB", step=lambda m, b: m(b[0]).sum(), loss_fn=lambda o, b: o)


def test_step_leaves_model_and_optimizer_as_they_were():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer.state.items()}
    grads = [p.grad.clone() for p in model.parameters()]
    batchfit.find_batch_size(
        model,
        (torch.randn(16), torch.tensor(1)),
        optimizer=optimizer,
        memory="256MiB",
        device="cpu",  # real arithmetic: the trials train the user's own tensors, then restore them
        step=lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1]),
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(optimizer.state[k]["momentum_buffer"], v) for k, v in momentum.items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
