"""Champion promotion that compares only like with like, from evaluations recorded on MLflow runs.

Every evaluation is logged (chimein.evaluate.records.log_evaluation) with what makes it comparable, its
EvalStamp: the evaluation set's fingerprint (`bench-…` for the shipped benchmark, the dataset
version for a held-out split), the number of decisions scored, whether the whole set was scored,
and the chattiness threshold (and where it came from: calibrated with the adapter, or fixed by
the caller). Metric sets on a training run:

    bench.*     the shipped benchmark (chimein/evaluate/benchmark.py): the only one that decides promotion
    heldout.*   the run's own held-out split, a quick check (splits differ per dataset version)

The `champion` alias moves only when the new version beats its holder on the same benchmark, both
scored in full, with the same kind of threshold; otherwise nothing moves and the reason says why.
The verdict is tagged on the run and on the model version, with the version's benchmark scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from chimein.evaluate.records import BENCH, EvalStamp

METRICS = ("balanced_accuracy", "macro_f1", "f1", "precision", "recall", "accuracy", "answer_accuracy")
LOWER_IS_BETTER = ("missed_intervention_rate", "false_interruption_rate", "confident_error_rate")


@dataclass(frozen=True)
class Verdict:
    move: bool
    reason: str


def compare(metric: str, new_value: float | None, new: EvalStamp | None,
            holder: tuple[str, float | None, EvalStamp | None] | None,
            errors: tuple[float | None, float | None] = (None, None)) -> Verdict:
    """Whether a new version takes the alias from its holder: (name, value, stamp), or None when
    nobody holds it. `errors`: the confident-error rates at the benchmark's factual turns (new,
    holder): a version more often confidently wrong than the holder, on the same annotations,
    does not take the alias whatever its `metric`."""
    if new is None or new_value is None:
        return Verdict(False, f"this run has no benchmark evaluation (bench.{metric}); promotion needs one")
    if not new.complete:
        return Verdict(False, f"this run scored {new.decisions} of the {new.total} decisions of "
                              f"{new.fingerprint}; promotion needs the whole benchmark")
    if holder is None:
        return Verdict(True, f"first version scored on {new.fingerprint}: {metric} {new_value:.3f}")
    holder_name, holder_value, stamp = holder
    if stamp is None or holder_value is None:
        return Verdict(False, f"not comparable: {holder_name} has no bench.{metric}. Re-evaluate it "
                              "(`chimein eval --adapter models:/NAME@champion --log-to-run`) to compare")
    why = None
    if stamp.fingerprint != new.fingerprint:
        why = f"{holder_name} was scored on {stamp.fingerprint}, this run on {new.fingerprint}"
    elif not stamp.complete or stamp.decisions != new.decisions:
        why = f"{holder_name} scored {stamp.decisions} of {stamp.total} decisions, this run {new.decisions}"
    elif stamp.chattiness_source != new.chattiness_source or (
            new.chattiness_source == "fixed" and stamp.chattiness != new.chattiness):
        why = (f"{holder_name} was scored at a {stamp.chattiness_source} chattiness {stamp.chattiness:.3f}, "
               f"this run at a {new.chattiness_source} {new.chattiness:.3f}")
    elif new.answers and new.answers == stamp.answers and stamp.honesty != new.honesty:
        # the confident errors below are only comparable when the same tools and hedging shaped the replies
        why = f"{holder_name}'s replies were scored with {stamp.honesty}, this run's with {new.honesty}"
    if why:
        return Verdict(False, f"not comparable: {why}. Re-evaluate the champion on this benchmark "
                              "(`chimein eval --adapter models:/NAME@champion --log-to-run`) to compare")
    better = new_value < holder_value if metric in LOWER_IS_BETTER else new_value > holder_value
    sign = ">" if new_value > holder_value else "<" if new_value < holder_value else "="
    new_errors, holder_errors = errors
    if better and None not in (new_errors, holder_errors) and new.answers and new.answers == stamp.answers \
            and new_errors > holder_errors:
        return Verdict(False, f"{metric} {new_value:.3f} {sign} {holder_value:.3f} of {holder_name}, but "
                              f"confidently wrong at {new_errors:.1%} of the factual turns of {new.fingerprint}, "
                              f"more often than its {holder_errors:.1%}: a wrong reply costs as much as a "
                              "wrong decision")
    if better:
        return Verdict(True, f"{metric} {new_value:.3f} {sign} {holder_value:.3f} of {holder_name} "
                             f"on {new.fingerprint}")
    return Verdict(False, f"{metric} {new_value:.3f} {sign} {holder_value:.3f} of {holder_name} on "
                          f"{new.fingerprint}: not better")


def promote(client, registered: str, metric: str, alias: str = "champion") -> Verdict:
    """Point `alias` of the registered model at version NAME/VERSION if `compare` says so, from
    the bench.* metrics and tags of both runs. The verdict is tagged on the new run and version,
    and the version gets its benchmark scores as tags (they are on its run too)."""
    import mlflow

    name, version = registered.rsplit("/", 1)
    run_id = client.get_model_version(name, version).run_id
    new_run = client.get_run(run_id)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        holder = None
    if holder is not None and str(holder.version) == version:
        verdict = Verdict(False, f"version {version} already holds @{alias}")
    else:
        held, held_errors = None, None
        if holder is not None:
            data = client.get_run(holder.run_id).data
            held = (f"{name} v{holder.version} (@{alias})", data.metrics.get(f"{BENCH}.{metric}"),
                    EvalStamp.from_tags(data.tags, BENCH))
            held_errors = data.metrics.get(f"{BENCH}.confident_error_rate")
        tags, metrics = new_run.data.tags, new_run.data.metrics
        prefix = BENCH if f"{BENCH}.fingerprint" in tags else f"{BENCH}_partial"
        verdict = compare(metric, metrics.get(f"{prefix}.{metric}"), EvalStamp.from_tags(tags, prefix), held,
                          (metrics.get(f"{prefix}.confident_error_rate"), held_errors))
        if verdict.move:
            client.set_registered_model_alias(name, alias, version)
    said = ("moved: " if verdict.move else "kept: ") + verdict.reason
    client.set_tag(run_id, "chimein.promotion", said)
    tag_version(client, name, version, new_run.data, said)
    return verdict


def tag_version(client, name: str, version: str, run_data, verdict: str) -> None:
    """The version's benchmark scores (whole: bench.*, else bench_partial.*) and stamp, and the
    promotion verdict, as model version tags: the registry page shows them without opening the run."""
    tags = {"chimein.promotion": verdict}
    for prefix in (BENCH, f"{BENCH}_partial"):
        if f"{prefix}.fingerprint" in run_data.tags:
            tags |= {k: f"{v:.4f}" for k, v in run_data.metrics.items()
                     if k.startswith(f"{prefix}.") and k.removeprefix(f"{prefix}.") in METRICS + LOWER_IS_BETTER}
            tags |= {k: v for k, v in run_data.tags.items() if k.startswith(f"{prefix}.")}
            break
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v[:5000])
