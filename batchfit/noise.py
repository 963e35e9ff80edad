"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, Appendix A).

Batches much smaller than B_simple are noise-dominated (the linear learning-rate rule
holds); much larger ones buy little progress per sample. Measured from gradients at two
batch sizes, b and B = K·b, with micro-batches rather than per-example gradients so that
BatchNorm sees real batches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batchfit.snapshot import ModelSnapshot


@dataclass(frozen=True)
class NoiseScale:
    """B_simple with the moving averages it is the ratio of, and a bootstrap interval."""

    b_simple: float
    interval: tuple[float, float]
    grad_sq: float
    trace_sigma: float
    samples_used: int
    small_batch_size: int
    big_batch_size: int
    batches: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_from_norms(
    small_sq: float, big_sq: float, small_batch_size: int, big_batch_size: int
) -> tuple[float, float]:
    """Unbiased |G|² and tr(Σ) from squared gradient norms at batch sizes b < B.

    E|G_b|² = |G|² + tr(Σ)/b, so two sizes give two equations in two unknowns.
    """
    b, big = small_batch_size, big_batch_size
    if not 0 < b < big:
        raise ValueError(f"need 0 < small_batch_size ({b}) < big_batch_size ({big})")
    grad_sq = (big * big_sq - b * small_sq) / (big - b)
    trace_sigma = (small_sq - big_sq) / (1 / b - 1 / big)
    return grad_sq, trace_sigma


def _flat_grad(params: list[torch.Tensor], scale: float) -> torch.Tensor:
    parts = [
        (p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device))
        for p in params
    ]
    return torch.cat(parts) / scale


@dataclass
class _Gradients:
    """Flat, unscaled gradients of the mean loss of `model` over any (micro-)batch."""

    model: nn.Module
    params: list[torch.Tensor]
    loss_fn: Callable[..., Any]
    amp: torch.dtype | None
    scaler: Any

    def __call__(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        with torch.autocast(self.params[0].device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.loss_fn(self.model(inputs), targets)
        scale = 1.0
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())
            loss = self.scaler.scale(loss)
        loss.backward()
        return _flat_grad(self.params, scale)


def _norms_over_micro_batches(
    gradient: _Gradients, inputs: Any, targets: torch.Tensor, small: int
) -> tuple[float, float, int] | None:
    """Mean |G_b|² over K micro-batches of `small`, and |G_B|² of their mean (B = K·b)."""
    k = targets.shape[0] // small
    if k < 2:
        raise ValueError(
            f"batch of {targets.shape[0]} holds fewer than two micro-batches of {small}; "
            "use larger batches or a smaller small_batch_size"
        )
    total, small_sq = None, 0.0
    for j in range(k):
        part = slice(j * small, (j + 1) * small)
        grad = gradient(inputs[part], targets[part])
        if not torch.isfinite(grad).all():
            return None  # an fp16 overflow: the scaler skips this step, so do we
        small_sq += float(grad.square().sum())
        total = grad if total is None else total + grad
    assert total is not None
    return small_sq / k, float((total / k).square().sum()), k * small


def _norms_over_ranks(gradient: _Gradients, inputs: Any, targets: torch.Tensor) -> tuple[float, float, int] | None:
    """Each rank's batch is a small batch; their mean over the ranks is the big batch."""
    world = dist.get_world_size()
    grad = gradient(inputs, targets)
    stats = torch.tensor([float(grad.square().sum()), float(not torch.isfinite(grad).all())], device=grad.device)
    dist.all_reduce(stats)
    dist.all_reduce(grad)
    if stats[1] > 0:  # any rank overflowed: every rank skips this batch
        return None
    return float(stats[0]) / world, float((grad / world).square().sum()), targets.shape[0] * world


def noise_scale(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    small_batch_size: int | None = None,
    *,
    ema: float = 0.9,
    max_batches: int | None = None,
    precision: str | None = None,
    scaler: Any = None,
    seed: int = 0,
) -> NoiseScale:
    """Estimate B_simple for `model` from `(inputs, targets)` batches; the model is left as found.

    Each batch of size B is split into K = B // small_batch_size micro-batches (K ≥ 2).
    Under torch.distributed with several ranks, each rank's batch is a small batch and
    their mean the big one (`small_batch_size` is then the per-rank batch). `loss_fn(output,
    targets)` must average over the batch (mean reduction). With an AMP `scaler` the loss is
    scaled and gradients unscaled, and batches that overflow are skipped.
    """
    if not 0 < ema < 1:
        raise ValueError(f"ema={ema!r} must be in (0, 1)")
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "")
    gradient = _Gradients(model, params, loss_fn, amp, scaler)
    across_ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    snapshot = ModelSnapshot(model)
    pairs: list[tuple[float, float]] = []
    avg_g = avg_s = weight = 0.0
    samples = big_size = small = 0
    try:
        snapshot.set_grads_aside()
        model.train()
        for index, (inputs, targets) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if across_ranks:
                small = targets.shape[0]
                norms = _norms_over_ranks(gradient, inputs, targets)
            else:
                small = small_batch_size or max(1, targets.shape[0] // 8)
                norms = _norms_over_micro_batches(gradient, inputs, targets, small)
            if norms is None:
                continue
            small_sq, big_sq, big_size = norms
            g2, s = estimate_from_norms(small_sq, big_sq, small, big_size)
            pairs.append((g2, s))
            # Bias-corrected exponential moving averages of numerator and denominator.
            weight = ema * weight + (1 - ema)
            avg_g = ema * avg_g + (1 - ema) * g2
            avg_s = ema * avg_s + (1 - ema) * s
            samples += big_size
    finally:
        for p in params:
            p.grad = None
        snapshot.restore()
    if len(pairs) < 2:
        raise ValueError("the noise scale needs at least two usable batches")
    grad_sq, trace_sigma = avg_g / weight, avg_s / weight
    return NoiseScale(
        b_simple=trace_sigma / grad_sq if grad_sq > 0 else math.inf,
        interval=_bootstrap(pairs, seed),
        grad_sq=grad_sq,
        trace_sigma=trace_sigma,
        samples_used=samples,
        small_batch_size=small,
        big_batch_size=big_size,
        batches=len(pairs),
    )


def _bootstrap(pairs: list[tuple[float, float]], seed: int, rounds: int = 1000) -> tuple[float, float]:
    """95% interval of the ratio of means, resampling batches (the ratio is not normal)."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(rounds):
        draw = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        g = sum(p[0] for p in draw)
        ratios.append(sum(p[1] for p in draw) / g if g > 0 else math.inf)
    ratios.sort()
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]
