"""QLoRA fine-tuning with MLflow tracking, guards against the known traps, and resume.

    chimein train --preset smollm2-135m-instruct --dataset outputs/conversations.jsonl --max-steps 20

Plan, the steps of `train`:
  1. data: the dataset version, its train split tokenized with exact assistant masks
     (`tokenize_train_split`; the flows run it as a cached task, tasks/preprocess.py)
  2. run: start the MLflow run (params, tags, the dataset as input, config) or resume it
  3. model: the base in 4-bit NF4 (bitsandbytes; CPU and GPU alike) with LoRA
  4. train: TRL's SFTTrainer (or the decision-weighted one), per-step metrics to MLflow
  5. adapter: saved, and the chattiness threshold calibrated on the validation split
  6. publish: the registered model, artifacts and chimein.json (written last: the run is done)

Defaults are the method's (README, "Training"): LoRA r=64, alpha=16, dropout 0.1; batch 4 ×
accumulation 2; gradient checkpointing; lr 2e-4 constant after 3 % warmup; max grad norm 0.3;
max length 1024. MLflow names and helpers are in chimein/tracking.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from chimein import distributed, tracking
from chimein.adapters import adapter_meta
from chimein.assistant import DEFAULT_CHATTINESS
# model loading lives in chimein.models; QuantSettings, load_base_model and resolve_compute_dtype
# stay importable from here
from chimein.models import QuantSettings, load_base_model, load_tokenizer, resolve_compute_dtype
from chimein.preprocess import EXAMPLES_LEGEND, PreprocessSummary
from chimein.presets import DEFAULT_PRESET, ModelPreset, load_preset
from chimein.tracking import tracking_uri


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
    processes: int = Field(1, ge=1, description="Training processes (DDP through torchrun; chimein/"
                           "distributed.py): one per GPU on a GPU host, CPU processes otherwise. The "
                           "global batch stays per_device_train_batch_size × gradient_accumulation_steps: "
                           "each process accumulates gradient_accumulation_steps / processes. Not part "
                           "of the run's settings hash; a checkpoint resumes only on as many processes.")
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

    model: str = Field(DEFAULT_PRESET, description="Model preset name or YAML path.")
    dataset: str = Field(description="Dataset version (local:ds-…, hub:ORG/NAME@ds-…) or a JSONL path.")
    max_length: int | None = Field(None, description="Tokens per row; default: the preset's.")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="Attention kernel for training. auto: transformers' default (SDPA). On a "
        "2-core CPU, eager is ~1.2x faster for ~400-token chats (benchmarks/bench_train_step.py).")
    experiment: str = Field(tracking.DEFAULT_EXPERIMENT, description="MLflow experiment (one per "
                            "pipeline); a child run (a comparison's) goes to its parent's.")
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


# --- guards ---------------------------------------------------------------------------------------


class TrainingGuardError(RuntimeError):
    """A known trap was hit; the message names the fix."""


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
        # per rank: the global batch is per-device × gradient_accumulation_steps on any number of processes
        gradient_accumulation_steps=distributed.per_rank_accumulation(t.gradient_accumulation_steps,
                                                                      distributed.world_size()),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # TRL 1.x: a float below 1 is a ratio
        max_grad_norm=t.max_grad_norm, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, logging_steps=t.logging_steps,
        seed=t.seed, data_seed=t.seed, max_length=max_length, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, report_to="none", disable_tqdm=not progress,
        include_num_input_tokens_seen=True, dataset_num_proc=None, use_cpu=device == "cpu",
        # several processes: gloo on CPUs (accelerate would pick MPI where torch has it, which torchrun
        # does not set up), NCCL on GPUs; every LoRA weight gets a gradient each step, so DDP need not
        # search the graph for unused ones (the Trainer's default for a PEFT model)
        ddp_backend="gloo" if device == "cpu" and distributed.world_size() > 1 else None,
        ddp_find_unused_parameters=False)


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
    if args.disable_tqdm:  # no progress bars: the Trainer would print every log as a raw dict
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.adapter_dtype = adapter_dtype
    return trainer


# --- model ----------------------------------------------------------------------------------------


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


def progress_log(log, every_s: float = 10.0):
    """A callback that reports progress to `log` (a logging.Logger; the Prefect tasks pass their
    run logger, so it reaches the flow run's log, not only the worker's stdout): step, loss,
    tokens/s and ETA at the first logged step, then at most every `every_s` seconds, and at the last."""
    from transformers import TrainerCallback

    def duration(s: float) -> str:
        return "?" if not math.isfinite(s) else f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" \
            if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"

    class ProgressLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.monotonic(), state.global_step
            self.first_tokens, self.reported = state.num_input_tokens_seen, -math.inf

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss, now = (logs or {}).get("loss"), time.monotonic()
            if loss is None or (now - self.reported < every_s and state.global_step < state.max_steps):
                return
            self.reported = now
            elapsed, done = now - self.start, state.global_step - self.first_step
            rate = (state.num_input_tokens_seen - self.first_tokens) / elapsed if elapsed > 0 else 0.0
            eta = elapsed / done * (state.max_steps - state.global_step) if done else math.nan
            log.info(f"step {state.global_step}/{state.max_steps}  loss {loss:.4f}  "
                     f"{rate:,.0f} tokens/s  ETA {duration(eta)}")

    callback = ProgressLog()
    callback.relay_to = log  # under several processes, rank 0's progress lines go to `log` (distributed.launch)
    return callback


# --- data -----------------------------------------------------------------------------------------


@dataclass
class TokenizedData:
    """The train split of a dataset version as token rows for one preset (input_ids,
    assistant_masks, decision_masks, …: what the trainer consumes), with the counts and rendered
    examples of the tokenization. `save`/`load` keep it as a directory (tasks/preprocess.py caches
    it in the store, so a flow tokenizes once per preset and dataset version)."""

    preset: ModelPreset
    version: str  # the dataset version
    max_length: int
    rows: dict[str, list]
    summary: PreprocessSummary
    too_long: int  # conversations left out: their first exchange alone exceeds max_length
    examples: list[str]
    labelled_tokens: int

    def save(self, path: str | Path) -> Path:
        from datasets import Dataset

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(self.rows).save_to_disk(str(path / "rows"))
        (path / "examples.txt").write_text(EXAMPLES_LEGEND + "\n\n".join(self.examples) + "\n", encoding="utf-8")
        meta = {"preset": self.preset.model_dump(), "version": self.version, "max_length": self.max_length,
                "summary": asdict(self.summary), "too_long": self.too_long, "examples": self.examples,
                "labelled_tokens": self.labelled_tokens}
        (path / "tokenized.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))  # last: complete
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenizedData:
        from datasets import load_from_disk

        path = Path(path)
        meta = json.loads((path / "tokenized.json").read_text())
        return cls(ModelPreset.from_stored(meta["preset"]), meta["version"], meta["max_length"],
                   load_from_disk(str(path / "rows")).to_dict(), PreprocessSummary(**meta["summary"]),
                   meta["too_long"], meta["examples"], meta["labelled_tokens"])


def tokenize_train_split(preset: ModelPreset, ds, version: str, max_length: int | None = None) -> TokenizedData:
    """The train split of `ds` (a DatasetDict of dataset version `version`) as token rows with
    exact assistant masks; refused (TrainingGuardError) when nothing is labelled."""
    from chimein import preprocess
    from chimein.dataset import split_conversations

    tokenizer = load_tokenizer(preset)
    max_length = max_length or preset.max_length
    summary = PreprocessSummary(preset.name, version, "", max_length)
    rows, too_long, examples = preprocess.tokenize_conversations(
        split_conversations(ds["train"]), range(1, len(ds["train"]) + 1), f"{version}:train",
        preset, tokenizer, summary)
    return TokenizedData(preset, version, max_length, rows, summary, len(too_long), examples,
                         check_labelled_tokens(rows))


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

    trainer.processes > 1: launched on that many processes (chimein/distributed.py), rank 0's
    result returned. Inside a rank, only rank 0 logs to MLflow and saves, calibrates and registers
    the adapter; the other ranks train and return None."""
    from datasets import disable_progress_bars
    from transformers import set_seed

    if cfg.trainer.processes > 1 and distributed.world_size() == 1:
        return distributed.launch(cfg, resume, progress, callbacks, parent_run_id, data, tags)
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
        result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        if not main:
            return None
        # 5. adapter, with its chattiness threshold
        chattiness = save_and_calibrate(cfg, trainer, tokenizer, preset, ds, data.version, plan.out_dir)
        # 6. publish: registered model, artifacts, chimein.json
        registered = register_and_log(client, run_id, cfg, trainer, tokenizer, data, plan, chattiness,
                                      result.training_loss)
    return TrainResult(run_id, plan.name, plan.out_dir / "adapter", data.version, trainer.state.global_step,
                       result.training_loss, data.labelled_tokens, plan.checkpoint, tracking_uri(),
                       registered, chattiness=chattiness)


