"""Grounded training chats: the reply copies a fact only from a passage the model was shown."""

from __future__ import annotations

import re

import pytest

from chimein.data.grounded import DOMAINS, NOT_SAID, grounded_chat
from chimein.formatting import DOCUMENTS
from chimein.knowledge.grounding import recent_passages
from chimein.knowledge.index import HEADING

NAMES = ["Ana", "Ben", "Chloé", "Dmitri", "Eun-ji", "Farah", "Gus"]
NOT_SAID_START = NOT_SAID.split("{")[0]


@pytest.fixture(scope="module")
def chats():
    return [grounded_chat(seed, NAMES) for seed in range(40)]


def test_every_reply_is_in_the_passages_shown_or_says_the_documents_do_not(chats):
    checked = 0
    for c in chats:
        msgs = list(c.messages)
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            if m.content.startswith(NOT_SAID_START):
                continue
            shown = " ".join(recent_passages(msgs[:i]))
            values = re.findall(r"\d+(?::\d+)?|[A-Z][a-zé]+ [A-Z][a-z]+|[A-Z][a-z]+-Guest", m.content)
            assert all(v in shown for v in values), (m.content, shown)
            checked += bool(values)
    assert checked >= 30


def test_the_mix_of_decisions(chats):
    """Speak at a quarter to two fifths of the messages; questions to a named friend get silence;
    a question the documents do not answer is addressed, and gets "don't say"."""
    users = sum(c.n_user for c in chats)
    speaks = sum(c.n_speak for c in chats)
    assert 0.2 <= speaks / users <= 0.42
    not_said = [m for c in chats for m in c.messages if m.role == "assistant" and m.content.startswith(NOT_SAID_START)]
    assert len(not_said) >= 8
    for c in chats:
        msgs = c.messages
        for i, m in enumerate(msgs):
            nxt = msgs[i + 1] if i + 1 < len(msgs) else None
            if m.role == "user" and re.match(r"@?(?:%s)\b" % "|".join(NAMES), m.content):  # to a friend
                assert nxt is None or nxt.role == "user", m.content
            if nxt is not None and nxt.role == "assistant" and nxt.content.startswith(NOT_SAID_START):
                assert re.search(r"\b(?:bot|assistant|chimeinbot)\b", m.content), m.content


def test_passages_come_from_the_chats_documents_through_the_run_time_retrieval(chats):
    with_passages = [m for c in chats for m in c.messages if m.passages]
    assert len(with_passages) >= 60
    for m in with_passages:
        assert len(m.passages) <= 2
        for p in m.passages:
            assert re.match(r"\[(?:other/)?[a-z-]+\.md › ", p) and DOCUMENTS not in p
    files = {d.file for d in DOMAINS}
    assert len(files) == len(DOMAINS)
    assert HEADING.match("## Fees")


def test_deterministic():
    assert grounded_chat(7, NAMES) == grounded_chat(7, NAMES)
    assert grounded_chat(7, NAMES) != grounded_chat(8, NAMES)
