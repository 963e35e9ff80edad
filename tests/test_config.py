"""ProbeConfig: every option checked before any trial runs, one rule per kind of option."""

from __future__ import annotations

import dataclasses

import pytest

from batchfit.config import TRAINING_ONLY, ProbeConfig


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
