"""Training on one or several processes: `train()` here, or on N ranks (DDP) launched by torchrun.

    chimein train --preset smollm2-135m-instruct --dataset outputs/conversations.jsonl --processes 2

`train()` runs chimein.train.run.train in this process when `trainer.processes` is 1, and calls
`launch` when it is more. The launcher (the calling process) does what must happen once — resolve
and tokenize the dataset, refuse an existing run without --resume, return a finished one — then
runs `torchrun --standalone --nproc-per-node N -m chimein.train.launch rank JOB.json`. Each rank
calls chimein.train.run.train; the HF Trainer sees RANK and WORLD_SIZE and does DDP through
accelerate (gloo on CPUs, NCCL on GPUs, each rank on the GPU LOCAL_RANK). Rank 0 alone talks to
MLflow (one run, per-step metrics, the registered adapter), saves and calibrates the adapter; the
other ranks train and exit. Rank 0's TrainResult comes back through a file; a failing rank's
exception through another, so the launcher fails with it. The global batch is the same on any
number of processes (chimein.train.distributed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from chimein.paths import cache_dir
from chimein.train import run as training
from chimein.train.config import TrainConfig
from chimein.train.distributed import DistributedTrainingError, check_processes, world_size
from chimein.train.rows import TokenizedData
from chimein.train.trainer import progress_log


def train(cfg, resume: bool = False, progress: bool = True, callbacks=(), parent_run_id: str | None = None,
          data=None, tags: dict[str, str] | None = None):
    """Train one adapter on cfg.trainer.processes processes (chimein.train.run.train's arguments):
    in this process when it is 1, else on that many torchrun ranks, rank 0's TrainResult returned.
    On a host without CUDA, one training at a time uses the CPU (`cpu_slot`)."""
    relays = [cb.relay_to for cb in callbacks if getattr(cb, "relay_to", None) is not None]
    with cpu_slot(relays[0] if relays else logging.getLogger("chimein.train")):
        if cfg.trainer.processes > 1 and world_size() == 1:
            return launch(cfg, resume, progress, callbacks, parent_run_id, data, tags)
        return training.train(cfg, resume, progress, callbacks, parent_run_id, data, tags)


@contextlib.contextmanager
def cpu_slot(log: logging.Logger):
    """Hold this host's CPU for one training when it has no CUDA device: a second training started
    meanwhile (two flow runs, two `chimein train`) waits for the first and says so, since two at
    once would share the cores with twice the threads and each run many times slower than alone.
    The slot is an OS file lock in the cache directory: a killed training leaves nothing held. A
    worker pinned to a GPU (`chimein worker --gpu N` sets CHIMEIN_GPU) trains under that GPU's
    slot instead. CHIMEIN_CPU_SLOT=off trains at once anyway (benchmarks/concurrent_training.py
    measures both)."""
    import torch

    if torch.cuda.is_available() or "CHIMEIN_GPU" in os.environ or os.environ.get("CHIMEIN_CPU_SLOT") == "off":
        yield
        return
    path = cache_dir() / "cpu-training.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as slot:
        try:
            fcntl.flock(slot, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            slot.seek(0)
            holder = slot.read().strip() or "another process"
            log.warning(f"waiting for the CPU: another training holds it ({holder}); this one starts "
                        "when it ends (two at once would each run many times slower)")
            started = time.monotonic()
            fcntl.flock(slot, fcntl.LOCK_EX)
            log.warning(f"the CPU is free after {time.monotonic() - started:.0f} s: training")
        slot.seek(0)
        slot.truncate()
        slot.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        slot.flush()
        yield  # closing the file releases the lock


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
    (`progress_log`) are honoured: rank 0 runs one and its output is relayed to the same
    logger; other callbacks cannot cross into the ranks and are refused."""
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
    command = [sys.executable, "-m", "chimein.train.launch", "torchrun", "--standalone",
               f"--nproc-per-node={processes}", f"--log-dir={job.parent / 'torchrun'}",  # else a /tmp dir per run
               "-m", "chimein.train.launch", "rank", str(job)]
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

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ["RANK"])

    @record  # torchrun's failure summary then carries the exception
    def main():
        callbacks = []
        if job["log_progress"] and rank == 0:  # the launcher relays stdout to the caller's logger
            log = logging.getLogger("chimein.progress")
            log.addHandler(logging.StreamHandler(sys.stdout))
            log.setLevel(logging.INFO)
            callbacks.append(progress_log(log))
        try:
            result = training.train(
                TrainConfig.model_validate(job["config"]), resume=True, progress=job["progress"],
                callbacks=callbacks, parent_run_id=job["parent_run_id"],
                data=TokenizedData.load(job["data"]), tags=job["tags"])
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
