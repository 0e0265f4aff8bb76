"""The trainer and what it is built from: TRL's SFTTrainer arguments, the decision-weighted loss,
LoRA on the base model, the guards against the known traps (nothing labelled, a collapsed or NaN
loss) and the progress log."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from pathlib import Path

from chimein.presets import ModelPreset
from chimein.train import distributed
from chimein.train.config import LoraSettings, TrainConfig

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


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' GradientCheckpointingLayer: every decoder layer of
    its models), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def compiled_layers(model, how: str = "layers", log: logging.Logger | None = None):
    """Within: each decoder layer compiled by torch.compile (`trainer.compile: layers`), shapes
    dynamic so chats of any length share one graph; the identical layers share its compiled code,
    so it is compiled once (~30 s on 2 cores), at the first step. After: the layers run eagerly
    again (calibration and serving use the KV cache, which the training graph never saw).
    how="off", or no C++ compiler for inductor's CPU kernels: eager, with a warning for the latter."""
    log = log or logging.getLogger("chimein.train")
    layers = decoder_layers(model) if how == "layers" else []
    if how == "layers" and not layers:
        raise ValueError(f"trainer.compile is 'layers' but {type(model).__name__} has no decoder layers "
                         "that transformers marks (GradientCheckpointingLayer): set trainer.compile: off")
    if layers and not shutil.which("g++") and not shutil.which("c++"):
        log.warning("trainer.compile is 'layers' but there is no C++ compiler for torch.compile's CPU "
                    "kernels: training eagerly (install one, e.g. Debian's g++, for ~1.4x faster steps)")
        layers = []
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward


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
            self.start = time.monotonic()
            self.first_tokens, self.reported, self.base = state.num_input_tokens_seen, -math.inf, None
            if state.global_step:  # the Trainer has loaded the checkpoint's state
                log.info(f"resumed from checkpoint-{state.global_step}: step {state.global_step} of "
                         f"{state.max_steps} done, {state.max_steps - state.global_step} to go")

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss, now = (logs or {}).get("loss"), time.monotonic()
            if loss is None:
                return
            if self.base is None:  # the first step carries the warm-up (compiling the layers: ~30 s
                # on 2 cores): speed and ETA are measured from its end, not from the start
                self.base = (now, state.global_step, state.num_input_tokens_seen)
                elapsed = now - self.start
                rate = (state.num_input_tokens_seen - self.first_tokens) / elapsed if elapsed > 0 else 0.0
                self.reported = now
                log.info(f"step {state.global_step}/{state.max_steps}  loss {loss:.4f}  {rate:,.0f} tokens/s  "
                         f"(first step {elapsed:.0f} s, with the warm-up)  ETA "
                         f"{duration(0.0) if state.global_step >= state.max_steps else 'after the next steps'}")
                return
            if now - self.reported < every_s and state.global_step < state.max_steps:
                return
            self.reported = now
            t0, step0, tokens0 = self.base
            done = state.global_step - step0
            rate = (state.num_input_tokens_seen - tokens0) / (now - t0) if now > t0 else 0.0
            eta = (now - t0) / done * (state.max_steps - state.global_step) if done else math.nan
            log.info(f"step {state.global_step}/{state.max_steps}  loss {loss:.4f}  "
                     f"{rate:,.0f} tokens/s  ETA {duration(eta)}")

    callback = ProgressLog()
    callback.relay_to = log  # under several processes, rank 0's progress lines go to `log` (distributed.launch)
    return callback
