"""The search against synthetic memory curves: no torch devices, microseconds per case."""

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from batchfit.memory import budget as memory_budget
from batchfit.result import Trial
from batchfit.search import search

GB = 10**9


def device(fixed, per_sample, capacity, bend=0.0):
    """A fake `run(B)`: peak = fixed + per_sample·B (+ bend·B² to break linearity); OOM past capacity."""
    calls = []

    def run(b):
        calls.append(b)
        peak = fixed + per_sample * b + bend * b * b
        if peak > capacity:
            return Trial(batch_size=b, ok=False)
        return Trial(
            batch_size=b,
            ok=True,
            peak_allocated=int(peak * 0.9),
            peak_reserved=int(peak),
            seconds_per_step=0.1,
        )

    return run, calls


def test_resnet_like_curve_needs_few_trials():
    run, calls = device(0.4 * GB, 0.086 * GB, 24 * 2**30)
    out = search(run, 24 * 2**30, margin=0.2, start=2)
    assert out.recommended == 128
    assert len(calls) <= 5
    assert not any(not t.ok for t in out.trials)


def test_recommendation_was_run_and_respects_margin():
    run, calls = device(1 * GB, 0.05 * GB, 20 * GB)
    out = search(run, 20 * GB, margin=0.2)
    rec = out.recommended
    assert rec in calls
    trial = next(t for t in out.trials if t.batch_size == rec)
    assert trial.ok and trial.peak_reserved <= 0.8 * 20 * GB
    assert rec * 2 > (0.8 * 20 * GB - 1 * GB) / (0.05 * GB)  # the next power of two breaks the budget


def test_oom_during_doubling_is_handled():
    run, _calls = device(1 * GB, 1 * GB, 3.5 * GB)  # B=1,2 fit; B=4 runs out of memory
    out = search(run, int(3.5 * GB), margin=0.0)
    assert any(not t.ok for t in out.trials)
    assert out.recommended == 2
    assert out.largest_ran == 2


def test_nothing_fits_gives_zero():
    run, _ = device(5 * GB, 1 * GB, 4 * GB)
    out = search(run, 4 * GB, margin=0.2)
    assert out.recommended == 0 and out.largest_ran == 0


def test_convex_curve_steps_down_after_a_wrong_jump():
    run, calls = device(1 * GB, 0.01 * GB, 40 * GB, bend=0.0004 * GB)
    out = search(run, 40 * GB, margin=0.2)
    rec = out.recommended
    peak = 1 * GB + 0.01 * GB * rec + 0.0004 * GB * rec * rec
    assert peak <= 0.8 * 40 * GB
    assert rec in calls


def test_max_batch_size_caps_every_trial():
    run, calls = device(1 * GB, 0.001 * GB, 80 * GB)
    out = search(run, 80 * GB, margin=0.2, max_batch_size=100, rounding="none")
    assert max(calls) <= 100
    assert out.recommended == 100


def test_exact_limit_is_found_by_bisection():
    run, _calls = device(1 * GB, 0.1 * GB, 20 * GB)
    out = search(run, 20 * GB, margin=0.2, exact=True)
    assert out.exact_limit == 190  # 1 + 0.1·190 = 20 GB exactly; 191 runs out
    assert any(not t.ok for t in out.trials)


@settings(max_examples=200, deadline=None)
@given(
    fixed=st.floats(min_value=0.05, max_value=30),
    per_sample=st.floats(min_value=1e-5, max_value=5),
    capacity=st.floats(min_value=1, max_value=200),
    margin=st.floats(min_value=0, max_value=0.6),
    bend=st.floats(min_value=0, max_value=1e-3),
    rounding=st.sampled_from(["pow2", "mult8", "none"]),
)
@example(fixed=1.0, per_sample=1e-05, capacity=197.0, margin=0.05, bend=0.0, rounding="mult8")  # the budget's last byte
def test_invariant_every_answer_was_run_within_budget(fixed, per_sample, capacity, margin, bend, rounding):
    # The product's budget, not the expression again: (1 - m) * c * GB rounds an ulp below it.
    allowed = memory_budget(int(capacity * GB), margin)
    run, calls = device(fixed * GB, per_sample * GB, capacity * GB, bend=bend * GB)
    out = search(run, int(capacity * GB), margin=margin, rounding=rounding, max_trials=40)
    assert len(calls) <= 40
    if out.recommended:
        assert out.recommended in calls
        trial = next(t for t in out.trials if t.batch_size == out.recommended)
        assert trial.ok and trial.peak_reserved <= allowed
    else:
        assert fixed * GB + per_sample * GB + bend * GB > allowed


