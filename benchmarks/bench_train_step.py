"""Seconds per optimizer step of LoRA training on the CPU, the variants that matter side by side.

    .venv/bin/python benchmarks/bench_train_step.py [--model smollm2-135m-instruct] [--steps 3]

Every variant trains on the same conversations (the first of the curated corpus), with the same
seed and 8 conversations per optimizer step, so the tokens per step are the same and seconds per
step compare directly. The first step is discarded as warm-up. Variants:

  the method   4-bit NF4 base, gradient checkpointing, batch 4 x 2, fp32 compute on a CPU, TRL's loss
  ...          4-bit or unquantised, checkpointing on or off (batch 4 x 2, TRL's loss)
  then, cumulatively: batch 1 x 8 (no padding) with our decision-weighted loss, which computes
  logits only where a label is (TRL's fused head scores every position on a CPU); bf16 compute
  (this CPU has AVX512-BF16); no LoRA dropout (its random masks took a quarter of a step) and
  eager attention; then each decoder layer compiled by torch.compile (`trainer.compile: layers`):
  conf/train/offline-cpu.yaml, what `make run` trains with (which takes 4 conversations a step:
  here 8, like the others)

Prints the CPU and the instruction sets torch found, seconds per step, tokens per second and the
speed-up over the method's settings, and for the compiled variant what compiling cost (its
first step less a step). AMX: bf16 matrix products run on the AMX tiles where the CPU has them
(oneDNN's brgemm kernels; ONEDNN_VERBOSE=1 names them, e.g. brg_matmul:avx10_1_512_amx).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from transformers import TrainerCallback

from chimein.paths import conf_dir, sample_data
from chimein.train.config import load_train_config
from chimein.train.launch import train

METHOD = {"quantization.load_in_4bit": True, "trainer.gradient_checkpointing": True,
          "trainer.per_device_train_batch_size": 4, "trainer.gradient_accumulation_steps": 2}
UNQUANTISED = {"quantization.load_in_4bit": False, "trainer.gradient_checkpointing": False}
ONE_BY_EIGHT = {"trainer.per_device_train_batch_size": 1, "trainer.gradient_accumulation_steps": 8,
                "loss.decision_weight": 5.0}
VARIANTS = [
    ("the method: 4-bit, checkpointing, 4 x 2", {}),
    ("4-bit, no checkpointing", {"trainer.gradient_checkpointing": False}),
    ("unquantised, checkpointing", {"quantization.load_in_4bit": False}),
    ("unquantised, no checkpointing", UNQUANTISED),
    ("  + 1 x 8, logits only where labelled", UNQUANTISED | ONE_BY_EIGHT),
    ("  + bf16 compute", UNQUANTISED | ONE_BY_EIGHT | {"quantization.compute_dtype": "bfloat16"}),
    ("  + no LoRA dropout, eager attention", ("offline-cpu", {"trainer.compile": "off"})),
    ("  + compiled decoder layers: offline-cpu", ("offline-cpu", {})),
]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def cpu() -> str:
    """The CPU's model name, the instruction sets that matter here and what torch dispatches to."""
    import torch

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"CPU: {name}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}; torch {torch.__version__} "
            f"dispatches to {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


def main() -> None:
    from chimein.conversation import load_conversations
    from chimein.formatting import encode
    from chimein.models.loading import load_tokenizer
    from chimein.presets import load_preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    preset = load_preset(args.model)
    tok = load_tokenizer(preset)
    convs = load_conversations(sample_data()).conversations
    mean_tokens = sum(len(encode(c, tok, preset).input_ids) for c in convs) / len(convs)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ["CHIMEIN_STORE"] = f"{tmp}/store"
        for i, (label, overrides) in enumerate(VARIANTS):
            timer = StepTimer()
            common = {"model": args.model, "dataset": str(sample_data()), "output_dir": f"{tmp}/{i}",
                      "trainer.max_steps": args.steps, "calibration.enabled": False}
            if isinstance(overrides, tuple):  # what `make run` trains with, at 8 conversations a step
                cfg = load_train_config(conf_dir() / "train" / f"{overrides[0]}.yaml", **common,
                                        **{"trainer.gradient_accumulation_steps": 8} | overrides[1])
            else:
                cfg = load_train_config(**(common | METHOD | overrides))
            train(cfg, progress=False, callbacks=[timer])
            per_step = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1)
            first = timer.times[0] - timer.start
            results.append((label, per_step, first - per_step))
            print(f"  {label}: {per_step:.1f} s/step (first step {first:.1f} s)", flush=True)
    base = results[0][1]
    print(f"\n{cpu()}")
    print(f"{args.model}, 8 conversations (~{mean_tokens:.0f} tokens each) per optimizer step, "
          f"{args.steps} steps (first discarded), {os.cpu_count()} CPU cores")
    print(f"{'variant':<44}{'s/step':>8}{'tokens/s':>10}{'speed-up':>10}")
    for label, t, _ in results:
        print(f"{label:<44}{t:>8.1f}{8 * mean_tokens / t:>10.0f}{base / t:>9.2f}x")
    print(f"compiling the decoder layers cost ~{results[-1][2]:.0f} s once (its first step less a step)")


if __name__ == "__main__":
    main()
