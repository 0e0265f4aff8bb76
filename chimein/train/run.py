"""QLoRA fine-tuning with MLflow tracking, guards against the known traps, and resume.

    chimein train --preset smollm2-135m-instruct --dataset outputs/conversations.jsonl --max-steps 20

Plan, the steps of `train`:
  1. data: the dataset version, its train split tokenized with exact assistant masks
     (`tokenize_train_split`; the flows run it as a cached task, tasks/preprocess.py)
  2. run: start the MLflow run (params, tags, the dataset as input, config) or resume it
  3. model: the base in 4-bit NF4 (bitsandbytes; CPU and GPU alike) with LoRA
  4. train: TRL's SFTTrainer (or the decision-weighted one), per-step metrics to MLflow
  5. adapter: saved, and its chattiness and confidence thresholds calibrated on the validation split
  6. publish: the registered model, artifacts and chimein.json (written last: the run is done)

Defaults are the method's (docs/training.md): LoRA r=64, alpha=16, dropout 0.1; batch 4 ×
accumulation 2; gradient checkpointing; lr 2e-4 constant after 3 % warmup; max grad norm 0.3;
max length 1024 (chimein.train.config). The trainer is chimein.train.trainer, the token rows
chimein.train.rows; MLflow names and helpers are chimein.ops.tracking.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml

from chimein.data.preprocess import EXAMPLES_LEGEND
from chimein.models.adapters import adapter_meta
from chimein.models.loading import load_base_model, load_tokenizer, resolve_compute_dtype
from chimein.ops import tracking
from chimein.ops.tracking import tracking_uri
from chimein.presets import ModelPreset, load_preset
from chimein.runtime.state import DEFAULT_CHATTINESS, DEFAULT_CONFIDENCE
from chimein.train import distributed
from chimein.train.calibration import calibrate_chattiness, calibrate_confidence
from chimein.train.config import TrainConfig, flat_params
from chimein.train.rows import TokenizedData, tokenize_train_split
from chimein.train.trainer import apply_lora, build_trainer, compiled_layers, loss_guard, sft_args

# --- the run --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    adapter_dir: Path
    dataset_version: str
    steps: int
    final_loss: float | None
    labelled_tokens: int
    resumed_from: str | None
    tracking_uri: str
    registered: str | None
    finished_earlier: bool = False  # resume found the run complete: nothing was trained
    chattiness: dict | None = None  # the threshold saved with the adapter, and where it came from


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, callbacks=(),
          parent_run_id: str | None = None, data: TokenizedData | None = None,
          tags: dict[str, str] | None = None) -> TrainResult | None:
    """Train one adapter, in the steps of the module docstring. Reruns with resume=True continue
    the same MLflow run from the last checkpoint in OUTPUT_DIR/RUN_NAME/. `parent_run_id`: a
    comparison's run, whose experiment the run joins. `data`: the train split already tokenized
    for this preset, dataset version and max length (else it is tokenized here). `tags`: more
    run tags (the Prefect flow run's link and source, tasks.model.flow_run_tags).

    One process of trainer.processes: several are launched by chimein.train.launch.train, which
    calls this in each rank. Inside a rank, only rank 0 logs to MLflow and saves, calibrates and registers
    the adapter; the other ranks train and return None."""
    from datasets import disable_progress_bars
    from transformers import set_seed

    if distributed.world_size() != cfg.trainer.processes:
        raise ValueError(f"this process is one of {distributed.world_size()} (WORLD_SIZE) but "
                         f"trainer.processes is {cfg.trainer.processes}: launch several processes with "
                         f"`chimein train --processes N`, not torchrun or accelerate around it")
    disable_progress_bars()
    # 1. data
    preset, ds, data = prepare_data(cfg, data)
    # 2. run: a new one, or the interrupted one from its last checkpoint; none if it finished
    plan = plan_run(cfg, preset, data.version, resume)
    if plan.finished is not None:
        return plan.finished
    main = distributed.is_main()  # rank 0 (or the only process): the one MLflow run, the adapter
    client = tracking.client() if main else None
    with start_or_resume_run(client, cfg, data, ds, plan, parent_run_id, tags) if main else nullcontext() as run:
        run_id = run.info.run_id if main else None
        # 3. model (seeded first: LoRA's A matrices are initialised at random)
        set_seed(cfg.trainer.seed)
        model, tokenizer = load_model(cfg, preset)
        # 4. train
        args = sft_args(cfg, plan.out_dir, data.max_length, plan.dtype, plan.device, progress)
        trainer = build_trainer(cfg, model, tokenizer, train_dataset(cfg, data), args, plan.dtype, callbacks=[
            *([tracking.mlflow_logger(client, run_id)] if main else []),
            loss_guard(cfg.trainer.collapse_patience, str(plan.dtype)), *callbacks])
        with compiled_layers(trainer.model, cfg.trainer.compile):
            result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        if not main:
            return None
        # 5. adapter, with its chattiness and confidence thresholds
        chattiness, confidence = save_and_calibrate(cfg, trainer, tokenizer, preset, ds, data.version,
                                                    plan.out_dir)
        # 6. publish: registered model, artifacts, chimein.json
        registered = register_and_log(client, run_id, cfg, trainer, tokenizer, data, plan, chattiness,
                                      result.training_loss, confidence)
    return TrainResult(run_id, plan.name, plan.out_dir / "adapter", data.version, trainer.state.global_step,
                       result.training_loss, data.labelled_tokens, plan.checkpoint, tracking_uri(),
                       registered, chattiness=chattiness)


def prepare_data(cfg: TrainConfig, data: TokenizedData | None = None):
    """(preset, DatasetDict, TokenizedData): the dataset version (a JSONL path is built and
    published locally first) and its train split as token rows, `data` if given and made for
    this preset, version and max length."""
    from chimein.data.dataset import resolve_dataset

    preset = load_preset(cfg.model)
    ds, version = resolve_dataset(cfg.dataset)
    if data is None:
        return preset, ds, tokenize_train_split(preset, ds, version, cfg.max_length)
    wanted = (preset.model_dump(), version, cfg.max_length or preset.max_length)
    if (data.preset.model_dump(), data.version, data.max_length) != wanted:
        raise ValueError(f"the tokenized rows are for {data.preset.name} on {data.version} at "
                         f"{data.max_length} tokens; this run trains {preset.name} on {version} at "
                         f"{wanted[2]}: tokenize it again (tasks.preprocess.tokenize_dataset)")
    return preset, ds, data


@dataclass
class RunPlan:
    name: str  # PRESET--VERSION--SETTINGS_HASH: the MLflow run name and the output directory's
    out_dir: Path
    checkpoint: str | None  # resume from it
    mlflow_run_id: str | None  # the interrupted run, when resuming
    dtype: object  # compute dtype
    device: str
    finished: TrainResult | None = None  # resume found the run finished


def plan_run(cfg: TrainConfig, preset: ModelPreset, version: str, resume: bool) -> RunPlan:
    """One run per (preset, data, settings): a changed setting is a new run, not a resume."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    # the number of processes is not a setting (the global batch is the same on any number), nor
    # is compiling (the same steps, faster)
    settings = json.dumps(cfg.model_dump(exclude={"output_dir": True, "dataset": True, "model": True,
                                                  "trainer": {"processes", "compile"}}), sort_keys=True)
    name = f"{preset.name}--{version}--{hashlib.sha256(settings.encode()).hexdigest()[:6]}"
    out_dir = Path(cfg.output_dir) / name
    if not resume and out_dir.exists():
        raise FileExistsError(f"{out_dir} exists from an earlier run; pass --resume to continue it "
                              "(same MLflow run, from its last checkpoint) or remove the directory")
    run_id_file = out_dir / "mlflow_run_id"
    plan = RunPlan(name, out_dir, get_last_checkpoint(str(out_dir)) if resume and out_dir.is_dir() else None,
                   run_id_file.read_text().strip() if resume and run_id_file.is_file() else None,
                   resolve_compute_dtype(cfg.quantization.compute_dtype),
                   "cuda" if torch.cuda.is_available() else "cpu")
    done = out_dir / "adapter" / "chimein.json"
    if resume and done.is_file():  # the adapter is written last: this run already finished
        meta = adapter_meta(done.parent)
        plan.finished = TrainResult(
            meta["mlflow_run_id"], name, done.parent, version, meta["hyperparameters"]["steps"],
            meta["metrics"]["train_loss"], meta["metrics"]["labelled_tokens"], None, tracking_uri(),
            meta["registered"], finished_earlier=True, chattiness=meta.get("chattiness"))
    else:
        distributed.check_resume(plan.checkpoint, cfg.trainer.processes)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plan


def start_or_resume_run(client, cfg: TrainConfig, data: TokenizedData, ds, plan: RunPlan,
                        parent_run_id: str | None, tags: dict[str, str] | None):
    """The MLflow run, active (a context manager): a new one with everything known before
    training (params, tags, the dataset as input, config and examples), or the interrupted one."""
    import mlflow

    preset, version = data.preset, data.version
    tags = tracking.source_tags("chimein train") | (tags or {})
    counts = {split: len(ds[split]) for split in ("train", "validation", "test") if split in ds}
    by = f"[{tags['prefect.flow_run_name']}]({tags['prefect.flow_run_url']})" \
        if "prefect.flow_run_url" in tags else f"`{tags['mlflow.source.name']}`"
    note = (f"QLoRA adapter of **{preset.name}** (`{preset.hub_id or preset.asset}`) on dataset "
            f"**{version}** ({' / '.join(f'{n} {k}' for k, n in counts.items())} conversations; "
            f"{data.labelled_tokens} labelled tokens in {data.summary.conversations} rows of at most "
            f"{data.max_length} tokens). Started by {by}.")
    experiment = (client.get_run(parent_run_id).info.experiment_id if parent_run_id
                  else tracking.experiment_id(client, cfg.experiment))
    run = mlflow.start_run(run_id=plan.mlflow_run_id, run_name=None if plan.mlflow_run_id else plan.name,
                           experiment_id=experiment, parent_run_id=parent_run_id, description=note,
                           tags=tags, log_system_metrics=True)
    try:
        log_run_start(client, run.info.run_id, cfg, data, plan, counts)
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    return run


def dataset_sources(ref: str, version: str) -> dict[str, int]:
    """Conversations per source of a local dataset version that merged several (its info.json),
    else {}."""
    import json

    from chimein.paths import store_dir

    info = store_dir() / "datasets" / version / "info.json"
    if ref.startswith("hub:") or not info.is_file():
        return {}
    return json.loads(info.read_text(encoding="utf-8")).get("sources") or {}


def log_run_start(client, run_id: str, cfg: TrainConfig, data: TokenizedData, plan: RunPlan,
                  counts: dict[str, int]) -> None:
    """Everything known before training, once per run: params, tags, the dataset as the run's
    input, the config, examples and data.* counts."""
    import mlflow

    from chimein.paths import store_dir

    preset, version = data.preset, data.version
    (plan.out_dir / "mlflow_run_id").write_text(run_id)
    if plan.checkpoint is None:  # params are immutable: log them once, at the start
        mlflow.log_params(flat_params(cfg, preset, version, data.max_length))
        mlflow.set_tags({"chimein.family": preset.family, "chimein.preset": preset.name,
                         "chimein.base_model": preset.hub_id or preset.asset,
                         "chimein.dataset_version": version, "chimein.git_commit": tracking.git_commit(),
                         "chimein.device": plan.device,
                         "chimein.compute_dtype": str(plan.dtype).removeprefix("torch.")})
        source = cfg.dataset if cfg.dataset.startswith("hub:") else str(store_dir() / "datasets" / version)
        sources = dataset_sources(cfg.dataset, version)  # {"offline": 300, "feedback": 12} when merged
        tracking.log_dataset(client, run_id, version, source, counts | {f"source:{k}": n for k, n in sources.items()})
        if sources:
            mlflow.log_metrics({f"data.source.{k}": n for k, n in sources.items()})
        mlflow.log_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), "config/train.yaml")
        mlflow.log_text(yaml.safe_dump(preset.model_dump(), sort_keys=False), "config/model.yaml")
        mlflow.log_text(EXAMPLES_LEGEND + "\n\n".join(data.examples) + "\n", "examples.txt")
        mlflow.log_metrics({"data.labelled_tokens": data.labelled_tokens, "data.rows": data.summary.conversations,
                            "data.truncated": data.summary.truncated, "data.too_long": data.too_long})