def prepare_data(cfg: TrainConfig, data: TokenizedData | None = None):
    """(preset, DatasetDict, TokenizedData): the dataset version (a JSONL path is built and
    published locally first) and its train split as token rows, `data` if given and made for
    this preset, version and max length."""
    from chimein.dataset import resolve_dataset

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

    # the number of processes is not a setting: the global batch is the same on any number
    settings = json.dumps(cfg.model_dump(exclude={"output_dir": True, "dataset": True, "model": True,
                                                  "trainer": {"processes"}}), sort_keys=True)
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


def log_run_start(client, run_id: str, cfg: TrainConfig, data: TokenizedData, plan: RunPlan,
                  counts: dict[str, int]) -> None:
    """Everything known before training, once per run: params, tags, the dataset as the run's
    input, the config, examples and data.* counts."""
    import mlflow

    from chimein.dataset import store_dir

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
        tracking.log_dataset(client, run_id, version, source, counts)
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
                       out_dir: Path) -> dict:
    """Save the adapter and tokenizer to OUT_DIR/adapter; the chattiness threshold (logged as
    calibration.*), calibrated on the validation split unless calibration is off."""
    import mlflow

    trainer.model.save_pretrained(out_dir / "adapter")
    tokenizer.save_pretrained(out_dir / "adapter")
    chattiness = calibrate_chattiness(trainer.model, tokenizer, preset, ds, version,
                                      cfg.calibration.max_false_interruption_rate) \
        if cfg.calibration.enabled else {"threshold": DEFAULT_CHATTINESS, "source": "default (calibration off)"}
    mlflow.log_metrics({f"calibration.{k}": v for k, v in chattiness.items() if isinstance(v, (int, float))})
    mlflow.set_tag("chimein.chattiness_source", chattiness["source"])
    return chattiness


def register_and_log(client, run_id: str, cfg: TrainConfig, trainer, tokenizer, data: TokenizedData,
                     plan: RunPlan, chattiness: dict, train_loss: float) -> str | None:
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
         "metrics": {"train_loss": train_loss, "labelled_tokens": data.labelled_tokens}},
        indent=2))
    mlflow.log_artifact(str(done), "adapter")
    return registered


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
        return {"threshold": DEFAULT_CHATTINESS, "source": f"default ({version} has no validation split)"}
    model.config.use_cache = True
    records = evaluate(GroupChatAssistant(model, tokenizer, preset), convs, replies=False)
    labels = [r.label for r in records]
    if len(set(labels)) < 2:
        return {"threshold": DEFAULT_CHATTINESS, "source": f"default ({version}:validation has one class only)"}
    threshold, m = calibrate_threshold(labels, [r.p_speak for r in records], max_fir)
    bound = f", false interruptions <= {max_fir:g}" if max_fir is not None else ""
    return {"threshold": threshold, "source": f"calibrated on {version}:validation{bound}",
            "decisions": len(records), "balanced_accuracy": m["balanced_accuracy"],
            "missed_intervention_rate": m["missed_intervention_rate"],
            "false_interruption_rate": m["false_interruption_rate"]}
