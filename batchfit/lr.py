"""Learning rate for a batch size: the scaling rules and the advice that goes with them.

A mini-batch gradient is an average of B per-example gradients, so its variance is σ²/B.
A larger batch is a steadier step that can take a larger learning rate: linearly while the
batch is small against the gradient noise scale, with warmup, and flat beyond it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit.config import check_positive_int

RULES = ("auto", "linear", "sqrt", "noise")

# Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): the linear rule needs a gradual
# warmup (5 epochs) at large batches and held up to 8192 on ImageNet with ResNet-50.
WARMUP_ABOVE = 1024
WARMUP_EPOCHS = 5
LINEAR_LIMIT = 8192
# Adam-family optimizers follow the square-root rule (Hoffer et al. 2017; Malladi et al. 2022).
_ADAPTIVE = ("adam", "lamb", "adagrad", "adadelta", "rmsprop", "adafactor", "nadam", "radam")
_SGD_LIKE = ("sgd", "lars", "momentum", "nesterov")


@dataclass(frozen=True)
class LRScaling:
    """A scaled learning rate, the rule that made it and what to do alongside."""

    learning_rate: float
    rule: str
    factor: float
    base_lr: float
    base_batch_size: int
    batch_size: int
    warmup_epochs: float = 0.0
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"learning rate: {self.learning_rate:.6g} ({self.rule} rule, ×{self.factor:.4g} "
            f"from {self.base_lr:g} at batch {self.base_batch_size} to batch {self.batch_size})"
        ]
        lines += [f"- {a}" for a in self.advice]
        return "\n".join(lines)


def optimizer_family(optimizer: Any) -> str | None:
    """'adaptive' for Adam-like optimizers, 'sgd' for the rest, None when unknown."""
    if optimizer is None:
        return None
    if isinstance(optimizer, str):
        name = optimizer
    elif isinstance(optimizer, type):
        name = optimizer.__name__
    elif isinstance(getattr(optimizer, "func", None), type):  # functools.partial(AdamW, ...)
        name = optimizer.func.__name__
    else:
        name = type(optimizer).__name__
    name = name.lower()
    if name in ("function", "partial"):  # a factory: the class cannot be known before it runs
        return None
    if any(a in name for a in _ADAPTIVE):
        return "adaptive"
    if isinstance(optimizer, str) and not any(s in name for s in _SGD_LIKE):
        # A name, not a class: a typo must not silently pick SGD's rule.
        raise ValueError(
            f"optimizer {optimizer!r} is not known; name an SGD-like ({', '.join(_SGD_LIKE)}) or "
            f"adaptive ({', '.join(_ADAPTIVE)}) optimizer"
        )
    return "sgd"


def adascale_gain(noise_scale: float, base_batch_size: int, batch_size: int) -> float:
    """AdaScale / McCandlish gain r = (1 + φ/B₀) / (1 + φ/B): ≈ B/B₀ while B ≪ φ, flat past φ."""
    return (1 + noise_scale / base_batch_size) / (1 + noise_scale / batch_size)


def scale_lr(
    base_lr: float,
    base_batch_size: int,
    batch_size: int,
    rule: str = "auto",
    optimizer: Any = None,
    noise_scale: float | None = None,
) -> LRScaling:
    """Scale `base_lr`, known good at `base_batch_size`, to `batch_size`."""
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr={base_lr!r} must be a positive number")
    check_positive_int("base_batch_size", base_batch_size)
    check_positive_int("batch_size", batch_size)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    if noise_scale is not None and not (math.isfinite(noise_scale) and noise_scale > 0):
        raise ValueError(f"noise_scale={noise_scale!r} must be a positive number")
    family = optimizer_family(optimizer)
    if rule == "auto":
        rule = "noise" if noise_scale else ("sqrt" if family == "adaptive" else "linear")
    if rule == "noise" and noise_scale is None:
        raise ValueError("rule='noise' needs noise_scale (the gradient noise scale B_simple)")

    ratio = batch_size / base_batch_size
    if rule == "linear":
        factor = ratio
    elif rule == "sqrt":
        factor = math.sqrt(ratio)
    else:
        assert noise_scale is not None
        factor = adascale_gain(noise_scale, base_batch_size, batch_size)

    advice: list[str] = []
    warmup = 0.0
    if batch_size > WARMUP_ABOVE and factor > 1:
        warmup = WARMUP_EPOCHS
        advice.append(
            f"warm up linearly from {base_lr:g} to {base_lr * factor:.6g} over the first "
            f"~{WARMUP_EPOCHS} epochs: large batches diverge early without it (Goyal et al. 2017)"
        )
    if batch_size > LINEAR_LIMIT and factor > 1:
        layerwise = "LAMB" if family == "adaptive" else "LARS (SGD) or LAMB (Adam)"
        advice.append(
            f"batch {batch_size} is past {LINEAR_LIMIT}, where the linear rule stopped holding "
            f"on ImageNet; use layer-wise adaptive rates: {layerwise} (You et al. 2017, 2019)"
        )
    if rule == "linear" and family == "adaptive" and ratio > 1:
        advice.append(
            "the linear rule over-scales Adam-family optimizers; the square-root rule is the "
            "usual choice (Malladi et al. 2022)"
        )
    if noise_scale is not None and batch_size > 2 * noise_scale:
        advice.append(
            f"batch {batch_size} is past the gradient noise scale (~{noise_scale:.0f}): each extra "
            "sample buys little progress per step (McCandlish et al. 2018)"
        )
    if ratio < 1:
        advice.append("batch is below the base batch: the rate is scaled down; no warmup needed")
    return LRScaling(
        learning_rate=base_lr * factor,
        rule=rule,
        factor=factor,
        base_lr=float(base_lr),
        base_batch_size=base_batch_size,
        batch_size=batch_size,
        warmup_epochs=warmup,
        advice=advice,
    )
