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
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.json_schema import SkipJsonSchema

from chimein.data.generation import seed_for_date
from chimein.data.generation_config import GenerationSettings, load_generation_config
from chimein.evaluate.metrics import HEADLINE_METRICS
from chimein.ops import tracking
from chimein.paths import (
    CPU_TRAIN_CONFIG,
    DEFAULT_TRAIN_CONFIG,
    PublishTarget,
    list_train_configs,
    train_config_path,
)
from chimein.presets import DEFAULT_PRESET, PresetName
from chimein.train.config import TrainConfig, load_train_config, preflight
from flows.generate import GenerateParams
from flows.naming import typed_name_or
from tasks.data import add_feedback, build_and_publish_dataset, check_feedback, generate_conversations
from tasks.model import (
    evaluate_adapter,
    evaluate_grounded,
    index_knowledge,
    promote_if_better,
    publish_adapter,
    train_adapter,
)
from tasks.preprocess import tokenize_dataset

PromoteMetric = Literal[HEADLINE_METRICS]
# the Prefect form offers the training configs as a choice (conf/train/ and "defaults"); a direct
# call may still pass a YAML path, and None (the method's defaults, as before "defaults" existed)
TrainConfigName = Annotated[str, BeforeValidator(lambda v: DEFAULT_TRAIN_CONFIG if v is None else v),
                            WithJsonSchema({"type": "string", "enum": list_train_configs()})]
# a date picker that may stay empty (no `date | None` type switch in the form)
NightDate = Annotated[datetime.date | None, BeforeValidator(lambda v: v or None),
                      WithJsonSchema({"type": "string", "format": "date"})]
_data = GenerateParams.model_fields  # the data half of the plan: the generate flow's fields


class RetrainParams(BaseModel):
    """What this retrain run does. Every field has a default: the nightly run's."""

    # each field is a field of the Prefect run form: titles and descriptions are written for the
    # person filling it in, and a field takes a value directly (defaults, not `int | None` switches)

    model_config = ConfigDict(extra="forbid", title="Retrain")

    preset: PresetName = Field(DEFAULT_PRESET, title="Model", description="The base model to fine-tune "
                               "(conf/models/). The 7B ones need a GPU worker.")
    generation: GenerationSettings = _data["generation"]
    max_steps: int = Field(0, ge=0, title="Training steps", description="Optimizer steps. 0: what the "
                           "training config says (defaults: one epoch).")
    train_config: TrainConfigName = Field(
        CPU_TRAIN_CONFIG, title="Training config", description="Settings from conf/train/NAME.yaml; "
        "defaults: the QLoRA method's own (for a GPU). Outside a deployment also a YAML path.")
    nightly: bool = Field(False, title="New data each night", description="Derive the generation seed "
                          "from the night: each night a new dataset version and training run, and a "
                          "rerun of the same night reuses its data.")
    night: NightDate = Field(None, title="Night", description="With new data each night: the night to "
                             "train for. Empty: the day this run was scheduled for.",
                             json_schema_extra=lambda s: s.pop("default", None))  # an empty date, not null
    benchmark: bool = Field(True, title="Score on the benchmark", description="Score the adapter on the "
                            "shipped benchmark (bench.* in MLflow); only that decides the champion.")
    knowledge: str = Field("", title="The group's documents", description="A folder of Markdown or text "
                           "files on the worker that the assistant answers from. The run indexes it first "
                           "(what it indexed is in the log; a folder with nothing to index stops the run) "
                           "and names it in the adapter's chimein.json, so chat, serve and eval use it by "
                           "default. Empty: none.")
    grounded: bool = Field(True, title="Score with documents", description="Score the adapter on the "
                           "grounded benchmark too: chats about invented organisations with their documents "
                           "as its knowledge (grounded.* in MLflow): answers from them, and 'the documents "
                           "don't say' when they do not answer.")
    tools: bool = Field(True, title="Exact tools", description="Score replies with the exact tools on "
                        "(conversions, time zones, dates, arithmetic answered by libraries, not the model), as "
                        "chat and serve run by default. Promotion compares confident errors only between runs "
                        "scored with the same tools and hedging.")
    hedge: bool = Field(True, title="Hedge when unsure", description="Score replies with hedging on: below "
                        "the adapter's confidence threshold an addressed reply says it is not sure. As "
                        "chat and serve run by default.")
    benchmark_limit: int = Field(0, ge=0, title="Benchmark chats", description="Score only the first N "
                                 "benchmark chats: a quick check that never moves the champion. 0: all.")
    heldout_limit: int = Field(0, ge=0, title="Held-out chats", description="Check on the first N "
                               "conversations of the dataset's held-out split (heldout.*). 0: all.")
    chattiness: float = Field(0.0, ge=0, le=1, title="Chattiness", description="Speak when the model's "
                              "p(speak) is at least this. 0: the threshold calibrated with the adapter.")
    promote_metric: PromoteMetric = Field("balanced_accuracy", title="Champion metric", description="The "
                                          "benchmark metric on which a new model must beat the champion.")
    processes: int = Field(1, ge=1, title="Processes (GPUs)", description="Train on N processes (DDP), one "
                           "per GPU of the worker. The batch stays the config's, so N changes only the speed.")
    allow_cpu: bool = Field(False, title="Allow a 7B model on a CPU", description="Train a model that needs "
                            "a GPU on a worker without one anyway (days). Off: such a run stops at once.")
    publish: PublishTarget = Field("local", title="Publish the adapter to", description="local: the store "
                                   "on the worker; hub:ORG/NAME: a Hugging Face model repo.")
    publish_dataset: PublishTarget = _data["publish_dataset"]
    data_dir: str = _data["data_dir"]
    output_dir: str = Field(TrainConfig.model_fields["output_dir"].default, title="Training directory",
                            description="Checkpoints and the trained adapter, on the worker.")
    refresh: bool = _data["refresh"]

    @field_validator("max_steps", "benchmark_limit", "heldout_limit", "chattiness", mode="before")
    @classmethod
    def _none_is_zero(cls, v):
        return 0 if v is None else v  # None: what callers sent before these fields had a default

    @property
    def fixed_chattiness(self) -> float | None:
        return self.chattiness or None


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
    return typed_name_or(f"{p.preset}--{p.generation.source}-{p.generation.count}--{when}")


