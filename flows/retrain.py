"""Retrain: generate conversations → versioned dataset → QLoRA train (the chattiness threshold
calibrated on the validation split) → evaluate on the shipped benchmark and on the held-out split
→ publish the adapter → move the `champion` alias only if the new model beats it on the same
benchmark, in full.

    .venv/bin/python flows/retrain.py            # the offline default (what `make run` does)
    prefect deploy --prefect-file infra/prefect.yaml --all   # nightly, on a GPU work pool

Every parameter is a pydantic model, so the Prefect UI renders a form, and a run is reproducible
from its parameters. Generation and the dataset are cached on their inputs and code: a rerun with
the same parameters calls no API (`refresh: true` recomputes). The cache is kept in the store
(store/prefect-cache, deleted with it by `make clean`), and a cached result whose file or dataset
version is gone is made again, paying only for conversations that are gone. A nightly run
(`nightly: true`) derives its generation seed from the night it runs for, so every night brings
new conversations, a new dataset version and a new training run, while a retry or re-trigger of
the same night reuses that night's data and pays for no request twice.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from chimein.generation import load_generation_config, seed_for_date
from chimein.paths import conf_dir
from chimein.training import load_train_config, tracking_uri
from tasks.data import build_and_publish_dataset, generate_conversations
from tasks.model import evaluate_adapter, promote_if_better, publish_adapter, train_adapter

PromoteMetric = Literal["balanced_accuracy", "macro_f1", "f1", "precision", "recall",
                        "missed_intervention_rate", "false_interruption_rate"]


class GenerationOptions(BaseModel):
    source: str = Field("offline", description="offline | openai | replicate")
    count: int = Field(300, gt=0, description="Conversations to generate.")
    seed: int = Field(0, description="Run seed: same seed, same requests.")
    model: str | None = Field(None, description="Generation model (default per source).")
    base_url: str | None = Field(None, description="OpenAI/Replicate-compatible API base URL.")


class RetrainParams(BaseModel):
    preset: str = Field("smollm2-135m-instruct", description="Model preset (conf/models/).")
    generation: GenerationOptions = GenerationOptions()
    nightly: bool = Field(False, description="New data each night: the generation seed is derived "
                          "from `night` (a new dataset version and training run per night; the "
                          "same night again reuses its data).")
    night: datetime.date | None = Field(None, description="With nightly: the night to train for. "
                                        "Default: this flow run's scheduled start date.")
    train_config: str | None = Field(
        "offline-cpu", description="conf/train/NAME.yaml or a path; None: the method's defaults.")
    max_steps: int | None = Field(None, description="Override the optimizer steps.")
    benchmark: bool = Field(True, description="Score the adapter on the shipped benchmark (bench.*); "
                            "only that decides promotion.")
    benchmark_limit: int | None = Field(
        None, description="Score only the first N benchmark chats (a quick check: never promotes).")
    heldout_limit: int | None = Field(
        None, description="Held-out split check (heldout.*): only the first N conversations.")
    chattiness: float | None = Field(
        None, description="Speak when p_speak >= this. None: the threshold calibrated with the adapter.")
    promote_metric: PromoteMetric = Field("balanced_accuracy", description="Benchmark metric that decides the champion.")
    publish: str = Field("local", description="Adapter target: local or hub:ORG/NAME.")
    publish_dataset: str = Field("local", description="Dataset target: local or hub:ORG/NAME.")
    data_dir: str = Field("outputs/generated", description="Where generated conversations go.")
    output_dir: str = Field("outputs/train", description="Training checkpoints and adapters.")
    refresh: bool = Field(False, description="Recompute generation (every API call again) and the dataset.")


def train_config_path(name: str | None) -> str | None:
    if name is None or Path(name).suffix in (".yaml", ".yml"):
        return name
    return str(conf_dir() / "train" / f"{name}.yaml")


def scheduled_night() -> datetime.date:
    """The date this flow run was scheduled for (a retry keeps it; now for an ad-hoc run)."""
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.date()


@flow(name="retrain")
def retrain(params: RetrainParams = RetrainParams(), parent_run_id: str | None = None) -> dict:
    log = get_run_logger()  # not log_prints: libraries print to stdout inside tasks

    # data: cached on inputs + code, so a rerun spends no API call; a nightly run seeds by date
    generation = params.generation.model_dump()
    if params.nightly:
        night = params.night or scheduled_night()
        generation["seed"] = seed_for_date(params.generation.seed, night)
        log.info(f"nightly run for {night}: generation seed {generation['seed']}")
    gen_config = load_generation_config(**generation)
    conversations = generate_conversations.with_options(refresh_cache=params.refresh)(
        gen_config, params.data_dir, fresh=params.refresh)
    dataset = build_and_publish_dataset.with_options(refresh_cache=params.refresh)(
        conversations, params.publish_dataset)

    # model: one MLflow run, its id passed explicitly from task to task
    train_config = load_train_config(train_config_path(params.train_config), model=params.preset,
                                     dataset=dataset, output_dir=params.output_dir,
                                     **{"trainer.max_steps": params.max_steps})
    result = train_adapter(train_config, parent_run_id)

    # evaluation: the shipped benchmark decides promotion; the held-out split is a quick check
    bench = evaluate_adapter(result, "benchmark", chattiness=params.chattiness,
                             limit=params.benchmark_limit) if params.benchmark else None
    heldout = evaluate_adapter(result, "heldout", dataset, params.chattiness, params.heldout_limit)
    location = publish_adapter(result, params.publish)
    promotion = promote_if_better(result, params.promote_metric)

    def numbers(m):
        return {k: v for k, v in (m or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    summary = {"run_id": result.run_id, "run_name": result.run_name, "dataset": dataset,
               "adapter": location, "registered": result.registered, "champion": promotion,
               "final_train_loss": result.final_loss, "benchmark": numbers(bench),
               "benchmark_fingerprint": bench and bench["fingerprint"], "heldout": numbers(heldout)}
    create_markdown_artifact(key="retrain-summary", description="what this run trained and decided",
                             markdown=summary_markdown(summary, params.promote_metric))
    for name, m in (("benchmark", bench), ("held-out", heldout)):
        if m:
            log.info(f"{name} ({m['fingerprint']}, {m['decisions']} of {m['total_decisions']} decisions, "
                     f"chattiness {m['chattiness']:.3f}): balanced accuracy {m['balanced_accuracy']:.3f}, "
                     f"F1(speak) {m['f1']:.3f}, missed {m['missed_intervention_rate']:.3f}, "
                     f"false interruptions {m['false_interruption_rate']:.3f}")
    log.info(f"{result.run_name}: adapter {location}; champion "
             f"{'moved' if promotion['moved'] else 'not moved'}: {promotion['reason']}")
    ui = "" if tracking_uri().startswith("http") else f" --backend-store-uri {tracking_uri()}"
    log.info(f"open the MLflow UI: mlflow ui{ui}")
    return summary


def summary_markdown(summary: dict, metric: str) -> str:
    keys = ["decisions", "balanced_accuracy", "f1", "missed_intervention_rate", "false_interruption_rate"]

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"### {summary['run_name']}", "", "| evaluation | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, m in (("benchmark (bench.*)", summary["benchmark"]),
                    ("held-out split (heldout.*)", summary["heldout"])):
        if m:
            lines.append(f"| {name} | " + " | ".join(cell(m.get(k, "-")) for k in keys) + " |")
    p = summary["champion"]
    lines += ["", f"**champion** ({metric}): {'moved' if p['moved'] else 'not moved'} — {p['reason']}", "",
              f"adapter `{summary['adapter']}`, dataset `{summary['dataset']}`, MLflow run `{summary['run_id']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # `make run`: the whole benchmark (it decides promotion) and 8 held-out chats
    retrain(RetrainParams(heldout_limit=8))
