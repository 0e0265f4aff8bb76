"""Reply correctness: the judge (right / hedged / confident error), the shipped annotations
(every assistant turn of the benchmark, keys true to the reference and not given away by the
question), forced replies at factual turns whatever the decision, and a promotion refused when
the new version is more often confidently wrong than the champion."""

from __future__ import annotations

import json

import pytest

from chimein.conversation import parse_conversation
from chimein.evaluate.answers import AnnotationError, Answer, answer_metrics, judge, load_answers
from chimein.evaluate.benchmark import load_benchmark, load_eval_set
from chimein.evaluate.promotion import compare
from chimein.evaluate.records import EvalStamp
from chimein.evaluate.run import score
from chimein.runtime.state import ConversationState, Decision

CAPITAL = Answer("en-99", 3, "fact", ("Canberra",), ("Sydney", "Melbourne"))


@pytest.mark.parametrize(("reply", "verdict"), [
    ("It's Canberra, not Sydney!", "wrong"),  # a known-wrong string spoils it
    ("The capital is Canberra.", "right"), ("CANBERRA", "right"), ("Ｃａｎｂｅｒｒａ", "right"),
    ("Melbourne, I think", "wrong"), ("I'm not sure, maybe check a map", "hedged"),
    ("I'm not entirely sure — possibly Perth", "hedged"), ("Sure! It's Perth.", "wrong"),
    ("", "wrong"), (None, "wrong"),
])
def test_judge(reply, verdict):
    assert judge(reply, CAPITAL) == verdict


def test_judge_matches_keys_from_a_word_start_and_in_chinese():
    d20 = Answer("en-99", 3, "fact", ("advantage",))
    assert judge("That's advantage.", d20) == "right"
    assert judge("That's disadvantage.", d20) == "wrong"  # not a key at a word's start
    zh = Answer("zh-99", 3, "fact", ("堪培拉",))
    assert judge("澳大利亚的首都是堪培拉。", zh) == "right"
    assert judge("我不太确定，可能是悉尼？", zh) == "hedged"
    assert answer_metrics(["right", "hedged", "wrong", "wrong"]) == {
        "answer_accuracy": 0.25, "hedge_rate": 0.25, "confident_error_rate": 0.5, "factual_turns": 4}
    assert answer_metrics([]) == {}


def chat():
    return parse_conversation([
        {"role": "user", "name": "Ana", "content": "what's the capital of australia?"},
        {"role": "assistant", "content": "Canberra."},
        {"role": "user", "name": "Ben", "content": "thanks"}]).messages


@pytest.mark.parametrize(("line", "error"), [
    ({"id": "en-99", "turn": 0, "kind": "fact", "keys": ["x"]}, "no assistant message at turn 0"),
    ({"id": "en-99", "turn": 1, "kind": "fact", "keys": []}, r"fact \(with keys\) or open"),
    ({"id": "en-99", "turn": 1, "kind": "fact", "keys": ["australia"]}, "the question already contains"),
    ({"id": "en-99", "turn": 1, "kind": "vague"}, r"fact \(with keys\) or open"),
    ({"id": "en-98", "turn": 1, "kind": "open"}, "en-98 has no assistant message"),
    ("not json", "not an annotation"),
])
def test_a_bad_annotation_is_refused_naming_the_line(tmp_path, line, error):
    path = tmp_path / "en.answers.jsonl"
    path.write_text(line if isinstance(line, str) else json.dumps(line))
    with pytest.raises(AnnotationError, match=error) as e:
        load_answers(path, {"en-99": chat()})
    assert "en.answers.jsonl" in str(e.value)


def test_every_assistant_turn_must_be_annotated_once(tmp_path):
    path = tmp_path / "en.answers.jsonl"
    path.write_text("")
    with pytest.raises(AnnotationError, match="1 assistant turns are not annotated"):
        load_answers(path, {"en-99": chat()})
    line = json.dumps({"id": "en-99", "turn": 1, "kind": "fact", "keys": ["Canberra"]})
    path.write_text(f"{line}\n{line}\n")
    with pytest.raises(AnnotationError, match="annotated twice"):
        load_answers(path, {"en-99": chat()})
    path.write_text(line)
    assert load_answers(path, {"en-99": chat()}) == [Answer("en-99", 1, "fact", ("Canberra",))]