def load_model(cfg: TrainConfig, preset: ModelPreset):
    """(model with LoRA, tokenizer)."""
    tokenizer = load_tokenizer(preset)
    model = load_base_model(preset, cfg.quantization, tokenizer, cfg.attn_implementation)
    return apply_lora(model, preset, cfg.lora, cfg.trainer.gradient_checkpointing), tokenizer


def train_dataset(cfg: TrainConfig, data: TokenizedData):
    """The columns the trainer reads: decision_masks only for the decision-weighted loss."""
    from datasets import Dataset

    weighted = cfg.loss.decision_weight != 1.0
    columns = ("input_ids", "assistant_masks") + (("decision_masks",) if weighted else ())
    return Dataset.from_dict({k: data.rows[k] for k in columns})


def save_and_calibrate(cfg: TrainConfig, trainer, tokenizer, preset: ModelPreset, ds, version: str,
                       out_dir: Path) -> tuple[dict, dict]:
    """Save the adapter and tokenizer to OUT_DIR/adapter; the chattiness and confidence thresholds
    (logged as calibration.* and calibration.confidence.*), calibrated on the validation split
    unless calibration is off."""
    import mlflow

    trainer.model.save_pretrained(out_dir / "adapter")
    tokenizer.save_pretrained(out_dir / "adapter")
    chattiness = calibrate_chattiness(trainer.model, tokenizer, preset, ds, version,
                                      cfg.calibration.max_false_interruption_rate) \
        if cfg.calibration.enabled else {"threshold": DEFAULT_CHATTINESS, "origin": "default",
                                           "source": "default (calibration off)"}
    mlflow.log_metrics({f"calibration.{k}": v for k, v in chattiness.items() if isinstance(v, (int, float))})
    mlflow.set_tag("chimein.chattiness_source", chattiness["source"])
    confidence = calibrate_confidence(trainer.model, tokenizer, preset, ds, version,
                                      cfg.calibration.max_confident_error_rate) \
        if cfg.calibration.enabled else {"threshold": DEFAULT_CONFIDENCE, "origin": "default",
                                           "source": "default (calibration off)"}
    mlflow.log_metrics({f"calibration.confidence.{k}": v for k, v in confidence.items()
                        if isinstance(v, (int, float))})
    mlflow.set_tag("chimein.confidence_source", confidence["source"])
    return chattiness, confidence


