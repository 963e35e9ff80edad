"""Compiled models: compile=True / --compile (issue 12, part 3).

These compile for real (dynamo + AOTAutograd on CPU, a second or two per probe); no GPU needed.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import card, module_file, run_cli
from torch import nn

import batchfit
from batchfit.compiled import CompileError


def conv_net() -> nn.Module:
    """Conv + BatchNorm + ReLU: the partitioner recomputes BN/ReLU outputs instead of saving them."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16 * 16, 10),
    )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_compiled_probe_on_real_cpu_compute_beside_eager():
    """Trials at several sizes reuse one graph (batch dimension dynamic), the compiled model's
    memory is measured (it differs from eager's), and the user's model stays uncompiled."""
    model = conv_net()
    before = _state(model)
    sample = torch.randn(3, 16, 16)
    eager = batchfit.find_batch_size(model, sample, device="cpu", memory=card(64))
    compiled = batchfit.find_batch_size(model, sample, device="cpu", memory=card(64), compile=True)

    sizes = {t.batch_size for t in compiled.trials}
    assert len(sizes) >= 3
    info = compiled.compiled
    assert info is not None and info["compilations"] >= 1
    assert info["recompiles"] <= 2 and compiled.trials[0].batch_size == 4
    assert eager.compiled is None
    # Eager saves every BatchNorm and ReLU output; the compiled graph recomputes some of them.
    assert compiled.per_sample_allocated_bytes < 0.95 * eager.per_sample_allocated_bytes
    assert compiled.recommended_batch_size >= eager.recommended_batch_size
    assert any("aot_eager_decomp_partition" in n for n in compiled.notes)
    assert type(model) is nn.Sequential and not hasattr(model, "_orig_mod")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_simulated_estimate_of_a_compiled_model_matches_real_compute():
    """The offline estimate compiles on fake tensors and measures what real CPU compute measures;
    a second compiled probe in the same process compiles afresh (its counts are its own)."""
    sample = torch.randn(3, 16, 16)
    real = batchfit.find_batch_size(conv_net(), sample, device="cpu", memory=card(64), compile=True)
    fake = batchfit.find_batch_size(conv_net(), sample, device="simulated", memory=card(64), compile=True)
    assert fake.compiled is not None and fake.compiled["compilations"] >= 1
    assert fake.per_sample_allocated_bytes == pytest.approx(real.per_sample_allocated_bytes, rel=1e-6)
    assert fake.recommended_batch_size == real.recommended_batch_size


def test_compiled_evaluation():
    sample = torch.randn(3, 16, 16)
    both = batchfit.find_batch_size(conv_net(), sample, device="simulated", memory=card(64), mode="both", compile=True)
    assert both.eval_batch_size > both.recommended_batch_size
    assert both.eval_trials[0].compilations >= 1  # evaluation (inference mode) is a graph of its own
    assert sum(t.compilations for t in both.eval_trials[1:]) <= 2


_UNTRACEABLE = '''
import torch
from torch import nn

@torch.library.custom_op("batchfit_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2

twice.register_autograd(lambda ctx, grad: grad * 2)


class NoFakeKernel(nn.Module):
    """Runs eagerly; dynamo cannot trace it: the custom op has no fake (shape) kernel."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return twice(self.fc(x))


def make():
    return NoFakeKernel()
'''


def test_a_model_dynamo_cannot_compile_is_one_clear_line(tmp_path):
    path = module_file(tmp_path, "untraceable", _UNTRACEABLE)
    result = run_cli("probe", "--model", f"{path}:make", "--input-shape", "8", "--device", "cpu", "--memory", "256MiB")
    assert result.exit_code == 0, result.output  # eager runs it
    result = run_cli(
        "probe", "--model", f"{path}:make", "--input-shape", "8", "--device", "cpu", "--memory", "256MiB", "--compile"
    )
    assert result.exit_code == 2, result.output
    assert "torch.compile could not compile the model" in result.stderr
    assert "no fake impl" in result.stderr and "run without compile" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_a_step_that_dynamo_skipped_is_not_presented_as_compiled():
    model = conv_net()
    before = _state(model)
    with torch._dynamo.config.patch(disable=True), pytest.raises(CompileError, match="compiled nothing"):
        batchfit.find_batch_size(model, torch.randn(3, 16, 16), device="cpu", memory=card(64), compile=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_compile_reports_the_counts(tmp_path):
    path = module_file(
        tmp_path,
        "mlp",
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))\n",
    )
    result = run_cli(
        "estimate", "--model", f"{path}:make", "--input-shape", "64", "--memory", "256MiB", "--compile", "--json", "-"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["compiled"]["backend"] == "aot_eager_decomp_partition"
    assert data["compiled"]["compilations"] == sum(t["compilations"] for t in data["trials"]) >= 1
    assert data["trials"][0]["compilations"] >= 1


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="compile="):
        batchfit.ProbeConfig(compile="yes")  # type: ignore[arg-type]
