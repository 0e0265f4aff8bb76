"""QLoRA fine-tuning with MLflow tracking, guards against the known traps, and resume.

    chimein train --model smollm2-135m-instruct --dataset outputs/conversations.jsonl --max-steps 20

Plan: resolve config → dataset version → tokenize the train split with exact assistant masks →
load the base in 4-bit NF4 (bitsandbytes; CPU and GPU alike) → LoRA → TRL SFTTrainer → adapter,
logged to MLflow (params, per-step metrics, tags, artifacts, a registered model).

Defaults are the method's (DESIGN.md): LoRA r=64, alpha=16, dropout 0.1; batch 4 × accumulation 2;
gradient checkpointing; lr 2e-4 constant after 3 % warmup; max grad norm 0.3; max length 1024.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from chimein.presets import ModelPreset, load_preset, load_tokenizer, model_source


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(64, gt=0, description="Rank; higher: more capacity and memory.")
    alpha: int = Field(16, gt=0, description="Scaling numerator (alpha / r); peft's default is 8.")
    dropout: float = Field(0.1, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    top_layers: int | None = Field(
        None, gt=0, description="LoRA only in the last N decoder layers (None: all, the method). "
        "Backward then stops below them: on a CPU, where compute is the limit, more steps per minute.")
    adapter_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the LoRA weights. auto: the compute dtype (bf16 on GPUs that "
        "have it, fp32 on CPUs); TRL alone puts QLoRA adapters in bf16 everywhere. On a 2-core CPU "
        "both train at the same speed (benchmarks/bench_train_step.py).")


class QuantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_in_4bit: bool = Field(True, description="QLoRA: base weights in 4-bit; False trains LoRA on full-precision weights.")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(False, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp32. fp16 only on request: it "
        "collapsed Llama-2's loss to 0.0 in the original.")


class TrainerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 2
    gradient_checkpointing: bool = True
    learning_rate: float = 2e-4
    lr_scheduler_type: str = Field("constant_with_warmup", description="transformers' default is linear decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(0.3, description="transformers' default is 1.0.")
    num_train_epochs: float = 1.0
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs.")
    save_steps: int = Field(10, gt=0, description="Checkpoint every N optimizer steps (resume point).")
    save_total_limit: int = 2
    logging_steps: int = 1
    seed: int = 42
    collapse_patience: int = Field(3, gt=0, description="Stop after this many consecutive logged losses of exactly 0.0 or NaN/inf.")


class LossSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision_weight: float = Field(
        1.0, gt=0, description="Weight of the tokens that carry the speak/silence decision (a "
        "silent turn: \"(silence)\" and its end-of-turn token; a reply: its \"(response)\" label) "
        "relative to reply text, in a weighted mean over the assistant tokens. 1.0 is the method's "
        "plain mean (TRL's own loss). Reply text is ~80 % of the labelled tokens, so at 1.0 the "
        "decision gets a small share of the gradient; > 1 trains it faster.")


class CalibrationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="After training, choose the chattiness threshold on the "
                          "dataset's validation split and save it with the adapter (chat, serve, eval "
                          "and the flows use it by default); off: 0.5.")
    max_false_interruption_rate: float | None = Field(
        0.03, ge=0, le=1, description="The threshold with the best balanced accuracy among those that "
        "interrupt at most this share of silent turns on validation: an unwanted interruption costs "
        "more than a miss (a user can always address the assistant). Validation chats come from the "
        "training distribution, so they understate interruptions on new chats (~1.5x on the "
        "benchmark): 0.03 here aims at <= 0.05 there. None: the best balanced accuracy.")


class TrainConfig(BaseModel):
    """Everything a training run depends on; logged in full as MLflow params and a YAML artifact."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m-instruct", description="Model preset name or YAML path.")
    dataset: str = Field(description="Dataset version (local:ds-…, hub:ORG/NAME@ds-…) or a JSONL path.")
    max_length: int | None = Field(None, description="Tokens per row; default: the preset's.")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="Attention kernel for training. auto: transformers' default (SDPA). On a "
        "2-core CPU, eager is ~1.2x faster for ~400-token chats (benchmarks/bench_train_step.py).")
    experiment: str = Field("chimein", description="MLflow experiment (one per pipeline).")
    output_dir: str = Field("outputs/train", description="Checkpoints go to OUTPUT_DIR/RUN_NAME/.")
    lora: LoraSettings = LoraSettings()
    quantization: QuantSettings = QuantSettings()
    trainer: TrainerSettings = TrainerSettings()
    loss: LossSettings = LossSettings()
    calibration: CalibrationSettings = CalibrationSettings()


