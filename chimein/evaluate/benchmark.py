"""The shipped benchmark: hand-written group chats that no training run ever sees.

    chimein eval --adapter local:NAME                  # evaluates on this benchmark by default
    from chimein.evaluate.benchmark import load_benchmark; b = load_benchmark(); b.fingerprint

`chimein/evaluate/cases/*.jsonl` holds the chats (English and Chinese), each user message labelled
by what follows it (an assistant message: speak; none: stay silent), and `*.cases.jsonl` beside
each file tags every chat with the hard cases it covers (talk *about* the assistant, "AI" meaning
a person or product, names that sound like an address, rhetorical questions, questions to a named
friend, quizzing, addressed in many forms, facts nobody asked for, ...). The files live outside
the training corpus (`chimein/data/corpus/`): the offline source, augmentation and dataset builds
never read them, and a test checks that none of them is in the corpus.

The fingerprint is a hash of the conversations as validated, so two evaluations are comparable
exactly when their fingerprints and decision counts match (promotion relies on it).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from chimein.conversation import Conversation, load_conversations
from chimein.evaluate.answers import Answer, load_answers
from chimein.evaluate.answers import fingerprint as answers_fingerprint
from chimein.evaluate.records import eval_prefix

BENCHMARK_DIR = Path(__file__).resolve().parent / "cases"
CASES = {
    "about_assistant": "talk about the assistant without addressing it",
    "word_means_other": '"assistant"/"AI"/"bot" meaning a person or a product',
    "name_like_address": "a participant whose name sounds like an address",
    "rhetorical": "rhetorical questions between friends",
    "named_friend_question": "a question aimed at a named friend",
    "unanswerable": "only the friends or the live world can answer",
    "quizzing": "a friend quizzes the others",
    "addressed": "the assistant is addressed (many forms)",
    "missing_fact": "a fact nobody asked for but everyone needs",
    "small_talk": "small talk",
    # realistic noise (issue 23): the shape of real support channels and busy groups
    "support_channel": "a support channel: people answer each other's questions",
    "many_people": "six or more participants",
    "threads": "several threads of talk interleaved",
    "bot_commands": "commands for other bots (!seen, /giphy, /签到) and their replies",
    "nick_address": 'a question aimed at a person by nickname ("nick: …", "@nick …", "Nick, …")',
    "pasted_noise": "links, pasted logs, error lines and code",
}


@dataclass(frozen=True)
class Benchmark:
    conversations: tuple[Conversation, ...]
    ids: tuple[str, ...]  # "en-01", ... in file order
    languages: tuple[str, ...]
    cases: tuple[tuple[str, ...], ...]  # the hard cases each chat covers
    fingerprint: str  # "bench-" + hash of the validated conversations
    answers: tuple[Answer, ...] = ()  # what is right at each assistant turn (*.answers.jsonl)

    @property
    def answers_fingerprint(self) -> str | None:
        return answers_fingerprint(list(self.answers)) if self.answers else None

    def factual(self) -> dict[tuple[int, int], Answer]:
        """(chat index, index of the user message answered) → its `fact` annotation."""
        index = {chat: i for i, chat in enumerate(self.ids)}
        return {(index[a.chat], a.turn - 1): a for a in self.answers if a.kind == "fact"}

    @property
    def decisions(self) -> int:
        return sum(c.n_user for c in self.conversations)

    def summary(self) -> dict:
        return {"fingerprint": self.fingerprint, "conversations": len(self.conversations),
                "decisions": self.decisions, "speak": sum(c.n_speak for c in self.conversations),
                "languages": dict(Counter(self.languages)),
                "cases": dict(Counter(c for cs in self.cases for c in cs))}


def fingerprint(conversations) -> str:
    blob = json.dumps([c.to_json() for c in conversations], ensure_ascii=False, sort_keys=True)
    return "bench-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.cache
def load_benchmark(directory: str | Path = BENCHMARK_DIR) -> Benchmark:
    """Every chat of the benchmark, strictly validated (a bad line is a bug in the package)."""
    directory = Path(directory)
    convs, ids, langs, cases = [], [], [], []
    files = sorted(p for p in directory.glob("*.jsonl") if not p.name.endswith((".cases.jsonl", ".answers.jsonl")))
    if not files:
        raise FileNotFoundError(f"no benchmark chats in {directory}")
    for path in files:
        loaded = load_conversations(path, strict=True).conversations
        tags_file = path.with_name(path.stem + ".cases.jsonl")
        tags = [json.loads(line) for line in tags_file.read_text(encoding="utf-8").splitlines()
                if line.strip()] if tags_file.is_file() else []
        if len(tags) != len(loaded):
            raise ValueError(f"{tags_file}: {len(tags)} case lines for {len(loaded)} chats in {path}; "
                             "write one line per chat, in the same order")
        for conv, tag in zip(loaded, tags):
            if unknown := set(tag["cases"]) - set(CASES):
                raise ValueError(f"{tags_file}: {tag['id']}: unknown case(s) {sorted(unknown)}; "
                                 f"use {sorted(CASES)}")
            convs.append(conv)
            ids.append(tag["id"])
            langs.append(tag["lang"])
            cases.append(tuple(tag["cases"]))
    answers = []
    for path in files:
        answers_file = path.with_name(path.stem + ".answers.jsonl")
        if answers_file.is_file():
            chats = {i: c.messages for i, c in zip(ids, convs) if i.startswith(path.stem + "-")}
            answers += load_answers(answers_file, chats)
    return Benchmark(tuple(convs), tuple(ids), tuple(langs), tuple(cases), fingerprint(convs), tuple(answers))


def metrics_by_case(benchmark: Benchmark, records) -> dict[str, dict]:
    """Decision metrics per hard case and per language (records from evaluation.evaluate)."""
    from chimein.evaluate.metrics import decision_metrics

    groups: dict[str, list] = {}
    for r in records:
        for key in (*benchmark.cases[r.conversation], f"lang:{benchmark.languages[r.conversation]}"):
            groups.setdefault(key, []).append(r)
    return {k: decision_metrics([r.label for r in rs], [r.speak for r in rs])
            for k, rs in sorted(groups.items())}


@dataclass(frozen=True)
class EvalSet:
    """Conversations to score and what identifies them (comparable scores share a fingerprint)."""

    conversations: list
    fingerprint: str  # bench-… (the benchmark), ds-…:test (a held-out split), file-… (a JSONL file)
    prefix: str  # its metrics' prefix on MLflow: bench, heldout or file (records.eval_prefix)
    rejected: int = 0  # invalid lines skipped in a file
    benchmark: Benchmark | None = None

    @property
    def total_decisions(self) -> int:
        return sum(c.n_user for c in self.conversations)


def load_eval_set(data: str) -> EvalSet:
    """'benchmark', a dataset version (local:ds-…, hub:ORG/NAME@ds-…: its held-out test split) or
    a JSON Lines file (invalid lines skipped and counted). FileNotFoundError names what is missing."""
    if data == "benchmark":
        bench = load_benchmark()
        return EvalSet(list(bench.conversations), bench.fingerprint, eval_prefix(data), benchmark=bench)
    if data.startswith(("local:", "hub:", "ds-")):
        from chimein.data.dataset import load_published, split_conversations

        return EvalSet(split_conversations(load_published(data)["test"]),
                       f"{data.rpartition('@')[2].removeprefix('local:')}:test", eval_prefix(data))
    loaded = load_conversations(data)
    return EvalSet(list(loaded.conversations),
                   fingerprint(loaded.conversations).replace("bench-", "file-"), eval_prefix(data),
                   len(loaded.rejected))