def test_the_shipped_benchmark_is_annotated_and_its_own_replies_are_right():
    bench = load_benchmark()
    assert len(bench.answers) == sum(c.n_speak for c in bench.conversations)  # every assistant turn
    factual = bench.factual()
    assert len(factual) >= 100 and {bench.languages[c] for c, _ in factual} == {"en", "zh"}
    assert bench.answers_fingerprint.startswith("answers-")
    # the hand-written reference replies state the facts the keys name (the keys fit the chats)
    for (c, turn), a in factual.items():
        assert judge(bench.conversations[c].messages[turn + 1].content, a) == "right", a


class Scripted:
    """A system with the assistant's evaluation interface that never speaks on its own and,
    made to reply, says `answer(question)`."""

    def __init__(self, answer):
        self.answer, self.messages, self.chattiness = answer, [], 0.5

    def reset(self):
        self.messages = []

    def add(self, name, content, reply=True):
        self.messages.append(content)
        return Decision(speak=False, p_speak=0.1)

    def reply(self):
        return Decision(speak=True, p_speak=0.1, response=self.answer(self.messages[-1]))

    def set_reply(self, reply):
        pass


@pytest.mark.parametrize(("answer", "expected"), [
    (lambda q: "I'm not sure, sorry.", {"answer_accuracy": 0.0, "hedge_rate": 1.0, "confident_error_rate": 0.0}),
    (lambda q: "Melbourne, obviously.", {"answer_accuracy": 0.0, "hedge_rate": 0.0, "confident_error_rate": 1.0}),
])
def test_replies_are_forced_at_factual_turns_whatever_the_decision(answer, expected):
    evalset = load_eval_set("benchmark")
    s = score(Scripted(answer), evalset, replies=False)
    factual = len(evalset.benchmark.factual())
    assert s.metrics["factual_turns"] == factual and s.metrics["recall"] == 0.0  # it never spoke itself
    assert {k: s.metrics[k] for k in expected} == expected
    assert s.by_case["lang:zh"]["factual_turns"] + s.by_case["lang:en"]["factual_turns"] == factual
    assert len(s.report["answers"]) == factual


def stamp(answers="answers-1", honesty="tools+hedge"):
    return EvalStamp("bench-1", 809, 809, 0.5, "calibrated", answers, honesty)


def test_a_version_more_often_confidently_wrong_does_not_take_the_alias():
    holder = ("chimein-x v1 (@champion)", 0.90, stamp())
    refused = compare("balanced_accuracy", 0.95, stamp(), holder, errors=(0.30, 0.20))
    assert not refused.move and "confidently wrong at 30.0%" in refused.reason and "20.0%" in refused.reason
    assert compare("balanced_accuracy", 0.95, stamp(), holder, errors=(0.10, 0.20)).move
    assert compare("balanced_accuracy", 0.95, stamp(), holder, errors=(0.30, None)).move  # nothing to compare
    # other annotations: the rates are not comparable, the decision metric decides
    assert compare("balanced_accuracy", 0.95, stamp("answers-2"), holder, errors=(0.30, 0.20)).move
    assert EvalStamp.from_tags(stamp().tags("bench"), "bench") == stamp()


def test_confident_errors_are_compared_only_between_replies_shaped_alike():
    """A run scored without tools or hedging (the retrain flow's switches) is not compared on
    confident errors with a champion scored with them, nor the other way round."""
    holder = ("chimein-x v1 (@champion)", 0.90, stamp())
    for new in (stamp(honesty="none"), stamp(honesty="tools")):
        refused = compare("balanced_accuracy", 0.95, new, holder, errors=(0.10, 0.20))
        assert not refused.move and "not comparable" in refused.reason
        assert f"scored with tools+hedge, this run's with {new.honesty}" in refused.reason
    assert compare("balanced_accuracy", 0.95, stamp(honesty="none"), ("v1", 0.90, stamp(honesty="none")),
                   errors=(0.10, 0.20)).move
    # a champion recorded before the stamp named it was scored with the defaults
    old_tags = {k: v for k, v in stamp().tags("bench").items() if k != "bench.honesty"}
    assert EvalStamp.from_tags(old_tags, "bench").honesty == "tools+hedge"
    assert EvalStamp.from_tags(stamp(honesty="hedge").tags("bench"), "bench").honesty == "hedge"