def test_search_is_near_optimal_for_linear_memory():
    for per_sample in (0.003, 0.02, 0.7):
        run, _calls = device(2 * GB, per_sample * GB, 40 * GB)
        out = search(run, 40 * GB, margin=0.2, rounding="none")
        best = int((0.8 * 40 - 2) / per_sample)
        assert out.recommended >= 0.97 * best, (per_sample, out.recommended, best)


@pytest.mark.parametrize("rounding", ["pow2", "mult8"])
def test_recommendation_follows_rounding(rounding):
    run, _ = device(1 * GB, 0.013 * GB, 24 * GB)
    out = search(run, 24 * GB, margin=0.2, rounding=rounding)
    if rounding == "pow2":
        assert out.recommended & (out.recommended - 1) == 0
    else:
        assert out.recommended % 8 == 0


def test_two_regime_curve_converges_in_few_trials():
    """Optimizer-step peak dominates small batches (flat), activations dominate large ones."""
    calls = []
    capacity = 64 * 2**20

    def run(b):
        calls.append(b)
        peak = max(3 * 2**20 + 512 * b, 2 * 2**20 + 6 * 1024 * b)
        if peak > capacity:
            return Trial(batch_size=b, ok=False)
        return Trial(batch_size=b, ok=True, peak_allocated=peak, peak_reserved=peak)

    for rounding in ("none", "pow2"):
        calls.clear()
        out = search(run, capacity, margin=0.0, rounding=rounding)
        assert len(calls) <= 14, (rounding, calls)
        assert out.recommended >= (0.9 * (capacity - 2 * 2**20) / 6144 if rounding == "none" else 8192)


# next_move, branch by branch: a ledger built by hand, the move it gives and why.
from batchfit.search import Ledger, Move, next_move  # noqa: E402

MB = 2**20


def ledger_with(*trials: tuple[int, float | None], budget_mb: int = 800, rounding: str = "pow2", moves=()):
    """Trials (batch size, peak MiB or None for an OOM), recorded as the given moves made them."""
    ledger = Ledger(budget=budget_mb * MB, cap=2**40, rounding=rounding)
    moves = list(moves) or [Move(b, "test", "doubling") for b, _ in trials]
    for (b, peak), move in zip(trials, moves, strict=True):
        ok = peak is not None
        mem = int(peak * MB) if ok else 0
        ledger.record(move, Trial(batch_size=b, ok=ok, peak_allocated=mem, peak_reserved=mem))
    return ledger


def test_move_start_where_the_line_is_fitted():
    """Sizes below 4 are never fitted once two at 4 or more exist: the search starts at 4."""
    move = next_move(Ledger(budget=MB, cap=2**40, start=2))
    assert (move.batch_size, move.phase) == (4, "doubling") and move.reason.startswith("start")
    assert next_move(Ledger(budget=MB, cap=3, start=1)).batch_size == 3  # max_batch_size caps it


def test_move_halves_down_to_the_smallest_size_while_nothing_fits():
    ledger = ledger_with((4, None))
    move = next_move(ledger)
    assert (move.batch_size, move.phase) == (2, "doubling") and move.reason.startswith("halve")
    ledger.record(move, Trial(batch_size=2, ok=True, peak_allocated=500 * MB, peak_reserved=500 * MB))
    assert next_move(ledger).batch_size is None  # 2 fits, 4 does not: nothing to double into
    assert next_move(ledger_with((4, None), (2, None), (1, None))).batch_size is None
    batchnorm = Ledger(budget=800 * MB, cap=2**40, start=2)  # BatchNorm cannot train on one example
    for b in (4, 2):
        batchnorm.record(next_move(batchnorm), Trial(batch_size=b, ok=False))
    assert next_move(batchnorm).batch_size is None


