"""The shipped benchmark: what it covers, that it stays apart from training, and its fingerprint."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from chimein.cli import app
from chimein.data.corpus import CORPUS_DIR, load_corpus
from chimein.evaluate.benchmark import BENCHMARK_DIR, CASES, load_benchmark


def words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def test_covers_the_hard_cases_in_two_languages():
    b = load_benchmark()
    s = b.summary()
    assert s["conversations"] >= 60 and s["languages"].get("zh", 0) >= 10
    assert set(s["cases"]) == set(CASES) and min(s["cases"].values()) >= 5
    # labelled by what follows each user message: both answers occur, silence the common one
    assert 0.15 < s["speak"] / s["decisions"] < 0.35
    assert all(c.n_user >= 4 for c in b.conversations)


def test_kept_apart_from_the_training_corpus():
    """No benchmark chat is in the corpus the offline source and datasets are built from, and
    no benchmark message longer than a few words appears there either."""
    corpus = load_corpus()
    corpus_msgs = {words(m.content) for c in corpus for m in c.messages}
    corpus_chats = {json.dumps(c.to_json(), ensure_ascii=False) for c in corpus}
    b = load_benchmark()
    for conv in b.conversations:
        assert json.dumps(conv.to_json(), ensure_ascii=False) not in corpus_chats
    shared = [m.content for c in b.conversations for m in c.messages
              if len(words(m.content)) > 25 and words(m.content) in corpus_msgs]
    assert not shared, shared
    assert all(BENCHMARK_DIR not in p.parents for p in CORPUS_DIR.iterdir())


def test_fingerprint_follows_the_content(tmp_path):
    b = load_benchmark()
    assert b.fingerprint == load_benchmark(str(BENCHMARK_DIR)).fingerprint  # stable
    copy = tmp_path / "bench"
    shutil.copytree(BENCHMARK_DIR, copy)
    lines = (copy / "en.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first[0]["content"] += "!"
    (copy / "en.jsonl").write_text("\n".join([json.dumps(first, ensure_ascii=False)] + lines[1:]) + "\n",
                                   encoding="utf-8")
    assert load_benchmark(str(copy)).fingerprint != b.fingerprint


def test_cases_file_must_match_the_chats(tmp_path):
    copy = tmp_path / "bench"
    shutil.copytree(BENCHMARK_DIR, copy)
    cases = (copy / "zh.cases.jsonl").read_text(encoding="utf-8").splitlines()
    (copy / "zh.cases.jsonl").write_text("\n".join(cases[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="one line per chat"):
        load_benchmark(str(copy))


def test_eval_uses_the_benchmark_by_default(tmp_path):
    out = tmp_path / "report.json"
    r = CliRunner().invoke(app, ["eval", "--baseline", "base", "--preset", "tiny-chatml", "--no-replies",
                                 "--no-track", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    b = load_benchmark()
    assert report["fingerprint"] == b.fingerprint
    assert report["decisions"] == report["total_decisions"] == b.decisions
    base = report["systems"]["base"]
    assert base["chattiness"] == 0.5 and set(base["by_case"]) >= set(CASES) | {"lang:en", "lang:zh"}
    assert sum(m["decisions"] for k, m in base["by_case"].items() if k.startswith("lang:")) == b.decisions
    assert b.fingerprint in r.output and "by case" in r.output