def load_train_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, field = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[field] = value
    return TrainConfig.model_validate(data or {})


def flat_params(cfg: TrainConfig, preset: ModelPreset) -> dict[str, str]:
    """Consistent names across runs, so runs of different presets line up in MLflow."""
    out = {f"preset.{k}": v for k, v in preset.model_dump().items()}
    for k, v in cfg.model_dump().items():
        if isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        else:
            out[k] = v
    return {k: str(v) for k, v in out.items()}


# --- guards ---------------------------------------------------------------------------------------


class TrainingGuardError(RuntimeError):
    """A known trap was hit; the message names the fix."""


def resolve_compute_dtype(setting: str):
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_labelled_tokens(train_rows) -> int:
    n = sum(map(sum, train_rows["assistant_masks"]))
    if n == 0:
        raise TrainingGuardError(
            "the training data has zero labelled tokens, so there is nothing to learn: every "
            "assistant mask is empty. Check that the preset's family matches the model's chat "
            "template (`chimein preprocess` writes examples.txt with the labelled spans marked)")
    return n


def loss_guard(patience: int, dtype_name: str):
    from transformers import TrainerCallback

    class LossGuard(TrainerCallback):
        """Stop when the loss is exactly 0.0 or NaN/inf for `patience` consecutive logs."""

        def __init__(self):
            self.bad = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            self.bad = self.bad + 1 if (loss == 0.0 or not math.isfinite(loss)) else 0
            if self.bad >= patience:
                raise TrainingGuardError(
                    f"the training loss was {loss} for {patience} consecutive steps (compute dtype "
                    f"{dtype_name}): training has collapsed. Use bf16 where the GPU supports it "
                    "(--dtype bfloat16), else float32 (--dtype float32); fp16 collapsed Llama-2's "
                    "loss to exactly 0.0. A lower learning rate also helps if the loss is NaN.")

    return LossGuard()


def keep_adapter_dtype(model):
    """Resuming loads the checkpoint through peft, which upcasts bf16 adapters to fp32 (and the
    optimizer state with them): the resumed run would drift from an uninterrupted one. Put the
    adapter weights and their optimizer state back in the dtype they train in."""
    from transformers import TrainerCallback

    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}

    class KeepAdapterDtype(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            for name, param in model.named_parameters():
                dtype = dtypes.get(name)
                if dtype is None or param.dtype == dtype:
                    continue
                param.data = param.data.to(dtype)
                for key, value in (optimizer.state.get(param, {}) if optimizer else {}).items():
                    if key != "step" and value.is_floating_point():
                        optimizer.state[param][key] = value.to(dtype)

    return KeepAdapterDtype()


def decision_weighted_trainer(decision_weight: float, **kwargs):
    """An SFTTrainer whose loss is the weighted mean of the assistant tokens' cross-entropy, the
    decision tokens weighted `decision_weight` (rows carry a `decision_masks` column). Logits are
    computed only where a label is (TRL's fused head scores every position on a CPU)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class Collator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            out = super().torch_call([{k: v for k, v in e.items() if k != "decision_masks"}
                                      for e in examples])
            masks = pad_sequence([torch.tensor(e["decision_masks"]) for e in examples], batch_first=True)
            out["decision_masks"] = F.pad(masks, (0, out["input_ids"].shape[1] - masks.shape[1]))
            return out

    class DecisionWeightedTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "decision_masks"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            decision, labels = inputs.pop("decision_masks"), inputs.pop("labels")
            target = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
            keep = target != -100
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target[keep], reduction="none")
            weight = 1 + (decision_weight - 1) * F.pad(decision[:, 1:], (0, 1))[keep].to(ce.dtype)
            loss = (ce * weight).sum() / weight.sum().clamp(min=1e-8)
            return (loss, None) if return_outputs else loss

    tokenizer = kwargs["processing_class"]
    trainer = DecisionWeightedTrainer(data_collator=Collator(pad_token_id=tokenizer.pad_token_id), **kwargs)
    trainer.loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by accumulation
    return trainer


def sft_args(cfg: TrainConfig, out_dir: str | Path, max_length: int, dtype, device: str, progress: bool):
    """TRL's SFTConfig for a TrainConfig: the arguments every training of chimein runs with."""
    import torch
    from trl import SFTConfig

    t = cfg.trainer
    return SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # TRL 1.x: a float below 1 is a ratio
        max_grad_norm=t.max_grad_norm, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, logging_steps=t.logging_steps,
        seed=t.seed, data_seed=t.seed, max_length=max_length, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, report_to="none", disable_tqdm=not progress,
        include_num_input_tokens_seen=True, dataset_num_proc=None, use_cpu=device == "cpu")


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, args, dtype, callbacks=()):
    """The trainer `train` runs (TRL's SFTTrainer, or the decision-weighted one), with the adapter
    cast to its training dtype; `trainer.adapter_dtype` says which. Also used by the benchmarks, so
    they time the same code."""
    import torch
    from trl import SFTTrainer

    weighted = cfg.loss.decision_weight != 1.0
    make_trainer = (functools.partial(decision_weighted_trainer, cfg.loss.decision_weight)
                    if weighted else SFTTrainer)
    trainer = make_trainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                           callbacks=list(callbacks))
    adapter_dtype = dtype if cfg.lora.adapter_dtype == "auto" else getattr(torch, cfg.lora.adapter_dtype)
    for param in trainer.model.parameters():
        if param.requires_grad:  # before the optimizer exists, so its state follows
            param.data = param.data.to(adapter_dtype)
    trainer.add_callback(keep_adapter_dtype(trainer.model))
    trainer.adapter_dtype = adapter_dtype
    return trainer