def register_and_log(client, run_id: str, cfg: TrainConfig, trainer, tokenizer, data: TokenizedData,
                     plan: RunPlan, chattiness: dict, train_loss: float, confidence: dict) -> str | None:
    """The registered model version (described and tagged), the run's artifacts (loss curve,
    adapter) and chimein.json, written last: its presence marks the run as finished."""
    import mlflow

    preset, t, steps = data.preset, cfg.trainer, trainer.state.global_step
    registered = tracking.register_adapter(
        trainer.model, tokenizer, preset, run_id,
        tags={"chimein.preset": preset.name, "chimein.dataset_version": data.version,
              "chimein.base_model": preset.hub_id or preset.asset, "chimein.run_name": plan.name,
              "chimein.chattiness": f"{chattiness['threshold']:.3f}", "train_loss": f"{train_loss:.4f}"},
        description=(f"{preset.name} adapter trained on {data.version}: {steps} steps, train loss "
                     f"{train_loss:.3f}; chattiness {chattiness['threshold']:.3f} ({chattiness['source']}). "
                     f"Run {plan.name}."))
    try:
        mlflow.log_artifact(str(tracking.loss_plot(client, {preset.name: run_id}, plan.out_dir / "loss_curve.png")))
    except ImportError:  # mlflow-skinny installs come without matplotlib: the metric is logged anyway
        pass
    adapter_dir = plan.out_dir / "adapter"
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    hyper = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
             "quantization": cfg.quantization.quant_type if cfg.quantization.load_in_4bit else "none",
             "compute_dtype": str(plan.dtype).removeprefix("torch."), "learning_rate": t.learning_rate,
             "batch": f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}",
             "processes": t.processes,
             "steps": steps, "max_length": data.max_length}
    done = adapter_dir / "chimein.json"
    done.write_text(json.dumps(
        {"name": plan.name, "preset": preset.model_dump(), "dataset_version": data.version,
         "mlflow_run_id": run_id, "registered": registered, "hyperparameters": hyper,
         "adapter_dtype": str(trainer.adapter_dtype).removeprefix("torch."), "chattiness": chattiness,
         "confidence": confidence, "knowledge": cfg.knowledge,
         "metrics": {"train_loss": train_loss, "labelled_tokens": data.labelled_tokens}},
        indent=2))
    mlflow.log_artifact(str(done), "adapter")
    return registered
