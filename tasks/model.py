"""Model tasks: train (a retry resumes the same MLflow run), evaluate, publish, promote."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from chimein import adapters
from chimein.training import TrainConfig, TrainResult, train, tracking_uri


@task(retries=1, retry_delay_seconds=10)
def train_adapter(config: TrainConfig, parent_run_id: str | None = None) -> TrainResult:
    # resume=True: a Prefect retry continues from the last checkpoint in the same MLflow run
    result = train(config, resume=True, progress=False, parent_run_id=parent_run_id)
    create_markdown_artifact(key="training", description="training summary", markdown=(
        f"### {result.run_name}\n\n| | |\n|---|---|\n| MLflow run | `{result.run_id}` |\n"
        f"| steps | {result.steps} |\n| final train loss | {result.final_loss:.4f} |\n"
        f"| labelled tokens | {result.labelled_tokens} |\n| registered | {result.registered} |\n"
        f"| chattiness | {(result.chattiness or {}).get('threshold', 0.5):.3f} "
        f"({(result.chattiness or {}).get('source', 'default')}) |\n"
        f"| tracking store | `{result.tracking_uri}` |\n"))
    if result.tracking_uri.startswith("http"):
        create_link_artifact(key="mlflow-run", description="the MLflow run", link=(
            f"{result.tracking_uri}/#/experiments/0/runs/{result.run_id}"))
    return result


@task(task_run_name="evaluate-{on}")
def evaluate_adapter(result: TrainResult, on: str = "benchmark", dataset: str | None = None,
                     chattiness: float | None = None, limit: int | None = None) -> dict:
    """Decision metrics of the adapter (decisions only, no generation), logged on its training
    run with what makes them comparable (promotion.EvalStamp):

    on="benchmark": the shipped hand-written benchmark, as bench.* (decides promotion);
    on="heldout": the dataset version's held-out test split, as heldout.* (a quick check).
    chattiness None: the adapter's calibrated threshold. limit: the first N conversations only."""
    import mlflow

    from chimein.assistant import GroupChatAssistant
    from chimein.benchmark import load_eval_set
    from chimein.evaluation import evaluate, report
    from chimein.promotion import BENCH, HELDOUT, EvalStamp, log_evaluation

    evalset = load_eval_set("benchmark" if on == "benchmark" else dataset)
    prefix = BENCH if on == "benchmark" else HELDOUT
    fingerprint, total = evalset.fingerprint, evalset.total_decisions
    convs = evalset.conversations[:limit] if limit else evalset.conversations
    bot = GroupChatAssistant.from_adapter(str(result.adapter_dir), chattiness=chattiness)
    metrics = report(evaluate(bot, convs, replies=False), with_similarity=False)["metrics"]
    stamp = EvalStamp.of(bot, fingerprint, metrics["decisions"], total)
    log_evaluation(mlflow.MlflowClient(tracking_uri()), result.run_id, prefix, metrics, stamp)
    keys = ["decisions", "balanced_accuracy", "f1", "missed_intervention_rate",
            "false_interruption_rate", "precision", "recall", "macro_f1", "format_compliance"]
    create_table_artifact(
        key=f"evaluation-{on}", description=f"{prefix}.*: {fingerprint}, {stamp.decisions} of {total} "
        f"decisions, chattiness {bot.chattiness:.3f} ({bot.chattiness_source})",
        table=[{k: round(metrics[k], 3) if isinstance(metrics[k], float) else metrics[k] for k in keys}])
    return metrics | {"fingerprint": fingerprint, "complete": stamp.complete, "total_decisions": total,
                      "chattiness": bot.chattiness, "chattiness_source": bot.chattiness_source}


@task(retries=2, retry_delay_seconds=30)
def publish_adapter(result: TrainResult, target: str = "local") -> str:
    if target == "local":
        return adapters.publish_local(result.adapter_dir, result.run_name)
    return adapters.publish_hub(result.adapter_dir, target.removeprefix("hub:"))


@task
def promote_if_better(result: TrainResult, metric: str, alias: str = "champion") -> dict:
    """Move `alias` to the new registered version only if it beats the holder on the same
    benchmark, both scored in full (chimein.promotion); the verdict says why either way."""
    import mlflow

    from chimein.promotion import Verdict, promote

    if not result.registered:
        verdict = Verdict(False, "the adapter is not registered in MLflow (see the run's "
                                 "chimein.registered tag)")
    else:
        verdict = promote(mlflow.MlflowClient(tracking_uri()), result.registered, metric, alias)
    return {"moved": verdict.move, "reason": verdict.reason}
