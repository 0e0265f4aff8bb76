"""The grounded benchmark: true keys, kept apart from training, scored with its documents."""

from __future__ import annotations

import functools
import inspect
import re
import shutil

import pytest

from chimein.data import grounded as training
from chimein.data.corpus import load_corpus
from chimein.evaluate.answers import AnnotationError, Answer, contains, normalize
from chimein.evaluate.grounded import GROUNDED_DIR, load_grounded, score_grounded, verdict
from chimein.runtime.assistant import GroupChatAssistant


def _documents(s) -> str:
    return " ".join(f.read_text(encoding="utf-8") for f in sorted(s.documents.rglob("*.md")))


def test_the_shipped_grounded_benchmark():
    b = load_grounded()
    assert b.summary() | {"fingerprint": None} == {
        "fingerprint": None, "organisations": ["choir", "office", "wedding"], "conversations": 9,
        "answered": 31, "unanswered": 10}
    assert b.fingerprint.startswith("grounded-") and load_grounded(str(GROUNDED_DIR)).fingerprint == b.fingerprint


def test_every_key_is_in_its_organisations_documents():
    """Keys must be true: each fact's keys include one the documents state (up to the usual
    spellings of a time: "7:30" for 19:30)."""
    for s in load_grounded().sets:
        docs = normalize(_documents(s))
        for a in s.answers:
            if a.kind == "fact":
                assert any(contains(docs, k) for k in a.keys), (a.chat, a.turn, a.keys)


def test_kept_apart_from_training():
    """No organisation, document sentence or chat message of the benchmark is in the training
    corpus or in the grounded training chats' templates."""
    template = inspect.getsource(training).lower()
    corpus = " ".join(m.content.lower() for c in load_corpus() for m in c.messages)
    for s in load_grounded().sets:
        for name in re.findall(r"^# (.+)$", _documents(s), flags=re.M):
            assert name.lower() not in template and name.lower() not in corpus, name
        for sentence in re.split(r"(?<=\.)\s+", _documents(s)):
            if len(sentence) > 40:
                assert sentence.lower() not in template and sentence.lower() not in corpus, sentence
        for c in s.conversations:
            for m in c.messages:
                if len(m.content) > 25:
                    assert m.content.lower() not in template and m.content.lower() not in corpus, m.content


def test_unanswered_is_right_only_when_it_says_the_documents_do_not_say():
    q = Answer("x", 1, "unanswered")
    assert verdict("The handbook doesn't say anything about that.", q) == "right"
    assert verdict("The documents don't say when it ends — best ask the organisers.", q) == "right"
    assert verdict("Not sure, sorry.", q) == "right"
    assert verdict("It lasts about two hours.", q) == "wrong"
    assert verdict(None, q) == "wrong"
    fact = Answer("x", 1, "fact", ("19:30",))
    assert verdict("Rehearsals start at 19:30.", fact) == "right"
    assert verdict("The documents don't say.", fact) == "hedged"


def test_a_folder_laid_out_wrong_is_refused_with_the_fix(tmp_path):
    shutil.copytree(GROUNDED_DIR, tmp_path / "g")
    shutil.rmtree(tmp_path / "g" / "office")
    with pytest.raises(FileNotFoundError, match=r"office.jsonl: no folder office/ beside it"):
        load_grounded(tmp_path / "g")
    (tmp_path / "g" / "office").mkdir()
    (tmp_path / "g" / "office.answers.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="no office.answers.jsonl beside it"):
        load_grounded(tmp_path / "g")
    answers = (GROUNDED_DIR / "office.answers.jsonl").read_text().replace('"unanswered"', '"open"', 1)
    (tmp_path / "g" / "office.answers.jsonl").write_text(answers)
    with pytest.raises(AnnotationError, match="kind must be fact"):
        load_grounded(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="no grounded chats"):
        load_grounded(tmp_path)


@functools.cache
def tiny() -> GroupChatAssistant:
    return GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=6)


def test_scored_with_each_organisations_documents_as_knowledge():
    bot = tiny()
    bot.reset()
    before = bot.knowledge
    b = load_grounded()
    scored = score_grounded(bot, b)
    m = scored["metrics"]
    assert bot.knowledge is before  # put back
    assert (m["answered_turns"], m["unanswered_turns"]) == (31, 10)
    assert m["decisions"] == sum(c.n_user for s in b.sets for c in s.conversations)
    for k in ("answered_accuracy", "answered_confident_error_rate", "unanswered_not_sure_rate", "balanced_accuracy"):
        assert 0 <= m[k] <= 1
    assert m["unanswered_not_sure_rate"] + m["unanswered_confident_error_rate"] == pytest.approx(1)
    rows = scored["replies"]
    assert len(rows) == 41 and all(r["reply"] for r in rows)
    # the questions are asked with the passages they retrieve from their own organisation's documents
    choir = [r for r in rows if r["chat"].startswith("choir") and r["passages"]]
    assert choir and all(p.startswith("handbook.md") for r in choir for p in r["passages"])
    assert sum(bool(r["passages"]) for r in rows) >= 15