# --- model ----------------------------------------------------------------------------------------


def load_base_model(preset: ModelPreset, quant: QuantSettings, tokenizer, attn_implementation: str = "auto"):
    """The preset's base model, 4-bit NF4 when asked (same path on CPU and GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_compute_dtype(quant.compute_dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=quant.double_quant)
        kwargs["device_map"] = {"": 0 if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_source(preset, need_weights=True), **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # pad policy 'add'
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # incompatible with gradient checkpointing; inference turns it on
    return model


def apply_lora(model, preset: ModelPreset, lora: LoraSettings, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        # PEFT freezes the embeddings, so with checkpointing no input would require grad and
        # backward fails with "element 0 of tensors does not require grad".
        model.enable_input_require_grads()
    layers = model.config.num_hidden_layers
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                        target_modules=list(preset.lora_target_modules), task_type="CAUSAL_LM",
                        layers_to_transform=list(range(max(layers - lora.top_layers, 0), layers))
                        if lora.top_layers else None)
    return get_peft_model(model, config)


# --- MLflow ---------------------------------------------------------------------------------------


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the working directory (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_logger(client, run_id: str):
    from transformers import TrainerCallback

    class MlflowLogger(TrainerCallback):
        """Per-step metrics to one run, by id (MLflow's active run is per thread)."""

        def __init__(self):
            self.last = None  # (time, tokens seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            from mlflow.entities import Metric

            now = time.time()
            metrics = {k: float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and k in
                       ("loss", "grad_norm", "learning_rate", "epoch", "train_loss", "train_runtime")}
            seen = state.num_input_tokens_seen
            if self.last and seen > self.last[1] and now > self.last[0]:
                metrics["tokens_per_s"] = (seen - self.last[1]) / (now - self.last[0])
            self.last = (now, seen)
            stamp = int(now * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, state.global_step)
                                              for k, v in metrics.items() if math.isfinite(v)])

    return MlflowLogger()


