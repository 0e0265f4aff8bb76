"""What an evaluation records on an MLflow run, in one place: the metric prefix of each evaluation
set, the EvalStamp that says what was scored, and the logging of both. Promotion reads them back.

    bench.*     the shipped benchmark (chimein/evaluate/benchmark.py): the only one that decides promotion
    heldout.*   a dataset version's held-out test split
    file.*      a JSON Lines file (`chimein eval --data FILE`)

An evaluation (`log_evaluation`) is PREFIX.METRIC metrics and PREFIX.* tags (the stamp), on the run
of the system scored: its training run (the retrain flow, `chimein eval --log-to-run`) or an
evaluation run of its own (`chimein eval`), a child of the training run when there is one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from chimein.ops.tracking import NOTE, as_param, experiment_id, source_tags

BENCH, HELDOUT, FILE = "bench", "heldout", "file"


@dataclass(frozen=True)
class EvalStamp:
    """What an evaluation was scored on; equal stamps (but for `chattiness` when calibrated) are
    comparable."""

    fingerprint: str
    decisions: int  # scored
    total: int  # in the whole set
    chattiness: float | None  # None: the system decides in its output (the OpenAI baseline)
    chattiness_source: str  # "calibrated" (the adapter's own threshold), "fixed" or "model output"
    answers: str | None = None  # the fingerprint of the answer annotations its answer rates used
    # what shaped its replies (chimein.runtime.honesty): "tools+hedge" (the default), "tools", "hedge"
    # or "none"; a run recorded before this stamp existed was scored with the default
    honesty: str = "tools+hedge"

    @property
    def complete(self) -> bool:
        return self.decisions == self.total

    def tags(self, prefix: str) -> dict[str, str]:
        threshold = {} if self.chattiness is None else {f"{prefix}.chattiness": f"{self.chattiness:.6g}"}
        return {f"{prefix}.fingerprint": self.fingerprint, f"{prefix}.decisions": str(self.decisions),
                f"{prefix}.total_decisions": str(self.total), f"{prefix}.complete": str(self.complete).lower(),
                **threshold, f"{prefix}.chattiness_source": self.chattiness_source,
                **({f"{prefix}.answers": self.answers} if self.answers else {}), f"{prefix}.honesty": self.honesty}

    @classmethod
    def of(cls, bot, fingerprint: str, decisions: int, total: int, answers: str | None = None) -> EvalStamp:
        """The stamp of `bot`'s scores (a GroupChatAssistant: its threshold and where it came from)."""
        source = "calibrated" if bot.threshold.origin == "calibrated" else "fixed"
        return cls(fingerprint, decisions, total, bot.chattiness, source, answers, honesty_of(bot.tools, bot.hedge))

    @classmethod
    def from_tags(cls, tags: dict, prefix: str) -> EvalStamp | None:
        if f"{prefix}.fingerprint" not in tags:
            return None
        threshold = tags.get(f"{prefix}.chattiness")
        return cls(tags[f"{prefix}.fingerprint"], int(tags[f"{prefix}.decisions"]),
                   int(tags[f"{prefix}.total_decisions"]), None if threshold is None else float(threshold),
                   tags[f"{prefix}.chattiness_source"], tags.get(f"{prefix}.answers"),
                   tags.get(f"{prefix}.honesty", "tools+hedge"))


def honesty_of(tools: bool, hedge: bool) -> str:
    """The EvalStamp's name for what shaped a system's replies."""
    return "+".join(n for n, on in (("tools", tools), ("hedge", hedge)) if on) or "none"


def eval_prefix(data: str) -> str:
    """The metric prefix of an evaluation set: 'benchmark', a dataset version (its test split), or a
    JSON Lines file (the names of `chimein eval --data`)."""
    if data == "benchmark":
        return BENCH
    return HELDOUT if data.startswith(("local:", "hub:", "ds-")) else FILE


def log_evaluation(client, run_id: str, prefix: str, metrics: dict, stamp: EvalStamp) -> None:
    """Metrics as PREFIX.NAME and the stamp as PREFIX.* tags. A partial benchmark score (a subset
    of it) goes to bench_partial.*, so it never overwrites a whole one."""
    from mlflow.entities import Metric, RunTag

    if prefix == BENCH and not stamp.complete:
        prefix = f"{BENCH}_partial"
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{prefix}.{k}", float(v), now, 0) for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v],
                     tags=[RunTag(k, v) for k, v in stamp.tags(prefix).items()])


def start_evaluation_run(client, system: str, data: str, stamp: EvalStamp, params: dict,
                         trained_run_id: str | None = None) -> str:
    """A run for one system's evaluation (`chimein eval`): a child of the system's training run when
    this store has it (its experiment, nested under it in the UI), else in the default experiment."""
    import mlflow

    parent = None
    if trained_run_id:
        try:
            parent = client.get_run(trained_run_id)
        except mlflow.exceptions.MlflowException:  # trained against another store
            parent = None
    tags = source_tags("chimein eval") | {
        "chimein.system": system, NOTE: f"`chimein eval` of the {system} system on {stamp.fingerprint} "
        f"({data}): {stamp.decisions} of {stamp.total} decisions."}
    if parent:
        tags["mlflow.parentRunId"] = trained_run_id
    exp = parent.info.experiment_id if parent else experiment_id(client)
    run = client.create_run(exp, run_name=f"eval--{system}--{stamp.fingerprint}", tags=tags)
    client.log_batch(run.info.run_id, params=[as_param(k, v) for k, v in params.items()])
    return run.info.run_id
