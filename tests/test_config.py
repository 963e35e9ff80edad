"""ProbeConfig: every option checked before any trial runs, one rule per kind of option."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.config import TRAINING_ONLY, ProbeConfig, check_positive_int


def test_evaluation_options_are_the_training_ones_less_the_training_only():
    training = ProbeConfig(
        memory="1GiB", margin=0.3, base_lr=0.1, base_batch_size=32, noise_scale=500.0,
        target_global_batch=64, objective="goodput", max_trials=7,
    )  # fmt: skip
    evaluation = training.for_evaluation()
    assert evaluation.mode == "eval" and evaluation.objective == "memory"
    assert all(getattr(evaluation, name) is None for name in TRAINING_ONLY)
    kept = {f.name for f in dataclasses.fields(ProbeConfig)} - {*TRAINING_ONLY, "mode", "objective"}
    assert all(getattr(evaluation, name) == getattr(training, name) for name in kept)


@pytest.mark.parametrize("name", TRAINING_ONLY)
def test_each_training_only_option_is_refused_in_eval_mode(name):
    with pytest.raises(ValueError, match=f"{name} apply to training only"):
        ProbeConfig(mode="eval", **{name: 2})


COUNTS = ("steps_per_trial", "max_batch_size", "base_batch_size", "target_global_batch", "max_trials", "scan_items")
ANYTHING = st.one_of(
    st.integers(min_value=-3, max_value=2**40), st.booleans(), st.none(), st.floats(), st.text(max_size=2)
)


def _accepted(**options: object) -> bool:
    try:
        ProbeConfig(**options)
    except ValueError:
        return False
    return True


@given(name=st.sampled_from(COUNTS), value=ANYTHING)
def test_every_count_option_takes_exactly_the_positive_integers(name, value):
    """One rule for every count: an int of 1 or more, never a bool, a float or a string; None
    where the option may be left unset."""
    positive = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    unset = value is None and ProbeConfig.__dataclass_fields__[name].default is None
    assert _accepted(**{name: value}) == (positive or unset)


@given(value=ANYTHING, least=st.integers(min_value=1, max_value=4))
def test_check_positive_int_is_the_rule(value, least):
    fine = isinstance(value, int) and not isinstance(value, bool) and value >= least
    try:
        check_positive_int("n", value, least)
    except ValueError as error:
        assert not fine and str(error).startswith(f"n={value!r} must be")
    else:
        assert fine


@pytest.mark.parametrize("name", COUNTS)
def test_a_bool_is_no_count(name):
    with pytest.raises(ValueError, match=f"{name}=True must be"):
        ProbeConfig(**{name: True})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"noise_scale": True}, "noise_scale=True must be a positive number"),
        ({"dist_timeout_s": float("inf")}, "dist_timeout_s=inf must be a positive number"),
        ({"exact": "yes"}, "exact='yes' must be True or False"),
        ({"margin": True}, r"margin=True must be in \[0, 1\)"),
        ({"lr_rule": "cubic"}, "lr_rule='cubic' is not one of auto, linear, sqrt, noise"),
        ({"memory": "1GiB", "gpu": "A10G"}, "give memory= or gpu=, not both"),
        ({"gpu": "Z9000"}, "Z9000"),
    ],
)
def test_other_options_one_line_each(options, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(**options)
