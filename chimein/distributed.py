"""Training on several processes (DDP): the same `train()` on N ranks, launched by torchrun.

    chimein train --preset smollm2-135m-instruct --dataset outputs/conversations.jsonl --processes 2

`train()` with `trainer.processes` > 1 calls `launch` here. The launcher (the calling process)
does what must happen once — resolve and tokenize the dataset, refuse an existing run without
--resume, return a finished one — then runs `torchrun --standalone --nproc-per-node N -m
chimein.distributed rank JOB.json`. Each rank calls `train()` again; the HF Trainer sees RANK and
WORLD_SIZE and does DDP through accelerate (gloo on CPUs, NCCL on GPUs, each rank on the GPU
LOCAL_RANK). Rank 0 alone talks to MLflow (one run, per-step metrics, the registered adapter),
saves and calibrates the adapter; the other ranks train and exit. Rank 0's TrainResult comes back
through a file; a failing rank's exception through another, so the launcher fails with it.

Global batch = per_device_train_batch_size × gradient_accumulation_steps, whatever the number of
processes: each rank accumulates gradient_accumulation_steps / N micro-batches, so a run on N
processes makes the same optimizer steps as on one, N times faster (refused when N does not
divide the accumulation).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
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


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies: torchrun starts every rank in
    a session of its own, so killing the launcher's process group would otherwise leave the ranks
    training on."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1: PR_SET_PDEATHSIG


# --- the launcher ---------------------------------------------------------------------------------


def launch(cfg, resume: bool = False, progress: bool = True, callbacks=(), parent_run_id: str | None = None,
           data=None, tags: dict[str, str] | None = None):
    """`train()` on cfg.trainer.processes ranks; rank 0's TrainResult. Progress callbacks
    (`training.progress_log`) are honoured: rank 0 runs one and its output is relayed to the same
    logger; other callbacks cannot cross into the ranks and are refused."""
    from chimein import training

    processes = cfg.trainer.processes
    relays = [cb.relay_to for cb in callbacks if getattr(cb, "relay_to", None) is not None]
    if len(relays) != len(callbacks):
        raise ValueError("trainer callbacks run in the process that trains: with trainer.processes "
                         f"{processes} only progress_log callbacks are supported (rank 0 runs one)")
    check_processes(processes, cfg.trainer.gradient_accumulation_steps)
    # once, here: the dataset version and its token rows; the ranks load them
    preset, _, data = training.prepare_data(cfg, data)
    plan = training.plan_run(cfg, preset, data.version, resume)
    if plan.finished is not None:
        return plan.finished
    if not cfg.dataset.startswith(("local:", "hub:", "ds-")):  # a JSONL file, now published: no rebuild per rank
        cfg = cfg.model_copy(update={"dataset": f"local:{data.version}"})
    job_dir = plan.out_dir / "launch"
    shutil.rmtree(job_dir, ignore_errors=True)
    (job_dir / "errors").mkdir(parents=True)
    job = {"config": cfg.model_dump(), "progress": progress, "log_progress": bool(relays),
           "parent_run_id": parent_run_id, "tags": tags, "data": str(data.save(job_dir / "tokenized")),
           "result": str(job_dir / "result.json"), "errors": str(job_dir / "errors")}
    (job_dir / "job.json").write_text(json.dumps(job))
    try:
        code = _run_torchrun(processes, job_dir / "job.json", relays[0] if relays else None)
        if code != 0:
            raise DistributedTrainingError(_failure(code, processes, job_dir / "errors"))
        result = json.loads((job_dir / "result.json").read_text())
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    return training.TrainResult(**result | {"adapter_dir": Path(result["adapter_dir"])})


def _run_torchrun(processes: int, job: Path, relay) -> int:
    """torchrun's exit code: 0, or not when a rank failed (it stops the others then). Its output
    goes to this process's stdout/stderr, or line by line to `relay` (a logger)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))  # torchrun's default: 1
    env["CHIMEIN_LAUNCHER_PID"] = str(os.getpid())
    command = [sys.executable, "-m", "chimein.distributed", "torchrun", "--standalone",
               f"--nproc-per-node={processes}", f"--log-dir={job.parent / 'torchrun'}",  # else a /tmp dir per run
               "-m", "chimein.distributed", "rank", str(job)]
    pipe = subprocess.PIPE if relay is not None else None
    proc = subprocess.Popen(command, env=env, stdout=pipe, stderr=subprocess.STDOUT if pipe else None,
                            text=True, errors="replace")
    try:
        if relay is not None:
            for line in proc.stdout:
                relay.info(line.rstrip())
        return proc.wait()
    except BaseException:  # interrupted or cancelled: torchrun stops its ranks on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def _failure(code: int, processes: int, errors: Path) -> str:
    failed = sorted(errors.glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)
    if not failed:
        return (f"training on {processes} processes failed (torchrun exit code {code}) and no rank "
                "reported an exception: a rank was killed (out of memory?) or could not start; "
                "torchrun's output above names it")
    first = failed[0]
    return (f"training on {processes} processes failed: {first.stem.replace('-', ' ')} raised "
            f"{first.read_text().strip()} (torchrun exit code {code}; its output above has the traceback)")


# --- the ranks ------------------------------------------------------------------------------------


def _rank(job_path: str) -> None:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import record

    from chimein import training

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ["RANK"])

    @record  # torchrun's failure summary then carries the exception
    def main():
        callbacks = []
        if job["log_progress"] and rank == 0:  # the launcher relays stdout to the caller's logger
            log = logging.getLogger("chimein.progress")
            log.addHandler(logging.StreamHandler(sys.stdout))
            log.setLevel(logging.INFO)
            callbacks.append(training.progress_log(log))
        try:
            result = training.train(
                training.TrainConfig.model_validate(job["config"]), resume=True, progress=job["progress"],
                callbacks=callbacks, parent_run_id=job["parent_run_id"],
                data=training.TokenizedData.load(job["data"]), tags=job["tags"])
        except BaseException as e:
            Path(job["errors"], f"rank-{rank}.txt").write_text(f"{type(e).__name__}: {e}")
            raise
        if result is not None:  # rank 0
            Path(job["result"]).write_text(json.dumps(asdict(result), default=str))

    main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "torchrun":  # the agent: stop the ranks (SIGTERM) if the launcher dies
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != int(os.environ["CHIMEIN_LAUNCHER_PID"]):
            sys.exit("the launcher exited before torchrun started")
        from torch.distributed.run import main as torchrun

        torchrun(args)
    else:  # a rank: gone with its agent
        _die_with_parent(signal.SIGKILL)
        _rank(args[0])
