"""Seconds per optimizer step of QLoRA training, variants side by side in one run.

    .venv/bin/python benchmarks/bench_train_step.py [--model smollm2-135m-instruct] [--steps 2]

Variants: LoRA adapter weights in bf16 (TRL's QLoRA default) or in the compute dtype (fp32 on a
CPU), gradient checkpointing on or off. Same data, seed and batch shape for all; the first step
is discarded as warm-up. Prints seconds per step and the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from transformers import TrainerCallback

from chimein.paths import sample_data
from chimein.training import load_train_config, train


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    variants = [("adapters bf16, checkpointing", "bfloat16", True),
                ("adapters fp32, checkpointing", "float32", True),
                ("adapters fp32, no checkpointing", "float32", False)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ["CHIMEIN_STORE"] = f"{tmp}/store"
        for i, (label, adapter_dtype, gc) in enumerate(variants):
            timer = StepTimer()
            cfg = load_train_config(model=args.model, dataset=str(sample_data()), output_dir=f"{tmp}/{i}",
                                    **{"trainer.max_steps": args.steps, "trainer.gradient_checkpointing": gc,
                                       "lora.adapter_dtype": adapter_dtype})
            train(cfg, progress=False, callbacks=[timer])
            per_step = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1)
            results.append((label, per_step))
    base = results[0][1]
    print(f"{args.model}, batch 4 x 2, {args.steps} steps (first discarded)")
    for label, t in results:
        print(f"{label:<36}{t:>8.1f} s/step{base / t:>7.2f}x faster than the first")


if __name__ == "__main__":
    main()
