"""A primed trial (steps_per_trial=1): the optimizer state made before its one step (trial.prime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import card, linear_stack, module_file, run_cli

import batchfit
from batchfit import trial
from batchfit.config import ProbeConfig
from batchfit.device import SimulatedDevice
from batchfit.optimizers import OPTIMIZERS
from batchfit.session import holding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import prime_check


def _forwards(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_primed_step_peaks_as_two_steps_allocate(name):
    capacity = card(64)
    model = linear_stack(4, 256)
    forwards = _forwards(model)
    peaks = prime_check.compare(model, torch.randn(256), lambda: SimulatedDevice(capacity), 8, OPTIMIZERS[name], None)
    assert len(forwards) == 2 + 1 + prime_check.STEADY_STEPS  # the primed trial ran one step
    assert peaks.two.ok and peaks.primed.ok
    assert peaks.primed.peak_allocated == pytest.approx(peaks.two.peak_allocated, rel=0.01)
    assert peaks.steady.peak_allocated == pytest.approx(peaks.two.peak_allocated, rel=0.01)
    assert prime_check.close(peaks.two, peaks.primed)


def test_one_step_without_the_state_peaks_low():
    """What priming is for: where the peak is in backward (activations above the optimizer's own
    temporaries), an unprimed step lacks AdamW's moments, two times the weights."""
    capacity, weights = card(512), 4 * 1024 * 1024 * 4
    args = (torch.randn(1024), lambda: SimulatedDevice(capacity), 4096, OPTIMIZERS["adamw"])
    with mock.patch.object(trial, "prime", lambda optimizer, params: True):
        bare = prime_check.compare(linear_stack(4, 1024), *args)
    assert bare.two.peak_allocated - bare.primed.peak_allocated == pytest.approx(2 * weights, rel=0.01)
    primed = prime_check.compare(linear_stack(4, 1024), *args)
    assert primed.primed.peak_allocated == primed.two.peak_allocated == primed.steady.peak_allocated


def test_prime_makes_the_state_and_leaves_no_gradient():
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
    adamw = OPTIMIZERS["adamw"](params)
    assert trial.prime(adamw, params)
    assert all(set(adamw.state[p]) >= {"exp_avg", "exp_avg_sq"} and p.grad is None for p in params)
    assert not trial.prime(torch.optim.LBFGS(params), params)  # it needs a closure: two steps instead
    assert all(p.grad is None for p in params)


def test_a_closure_optimizer_fails_as_with_two_steps_and_a_timing_objective_runs_two():
    model, sample = linear_stack(2, 64), torch.randn(64)
    for steps in (1, 2):  # LBFGS steps only with a closure: the same one-line error either way
        with pytest.raises(trial.TrialError, match=r"LBFGS\.step\(\) missing 1 required positional argument"):
            batchfit.find_batch_size(model, sample, optimizer=torch.optim.LBFGS, memory=card(64), steps_per_trial=steps)
    config = ProbeConfig(steps_per_trial=1, objective="throughput")
    with holding(model, sample, SimulatedDevice(card(64)), None, None, config, None) as session:
        assert session.steps == 2  # its step time is the second step's


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_primed_probe_answers_as_two_steps_and_leaves_the_model_as_it_was(name):
    model, sample = linear_stack(4, 256), torch.randn(256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    common = {"optimizer": OPTIMIZERS[name], "memory": card(16), "rounding": "none"}
    primed = batchfit.find_batch_size(model, sample, device="cpu", steps_per_trial=1, **common)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    two = batchfit.find_batch_size(model, sample, device="cpu", **common)
    assert primed.recommended_batch_size == two.recommended_batch_size
    assert primed.predicted_limit == pytest.approx(two.predicted_limit, rel=0.02)


TINY = """
import torch
from torch import nn


def tiny():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(64)
"""


def test_the_cli_primes_with_steps_per_trial_1_and_refuses_0(tmp_path):
    model = module_file(tmp_path, "tiny", TINY) + ":tiny"
    args = ("estimate", "--model", model, "--memory", f"{card(64)}B", "--optimizer", "adamw", "--json", "-")
    with mock.patch.object(trial, "prime", wraps=trial.prime) as prime:
        primed = run_cli(*args, "--steps-per-trial", "1")
        assert primed.exit_code == 0 and prime.call_count == len(json.loads(primed.stdout)["trials"])
        prime.reset_mock()
        two = run_cli(*args)
        assert two.exit_code == 0 and prime.call_count == 0
    assert json.loads(primed.stdout)["recommended_batch_size"] == json.loads(two.stdout)["recommended_batch_size"]
    refused = run_cli(*args, "--steps-per-trial", "0")
    assert refused.exit_code == 2 and "--steps-per-trial" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_cuda_card_the_primed_step_allocates_as_two_and_eight_steps():
    from batchfit.device import resolve_device

    card = lambda: resolve_device("cuda", ProbeConfig())  # noqa: E731
    peaks = prime_check.compare(linear_stack(4, 1024), torch.randn(1024), card, 4096, OPTIMIZERS["adamw"])
    assert peaks.two.ok and peaks.primed.ok
    assert peaks.primed.peak_allocated == pytest.approx(peaks.two.peak_allocated, rel=0.01)
    assert peaks.two.peak_allocated == pytest.approx(peaks.steady.peak_allocated, rel=0.01)