def loss_curve_png(client, run_id: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m.step for m in history], [m.value for m in history], marker=".")
    ax.set(xlabel="optimizer step", ylabel="train loss (assistant tokens)", title="loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
          parent_run_id: str | None = None) -> TrainResult:
    """Train one adapter; see the module docstring. Reruns with resume=True continue the same
    MLflow run from the last checkpoint in OUTPUT_DIR/RUN_NAME/."""
    import mlflow
    import torch
    from datasets import Dataset, disable_progress_bars
    from mlflow import MlflowClient
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from chimein.dataset import resolve_dataset, split_conversations
    from chimein.preprocess import EXAMPLES_LEGEND, PreprocessSummary, tokenize_conversations

    disable_progress_bars()
    # config → data
    preset = load_preset(cfg.model)
    tokenizer = load_tokenizer(preset)
    ds, version = resolve_dataset(cfg.dataset)
    max_length = cfg.max_length or preset.max_length
    summary = PreprocessSummary(preset.name, version, "", max_length)
    rows, too_long, examples = tokenize_conversations(
        split_conversations(ds["train"]), range(1, len(ds["train"]) + 1), f"{version}:train",
        preset, tokenizer, summary)
    labelled = check_labelled_tokens(rows)
    weighted = cfg.loss.decision_weight != 1.0
    columns = ("input_ids", "assistant_masks") + (("decision_masks",) if weighted else ())
    train_ds = Dataset.from_dict({k: rows[k] for k in columns})

    # one run per (preset, data, settings): a changed setting is a new run, not a resume
    settings = json.dumps(cfg.model_dump(exclude={"output_dir", "dataset", "model"}), sort_keys=True)
    run_name = f"{preset.name}--{version}--{hashlib.sha256(settings.encode()).hexdigest()[:6]}"
    out_dir = Path(cfg.output_dir) / run_name
    last_ckpt = get_last_checkpoint(str(out_dir)) if resume and out_dir.is_dir() else None
    run_id_file = out_dir / "mlflow_run_id"
    if not resume and out_dir.exists():
        raise FileExistsError(f"{out_dir} exists from an earlier run; pass --resume to continue it "
                              "(same MLflow run, from its last checkpoint) or remove the directory")
    done = out_dir / "adapter" / "chimein.json"
    if resume and done.is_file():  # the adapter is written last: this run already finished
        meta = json.loads(done.read_text())
        return TrainResult(meta["mlflow_run_id"], run_name, done.parent, version,
                           meta["hyperparameters"]["steps"], meta["metrics"]["final_train_loss"],
                           meta["metrics"]["labelled_tokens"], None, tracking_uri(),
                           meta["registered"], finished_earlier=True, chattiness=meta.get("chattiness"))
    out_dir.mkdir(parents=True, exist_ok=True)

    # MLflow run: a new one, or the interrupted one when resuming
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # it would call home
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment = mlflow.set_experiment(cfg.experiment)
    run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                          experiment_id=experiment.experiment_id, log_system_metrics=True) as run:
        run_id = run.info.run_id
        run_id_file.write_text(run_id)
        if last_ckpt is None:  # params are immutable: log them once, at the start
            mlflow.log_params(flat_params(cfg, preset) | {"data.version": version,
                                                          "data.max_length": str(max_length)})
            if parent_run_id:  # a child of a comparison run
                mlflow.set_tag("mlflow.parentRunId", parent_run_id)
            mlflow.set_tags({"chimein.family": preset.family, "chimein.preset": preset.name,
                             "chimein.base_model": preset.hub_id or preset.asset,
                             "chimein.dataset_version": version, "chimein.git_commit": git_commit(),
                             "chimein.device": device, "chimein.compute_dtype": str(dtype).removeprefix("torch.")})
            mlflow.log_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), "config/train.yaml")
            mlflow.log_text(yaml.safe_dump(preset.model_dump(), sort_keys=False), "config/model.yaml")
            mlflow.log_text(EXAMPLES_LEGEND + "\n\n".join(examples) + "\n", "examples.txt")
            mlflow.log_metrics({"data.labelled_tokens": labelled, "data.rows": summary.conversations,
                                "data.truncated": summary.truncated, "data.too_long": len(too_long)})

        # model (seeded first: LoRA's A matrices are initialised at random)
        set_seed(cfg.trainer.seed)
        model = load_base_model(preset, cfg.quantization, tokenizer, cfg.attn_implementation)
        model = apply_lora(model, preset, cfg.lora, cfg.trainer.gradient_checkpointing)

        # train
        t = cfg.trainer
        args = sft_args(cfg, out_dir, max_length, dtype, device, progress)
        trainer = build_trainer(cfg, model, tokenizer, train_ds, args, dtype,
                                callbacks=[mlflow_logger(client, run_id),
                                           loss_guard(t.collapse_patience, str(dtype)), *callbacks])
        adapter_dtype = trainer.adapter_dtype
        result = trainer.train(resume_from_checkpoint=last_ckpt)

        # artifacts; chimein.json goes last: its presence marks the run as finished
        adapter_dir = out_dir / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        chattiness = calibrate_chattiness(trainer.model, tokenizer, preset, ds, version,
                                          cfg.calibration.max_false_interruption_rate) \
            if cfg.calibration.enabled else {"threshold": 0.5, "source": "default (calibration off)"}
        mlflow.log_metrics({f"calibration.{k}": v for k, v in chattiness.items() if isinstance(v, (int, float))})
        mlflow.set_tag("chimein.chattiness_source", chattiness["source"])
        registered = register_adapter(trainer.model, tokenizer, preset, run_id)
        mlflow.log_metric("final_train_loss", result.training_loss)
        mlflow.log_artifact(str(loss_curve_png(client, run_id, out_dir / "loss_curve.png")))
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        hyper = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
                 "quantization": cfg.quantization.quant_type if cfg.quantization.load_in_4bit else "none",
                 "compute_dtype": str(dtype).removeprefix("torch."), "learning_rate": t.learning_rate,
                 "batch": f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}",
                 "steps": trainer.state.global_step, "max_length": max_length}
        done.write_text(json.dumps(
            {"name": run_name, "preset": preset.model_dump(), "dataset_version": version,
             "mlflow_run_id": run_id, "registered": registered, "hyperparameters": hyper,
             "adapter_dtype": str(adapter_dtype).removeprefix("torch."), "chattiness": chattiness,
             "metrics": {"final_train_loss": result.training_loss, "labelled_tokens": labelled}},
            indent=2))
        mlflow.log_artifact(str(done), "adapter")
    return TrainResult(run_id, run_name, adapter_dir, version, trainer.state.global_step,
                       result.training_loss, labelled, last_ckpt, tracking_uri(), registered,
                       chattiness=chattiness)


