"""Retrain: generate conversations → versioned dataset → token rows for the preset → QLoRA train
(the chattiness threshold calibrated on the validation split) → evaluate on the shipped benchmark
and on the held-out split → publish the adapter → move the `champion` alias only if the new model
beats it on the same benchmark, in full.

    .venv/bin/python flows/retrain.py            # the offline default (what `make run` does)
    prefect deploy --prefect-file infra/prefect.yaml --all   # nightly, on a GPU work pool

Every parameter is a pydantic model, so the Prefect UI renders a form, and a run is reproducible
from its parameters. Generation, the dataset and its token rows are cached on their inputs and
code: a rerun with the same parameters calls no API (`refresh: true` recomputes). The cache is
kept in the store (store/prefect-cache, deleted with it by `make clean`), and a cached result whose
file or dataset version is gone is made again, paying only for conversations that are gone. A nightly run
(`nightly: true`) derives its generation seed from the night it runs for, so every night brings
new conversations, a new dataset version and a new training run, while a retry or re-trigger of
the same night reuses that night's data and pays for no request twice.
"""

from __future__ import annotations

import datetime
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from chimein.data.generation import seed_for_date
from chimein.data.generation_config import GenerationSettings, load_generation_config
from chimein.evaluate.metrics import HEADLINE_METRICS
from chimein.ops import tracking
from chimein.paths import PublishTarget, train_config_path
from chimein.presets import DEFAULT_PRESET, PresetName
from chimein.train.config import TrainConfig, load_train_config, preflight
from flows.generate import GenerateParams
from tasks.data import build_and_publish_dataset, generate_conversations
from tasks.model import evaluate_adapter, promote_if_better, publish_adapter, train_adapter
from tasks.preprocess import tokenize_dataset

PromoteMetric = Literal[HEADLINE_METRICS]
_data = GenerateParams.model_fields  # the data half of the plan: the generate flow's fields


class RetrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: PresetName = Field(DEFAULT_PRESET, description="Model preset (conf/models/).")
    allow_cpu: bool = Field(False, description="Train a preset that needs a GPU (the 7B ones) on a "
                            "machine without CUDA anyway. Off: such a run stops at once, naming the "
                            "work pool to run it on.")
    generation: GenerationSettings = _data["generation"]
    nightly: bool = Field(False, description="New data each night: the generation seed is derived "
                          "from `night` (a new dataset version and training run per night; the "
                          "same night again reuses its data).")
    night: datetime.date | None = Field(None, description="With nightly: the night to train for. "
                                        "Default: this flow run's scheduled start date.")
    train_config: str | None = Field(
        "offline-cpu", description="conf/train/NAME.yaml or a path; None: the method's defaults.")
    max_steps: int | None = Field(None, description="Override the optimizer steps.")
    processes: int = Field(1, ge=1, description="Train on N processes (DDP): on a GPU worker one per "
                           "GPU, at most its GPUs. The global batch stays the config's (each process "
                           "accumulates 1/N of it), so N only changes the speed.")
    benchmark: bool = Field(True, description="Score the adapter on the shipped benchmark (bench.*); "
                            "only that decides promotion.")
    benchmark_limit: int | None = Field(
        None, description="Score only the first N benchmark chats (a quick check: never promotes).")
    heldout_limit: int | None = Field(
        None, description="Held-out split check (heldout.*): only the first N conversations.")
    chattiness: float | None = Field(
        None, description="Speak when p_speak >= this. None: the threshold calibrated with the adapter.")
    promote_metric: PromoteMetric = Field("balanced_accuracy", description="Benchmark metric that decides the champion.")
    publish: PublishTarget = Field("local", description="Adapter target: local (the store) or hub:ORG/NAME.")
    publish_dataset: PublishTarget = _data["publish_dataset"]
    data_dir: str = _data["data_dir"]
    output_dir: str = TrainConfig.model_fields["output_dir"]
    refresh: bool = _data["refresh"]


def scheduled_night() -> datetime.date:
    """The date this flow run was scheduled for (a retry keeps it; now for an ad-hoc run)."""
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.date()


