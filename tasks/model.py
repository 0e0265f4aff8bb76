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
        f"| tracking store | `{result.tracking_uri}` |\n"))
    if result.tracking_uri.startswith("http"):
        create_link_artifact(key="mlflow-run", description="the MLflow run", link=(
            f"{result.tracking_uri}/#/experiments/0/runs/{result.run_id}"))
    return result


@task
def evaluate_adapter(result: TrainResult, dataset: str, chattiness: float = 0.5,
                     limit: int | None = None) -> dict:
    """Decision metrics on the dataset's held-out split, logged to the training run as eval.*"""
    import mlflow

    from chimein.assistant import GroupChatAssistant
    from chimein.dataset import load_published, split_conversations
    from chimein.evaluation import evaluate, report

    convs = split_conversations(load_published(dataset)["test"])[:limit]
    bot = GroupChatAssistant.from_adapter(str(result.adapter_dir), chattiness=chattiness)
    metrics = report(evaluate(bot, convs))["metrics"]
    client = mlflow.MlflowClient(tracking_uri())
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and v == v:
            client.log_metric(result.run_id, f"eval.{k}", float(v))
    keys = ["decisions", "precision", "recall", "f1", "macro_f1", "balanced_accuracy",
            "missed_intervention_rate", "false_interruption_rate", "format_compliance",
            "response_similarity"]
    create_table_artifact(key="evaluation", description=f"held-out split of {dataset}",
                          table=[{k: metrics[k] for k in keys}])
    return metrics


@task(retries=2, retry_delay_seconds=30)
def publish_adapter(result: TrainResult, target: str = "local") -> str:
    if target == "local":
        return adapters.publish_local(result.adapter_dir, result.run_name)
    return adapters.publish_hub(result.adapter_dir, target.removeprefix("hub:"))


@task
def promote_if_better(result: TrainResult, metric: str, value: float, alias: str = "champion") -> bool:
    """Point `alias` at the new registered version if it beats the current holder on `metric`
    (eval.METRIC of its run); the first version always gets it."""
    import mlflow

    if not result.registered:
        return False
    name, version = result.registered.rsplit("/", 1)
    client = mlflow.MlflowClient(tracking_uri())
    try:
        current = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    best = client.get_run(current.run_id).data.metrics.get(f"eval.{metric}") if current else None
    if current is not None and str(current.version) == version:
        return True
    if best is not None and value <= best:
        return False
    client.set_registered_model_alias(name, alias, version)
    return True