def calibrate_chattiness(model, tokenizer, preset: ModelPreset, ds, version: str,
                         max_fir: float | None = None) -> dict:
    """The threshold on p_speak with the best balanced accuracy on the validation split (among
    those with a false-interruption rate <= max_fir), scored by the runtime itself: the same
    decisions chat and serve make."""
    from chimein.assistant import GroupChatAssistant
    from chimein.dataset import split_conversations
    from chimein.evaluation import calibrate_threshold, evaluate

    convs = split_conversations(ds["validation"]) if "validation" in ds else []
    if not convs:
        return {"threshold": 0.5, "source": f"default ({version} has no validation split)"}
    model.config.use_cache = True
    records = evaluate(GroupChatAssistant(model, tokenizer, preset), convs, replies=False)
    labels = [r.label for r in records]
    if len(set(labels)) < 2:
        return {"threshold": 0.5, "source": f"default ({version}:validation has one class only)"}
    threshold, m = calibrate_threshold(labels, [r.p_speak for r in records], max_fir)
    bound = f", false interruptions <= {max_fir:g}" if max_fir is not None else ""
    return {"threshold": threshold, "source": f"calibrated on {version}:validation{bound}",
            "decisions": len(records), "balanced_accuracy": m["balanced_accuracy"],
            "missed_intervention_rate": m["missed_intervention_rate"],
            "false_interruption_rate": m["false_interruption_rate"]}


def register_adapter(model, tokenizer, preset: ModelPreset, run_id: str) -> str | None:
    """Log the adapter as an MLflow transformers/PEFT model that references its base, and register
    it as `chimein-PRESET`. Returns "NAME/VERSION", or None (with a tag saying why) if this MLflow
    cannot log it; the adapter is in the run's artifacts either way."""
    import logging

    import mlflow
    import peft
    import torch
    import transformers

    base = model_source(preset, need_weights=True)
    try:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
            task="text-generation",
            # a local base must be named, else MLflow saves the base with LoRA layers injected
            base_model_path=base if Path(base).is_dir() else None,
            # pinned here: MLflow's inferred requirements add torchvision, which is not installed
            pip_requirements=[f"transformers=={transformers.__version__}", f"peft=={peft.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=f"chimein-{preset.name}")
    except Exception as e:  # noqa: BLE001 — MLflow's flavor support trails transformers releases
        logging.getLogger(__name__).warning("MLflow could not log the PEFT model (%s); the adapter "
                                            "is in the run's artifacts under adapter/", e)
        mlflow.MlflowClient().set_tag(run_id, "chimein.registered", f"no: {type(e).__name__}: {e}"[:500])
        return None
    return f"chimein-{preset.name}/{info.registered_model_version}"