# parent_run_id: the compare flow's MLflow parent run; internal, so no field of the Prefect form
@flow(name="retrain", flow_run_name=run_name)
def retrain(params: RetrainParams = RetrainParams(), parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    log = get_run_logger()  # not log_prints: libraries print to stdout inside tasks

    # the training config, checked first: a preset that needs a GPU stops here on a CPU worker, as do
    # more processes than GPUs, before any API call or download
    train_config = load_train_config(train_config_path(params.train_config), model=params.preset, dataset="",
                                     output_dir=params.output_dir,
                                     **{"trainer.max_steps": params.max_steps or None, "trainer.processes": params.processes})
    preset = preflight(train_config, params.allow_cpu)
    check_feedback(params.generation.feedback)  # a folder that is not there stops the run before any work
    if params.knowledge:  # the group's documents: indexed now, so a bad folder stops the run before any work
        train_config = train_config.model_copy(update={"knowledge": index_knowledge(params.knowledge)})

    # data: cached on inputs + code, so a rerun spends no API call; a nightly run seeds by date
    generation = params.generation.model_dump()
    if params.nightly:
        night = params.night or scheduled_night()
        generation["seed"] = seed_for_date(params.generation.seed, night)
        log.info(f"nightly run for {night}: generation seed {generation['seed']}")
    gen_config = load_generation_config(**generation)
    conversations = generate_conversations.with_options(refresh_cache=params.refresh)(
        gen_config, params.data_dir, fresh=params.refresh)
    if params.generation.feedback:  # the recorded rooms, beside the generated conversations
        conversations = add_feedback(conversations, params.generation.feedback)
    dataset = build_and_publish_dataset.with_options(refresh_cache=params.refresh)(
        conversations, params.publish_dataset)

    # preprocessing: token rows + masks for this preset and dataset version, cached on both
    train_config = train_config.model_copy(update={"dataset": dataset})
    tokenized = tokenize_dataset.with_options(refresh_cache=params.refresh)(preset, dataset, train_config.max_length)
    # model: one MLflow run, its id passed explicitly from task to task
    result = train_adapter(train_config, parent_run_id, tokenized)  # processes > 1: rank 0's progress still reaches this log

    # evaluation: the shipped benchmark decides promotion; the held-out split is a quick check
    honesty = {"tools": params.tools, "hedge": params.hedge}  # what shapes the replies scored
    bench = evaluate_adapter(result, "benchmark", chattiness=params.fixed_chattiness,
                             limit=params.benchmark_limit or None, **honesty) if params.benchmark else None
    heldout = evaluate_adapter(result, "heldout", dataset, params.fixed_chattiness, params.heldout_limit or None,
                               **honesty)
    grounded = evaluate_grounded(result, params.fixed_chattiness, **honesty) if params.grounded else None
    location = publish_adapter(result, params.publish)
    promotion = promote_if_better(result, params.promote_metric)

    def numbers(m):
        return {k: v for k, v in (m or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    summary = {"run_id": result.run_id, "run_url": tracking.run_url(tracking.client(), result.run_id),
               "run_name": result.run_name, "preset": params.preset, "dataset": dataset,
               "adapter": location, "registered": result.registered, "champion": promotion,
               "train_loss": result.final_loss, "benchmark": numbers(bench),
               "benchmark_fingerprint": bench and bench["fingerprint"], "heldout": numbers(heldout),
               "grounded": numbers(grounded), "grounded_fingerprint": grounded and grounded["fingerprint"]}
    create_markdown_artifact(key="retrain-summary", description="what this run trained and decided",
                             markdown=summary_markdown(summary, params.promote_metric))
    for name, m in (("benchmark", bench), ("held-out", heldout)):
        if m:
            log.info(f"{name} ({m['fingerprint']}, {m['decisions']} of {m['total_decisions']} decisions, "
                     f"chattiness {m['chattiness']:.3f}): balanced accuracy {m['balanced_accuracy']:.3f}, "
                     f"F1(speak) {m['f1']:.3f}, missed {m['missed_intervention_rate']:.3f}, "
                     f"false interruptions {m['false_interruption_rate']:.3f}"
                     + (f"; replies at {m['factual_turns']} factual turns: right {m['answer_accuracy']:.3f}, "
                        f"hedged {m['hedge_rate']:.3f}, confidently wrong {m['confident_error_rate']:.3f}"
                        if m.get("factual_turns") else ""))
    if grounded:
        log.info(f"with documents ({grounded['fingerprint']}): right at {grounded['answered_accuracy']:.3f} of "
                 f"{grounded['answered_turns']} questions they answer (confidently wrong "
                 f"{grounded['answered_confident_error_rate']:.3f}); says they don't say at "
                 f"{grounded['unanswered_not_sure_rate']:.3f} of {grounded['unanswered_turns']} they don't; "
                 f"decisions: balanced accuracy {grounded['balanced_accuracy']:.3f}")
    log.info(f"{result.run_name}: adapter {location}; champion "
             f"{'moved' if promotion['moved'] else 'not moved'}: {promotion['reason']}")
    log.info(tracking.ui_hint(result.run_id))
    return summary


def summary_markdown(summary: dict, metric: str) -> str:
    """The `retrain-summary` artifact: the champion decision and why, the scores, what was made."""
    keys = ["decisions", *HEADLINE_METRICS, "answer_accuracy", "hedge_rate", "confident_error_rate", "chattiness"]

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
    if g := summary.get("grounded"):
        lines += ["", f"**with documents** (grounded.*, {summary['grounded_fingerprint']}): right at "
                  f"{g['answered_accuracy']:.3f} of the questions they answer (confidently wrong "
                  f"{g['answered_confident_error_rate']:.3f}), \"the documents don't say\" at "
                  f"{g['unanswered_not_sure_rate']:.3f} of those they don't; balanced accuracy "
                  f"{g['balanced_accuracy']:.3f}"]
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
