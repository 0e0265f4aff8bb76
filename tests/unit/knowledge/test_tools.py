"""Exact answers from tools: conversions (pint), clock times across time zones (zoneinfo), weekdays
and arithmetic, each checked against the definition of the units or the calendar, and against
the benchmark's own conversion questions; what the tools do not recognise gets no answer."""

from __future__ import annotations

import datetime as dt

import pytest

from chimein.evaluate.answers import judge
from chimein.evaluate.benchmark import load_benchmark
from chimein.knowledge.tools import tool_answers


def one(*messages, today=None):
    (answer,) = tool_answers(list(messages), today)
    return answer


@pytest.mark.parametrize(("messages", "text", "exact"), [
    (["recipe says roast at 325 and my oven is celsius 😑"], "325 °F = 162.8 °C", (325 - 32) * 5 / 9),
    (["the door is 76 cm wide, what's that in inches?"], "76 cm = 29.92 in", 76 / 2.54),
    (["how hot is 28 degrees in fahrenheit"], "28 °C = 82.4 °F", 28 * 9 / 5 + 32),
    (["28°C is about 82°F.", "and if it drops to 15 tonight, what's that in F?"], "15 °C = 59 °F", 59.0),
    (["3.4kg is how much in pounds?"], "3.4 kg = 7.496 lb", 3.4 / 0.45359237),
    (["we drove 350 km today", "wow", "what's that in miles for my dad"], "350 km = 217.5 mi", 350 / 1.609344),
    (["3 cups to ml?"], "3 cups = 709.8 ml", 3 * 236.5882365),
    (["100公里是多少英里"], "100 km = 62.14 mi", 100 / 1.609344),
    (["烤箱是摄氏的，食谱写375华氏度，换算成摄氏是多少"], "375 °F = 190.6 °C", (375 - 32) * 5 / 9),
    (["assistant, how many minutes is 2 hours?"], "2 h = 120 min", 120.0),
    (["the flight is 14.5 hours, how many days is that"], "14.5 h = 0.6042 days", 14.5 / 24),
    (["what's 17% of 240"], "17% of 240 = 40.8", 40.8),
    (["so (3 + 4) * 2.5 each?"], "(3 + 4) * 2.5 = 17.5", 17.5),
])
def test_each_answer_is_computed_exactly(messages, text, exact):
    answer = one(*messages)
    assert answer.text == text
    assert answer.value == pytest.approx(exact, rel=1e-9)  # the unrounded value is the exact one


def test_clock_times_across_zones_and_weekdays_follow_the_calendar():
    summer = one("3pm in London, what time is that in Tokyo?", today=dt.date(2026, 7, 1))
    assert summer.text == "15:00 in Europe/London (01 Jul 2026) is 23:00 in Asia/Tokyo"  # BST: UTC+1
    winter = one("3pm in London, what time is that in Tokyo?", today=dt.date(2026, 12, 5))
    assert winter.text.endswith("is 00:00 the next day in Asia/Tokyo")  # GMT: UTC+0
    assert one("what day of the week is 25 December 2026?").text == "25 December 2026 is a Friday"
    assert tool_answers(["2026年2月29日是星期几"]) == []  # no such day
    assert one("2026年12月25日是星期几").value == "Friday"
    assert one("which day is 2028-02-29?").value == "Tuesday"


@pytest.mark.parametrize("message", [
    "meet at 7 by the lockers", "see you on 2026-12-05", "i'm in but only V1s for me", "it's 5k to the station",
    "1 in 3 people agree", "the 2 of us in 3 cars", "what time is it?", "__import__('os').system('ls') * 2",
    "2 ** 99999", "12/25/2026 works?", "", "4-3 on serve", "potassium! Marguerite leads 2-1", "was it 2-1?",
    "we need 12 * 7.5 metres of rope", "meet in 10 minutes, I'm 5 mins late", "took 3 hours, see you in a day or two",
    "my teaching assistant knits during office hours",
])
def test_no_answer_where_nothing_is_asked_or_nothing_can_be_computed_safely(message):
    assert tool_answers([message]) == []


def test_the_benchmark_conversions_are_answered_right():
    """Every conversion a tool computes at a factual turn of the shipped benchmark states the fact
    (the turn's keys): seven of them today (°F↔°C, cm→in, kg→lb, km→mi)."""
    bench, answered = load_benchmark(), 0
    for (c, turn), answer in bench.factual().items():
        msgs = [m.content for m in bench.conversations[c].messages[:turn + 1]]
        for tool in (t for t in tool_answers(msgs) if t.kind == "convert"):
            assert judge(tool.text, answer) == "right", (answer.chat, turn, tool.text, answer.keys)
            answered += 1
    assert answered >= 7
