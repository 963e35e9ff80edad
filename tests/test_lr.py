import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchfit.lr import adascale_gain, optimizer_family, scale_lr


def test_goyal_linear_check_value():
    scaled = scale_lr(0.1, 256, 8192, rule="linear")
    assert scaled.learning_rate == pytest.approx(3.2)
    assert scaled.warmup_epochs == 5
    assert any("warm up" in a for a in scaled.advice)


def test_sqrt_check_value():
    assert scale_lr(0.1, 256, 8192, rule="sqrt").learning_rate == pytest.approx(0.566, abs=5e-4)


def test_auto_picks_by_optimizer_family():
    assert scale_lr(0.1, 256, 1024, optimizer="sgd").rule == "linear"
    assert scale_lr(1e-3, 256, 1024, optimizer="adamw").rule == "sqrt"
    assert scale_lr(1e-3, 256, 1024, optimizer=torch.optim.Adam).rule == "sqrt"
    assert scale_lr(1e-3, 256, 1024, optimizer=functools.partial(torch.optim.AdamW, lr=1)).rule == "sqrt"
    assert scale_lr(1e-3, 256, 1024, noise_scale=5000).rule == "noise"


def test_large_batch_advice():
    advice = " ".join(scale_lr(0.1, 256, 16384, rule="linear").advice)
    assert "LARS" in advice
    adam = " ".join(scale_lr(1e-3, 256, 4096, rule="linear", optimizer="adam").advice)
    assert "square-root" in adam


def test_noise_rule_is_linear_when_small_and_flat_when_large():
    assert adascale_gain(1e6, 32, 64) == pytest.approx(2.0, rel=1e-3)
    assert adascale_gain(100, 32, 10**7) == pytest.approx(1 + 100 / 32, rel=1e-3)


@given(
    base=st.floats(min_value=1e-6, max_value=10),
    b0=st.integers(1, 10**5),
    b=st.integers(1, 10**5),
    phi=st.floats(min_value=1, max_value=1e6),
)
def test_rules_are_ordered_and_monotone(base, b0, b, phi):
    lin = scale_lr(base, b0, b, rule="linear").learning_rate
    sq = scale_lr(base, b0, b, rule="sqrt").learning_rate
    noise = scale_lr(base, b0, b, rule="noise", noise_scale=phi).learning_rate
    assert lin == pytest.approx(base * b / b0)
    # Scaling up: linear ≥ noise-aware and linear ≥ sqrt; down: the reverse.
    if b >= b0:
        assert lin >= sq * (1 - 1e-9) and lin >= noise * (1 - 1e-9) and noise >= base * (1 - 1e-9)
    else:
        assert lin <= sq * (1 + 1e-9) and lin <= noise * (1 + 1e-9)
    assert math.isfinite(noise)


@pytest.mark.parametrize(
    ("args", "match"),
    [((-0.1, 256, 512), "base_lr"), ((0.1, 0, 512), "base_batch_size"), ((0.1, 256, 2.5), "batch_size")],
)
def test_bad_input_names_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        scale_lr(*args)


def test_noise_rule_needs_noise_scale():
    with pytest.raises(ValueError, match="needs noise_scale"):
        scale_lr(0.1, 256, 512, rule="noise")


def test_family():
    assert optimizer_family("LAMB") == "adaptive"
    assert optimizer_family(torch.optim.SGD) == "sgd"
    assert optimizer_family(None) is None
