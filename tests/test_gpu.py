"""Checks that need a real CUDA GPU; skipped without one. scripts/gpu_check.py holds the long ones."""

from __future__ import annotations

import pytest
import torch
from conftest import SmallCNN, linear_stack

import batchfit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_probe_on_cuda_restores_model_and_memory():
    torch.manual_seed(0)
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    result = batchfit.find_batch_size(model, torch.randn(3, 16, 16), memory="2GiB")
    assert result.recommended_batch_size >= 2 and not result.is_estimate
    assert all(t.seconds_per_step for t in result.trials if t.ok)
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[key]), key
    assert torch.cuda.memory_allocated() == allocated


def test_memory_cap_makes_ooms_real_and_handled():
    result = batchfit.find_batch_size(linear_stack(4, 2048), torch.randn(2048), memory="512MiB", exact=True)
    assert any(not t.ok for t in result.trials)
    chosen = next(t for t in result.trials if t.batch_size == result.recommended_batch_size)
    assert chosen.peak_reserved <= 0.8 * 512 * 2**20


def test_estimate_is_close_to_cuda_for_a_linear_stack():
    model, sample = linear_stack(4, 1024), torch.randn(1024)
    real = batchfit.find_batch_size(model, sample, memory="2GiB", rounding="none")
    estimate = batchfit.find_batch_size(model, sample, memory="2GiB", rounding="none", device="simulated")
    assert estimate.per_sample_allocated_bytes == pytest.approx(real.per_sample_allocated_bytes, rel=0.05)
