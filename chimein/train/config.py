"""The training configuration: one pydantic model per concern (LoRA, trainer, loss, calibration),
YAML files in conf/train/ holding only what differs from the method's defaults (docs/training.md).

    cfg = load_train_config("offline-cpu", **{"trainer.max_steps": 20})
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from chimein.models.loading import QuantSettings
from chimein.ops import tracking
from chimein.presets import DEFAULT_PRESET, ModelPreset, check_hardware, load_preset
from chimein.train.distributed import check_processes


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
    processes: int = Field(1, ge=1, description="Training processes (DDP through torchrun; chimein/train/"
                           "launch.py): one per GPU on a GPU host, CPU processes otherwise. The "
                           "global batch stays per_device_train_batch_size × gradient_accumulation_steps: "
                           "each process accumulates gradient_accumulation_steps / processes. Not part "
                           "of the run's settings hash; a checkpoint resumes only on as many processes.")
    compile: Literal["off", "layers"] = Field(
        "off", description="layers: torch.compile each decoder layer (regional compilation: one "
        "graph, compiled once and shared by the identical layers, shapes dynamic), which fuses the "
        "norms, rotary embeddings, activations, casts and LoRA additions between the matrix "
        "products. Costs ~30 s once per process on 2 cores; made a CPU training step ~1.4x faster "
        "on an Intel Xeon with AMX (benchmarks/bench_train_step.py). Not part of the run's settings "
        "hash: it changes the speed, not what is trained (the same steps, rounded slightly differently).")
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
    max_confident_error_rate: float = Field(
        0.1, ge=0, le=1, description="The confidence threshold (below it a reply is said as a guess, "
        "or withdrawn when the assistant was not addressed) lets at most this share of the validation "
        "replies that state a checkable fact through confidently wrong.")


class TrainConfig(BaseModel):
    """Everything a training run depends on; logged in full as MLflow params and a YAML artifact."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_PRESET, description="Model preset name or YAML path.")
    dataset: str = Field(description="Dataset version (local:ds-…, hub:ORG/NAME@ds-…) or a JSONL path.")
    max_length: int | None = Field(None, description="Tokens per row; default: the preset's.")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="Attention kernel for training. auto: transformers' default (SDPA). On a "
        "2-core CPU, eager is ~1.2x faster for ~400-token chats (benchmarks/bench_train_step.py).")
    experiment: str = Field(tracking.DEFAULT_EXPERIMENT, description="MLflow experiment (one per "
                            "pipeline); a child run (a comparison's) goes to its parent's.")
    output_dir: str = Field("outputs/train", description="Checkpoints go to OUTPUT_DIR/RUN_NAME/.")
    knowledge: str | None = Field(None, description="The group's documents the adapter is meant to answer "
                                  "from (a folder): recorded in its chimein.json, which from_adapter, chat, "
                                  "serve and eval then use unless told otherwise.")
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


def preflight(cfg: TrainConfig, allow_cpu: bool = False) -> ModelPreset:
    """The preset to train, once this host is known to be able to train it: a preset that needs a
    GPU on a host without CUDA (unless `allow_cpu`), or a number of processes the host or the
    config cannot run, is refused here, before any download, API call or data work (HardwareError,
    ValueError; the message names the fix). `chimein train` and the retrain flow check through it."""
    preset = load_preset(cfg.model)
    check_hardware(preset, allow_cpu)
    check_processes(cfg.trainer.processes, cfg.trainer.gradient_accumulation_steps)
    return preset


def flat_params(cfg: TrainConfig, preset: ModelPreset, version: str, max_length: int) -> dict[str, str]:
    """Every setting once, under the same names across runs so runs of different presets line up
    in MLflow: preset.* (the model), data.* (the dataset version, the max length in effect) and
    the config's sections. `model`, `dataset` and `max_length` are there as preset.name,
    data.version and data.max_length."""
    out = {f"preset.{k}": v for k, v in preset.model_dump(exclude={"max_length"}).items()}
    out |= {"data.version": version, "data.max_length": max_length}
    for k, v in cfg.model_dump(exclude={"model", "dataset", "max_length"}).items():
        if isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        else:
            out[k] = v
    return {k: str(v) for k, v in out.items()}
