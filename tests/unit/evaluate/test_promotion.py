"""promotion.compare on its own: which new version takes the champion alias, and the reason given,
without MLflow (the flow's end-to-end promotion is tests/integration/test_flows.py)."""

from __future__ import annotations

import pytest

from chimein.evaluate.promotion import compare
from chimein.evaluate.records import EvalStamp

BENCH = "bench-abc123"
WHOLE = EvalStamp(BENCH, 600, 600, 0.42, "calibrated")


def holder(value=0.80, stamp=WHOLE):
    return ("chimein-x v1 (@champion)", value, stamp)


def test_first_whole_benchmark_score_takes_the_alias():
    v = compare("balanced_accuracy", 0.7, WHOLE, None)
    assert v.move and v.reason == f"first version scored on {BENCH}: balanced_accuracy 0.700"


def test_without_a_benchmark_score_nothing_moves():
    assert not compare("balanced_accuracy", None, None, None).move
    assert "no benchmark evaluation (bench.balanced_accuracy)" in compare("balanced_accuracy", None, WHOLE, None).reason


def test_a_partial_benchmark_never_moves_it_even_when_higher():
    partial = EvalStamp(BENCH, 100, 600, 0.42, "calibrated")
    for held in (None, holder(0.1)):
        v = compare("balanced_accuracy", 0.99, partial, held)
        assert not v.move and "scored 100 of the 600 decisions" in v.reason


@pytest.mark.parametrize("new_value, moves, sign", [(0.81, True, ">"), (0.80, False, "="), (0.79, False, "<")])
def test_higher_is_better_moves_only_when_strictly_better(new_value, moves, sign):
    v = compare("balanced_accuracy", new_value, WHOLE, holder(0.80))
    assert v.move is moves
    assert f"balanced_accuracy {new_value:.3f} {sign} 0.800 of chimein-x v1 (@champion)" in v.reason
    assert v.reason.endswith("not better") is not moves


def test_lower_is_better_metrics_move_on_a_lower_value():
    assert compare("false_interruption_rate", 0.02, WHOLE, holder(0.05)).move
    assert not compare("false_interruption_rate", 0.06, WHOLE, holder(0.05)).move


@pytest.mark.parametrize("held, why", [
    (EvalStamp("bench-other", 600, 600, 0.42, "calibrated"), "was scored on bench-other, this run on bench-abc123"),
    (EvalStamp(BENCH, 300, 600, 0.42, "calibrated"), "scored 300 of 600 decisions, this run 600"),
    (EvalStamp(BENCH, 600, 600, 0.5, "fixed"), "at a fixed chattiness 0.500, this run at a calibrated 0.420"),
])
def test_scores_that_are_not_comparable_keep_the_holder_and_say_why(held, why):
    v = compare("balanced_accuracy", 0.99, WHOLE, holder(0.1, held))
    assert not v.move and v.reason.startswith("not comparable: ") and why in v.reason
    assert "chimein eval --adapter models:/NAME@champion --log-to-run" in v.reason


def test_calibrated_thresholds_may_differ_fixed_ones_may_not():
    calibrated = EvalStamp(BENCH, 600, 600, 0.61, "calibrated")
    assert compare("balanced_accuracy", 0.9, calibrated, holder(0.8)).move
    fixed = EvalStamp(BENCH, 600, 600, 0.5, "fixed")
    assert compare("balanced_accuracy", 0.9, fixed, holder(0.8, EvalStamp(BENCH, 600, 600, 0.5, "fixed"))).move
    assert not compare("balanced_accuracy", 0.9, fixed, holder(0.8, EvalStamp(BENCH, 600, 600, 0.6, "fixed"))).move


def test_a_holder_without_a_benchmark_score_is_not_comparable():
    v = compare("balanced_accuracy", 0.9, WHOLE, ("chimein-x v1 (@champion)", None, None))
    assert not v.move and "has no bench.balanced_accuracy" in v.reason
