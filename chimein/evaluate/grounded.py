"""The grounded benchmark: does the assistant answer from the group's documents, and say so when
they do not answer?

    chimein eval --adapter local:NAME --grounded            # beside the shipped benchmark
    from chimein.evaluate.grounded import load_grounded, score_grounded

`chimein/evaluate/grounded-cases/` holds, per invented organisation (a choir's handbook, a
wedding weekend's logistics, an office FAQ), its documents (`NAME/`, Markdown), hand-written group
chats about it (`NAME.jsonl`) and what is right at each assistant turn (`NAME.answers.jsonl`):

    fact        the documents answer it: keys, any of which in a reply shows it is right
    unanswered  an addressed question the documents do not answer: the right reply says so
                ("the documents don't say", "not sure": answers.HEDGES)

Like the shipped benchmark it is never trained on: the grounded training chats
(chimein.data.grounded) are about other organisations, and a test checks that none of these
chats or documents is in them. Each chat is replayed with its organisation's documents as the
assistant's knowledge, retrieved as at run time (chimein.knowledge.grounding), and scored:

    answered_accuracy            right / fact turns (the reply forced, teacher-forced history)
    answered_confident_error_rate  neither right nor a hedge / fact turns
    unanswered_not_sure_rate     says the documents do not say (or not sure) / unanswered turns
    unanswered_confident_error_rate  the rest / unanswered turns
    balanced_accuracy, missed_intervention_rate, false_interruption_rate   the decisions

MLflow gets them as grounded.* on the run (with the fingerprint as a tag).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from chimein.conversation import Conversation, load_conversations
from chimein.evaluate.answers import HEDGES, Answer, judge, load_answers, normalize
from chimein.evaluate.metrics import decision_metrics, evaluate
from chimein.knowledge.grounding import attach_all

GROUNDED_DIR = Path(__file__).resolve().parent / "grounded-cases"
GROUNDED = "grounded"  # its metrics' prefix on MLflow
METRICS = ("answered_accuracy", "answered_confident_error_rate", "unanswered_not_sure_rate",
           "unanswered_confident_error_rate", "balanced_accuracy", "missed_intervention_rate",
           "false_interruption_rate")


@dataclass(frozen=True)
class GroundedSet:
    """One organisation: its documents and the chats about them."""

    name: str
    documents: Path
    conversations: tuple[Conversation, ...]
    ids: tuple[str, ...]  # NAME-01, … in file order
    answers: tuple[Answer, ...]


@dataclass(frozen=True)
class GroundedBenchmark:
    sets: tuple[GroundedSet, ...]
    fingerprint: str  # "grounded-" + hash of the chats, the annotations and the documents

    def summary(self) -> dict:
        kinds = Counter(a.kind for s in self.sets for a in s.answers)
        return {"fingerprint": self.fingerprint, "organisations": [s.name for s in self.sets],
                "conversations": sum(len(s.conversations) for s in self.sets),
                "answered": kinds["fact"], "unanswered": kinds["unanswered"]}


@functools.cache
def load_grounded(directory: str | Path = GROUNDED_DIR) -> GroundedBenchmark:
    """Every organisation of the grounded benchmark in `directory`, strictly validated."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.jsonl") if not p.name.endswith(".answers.jsonl"))
    if not files:
        raise FileNotFoundError(f"no grounded chats (NAME.jsonl beside a folder NAME/ of documents) in {directory}")
    sets, blob = [], []
    for path in files:
        documents = directory / path.stem
        if not documents.is_dir():
            raise FileNotFoundError(f"{path.name}: no folder {documents.name}/ beside it; put the "
                                    "organisation's documents (Markdown or text) there")
        convs = load_conversations(path, strict=True).conversations
        ids = tuple(f"{path.stem}-{k:02d}" for k in range(1, len(convs) + 1))
        if not (annotations := path.with_name(path.stem + ".answers.jsonl")).is_file():
            raise FileNotFoundError(f"{path.name}: no {annotations.name} beside it; annotate each assistant "
                                    "turn (kind fact with keys, or unanswered)")
        answers = load_answers(annotations,
                               {i: c.messages for i, c in zip(ids, convs)}, kinds=("fact", "unanswered"))
        sets.append(GroundedSet(path.stem, documents, tuple(convs), ids, tuple(answers)))
        blob.append([c.to_json() for c in convs])
        blob.append(sorted([a.chat, a.turn, a.kind, sorted(a.keys)] for a in answers))
        blob.append({str(f.relative_to(documents)): f.read_text(encoding="utf-8")
                     for f in sorted(documents.rglob("*")) if f.is_file() and ".chimein-index" not in f.parts})
    digest = hashlib.sha256(json.dumps(blob, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:12]
    return GroundedBenchmark(tuple(sets), "grounded-" + digest)


def verdict(reply: str | None, answer: Answer) -> str:
    """A fact: right, hedged or wrong (answers.judge). Unanswered: right when the reply says that
    the documents do not say (or that it is not sure), else wrong: whatever it stated, they did not say it."""
    if answer.kind == "fact":
        return judge(reply, answer)
    return "right" if HEDGES.search(normalize(reply or "")) else "wrong"


def score_grounded(bot, bench: GroundedBenchmark, progress: bool = False) -> dict:
    """`bot` (a GroupChatAssistant) on every organisation with its documents as knowledge: the
    metrics (METRICS, and the counts) and every judged reply. The bot's own knowledge is put back."""
    from chimein.knowledge.index import KnowledgeIndex, read_folder

    kept = bot.knowledge
    labels, preds, rows = [], [], []
    try:
        for s in bench.sets:
            bot.knowledge = KnowledgeIndex.build(read_folder(s.documents)[0])
            convs = [attach_all(bot.knowledge, c) for c in s.conversations]
            index = {chat: i for i, chat in enumerate(s.ids)}
            at = {(index[a.chat], a.turn - 1): a for a in s.answers}
            records = evaluate(bot, convs, progress=progress, replies=False, force_at=frozenset(at))
            labels += [r.label for r in records]
            preds += [r.speak for r in records]
            for r in records:
                if (a := at.get((r.conversation, r.turn))) is not None:
                    rows.append({"chat": a.chat, "turn": a.turn, "kind": a.kind, "verdict": verdict(r.forced_reply, a),
                                 "reply": r.forced_reply, "keys": list(a.keys),
                                 "passages": [p.split("]")[0].lstrip("[") for p in convs[r.conversation].messages[r.turn].passages]})
    finally:
        bot.knowledge = kept
    answered = [r["verdict"] for r in rows if r["kind"] == "fact"]
    unanswered = [r["verdict"] for r in rows if r["kind"] == "unanswered"]

    def share(verdicts, which):
        return sum(v == which for v in verdicts) / len(verdicts) if verdicts else 0.0

    decisions = decision_metrics(labels, preds)
    metrics = {"answered_accuracy": share(answered, "right"), "answered_confident_error_rate": share(answered, "wrong"),
               "unanswered_not_sure_rate": share(unanswered, "right"),
               "unanswered_confident_error_rate": share(unanswered, "wrong"),
               "answered_turns": len(answered), "unanswered_turns": len(unanswered),
               **{k: decisions[k] for k in ("balanced_accuracy", "missed_intervention_rate",
                                            "false_interruption_rate", "decisions")}}
    return {"fingerprint": bench.fingerprint, "metrics": metrics, "replies": rows}


def record_grounded(client, run_id: str, scored: dict) -> None:
    """score_grounded's metrics as grounded.* on an MLflow run, its fingerprint as grounded.fingerprint."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{GROUNDED}.{k}", float(v), now, 0) for k, v in scored["metrics"].items()],
                     tags=[RunTag(f"{GROUNDED}.fingerprint", scored["fingerprint"])])