def test_the_stamp_names_the_switches_the_assistant_ran_with():
    from chimein.evaluate.records import honesty_of

    assert [honesty_of(t, h) for t, h in ((True, True), (True, False), (False, True), (False, False))] == \
        ["tools+hedge", "tools", "hedge", "none"]


class OneByOne:
    """The assistant without `add_many`: forced replies take the one-by-one path."""

    def __init__(self, bot):
        self.bot = bot

    def __getattr__(self, name):
        if name == "add_many":
            raise AttributeError(name)
        return getattr(self.bot, name)


def test_forced_replies_in_batches_are_the_replies_one_by_one():
    from chimein.evaluate.metrics import forced_replies
    from chimein.runtime.assistant import GroupChatAssistant

    bot = GroupChatAssistant.from_preset("tiny-chatml")
    bot.max_new_tokens = 8  # under FORCED_REPLY_TOKENS: kept
    bench = load_benchmark()
    at = frozenset(sorted(bench.factual())[:6])  # three chats' worth, some sharing a chat
    convs = list(bench.conversations)
    kept = bot.state
    batched = forced_replies(bot, convs, at, batch=4)
    assert bot.state is kept and bot.max_new_tokens == 8  # the assistant is left as it was
    assert batched == forced_replies(OneByOne(bot), convs, at) and set(batched) == at
    assert all(isinstance(r, str) and r for r in batched.values())


def test_forced_replies_stop_at_the_cap_and_leave_the_setting_alone():
    from chimein.evaluate.metrics import FORCED_REPLY_TOKENS, forced_replies
    from chimein.runtime.assistant import GroupChatAssistant

    bot = GroupChatAssistant.from_preset("tiny-chatml")  # random weights: it never stops by itself
    bench = load_benchmark()
    (c, i), = at = frozenset(sorted(bench.factual())[:1])
    msgs = bench.conversations[c].messages
    whole = bot.add_many([(ConversationState(messages=list(msgs[:i])), msgs[i].name, msgs[i].content, True)])[0]
    capped = forced_replies(bot, list(bench.conversations), at)[c, i]
    assert whole.completion_tokens == bot.max_new_tokens == 96  # the setting is left alone
    assert whole.response.startswith(capped) and len(capped) < len(whole.response)  # the same reply, cut
    assert FORCED_REPLY_TOKENS < 96


def test_reference_keys_are_the_numbers_and_names_the_chat_had_not_said():
    from chimein.evaluate.answers import reference_keys

    assert reference_keys("250 km is about 155 miles.", "how far is 250 km in miles?") == ("155",)
    assert reference_keys("对，是1974年临潼的农民打井时发现的", "兵马俑什么时候发现的？") == ("1974",)
    assert reference_keys("Right — the first iPhone came out in January 2007, said Steve Jobs.", "") == \
        ("2007", "January", "Steve Jobs")  # "Right" starts the sentence: not a name
    assert reference_keys("Sure, happy to help!", "can you help?") == ()


def test_a_key_is_stated_as_a_whole_token_only():
    from chimein.evaluate.answers import states

    assert states("大约在1974年", ("1974",)) and states("It's 7.5 lb.", ("7.5",))
    assert not states("50 miles", ("5",)) and not states("14.5 psi", ("14",)) and not states("", ("1",))


def test_the_confidence_threshold_lets_through_at_most_the_bound_of_confident_errors():
    from chimein.train.calibration import confidence_threshold

    scored = [(0.9, True), (0.8, False), (0.5, False), (0.3, True)]
    assert confidence_threshold(scored, 0.25) == 0.8  # keeps 0.9 and 0.8: one error of four
    assert confidence_threshold(scored, 0.5) == 0.3  # two errors allowed: keeps all
    assert confidence_threshold([(0.9, False)], 0.1) > 0.9  # no bound met: every reply hedged
