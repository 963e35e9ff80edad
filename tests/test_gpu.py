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


def _warm_up() -> None:
    """One training step of the user's own, as any training run makes before or after a probe.

    Its first matmuls (forward on this thread, backward on autograd's) create the cuBLAS and
    cuBLASLt workspaces, which the caching allocator then keeps for the life of the process
    (65 MiB on an H200). batchfit leaves them: there is no way to tell them apart from ones the
    user's process already had, and the user's training would only allocate them again.
    """
    layer = torch.nn.Linear(64, 64).cuda()
    layer(torch.randn(8, 64, device="cuda")).sum().backward()
    del layer
    torch.cuda.synchronize()


def test_probe_on_cuda_restores_model_and_memory():
    torch.manual_seed(0)
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _warm_up()
    allocated = torch.cuda.memory_allocated()
    result = batchfit.find_batch_size(model, torch.randn(3, 16, 16), memory="2GiB")
    assert result.recommended_batch_size >= 2 and not result.is_estimate
    assert all(t.seconds_per_step for t in result.trials if t.ok)
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[key]), key
    assert torch.cuda.memory_allocated() == allocated


def test_trials_record_what_the_limit_model_needs():
    result = batchfit.find_batch_size(linear_stack(4, 1024), torch.randn(1024), memory="2GiB")
    fitted = [t for t in result.trials if t.ok]
    assert all(t.largest_alloc >= 1024 * 4 * t.batch_size for t in fitted)  # an activation at least
    assert result.predicted_limit == batchfit.predict_limit([t.to_dict() for t in result.trials], result.capacity_bytes)


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