def test_move_grows_as_far_as_one_point_shows_within_the_budget():
    """From one point, b × budget / peak(b) (fixed >= 0), rounded; at least 2x, at most 16x."""
    for trials, rounding, grow in [
        (((4, 104),), "pow2", 16),  # 4 × 800 / 104 = 30.7 -> 16
        (((4, 104),), "none", 30),
        (((4, 20),), "pow2", 64),  # 160, at most 16 × 4
        (((4, 500),), "pow2", 8),  # 6.4: double
        (((1, 101), (2, 102)), "pow2", 8),  # sizes below 4 never make the line: grow from 2
    ]:
        move = next_move(ledger_with(*trials, rounding=rounding))
        assert (move.batch_size, move.phase) == (grow, "doubling") and move.reason.startswith("grow"), trials
    ledger = ledger_with((32, None), (4, 20))  # never at or past a size that failed: double
    assert next_move(ledger).batch_size == 8


@settings(max_examples=300, deadline=None)
@given(
    fixed=st.integers(min_value=0, max_value=50 * 2**30),
    per_sample=st.integers(min_value=1, max_value=2**30),
    budget=st.integers(min_value=2**20, max_value=200 * 2**30),
    start=st.sampled_from([1, 2, 4, 8]),
    rounding=st.sampled_from(["pow2", "mult8", "none"]),
)
def test_growth_from_one_point_stays_within_the_budget_of_any_line(fixed, per_sample, budget, start, rounding):
    """For any fixed >= 0: a grow past doubling is within the budget (doubling is the old rule)."""
    peak = fixed + per_sample * start
    assume(peak <= budget)
    ledger = Ledger(budget=budget, cap=2**40, rounding=rounding, start=start)
    ledger.record(Move(start, "test", "doubling"), Trial(start, True, peak, peak))
    move = next_move(ledger)
    assert move.batch_size is not None and 2 * start <= move.batch_size <= 16 * start
    if move.batch_size > 2 * start:
        assert fixed + per_sample * move.batch_size <= budget


def test_move_jump_to_the_lines_answer():
    move = next_move(ledger_with((4, 104), (8, 108)))  # 100 MiB + 1 MiB/sample: 700 within 800 MiB
    assert move.batch_size == 128 and move.reason == "grow at most 16x per trial"  # 16 × 8
    move = next_move(ledger_with((4, 104), (8, 108), (64, 164)))
    assert move.batch_size == 512 and move.reason == "the memory line's largest size within the budget"
    assert move.predicted_peak == pytest.approx(612 * MB)


def test_move_second_point_after_a_missed_jump():
    jump = Move(512, "the memory line's largest size within the budget", "jumping", predicted_peak=612 * MB)
    moves = [Move(b, "test", "doubling") for b in (4, 8, 64)] + [jump]
    move = next_move(ledger_with((4, 104), (8, 108), (64, 164), (512, 700), moves=moves))  # 12.6% off
    assert move.batch_size == 256 and move.reason.startswith("second point")


def test_move_bisects_a_bracket():
    move = next_move(ledger_with((4, 104), (8, 108), (64, 164), (640, None), rounding="none"))
    assert move.batch_size == 352 and move.reason == "bisect: the middle of the bracket"  # (64 + 640) // 2


def test_move_no_closing_point_after_a_jump_the_line_predicted():
    jump = Move(512, "the memory line's largest size within the budget", "jumping", 612 * MB, 612 * MB)
    moves = [Move(b, "test", "doubling") for b in (4, 8)] + [jump]
    ledger = ledger_with((4, 104), (8, 108), (512, 620), moves=moves)  # 1.3% off: confirmed
    assert next_move(ledger).batch_size is None


