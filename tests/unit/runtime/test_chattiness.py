"""The chattiness threshold travels as a typed value (threshold + where it came from), read from an
adapter's chimein.json (older ones included) and stamped on evaluations without parsing words."""

from __future__ import annotations

from types import SimpleNamespace

from chimein.evaluate.records import EvalStamp
from chimein.runtime.state import DEFAULT_CHATTINESS, Chattiness


def test_an_adapter_without_a_threshold_has_the_default():
    assert Chattiness.stored(None) == Chattiness(DEFAULT_CHATTINESS, "default", "default")


def test_a_calibrated_threshold_keeps_its_origin_and_its_words():
    saved = {"threshold": 0.41, "origin": "calibrated", "source": "calibrated on ds-1:validation",
             "decisions": 80}
    assert Chattiness.stored(saved) == Chattiness(0.41, "calibrated", "calibrated on ds-1:validation")


def test_adapters_saved_before_the_origin_existed_are_read_from_their_source():
    assert Chattiness.stored({"threshold": 0.3, "source": "calibrated on ds-1:validation"}).origin == "calibrated"
    assert Chattiness.stored({"threshold": 0.5, "source": "default (calibration off)"}).origin == "default"


def test_a_default_threshold_named_like_a_calibrated_one_is_not_taken_for_one():
    saved = {"threshold": 0.5, "origin": "default", "source": "default (ds-1:validation has one class only)"}
    assert Chattiness.stored(saved).origin == "default"


def test_the_stamp_compares_calibrated_against_everything_else():
    def bot(c: Chattiness):
        return SimpleNamespace(threshold=c, chattiness=c.threshold, tools=True, hedge=True)

    assert EvalStamp.of(bot(Chattiness(0.4, "calibrated", "calibrated on x")), "b", 1, 1).chattiness_source == "calibrated"
    assert EvalStamp.of(bot(Chattiness.fixed(0.4)), "b", 1, 1).chattiness_source == "fixed"
    assert EvalStamp.of(bot(Chattiness()), "b", 1, 1).chattiness_source == "fixed"
