"""Recorded rooms become conversations whose labels follow the room's reactions
(chimein.data.feedback); personal data never reaches the files; old files are deleted."""

from __future__ import annotations

import json
import time

import pytest

from chimein.conversation import load_conversations
from chimein.data.feedback import Recorder, load_feedback, room_folder, scrub

T0 = 1_790_000_000_000  # ms


def test_personal_data_is_scrubbed():
    said = ("mail me at ann.lee+club@example.org or call +44 20 7946 0958, the form is "
            "https://forms.example.com/f?id=3&token=abc123 and @ben:matrix.example.org has it; "
            "see https://docs.example.com/guide (page 12, 2024)")
    out = scrub(said)
    for secret in ("ann.lee", "example.org", "7946", "token=abc123", "matrix.example.org"):
        assert secret not in out
    assert "[email]" in out and "[phone]" in out and "[link]" in out and "@ben" in out
    assert "https://docs.example.com/guide (page 12, 2024)" in out  # a link without a key, and small numbers, stay


def record(tmp_path, events):
    rec = Recorder(tmp_path / "rec")
    for kind, *args in events:
        getattr(rec, kind)("!room:hs", *args)
    return rec


def test_reactions_and_pokes_label_the_turns(tmp_path):
    t = iter(range(T0, T0 + 10**6, 1000))
    record(tmp_path, [
        ("message", "$1", next(t), "Ann", "anyone know when the pool opens on sunday?"),
        ("message", "$2", next(t), "chimein", "It opens at 9 on Sundays.", True),
        ("reaction", "$r1", next(t), "$2", "👍"),
        ("message", "$3", next(t), "Ben", "great, see you there"),
        ("message", "$4", next(t), "chimein", "Have fun!", True),            # unasked
        ("reaction", "$r2", next(t), "$4", "👎"),
        ("message", "$5", next(t), "Ann", "how far is the lido from the station?"),
        ("message", "$6", next(t), "Ann", "@chimein??", False, None, True),   # the poke
        ("message", "$7", next(t), "chimein", "About 800 m, a ten-minute walk.", True),
        ("message", "$8", next(t), "Ben", "ok"),
        ("message", "$9", next(t), "chimein", "Bring a towel!", True),
        ("message", "$10", next(t), "Ben", "not now, bot"),
        ("message", "$11", next(t), "Ann", "see you at 9"),
    ])
    report = load_feedback(tmp_path / "rec")
    assert report.labels == {"confirmed": 1, "interruption": 2, "missed": 1}
    assert report.rooms == 1 and report.skipped == {"'not now' line after an interruption": 1}
    [conv] = report.conversations
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "anyone know when the pool opens on sunday?"), ("assistant", "It opens at 9 on Sundays."),
        ("user", "great, see you there"),                                    # the 👎 reply is now silence
        ("user", "how far is the lido from the station?"),
        ("assistant", "About 800 m, a ten-minute walk."),                     # the missed moment, answered
        ("user", "ok"), ("user", "see you at 9")]                             # told off: silence, no "not now"


def test_threads_and_gaps_make_their_own_conversations_that_load(tmp_path):
    record(tmp_path, [
        ("message", "$1", T0, "Ann", "thread root about the trip"),
        ("message", "$2", T0 + 1000, "Ben", "in the thread: train or bus?", False, "$1"),
        ("message", "$3", T0 + 2000, "chimein", "The train is faster.", True, "$1"),
        ("message", "$4", T0 + 3 * 3600 * 1000, "Ann", "hours later, in the room"),
        ("message", "$5", T0 + 3 * 3600 * 1000 + 1, "chimein", "stray", True),
    ])
    report = load_feedback(tmp_path / "rec")
    assert sorted(c.n_user for c in report.conversations) == [1, 1, 1]
    out = tmp_path / "feedback.jsonl"
    out.write_text("".join(json.dumps(c.to_json()) + "\n" for c in report.conversations))
    assert len(load_conversations(out).conversations) == 3


def test_old_recordings_are_deleted_and_a_room_can_be_forgotten(tmp_path):
    rec = Recorder(tmp_path / "rec", retention_days=7)
    now = time.time()
    rec.message("!a:hs", "$old", int((now - 10 * 86400) * 1000), "Ann", "old")
    rec.message("!a:hs", "$new", int(now * 1000), "Ann", "new")
    assert rec.prune(now) == 1
    assert [e["id"] for f in (tmp_path / "rec").glob("*/*.jsonl") for e in map(json.loads, f.read_text().splitlines())] == ["$new"]
    assert (tmp_path / "rec" / room_folder("!a:hs")).is_dir() and "!a" not in room_folder("!a:hs")
    assert rec.forget("!a:hs") and not (tmp_path / "rec" / room_folder("!a:hs")).exists()


def test_no_recordings_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="/chimein record on"):
        load_feedback(tmp_path / "nothing")


def test_a_dataset_with_feedback_counts_each_source(tmp_path, monkeypatch):
    from chimein.data.dataset import build_dataset, dataset_card
    from chimein.data.feedback import merge_feedback
    from chimein.data.generation import generate
    from chimein.data.generation_config import load_generation_config

    generated = tmp_path / "conversations.jsonl"
    generate(load_generation_config(source="offline", count=6), generated)
    record(tmp_path, [("message", "$1", T0, "Ann", "when does the pool open?"),
                      ("message", "$2", T0 + 1, "chimein", "At 9.", True),
                      ("reaction", "$3", T0 + 2, "$2", "✅")])
    merged = merge_feedback(generated, tmp_path / "rec")
    _, info = build_dataset(merged)
    assert info.sources == {"offline": 6, "feedback": 1} and info.source == "offline"  # lineage kept
    assert info.feedback["labels"] == {"confirmed": 1} and info.feedback["rooms"] == 1
    card = dataset_card(info)
    assert "| sources | offline 6 · feedback 1 |" in card and "confirmed 1" in card
    _, plain = build_dataset(generated)
    assert plain.sources == {} and "| sources |" not in dataset_card(plain)


def test_the_feedback_command_reports_the_labels_and_writes_the_conversations(tmp_path):
    from typer.testing import CliRunner

    from chimein.cli import app

    record(tmp_path, [("message", "$1", T0, "Ann", "anyone up for chess?"),
                      ("message", "$2", T0 + 1, "chimein", "Chess was invented in India.", True),
                      ("reaction", "$3", T0 + 2, "$2", "👎")])
    out = tmp_path / "fb.jsonl"
    res = CliRunner().invoke(app, ["feedback", str(tmp_path / "rec"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "label: interruption" in res.output and "│ 1" in res.output
    [conv] = load_conversations(out).conversations
    assert conv.n_speak == 0 and conv.n_user == 1  # the interruption became silence
    again = CliRunner().invoke(app, ["feedback", str(tmp_path / "rec"), "--out", str(out)])
    assert again.exit_code != 0 and "--force" in again.output
