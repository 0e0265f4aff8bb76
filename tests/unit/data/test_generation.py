"""Generation: messy output, retries, resume, accounting — against local fake OpenAI/Replicate."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chimein.cli import app
from chimein.conversation import InvalidConversation, load_conversations, parse_conversation
from chimein.data.corpus import group_key, load_corpus, participants
from chimein.data.generation import GenerationAborted, extract_conversation, generate, plan_request
from chimein.data.generation_config import load_generation_config
from chimein.data.providers import MissingAPIKey
from tests.fakes.fake_llm import FakeLLM, conversation_text

GOOD = [{"role": "user", "name": "Ana", "content": "who wrote Dune?"},
        {"role": "assistant", "content": "Frank Herbert."}]


# --- messy output -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    f"Here you go:\n```json\n{json.dumps(GOOD)}\n```\nEnjoy!",
    f"```\n{json.dumps(GOOD, indent=2)}\n```",
    f"The conversation: {json.dumps(GOOD)} (10 turns)",
    json.dumps(GOOD)[:-1] + ",]",  # trailing comma
    "[1, 2] and then " + json.dumps(GOOD),  # an array that is not messages comes first
])
def test_extracts_the_conversation(text):
    conv = extract_conversation(text)
    assert conv.to_json() == GOOD


def test_repairs_what_is_safe_to_repair():
    raw = [{"role": "User", "name": "Ana", "content": "hi"},
           {"role": "assistant", "name": "Assistant", "content": "(silence)"},
           {"role": "user", "name": "Ben", "content": "who wrote Dune?"},
           {"role": "Assistant", "name": "AI", "content": "(response) Frank Herbert."}]
    conv = extract_conversation(json.dumps(raw))
    assert conv.to_json() == [{"role": "user", "name": "Ana", "content": "hi"}, *[
        {"role": "user", "name": "Ben", "content": "who wrote Dune?"},
        {"role": "assistant", "content": "Frank Herbert."}]]


@pytest.mark.parametrize("text, kind", [
    ("I can't help with that.", "no_json"),
    ('```json\n[{"role": "user", "name": "Ana", "content": "hi"\n```', "no_json"),  # cut off
    (json.dumps([{"role": "system", "content": "x"}]), "unknown_role"),
    (json.dumps([{"role": "assistant", "content": "hi"}]), "starts_with_assistant"),
    (json.dumps([{"role": "user", "content": "hi"}]), "missing_name"),
])
def test_rejects_what_cannot_be_repaired(text, kind):
    with pytest.raises(InvalidConversation) as e:
        extract_conversation(text)
    assert e.value.kind == kind


def test_requests_are_seeded_and_vary():
    cfg = load_generation_config()
    specs = [plan_request(cfg, i) for i in range(50)]
    assert specs == [plan_request(cfg, i) for i in range(50)]
    assert plan_request(load_generation_config(seed=1), 0) != specs[0]
    assert len({s.topic for s in specs}) > 10 and len({len(s.names) for s in specs}) == 4
    for s in specs:
        assert s.topic in cfg.topics and set(s.names) <= set(cfg.names)
        assert cfg.group_size[0] <= len(s.names) <= cfg.group_size[1]
        assert cfg.turns[0] <= s.turns <= cfg.turns[1]


# --- API sources over HTTP ----------------------------------------------------------------------

@pytest.fixture
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8-test-not-real")


def _cfg(source, fake, **kw):
    return load_generation_config(source=source, base_url=fake.base_url, backoff_s=0.01, **kw)


def test_openai_source_survives_messy_output_rate_limits_and_errors(tmp_path, api_keys):
    script = [429, 500, "no json here", json.dumps([{"role": "system", "content": "x"}]), 400]
    with FakeLLM("openai", script) as fake:
        out = tmp_path / "c.jsonl"
        stats = generate(_cfg("openai", fake, count=5, concurrency=2), out)
    assert stats.accepted == stats.total_accepted == 5
    assert load_conversations(out).conversations and len(out.read_text().splitlines()) == 5
    assert stats.retries == 2  # the 429 and the 500; never the 400
    assert dict(stats.rejected) == {"no_json": 1, "unknown_role": 1, "client_error": 1}
    assert stats.requests == len(fake.requests) == 10
    assert (stats.tokens_in, stats.tokens_out) == (100 * 7, 50 * 7)  # 7 replies with usage
    body = fake.requests[-1]
    assert body["model"] == "gpt-4o-mini" and "group chat" in body["messages"][0]["content"]
    ledger = [json.loads(x) for x in (tmp_path / "c.jsonl.ledger").read_text().splitlines()]
    assert ledger[0]["source"] == "openai" and "sk-test" not in json.dumps(ledger)
    assert sum(e.get("outcome") == "accepted" for e in ledger[1:]) == 5


def test_retries_are_bounded_and_failures_retried_on_resume(tmp_path, api_keys):
    with FakeLLM("openai", [503, 503, 503]) as fake:
        stats = generate(_cfg("openai", fake, count=1, concurrency=1, max_retries=2), tmp_path / "c.jsonl")
    assert (stats.failed, stats.retries, stats.requests, stats.accepted) == (1, 2, 4, 1)


def test_auth_failure_aborts_with_a_clear_message(tmp_path, api_keys):
    with FakeLLM("openai", [401] * 5) as fake, pytest.raises(GenerationAborted, match="API key"):
        generate(_cfg("openai", fake, count=3, concurrency=1), tmp_path / "c.jsonl")


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingAPIKey, match="OPENAI_API_KEY"):
        generate(load_generation_config(source="openai"), tmp_path / "c.jsonl")
    r = CliRunner().invoke(app, ["generate", "--source", "replicate", "--out", str(tmp_path / "r.jsonl")],
                           env={"REPLICATE_API_TOKEN": ""})
    assert r.exit_code == 1 and "REPLICATE_API_TOKEN is not set" in r.output



def test_resuming_a_complete_file_needs_no_api_key(tmp_path, api_keys, monkeypatch):
    """A cached flow whose cache was cleared resumes its complete file: nothing is asked for, so a
    missing key must not stop it (the key is checked where a request would be made)."""
    out = tmp_path / "c.jsonl"
    with FakeLLM("openai", []) as fake:
        cfg = _cfg("openai", fake, count=2, concurrency=1)
        generate(cfg, out)
        sent = len(fake.requests)
        monkeypatch.delenv("OPENAI_API_KEY")
        stats = generate(cfg, out, resume=True)
        assert (stats.accepted, stats.total_accepted, len(fake.requests)) == (0, 2, sent)
        with pytest.raises(MissingAPIKey, match="OPENAI_API_KEY"):  # one more is a request: key needed
            generate(cfg.model_copy(update={"count": 3}), out, resume=True)

def test_duplicates_are_dropped_and_counted(tmp_path, api_keys):
    same = conversation_text(7)
    conv = extract_conversation(same).to_json()
    shouting = json.dumps([m | {"content": "  " + m["content"].upper() + " "} for m in conv])
    with FakeLLM("openai", [same, shouting, same]) as fake:
        stats = generate(_cfg("openai", fake, count=2, concurrency=1), tmp_path / "c.jsonl")
    assert (stats.accepted, stats.duplicates) == (2, 2)


def test_replicate_source(tmp_path, api_keys):
    with FakeLLM("replicate", [429, "Sorry, as an AI I cannot"]) as fake:
        stats = generate(_cfg("replicate", fake, count=3, concurrency=1), tmp_path / "c.jsonl")
    assert (stats.accepted, stats.retries, dict(stats.rejected)) == (3, 1, {"no_json": 1})
    assert stats.tokens_in == 80 * 4 and stats.tokens_out == 40 * 4
    assert fake.requests[0]["input"]["prompt"].startswith("Write a realistic group chat")
    assert isinstance(fake.requests[0]["input"]["seed"], int)


# A 200 (Replicate: 201) whose body is not a usable reply: an HTML page from a proxy, broken JSON,
# a completion without choices. The first of each pair is the openai one.
MALFORMED = {
    "openai": [("body", "<html><body>502 Bad Gateway</body></html>", "text/html"),
               ("body", '{"choices": [{"index": 0, "mess', "application/json"),
               ("body", '{"id": "c1", "object": "chat.completion", "model": "m"}', "application/json"),
               ("body", '{"id": "c1", "object": "chat.completion", "model": "m", "choices": []}',
                "application/json")],
    "replicate": [("body", "<html><body>502 Bad Gateway</body></html>", "text/html"),
                  ("body", '{"id": "p1", "status": "succ', "application/json"),
                  ("body", '{"id": "p1", "status": "succeeded"}', "application/json"),
                  ("body", "[]", "application/json")],
}


@pytest.mark.parametrize("source", ["openai", "replicate"])
def test_malformed_replies_are_retried_then_rejected_without_stopping_the_run(tmp_path, api_keys, source):
    # request 0: two malformed replies (out of retries), request 1 too, request 2: one, then a good one
    script = MALFORMED[source] + MALFORMED[source][:1]
    with FakeLLM(source, script) as fake:
        out = tmp_path / "c.jsonl"
        stats = generate(_cfg(source, fake, count=2, concurrency=1, max_retries=1), out)
    assert (stats.accepted, stats.total_accepted, stats.failed) == (2, 2, 0)
    assert dict(stats.rejected) == {"malformed_reply": 2}
    assert (stats.requests, stats.retries) == (len(fake.requests), 3) == (7, 3)
    ledger = [json.loads(x) for x in (tmp_path / "c.jsonl.ledger").read_text().splitlines()[1:]]
    assert [e["outcome"] for e in ledger] == ["rejected", "rejected", "accepted", "accepted"]
    assert all(e["reason"] == "malformed_reply" and e["detail"] for e in ledger[:2])
    assert len(load_conversations(out).conversations) == 2


def test_ledger_header_is_on_disk_before_the_first_reply(tmp_path, api_keys):
    """A run killed while its first requests are in flight can still be resumed."""
    out, ledger = tmp_path / "c.jsonl", tmp_path / "c.jsonl.ledger"
    with FakeLLM("openai", delay=1.0) as fake:
        cfg = _cfg("openai", fake, count=1, concurrency=1)
        run = threading.Thread(target=generate, args=(cfg, out))  # not the main thread: no Ctrl-C handler
        run.start()
        deadline = time.monotonic() + 30
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        on_disk = ledger.read_text().splitlines()
        run.join(30)
    assert on_disk and json.loads(on_disk[0])["fingerprint"] == cfg.fingerprint()


def test_ctrl_c_records_the_requests_in_flight_and_resume_pays_for_none_twice(tmp_path, api_keys, caplog):
    out, ledger = tmp_path / "c.jsonl", tmp_path / "c.jsonl.ledger"
    with FakeLLM("openai", delay=0.5) as fake:
        cfg = _cfg("openai", fake, count=6, concurrency=3)

        def ctrl_c_at_the_first_request():  # an early Ctrl-C: no reply has arrived yet
            deadline = time.monotonic() + 30
            while not fake.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=ctrl_c_at_the_first_request, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            generate(cfg, out)
        sent = set(fake.seen)
        recorded = {json.loads(x)["seed"] for x in ledger.read_text().splitlines()[1:]}
        assert sent and recorded == sent  # the replies in flight were waited for and kept
        assert "interrupted" in caplog.text
        fake.delay = 0
        stats = generate(cfg, out, resume=True)
        generate(cfg, out, resume=True)  # a finished run resumes to nothing
    assert (stats.skipped, stats.accepted, stats.total_accepted) == (len(sent), 6 - len(sent), 6)
    assert set(fake.seen.values()) == {1}  # no request was paid for twice
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert sum("fingerprint" in e for e in entries) == 1 and all("i" in e for e in entries[1:])


def _tear_last_line(path: Path) -> int:
    """Cut the last line in half, as a kill in the middle of its write would; the bytes left."""
    data = path.read_bytes()
    last = data.splitlines(keepends=True)[-1]
    path.write_bytes(data[:-len(last)] + last[:len(last) // 2])
    return len(last) // 2


def test_resume_cuts_torn_last_lines_reports_them_and_repeats_only_the_torn_request(tmp_path, caplog):
    out, ledger = tmp_path / "c.jsonl", tmp_path / "c.jsonl.ledger"
    cfg = load_generation_config(count=3)
    generate(cfg, out)
    whole = out.read_text()
    torn = _tear_last_line(ledger), _tear_last_line(out)
    stats = generate(cfg, out, resume=True)
    assert f"{ledger}: cut a partial last line ({torn[0]} bytes)" in caplog.text
    assert f"{out}: cut a partial last line ({torn[1]} bytes)" in caplog.text
    report = load_conversations(out)
    assert (len(report.conversations), report.rejected, stats.total_accepted) == (3, [], 3)
    assert (stats.skipped, stats.accepted) == (2, 1) and out.read_text() == whole


def test_resume_restores_a_torn_conversation_from_the_ledger_and_counts_valid_lines(tmp_path, caplog):
    out = tmp_path / "c.jsonl"
    cfg = load_generation_config(count=3)
    generate(cfg, out)
    whole = out.read_text()
    _tear_last_line(out)
    stats = generate(cfg, out, resume=True)
    report = load_conversations(out)
    assert (len(report.conversations), report.rejected, stats.total_accepted) == (3, [], 3)
    assert stats.requests == 0 and out.read_text() == whole  # restored, not requested again
    assert "restored 1 conversation" in caplog.text


def test_appends_are_whole_lines_written_once_and_synced(tmp_path, monkeypatch):
    events = []
    write, fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write",
                        lambda fd, data: events.append(("write", fd, bytes(data))) or write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", fd)) or fsync(fd))
    generate(load_generation_config(count=3), tmp_path / "c.jsonl")
    writes = [k for k, e in enumerate(events) if e[0] == "write"]
    assert len(writes) == 1 + 3 + 3  # the ledger header, then a ledger entry and a line per conversation
    for k in writes:
        _, fd, data = events[k]
        assert data.endswith(b"\n") and data.count(b"\n") == 1 and events[k + 1] == ("fsync", fd)


def test_killed_run_resumes_without_repeating_calls(tmp_path):
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "chimein.cli", "generate", "--source", "openai", "--count", "8",
           "--concurrency", "1", "--out", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-not-real"}
    with FakeLLM("openai", delay=0.3) as fake:
        env["OPENAI_BASE_URL"] = fake.base_url
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (not out.exists() or len(out.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = len(fake.requests)
        done = {json.loads(x)["seed"] for x in (tmp_path / "c.jsonl.ledger").read_text().splitlines()[1:]}
        assert len(done) >= 3
        # without --resume the file is not touched
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 1 and "--resume" in r.stderr
        fake.delay = 0
        r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        again = [b["seed"] for b in fake.requests[first:]]
    convs = load_conversations(out).conversations
    assert len(convs) == 8 and len({json.dumps(c.to_json()) for c in convs}) == 8
    assert not done & set(again)  # no finished request was sent again
    assert len(fake.requests) <= 8 + 1  # at most the one in flight at the kill is repeated


def test_resume_with_another_config_is_refused(tmp_path):
    out = tmp_path / "c.jsonl"
    generate(load_generation_config(count=3), out)
    with pytest.raises(GenerationAborted, match="different config"):
        generate(load_generation_config(count=3, seed=5), out, resume=True)


# --- the offline source -------------------------------------------------------------------------

def test_offline_corpus_is_curated():
    corpus = load_corpus()
    assert len(corpus) >= 150
    n_user = sum(c.n_user for c in corpus)
    n_speak = sum(c.n_speak for c in corpus)
    assert 0.65 <= 1 - n_speak / n_user <= 0.80
    assert all(2 <= len(participants(c)) <= 5 for c in corpus)
    assert len({group_key(c) for c in corpus}) == len(corpus)  # no two share a group


def test_offline_generation_is_deterministic_and_augments_beyond_the_corpus(tmp_path):
    n = len(load_corpus()) + 40
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sa = generate(load_generation_config(count=n, grounded=0, noise=0), a)
    generate(load_generation_config(count=n, grounded=0, noise=0), b)
    assert sa.accepted == n and a.read_text() == b.read_text()
    convs = load_conversations(a).conversations
    originals = {json.dumps(c.to_json()) for c in load_corpus()}
    augmented = [c for c in convs if json.dumps(c.to_json()) not in originals]
    assert len(augmented) == 40
    by_key = {group_key(c): c for c in load_corpus()}
    for c in augmented:
        base = by_key[group_key(c)]  # every variant maps back to its original (names masked)
        assert c.n_speak == base.n_speak and c.n_user >= base.n_user
        assert not set(participants(c)) & set(participants(base))  # renamed
    assert any(len(participants(c)) > len(participants(by_key[group_key(c)])) for c in augmented)


def test_offline_source_mixes_in_grounded_chats_at_their_share(tmp_path):
    """grounded=0.2: every fifth conversation is a grounded chat (its messages carry passages),
    the rest come from the corpus in the same order as without them; deterministic."""
    a, b, plain = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "plain.jsonl"
    generate(load_generation_config(count=20, grounded=0.2, noise=0), a)
    generate(load_generation_config(count=20, grounded=0.2, noise=0), b)
    generate(load_generation_config(count=16, grounded=0, noise=0), plain)
    assert a.read_text() == b.read_text()
    convs = load_conversations(a).conversations
    grounded = [i for i, c in enumerate(convs) if any(m.passages for m in c.messages)]
    assert grounded == [4, 9, 14, 19]
    rest = [c for i, c in enumerate(convs) if i not in grounded]
    assert rest == list(load_conversations(plain).conversations)


def test_offline_data_changes_with_the_corpus_and_the_grounded_chats(tmp_path, monkeypatch):
    """The offline source's fingerprint (its file name, what a resume must match, and the flow's
    cache) covers the corpus and the code that writes the grounded chats: an edit to either is new
    data. (A changed grounded-chat generator was resumed and cached as the old data.)"""
    import shutil

    from chimein.data import corpus, grounded

    before = load_generation_config().fingerprint()
    edited = tmp_path / "corpus"
    shutil.copytree(corpus.CORPUS_DIR, edited)
    part = edited / "part-0.jsonl"
    part.write_text(part.read_text(encoding="utf-8").replace("lisbon", "porto", 1), encoding="utf-8")
    monkeypatch.setattr(corpus, "CORPUS_DIR", edited)
    after_corpus = load_generation_config().fingerprint()
    monkeypatch.undo()
    source = inspect.getsource(grounded)
    monkeypatch.setattr(inspect, "getsource", lambda obj: source + "# edited" if obj is grounded else _getsource(obj))
    after_code = load_generation_config().fingerprint()
    assert len({before, after_corpus, after_code}) == 3
    assert load_generation_config(source="openai").fingerprint() == load_generation_config(source="openai").fingerprint()


def test_generate_cli_offline(tmp_path):
    r = CliRunner().invoke(app, ["generate", "--count", "12", "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 0, r.output
    assert "12 of 12" in r.output and len((tmp_path / "c.jsonl").read_text().splitlines()) == 12


def test_augmentation_renames_mentions_in_text_without_spaces():
    """A Chinese chat mentions 小艾 as "小艾你来不来": renamed there too, as in the name field; and
    a name is never renamed inside a longer Latin word."""
    from chimein.data.corpus import augment
    from chimein.data.generation import RequestSpec

    conv = parse_conversation([
        {"role": "user", "name": "老周", "content": "小艾你来不来？Ana在吗"},
        {"role": "user", "name": "小艾", "content": "来！老周，Anaïs也来"},
        {"role": "user", "name": "Ana", "content": "ana here"}])
    out = augment(conv, RequestSpec(0, 1, "t", ("Kofi", "Mei", "Lars"), 3), ["Omar"])
    assert [m.name for m in out.messages] == ["Kofi", "Mei", "Lars"]
    assert [m.content for m in out.messages] == ["Mei你来不来？Lars在吗", "来！Kofi，Anaïs也来", "lars here"]


_getsource = inspect.getsource