def run_name() -> str:
    """What runs: e.g. `zephyr-7b-beta--offline-300--night-2026-11-01` (a nightly run: the night it
    trains for), `tiny-chatml--openai-10--2026-11-01` (else the day it runs)."""
    from prefect.runtime import flow_run

    p = RetrainParams.model_validate(flow_run.parameters.get("params", {}))
    when = f"night-{p.night or scheduled_night()}" if p.nightly else str(scheduled_night())
    return f"{p.preset}--{p.generation.source}-{p.generation.count}--{when}"


# parent_run_id: the compare flow's MLflow parent run; internal, so no field of the Prefect form
@flow(name="retrain", flow_run_name=run_name)
def retrain(params: RetrainParams = RetrainParams(), parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    log = get_run_logger()  # not log_prints: libraries print to stdout inside tasks

    # the training config, checked first: a preset that needs a GPU stops here on a CPU worker, as do
    # more processes than GPUs, before any API call or download
    train_config = load_train_config(train_config_path(params.train_config), model=params.preset, dataset="",
                                     output_dir=params.output_dir,
                                     **{"trainer.max_steps": params.max_steps, "trainer.processes": params.processes})
    preset = preflight(train_config, params.allow_cpu)

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

    # preprocessing: token rows + masks for this preset and dataset version, cached on both
    train_config = train_config.model_copy(update={"dataset": dataset})
    tokenized = tokenize_dataset.with_options(refresh_cache=params.refresh)(preset, dataset, train_config.max_length)
    # model: one MLflow run, its id passed explicitly from task to task
    result = train_adapter(train_config, parent_run_id, tokenized)  # processes > 1: rank 0's progress still reaches this log

    # evaluation: the shipped benchmark decides promotion; the held-out split is a quick check
    bench = evaluate_adapter(result, "benchmark", chattiness=params.chattiness,
                             limit=params.benchmark_limit) if params.benchmark else None
    heldout = evaluate_adapter(result, "heldout", dataset, params.chattiness, params.heldout_limit)
    location = publish_adapter(result, params.publish)
    promotion = promote_if_better(result, params.promote_metric)

    def numbers(m):
        return {k: v for k, v in (m or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    summary = {"run_id": result.run_id, "run_url": tracking.run_url(tracking.client(), result.run_id),
               "run_name": result.run_name, "preset": params.preset, "dataset": dataset,
               "adapter": location, "registered": result.registered, "champion": promotion,
               "train_loss": result.final_loss, "benchmark": numbers(bench),
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
    log.info(tracking.ui_hint(result.run_id))
    return summary


def summary_markdown(summary: dict, metric: str) -> str:
    """The `retrain-summary` artifact: the champion decision and why, the scores, what was made."""
    keys = ["decisions", *HEADLINE_METRICS, "chattiness"]

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    p = summary["champion"]
    moved = "moved" if p["moved"] else "not moved"
    lines = [f"### {summary['run_name']}", "", f"**champion** ({metric.replace('_', ' ')}): {moved} — {p['reason']}",
             "", "| evaluation | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, m in ((f"benchmark (bench.*, {summary['benchmark_fingerprint']})", summary["benchmark"]),
                    ("held-out split (heldout.*)", summary["heldout"])):
        if m:
            lines.append(f"| {name} | " + " | ".join(cell(m.get(k, "-")) for k in keys) + " |")
    loss = summary["train_loss"]
    lines += ["", "| | |", "|---|---|", f"| preset | {summary['preset']} |",
              f"| dataset | `{summary['dataset']}` |", f"| adapter | `{summary['adapter']}` |",
              f"| registered model | {summary['registered'] or 'not registered'} |",
              f"| train loss | {'-' if loss is None else f'{loss:.3f}'} |",
              f"| MLflow run | [{summary['run_id']}]({summary['run_url']}) |" if summary.get("run_url")
              else f"| MLflow run | `{summary['run_id']}` |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # `make run`: the whole benchmark (it decides promotion) and 8 held-out chats
    retrain(RetrainParams(heldout_limit=8))
