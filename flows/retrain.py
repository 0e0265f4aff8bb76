"""Retrain: generate conversations → versioned dataset → QLoRA train → evaluate on the held-out
split → publish the adapter → move the `champion` alias if the new model is better.

    .venv/bin/python flows/retrain.py            # the offline default (what `make run` does)
    prefect deploy --prefect-file infra/prefect.yaml --all   # nightly, on a GPU work pool

Every parameter is a pydantic model, so the Prefect UI renders a form, and a run is reproducible
from its parameters. Generation and the dataset are cached on their inputs and code: a rerun with
the same parameters calls no API (`refresh: true` recomputes).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from chimein.generation import load_generation_config
from chimein.paths import conf_dir
from chimein.training import load_train_config, tracking_uri
from tasks.data import build_and_publish_dataset, generate_conversations
from tasks.model import evaluate_adapter, promote_if_better, publish_adapter, train_adapter


class GenerationOptions(BaseModel):
    source: str = Field("offline", description="offline | openai | replicate")
    count: int = Field(200, gt=0, description="Conversations to generate.")
    seed: int = Field(0, description="Run seed: same seed, same requests.")
    model: str | None = Field(None, description="Generation model (default per source).")
    base_url: str | None = Field(None, description="OpenAI/Replicate-compatible API base URL.")


class RetrainParams(BaseModel):
    preset: str = Field("smollm2-135m-instruct", description="Model preset (conf/models/).")
    generation: GenerationOptions = GenerationOptions()
    train_config: str | None = Field(
        "offline-cpu", description="conf/train/NAME.yaml or a path; None: the method's defaults.")
    max_steps: int | None = Field(None, description="Override the optimizer steps.")
    eval_limit: int | None = Field(None, description="Evaluate only the first N held-out conversations.")
    chattiness: float = Field(0.5, description="Speak when p_speak >= this (evaluation).")
    promote_metric: str = Field("macro_f1", description="Evaluation metric that decides the champion.")
    publish: str = Field("local", description="Adapter target: local or hub:ORG/NAME.")
    publish_dataset: str = Field("local", description="Dataset target: local or hub:ORG/NAME.")
    data_dir: str = Field("outputs/generated", description="Where generated conversations go.")
    output_dir: str = Field("outputs/train", description="Training checkpoints and adapters.")
    refresh: bool = Field(False, description="Recompute generation (every API call again) and the dataset.")


def train_config_path(name: str | None) -> str | None:
    if name is None or Path(name).suffix in (".yaml", ".yml"):
        return name
    return str(conf_dir() / "train" / f"{name}.yaml")


@flow(name="retrain")
def retrain(params: RetrainParams = RetrainParams(), parent_run_id: str | None = None) -> dict:
    # data: cached on inputs + code, so a rerun spends no API call
    gen_config = load_generation_config(**params.generation.model_dump())
    conversations = generate_conversations.with_options(refresh_cache=params.refresh)(
        gen_config, params.data_dir, fresh=params.refresh)
    dataset = build_and_publish_dataset.with_options(refresh_cache=params.refresh)(
        conversations, params.publish_dataset)

    # model: one MLflow run, its id passed explicitly from task to task
    train_config = load_train_config(train_config_path(params.train_config), model=params.preset,
                                     dataset=dataset, output_dir=params.output_dir,
                                     **{"trainer.max_steps": params.max_steps})
    result = train_adapter(train_config, parent_run_id)
    metrics = evaluate_adapter(result, dataset, params.chattiness, params.eval_limit)
    location = publish_adapter(result, params.publish)
    promoted = promote_if_better(result, params.promote_metric, metrics[params.promote_metric])

    summary = {"run_id": result.run_id, "run_name": result.run_name, "dataset": dataset,
               "adapter": location, "registered": result.registered, "champion": promoted,
               "final_train_loss": result.final_loss,
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    m = summary["metrics"]
    log = get_run_logger()  # not log_prints: libraries print to stdout inside tasks
    log.info(f"{result.run_name}: macro F1 {m['macro_f1']:.3f}, F1(speak) {m['f1']:.3f}, "
          f"missed {m['missed_intervention_rate']:.3f}, false interruptions "
          f"{m['false_interruption_rate']:.3f}; adapter {location}; champion: {promoted}")
    ui = "" if tracking_uri().startswith("http") else f" --backend-store-uri {tracking_uri()}"
    log.info(f"open the MLflow UI: mlflow ui{ui}")
    return summary


if __name__ == "__main__":
    # `make run`: a CPU evaluates 8 held-out conversations in about a minute
    retrain(RetrainParams(eval_limit=8))
