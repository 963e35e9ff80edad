import pytest
import torch
from torch import nn

from batchfit.noise import estimate_from_norms, noise_scale


def test_mccandlish_check_values():
    """Appendix A's worked numbers: b = 32, B = 512, |G_b|² = 0.041, |G_B|² = 0.0028."""
    grad_sq, trace_sigma = estimate_from_norms(0.041, 0.0028, 32, 512)
    assert grad_sq == pytest.approx(2.533e-4, rel=1e-3)
    assert trace_sigma == pytest.approx(1.304, rel=1e-3)
    assert trace_sigma / grad_sq == pytest.approx(5147, rel=2e-3)


def test_estimator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="small_batch_size"):
        estimate_from_norms(1.0, 0.5, 64, 32)


def least_squares_batches(d, delta_w, sigma, batch, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.zeros(d)
    for _ in range(count):
        x = torch.randn(batch, d, generator=gen)
        y = x @ w_star + sigma * torch.randn(batch, generator=gen)
        yield x, y.unsqueeze(1)


def test_least_squares_noise_scale_matches_closed_form():
    """Closed form. Loss ½(x·w − y)², x ~ N(0, I_d), y = x·w* + ε, ε ~ N(0, σ²), δ = w − w*.

    Per-example gradient g = x(x·δ − ε); G = E[g] = δ. By Isserlis' theorem
    E[(x·δ)² x xᵀ] = |δ|² I + 2δδᵀ, so E[g gᵀ] = |δ|² I + 2δδᵀ + σ² I and
    tr(Σ) = E|g|² − |G|² = (d + 1)|δ|² + dσ². Hence B_simple = (d + 1) + dσ²/|δ|².
    MSELoss's factor of 2 scales |G|² and tr(Σ) alike and cancels.
    """
    d, sigma = 10, 3.0
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.ones(1, d) / d**0.5)  # |δ|² = 1 with w* = 0
    expected = (d + 1) + d * sigma**2  # 101
    before = model.weight.detach().clone()
    result = noise_scale(
        model, least_squares_batches(d, 1.0, sigma, 256, 150), nn.MSELoss(), small_batch_size=16, ema=0.99
    )
    assert result.b_simple == pytest.approx(expected, rel=0.2)
    low, high = result.interval
    assert low < result.b_simple < high
    assert result.samples_used == 150 * 256
    assert torch.equal(model.weight, before) and model.weight.grad is None


def test_noise_scale_needs_two_micro_batches():
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="fewer than two micro-batches"):
        noise_scale(model, [(torch.randn(8, 4), torch.randn(8, 1))], nn.MSELoss(), small_batch_size=8)


def test_batchnorm_model_runs_on_micro_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    running = model[1].running_mean.clone()
    batches = [(torch.randn(64, 8), torch.randint(0, 3, (64,))) for _ in range(6)]
    result = noise_scale(model, batches, nn.CrossEntropyLoss(), small_batch_size=8)
    assert result.b_simple > 0 and result.batches == 6
    assert torch.equal(model[1].running_mean, running)  # BatchNorm statistics are put back
