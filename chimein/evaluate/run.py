"""One evaluation, the same for `chimein eval` and the retrain flow: a system scored on an
evaluation set, and the scores recorded on an MLflow run with the stamp that makes them comparable.

    evalset = load_eval_set("benchmark")
    scored = score(bot, evalset, replies=False)   # decisions only: several times faster
    record(client, run_id, scored)                # bench.* metrics and tags on the run
"""

from __future__ import annotations

from dataclasses import dataclass

from chimein.evaluate.answers import answer_metrics, judge
from chimein.evaluate.benchmark import EvalSet, metrics_by_case
from chimein.evaluate.metrics import DecisionRecord, evaluate, report
from chimein.evaluate.records import EvalStamp, log_evaluation
from chimein.runtime.assistant import GroupChatAssistant


@dataclass
class Scored:
    """One system's scores on an evaluation set."""

    prefix: str  # the metric prefix of the set: bench, heldout or file
    report: dict  # metrics.report: "metrics", and the rest of the report
    stamp: EvalStamp  # what was scored: comparable scores have equal stamps
    records: list[DecisionRecord]  # every decision
    chattiness: float | None  # the system's threshold; None when it decides in its output
    chattiness_source: str
    by_case: dict | None  # per hard case and language: the whole shipped benchmark only

    @property
    def metrics(self) -> dict:
        return self.report["metrics"]


def score(system, evalset: EvalSet, limit: int | None = None, replies: bool = True,
          progress: bool = False, answers: bool = True) -> Scored:
    """`system` (a GroupChatAssistant, or the OpenAI baseline) replayed on `evalset`, its first
    `limit` conversations if given. replies=False scores the decisions alone. answers (the
    shipped benchmark, a system that can be made to reply): the replies at its factual turns,
    forced, judged right / hedged / wrong (chimein.evaluate.answers), whatever `replies` says."""
    convs = evalset.conversations[:limit] if limit else evalset.conversations
    factual = evalset.benchmark.factual() if answers and evalset.benchmark and hasattr(system, "reply") else {}
    factual = {k: a for k, a in factual.items() if k[0] < len(convs)}
    records = evaluate(system, convs, progress=progress, replies=replies, force_at=frozenset(factual))
    result = report(records, with_similarity=replies, replies=replies)
    forced = {(r.conversation, r.turn): r.forced_reply for r in records if (r.conversation, r.turn) in factual}
    verdicts = {k: judge(reply, factual[k]) for k, reply in forced.items()}
    result["metrics"] |= answer_metrics(list(verdicts.values()))
    result["answers"] = [{"chat": factual[k].chat, "turn": k[1], "verdict": v, "reply": forced[k],
                          "keys": list(factual[k].keys)} for k, v in verdicts.items()]
    decisions = result["metrics"]["decisions"]
    answers_stamp = evalset.benchmark.answers_fingerprint if verdicts else None
    if isinstance(system, GroupChatAssistant):
        stamp = EvalStamp.of(system, evalset.fingerprint, decisions, evalset.total_decisions, answers_stamp)
        chattiness, source = system.chattiness, system.threshold.source
        result["honesty"] = {"tools": system.tools, "hedge": system.hedge, "withdraw": system.withdraw,
                             "confidence": system.confidence.threshold, "confidence_source": system.confidence.source}
    else:  # the OpenAI baseline says (silence) or answers: no threshold
        stamp = EvalStamp(evalset.fingerprint, decisions, evalset.total_decisions, None, "model output")
        chattiness, source = None, "model output"
    by_case = metrics_by_case(evalset.benchmark, records) if evalset.benchmark and not limit else None
    if by_case is not None:  # the answer rates per language beside the decision metrics
        for lang in set(evalset.benchmark.languages):
            by_case[f"lang:{lang}"] |= answer_metrics(
                [v for (c, _), v in verdicts.items() if evalset.benchmark.languages[c] == lang])
    return Scored(evalset.prefix, result, stamp, records, chattiness, source, by_case)


def record(client, run_id: str, scored: Scored) -> None:
    """The scores on an MLflow run, as PREFIX.METRIC metrics and the stamp as PREFIX.* tags."""
    log_evaluation(client, run_id, scored.prefix, scored.metrics, scored.stamp)
