import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.memory import GIB, MemoryLine, fit_line, format_size, parse_size, round_batch


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GIB),
        ("24 gib", 24 * GIB),
        ("40GB", 40 * 10**9),
        ("512MiB", 512 * 1024**2),
        ("1.5GiB", int(1.5 * GIB)),
        ("1000", 1000),
        (4096, 4096),
        ("2TiB", 2 * 1024**4),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "24 parsecs", "-1GiB", "0", 0, -5, "1e400GiB", True, "nan"])
def test_parse_size_rejects_with_the_value_named(bad):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(bad)


@given(st.integers(min_value=1, max_value=2**50), st.sampled_from(["B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]))
def test_parse_size_round_trips_integers(number, unit):
    factor = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 10**6, "GB": 10**9}[unit]
    assert parse_size(f"{number}{unit}") == number * factor


@given(
    st.floats(min_value=1, max_value=1e9),
    st.floats(min_value=0, max_value=1e12),
    st.lists(st.integers(min_value=1, max_value=100000), min_size=2, max_size=8, unique=True),
)
def test_fit_recovers_an_exact_line(per_sample, fixed, sizes):
    line = fit_line([(b, fixed + per_sample * b) for b in sizes])
    assert line.per_sample == pytest.approx(per_sample, rel=1e-6, abs=1e-6 * fixed)
    assert line.predict(1000) == pytest.approx(fixed + per_sample * 1000, rel=1e-6)


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two distinct"):
        fit_line([(4, 100.0), (4, 120.0)])


@given(
    st.floats(min_value=1, max_value=1e9),
    st.floats(min_value=0, max_value=1e10),
    st.floats(min_value=1, max_value=1e12),
)
def test_max_batch_is_the_largest_within_budget(per_sample, fixed, budget):
    line = MemoryLine(fixed=fixed, per_sample=per_sample)
    b = line.max_batch(budget)
    if b > 0:
        assert line.predict(b) <= budget * (1 + 1e-9)
    assert line.predict(b + 1) > budget * (1 - 1e-9)


@given(st.integers(min_value=1, max_value=2**40), st.sampled_from(["pow2", "mult8", "none"]))
def test_round_batch_never_rounds_up_and_is_idempotent(limit, rounding):
    r = round_batch(limit, rounding)
    assert 1 <= r <= limit
    assert round_batch(r, rounding) == r
    if rounding == "pow2":
        assert r & (r - 1) == 0 and r * 2 > limit
    if rounding == "mult8" and limit >= 8:
        assert r % 8 == 0 and r + 8 > limit


def test_round_batch_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rounding='odd'"):
        round_batch(10, "odd")


def test_format_size():
    assert format_size(24 * GIB) == "24.0 GiB"
    assert format_size(512) == "512 B"