def test_move_stops_when_nothing_is_left_to_gain_then_closes_and_is_done():
    moves = [Move(b, "test", "jumping") for b in (4, 8, 64, 128)]
    ledger = ledger_with((4, 104), (8, 108), (64, 164), (128, 228), (256, None), moves=[*moves, moves[-1]])
    move = next_move(ledger)
    assert move.batch_size is None and move.reason.startswith("stop")
    closing = ledger_with((2, 101), (4, 104), (512, 612), moves=[Move(b, "test", "jumping") for b in (2, 4, 512)])
    move = next_move(closing)
    assert (move.batch_size, move.phase) == (256, "closing") and "near the top" in move.reason
    closing.record(move, Trial(batch_size=256, ok=True, peak_allocated=356 * MB, peak_reserved=356 * MB))
    assert next_move(closing) == Move(None, "done", "closing")


# The pricing variant (the lever table's): the batch asked, down by halves, a second point, refine.
from batchfit.search import next_price_move, price  # noqa: E402


def test_price_descends_from_the_batch_asked_then_refines_on_the_line():
    run, calls = device(1 * GB, 0.1 * GB, 40 * GB)  # budget 32 GB: 310 fits, 311 does not
    ledger = price(run, 32 * GB, 1000)
    assert calls[:4] == [1000, 500, 250, 125]  # asked, halves until one fits (the two above: OOM), a second point
    assert [ledger.moves[b].phase for b in calls[:4]] == ["descending", "descending", "descending", "second"]
    assert ledger.verified() >= 310 - 310 // 16 and ledger.verified() in calls


def test_price_move_reasons():
    ledger = Ledger(budget=800 * MB, cap=2**40, rounding="none", start=1, asked=64)
    assert next_price_move(ledger) == Move(64, "price: the batch asked", "descending")
    ledger.record(
        next_price_move(ledger), Trial(batch_size=64, ok=True, peak_allocated=400 * MB, peak_reserved=400 * MB)
    )
    move = next_price_move(ledger)  # 64 fits and is the only point: a second one below it
    assert (move.batch_size, move.phase) == (32, "second")
    nothing = Ledger(budget=MB, cap=2**40, rounding="none", start=2, asked=2)
    nothing.record(next_price_move(nothing), Trial(batch_size=2, ok=False))
    assert next_price_move(nothing).batch_size is None


def test_price_tries_the_smallest_size_first_when_the_model_alone_is_over_the_budget():
    out_of_memory, calls = device(90 * GB, 0.1 * GB, 80 * GB)  # 90 GB before any batch on an 80 GB card
    ledger = price(out_of_memory, 32 * GB, 64, smallest=2, over=True)
    assert ledger.verified() == 0 and calls == [2]  # larger batches need more: 64 is not run
    assert ledger.moves[2].reason == "price: the model alone needs more than the budget"
    # Over the budget but within the card: the batch asked runs too, for its peak, and nothing else.
    hopeless, calls = device(40 * GB, 0.1 * GB, 80 * GB)
    assert price(hopeless, 32 * GB, 64, smallest=2, over=True).verified() == 0 and calls == [2, 64]
    # The batch asked run already (the check's): the smallest next, as before.
    asked = out_of_memory(64)
    out_of_memory, calls = device(90 * GB, 0.1 * GB, 80 * GB)
    ledger = price(out_of_memory, 32 * GB, 64, smallest=2, over=True, ran={64: asked})
    assert calls == [2] and [t.batch_size for t in ledger.order] == [64, 2]
    # A bound that was wrong (a weight without gradients, say) costs one trial, not the answer.
    run, calls = device(1 * GB, 0.1 * GB, 40 * GB)
    ledger = price(run, 32 * GB, 1000, over=True)
    assert calls[:2] == [1, 1000] and ledger.verified() >= 310 - 310 // 16 and ledger.verified() in calls
    assert ledger.moves[1].reason == "price: the model alone needs more than the budget"
