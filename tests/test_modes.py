"""Evaluation and inference batch sizes: mode='eval' and mode='both' (issue 12, part 1)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import linear_stack, run_cli
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
