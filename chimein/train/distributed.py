"""Rank helpers of a training on several processes (DDP): which rank this is, how the global batch
splits over the ranks, and the checks made before launching or resuming. They import nothing from
training; the launcher that runs `train()` under torchrun is chimein.train.launch.

Global batch = per_device_train_batch_size × gradient_accumulation_steps, whatever the number of
processes: each rank accumulates gradient_accumulation_steps / N micro-batches, so a run on N
processes makes the same optimizer steps as on one, N times faster (refused when N does not
divide the accumulation).
"""

from __future__ import annotations

import os
from pathlib import Path


class DistributedTrainingError(RuntimeError):
    """A rank of a multi-process training failed; the message says which and why."""


def world_size() -> int:
    """Processes of this training: WORLD_SIZE under torchrun/accelerate, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs to MLflow and saves the adapter."""
    return int(os.environ.get("RANK", "0")) == 0


def per_rank_accumulation(accumulation: int, processes: int) -> int:
    """Micro-batches each rank accumulates so that the global batch stays per-device × `accumulation`."""
    if accumulation % processes:
        raise ValueError(
            f"{processes} processes cannot keep the global batch of gradient_accumulation_steps "
            f"{accumulation} (each rank accumulates gradient_accumulation_steps / processes): use a "
            f"number of processes that divides {accumulation}, or set trainer.gradient_accumulation_steps "
            f"to a multiple of {processes} (per_device_train_batch_size × it is the global batch)")
    return accumulation // processes


def check_processes(processes: int, accumulation: int) -> None:
    """Refuse, before any work, a number of processes this host or the config cannot run."""
    import torch

    if processes < 1:
        raise ValueError(f"--processes must be at least 1, not {processes}")
    if processes > 1 and torch.cuda.is_available() and processes > torch.cuda.device_count():
        from chimein.presets import HardwareError

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        n = torch.cuda.device_count()
        raise HardwareError(
            f"--processes {processes} runs one process per GPU and this host has {n} GPU"
            f"{'s' if n != 1 else ''}{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: "
            f"use --processes {n} or fewer")
    per_rank_accumulation(accumulation, processes)


def checkpoint_processes(checkpoint: str | Path) -> int | None:
    """How many processes wrote a Trainer checkpoint: one RNG state file per rank (rng_state_R.pth),
    rng_state.pth for a single process; None if it has neither."""
    path = Path(checkpoint)
    ranks = len(list(path.glob("rng_state_*.pth")))
    return ranks or (1 if (path / "rng_state.pth").is_file() else None)


def check_resume(checkpoint: str | None, processes: int) -> None:
    """A checkpoint resumes only on the number of processes that wrote it: the Trainer skips the
    batches already seen per rank and restores each rank's RNG state."""
    wrote = checkpoint_processes(checkpoint) if checkpoint else None
    if wrote is not None and wrote != processes:
        raise ValueError(f"{checkpoint} was written by {wrote} process{'es' if wrote > 1 else ''}; "
                         f"resume it with --processes {wrote} (trainer.processes: {wrote}), or start "
                         "a new run in another --output-dir")
