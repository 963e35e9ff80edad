"""The limit model and the simulated device against real H200 runs (tests/data/calibration)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import needs_hf, needs_vision

from batchfit import predict_limit
from batchfit.limit import before_first_oom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import accuracy  # noqa: E402

TRACES = sorted(accuracy.CASES)


def test_every_recorded_trace_has_a_case_and_derived_allocations():
    recorded = {p.name for p in accuracy.DATA.glob("h200_*.json") if "trials" in json.loads(p.read_text())}
    assert recorded == set(accuracy.CASES)
    for name in TRACES:
        assert all(t.get("largest_alloc_bytes") for t in accuracy.load_trace(name)["trials"]), name


@pytest.mark.parametrize("name", TRACES)
def test_predict_limit_from_trials_below_the_limit(name):
    trace = accuracy.load_trace(name)
    below = before_first_oom(trace["trials"])
    assert all(t["batch_size"] < accuracy.CASES[name]["exact"] for t in below)
    predicted = predict_limit(below, trace["capacity_bytes"])
    assert predicted == pytest.approx(accuracy.CASES[name]["exact"], rel=0.03)


@pytest.mark.parametrize("name", TRACES)
def test_predict_limit_on_the_whole_trace(name):
    trace = accuracy.load_trace(name)
    assert predict_limit(trace["trials"], trace["capacity_bytes"]) == pytest.approx(
        accuracy.CASES[name]["exact"], rel=0.03
    )


def test_the_reserved_line_alone_was_16_percent_low():
    """The cause the limit model removes: reserved far from the cap overstates the marginal cost."""
    trace = accuracy.load_trace("h200_resnet50_fp32_sgd.json")
    capacity = trace["capacity_bytes"]
    assert (capacity - trace["fixed_bytes"]) / trace["per_sample_bytes"] < 0.85 * 1710
    assert predict_limit(trace["trials"], capacity) > 0.97 * 1710


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_hf if "gpt2" in n else needs_vision) for n in TRACES])
def test_offline_estimate_matches_the_card(name):
    case, trace = accuracy.CASES[name], accuracy.load_trace(name)
    estimate = accuracy._simulate(case, trace["capacity_bytes"])
    assert estimate.per_sample_allocated_bytes == pytest.approx(trace["per_sample_allocated_bytes"], rel=0.03)
    assert estimate.per_sample_bytes == pytest.approx(trace["per_sample_bytes"], rel=0.03)
    assert estimate.predicted_limit == pytest.approx(case["exact"], rel=0.03)
    # The simulated trials at the card's batch sizes peak where the card's did (below 32,
    # cuDNN's per-call workspaces, which are not modelled, are several percent of the peak).
    real = {t["batch_size"]: t for t in trace["trials"] if t["status"] == "fitted"}
    for trial in estimate.trials:
        if trial.ok and trial.batch_size in real and trial.batch_size >= 32:
            assert trial.peak_allocated == pytest.approx(real[trial.batch_size]["peak_allocated_bytes"], rel=0.03)
            assert trial.peak_reserved == pytest.approx(real[trial.batch_size]["peak_reserved_bytes"], rel=0.03)
