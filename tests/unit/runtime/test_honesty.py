"""Saying only what is right at run time: a tool's exact answer is the reply; below the confidence
threshold a reply is a guess, said as one when the assistant is addressed and withdrawn when it is
not; the one-by-one and batched paths agree; the hedges are what the answer judge calls hedges."""

from __future__ import annotations

import functools

import pytest

from chimein.evaluate.answers import Answer, judge
from chimein.runtime import honesty
from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.state import Confidence, ConversationState

CAPITAL = Answer("x", 1, "fact", ("canberra",))


@functools.cache
def tiny() -> GroupChatAssistant:
    return GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=6)


@pytest.fixture
def bot():
    b = tiny()
    b.reset()
    b.tools, b.hedge, b.chattiness = True, True, 2.0
    yield b
    b.confidence = Confidence()


@pytest.mark.parametrize("question", ["capital of Australia?", "澳大利亚的首都是哪里？"])
def test_a_hedged_guess_is_judged_hedged_and_a_right_one_still_right(question):
    assert judge(honesty.hedged("Melbourne.", question), CAPITAL) == "hedged"
    assert judge(honesty.hedged("Canberra.", question), CAPITAL) == "right"
    assert judge("Melbourne.", CAPITAL) == "wrong"


def test_addressed_means_forced_or_named():
    assert honesty.addressed("ok", force=True)
    assert honesty.addressed("assistant, what's the capital?", force=False)
    assert honesty.addressed("@helperbot any idea", force=False)
    assert honesty.addressed("助手，首都是哪里？", force=False)
    assert not honesty.addressed("Bob, what's the capital?", force=False)
    assert not honesty.addressed("robotics club tonight", force=False)


def test_unsure_reply_is_hedged_when_addressed_and_withdrawn_when_not(bot):
    bot.confidence = Confidence.fixed(1.01)  # never sure enough
    d = bot.add("Ana", "who painted the Girl with a Pearl Earring?", force=True)
    assert d.speak and d.hedged and 0 < d.confidence <= 1
    assert d.response.startswith("Not sure about this one") and bot.conversation.messages[-1].content == d.response
    bot.chattiness = 0.0  # wants to speak at every message
    d = bot.add("Ben", "I think it was Rembrandt")
    assert not d.speak and d.hedged and d.response is None and d.confidence is not None
    assert bot.conversation.messages[-1].role == "user"  # withdrawn: nothing said
    d = bot.add("Chen", "assistant, 这幅画是谁画的？")
    assert d.speak and d.hedged and d.response.startswith("这个我不太确定")


def test_sure_reply_or_hedging_off_is_said_as_it_is(bot):
    bot.confidence = Confidence.fixed(0.0)
    d = bot.add("Ana", "who painted the Girl with a Pearl Earring?", force=True)
    assert d.speak and not d.hedged and not d.response.startswith("Not sure")
    bot.reset()
    bot.confidence, bot.hedge = Confidence.fixed(1.01), False
    e = bot.add("Ana", "who painted the Girl with a Pearl Earring?", force=True)
    assert not e.hedged and e.response == d.response


def test_a_tool_answer_is_the_reply_word_for_word(bot):
    bot.confidence = Confidence.fixed(1.01)
    d = bot.add("Ana", "assistant the door is 76 cm wide, what's that in inches?", force=True)
    assert (d.response, d.tool, d.completion_tokens, d.hedged) == ("76 cm = 29.92 in", "convert", 0, False)
    bot.reset()
    bot.tools = False
    d = bot.add("Ana", "assistant the door is 76 cm wide, what's that in inches?", force=True)
    assert d.tool is None and d.completion_tokens > 0 and d.hedged


def test_batched_replies_hedge_withdraw_and_use_tools_as_one_by_one(bot):
    bot.confidence, bot.chattiness = Confidence.fixed(1.01), 0.0
    requests = [("Ana", "assistant, 3.4kg is how much in pounds?", False), ("Ben", "lol no way", False),
                ("Chen", "who wrote Dune?", True), ("Dee", "bot, capital of Australia?", False)]
    alone = []
    for who, text, force in requests:
        bot.use(ConversationState())
        alone.append(bot.add(who, text, force=force))
    states = [ConversationState() for _ in requests]
    together = bot.add_many([(st, *r) for st, r in zip(states, requests)])
    for a, b, st in zip(alone, together, states, strict=True):
        assert (a.speak, a.response, a.hedged, a.tool) == (b.speak, b.response, b.hedged, b.tool)
        assert (st.messages[-1].role == "assistant") == b.speak
    assert [d.tool for d in together] == ["convert", None, None, None]
    assert [d.speak for d in together] == [True, False, True, True]
    assert all(d.hedged for d in together[1:])


def test_without_withdrawing_an_unaddressed_guess_is_said_as_one_and_the_decision_stands(bot):
    bot.confidence, bot.chattiness = Confidence.fixed(1.01), 0.0
    try:
        bot.withdraw = False
        d = bot.add("Ben", "I think it was Rembrandt")
        assert d.speak and d.hedged and d.response.startswith("Not sure about this one")
        assert bot.conversation.messages[-1].content == d.response
    finally:
        bot.withdraw = True
