"""Training on several processes (chimein/train/launch.py, chimein/train/distributed.py): 2 CPU ranks (gloo) of a tiny model,
launched by `chimein train --processes 2` as a user would, in a real MLflow SQLite store."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from chimein.cli import app
from chimein.data.corpus import CORPUS_DIR
from chimein.presets import HardwareError, load_preset
from chimein.train import distributed
from chimein.train.config import load_train_config
from chimein.train.launch import train
from chimein.train.run import TrainResult, plan_run
from chimein.train.trainer import progress_log

CHIMEIN = str(Path(sys.executable).with_name("chimein"))
TIMEOUT = 300  # seconds for one launch; a tiny run takes ~30 s on 2 busy cores

# Loaded by every Python process of a launch (PYTHONPATH): in the ranks (RANK is set), a callback
# that makes each step slow, or makes rank 1 fail at step 1.
FAULT = '''
import os
if os.environ.get("CHIMEIN_TEST_FAULT") and "RANK" in os.environ:
    import time
    from transformers import TrainerCallback
    import chimein.train.run as training

    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if os.environ["CHIMEIN_TEST_FAULT"] == "slow":
                time.sleep(1.5)
            elif os.environ["RANK"] == "1" and state.global_step == 1:
                raise RuntimeError("simulated crash on rank 1")

    real = training.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(Fault())
        return trainer

    training.build_trainer = build_trainer
'''


def ours(workdir: Path) -> list[psutil.Process]:
    """Processes of a launch from `workdir`: the torchrun agent and the ranks name its job file."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return [p for p in found if p.pid != os.getpid()]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    (tmp_path / "chats.jsonl").write_text(
        "".join((CORPUS_DIR / "part-0.jsonl").read_text().splitlines(keepends=True)[:12]))
    # 2 ranks × 1 row a micro-batch = the global batch of 1 × 2 on one process; no dropout, so
    # both ways compute the same steps
    (tmp_path / "train.yaml").write_text(
        "model: tiny-chatml\ndataset: chats.jsonl\nmax_length: 256\nlora: {r: 8, dropout: 0.0}\n"
        "trainer: {per_device_train_batch_size: 1, gradient_accumulation_steps: 2, max_steps: 4, "
        "save_steps: 2, learning_rate: 1.0e-3}\ncalibration: {enabled: false}\n")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT)
    yield tmp_path
    left = ours(tmp_path)  # nothing of a launch outlives its test
    for proc in left:
        proc.kill()
    assert not left, [p.info["cmdline"] for p in left]


def chimein_train(workdir: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    """`chimein train --processes 2` in a process group of its own, as a shell would run it."""
    env = dict(os.environ, COLUMNS="250")  # rich would wrap the output at 80 columns
    if fault:
        env |= {"CHIMEIN_TEST_FAULT": fault,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(workdir / "inject"), env.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [CHIMEIN, "train", "--preset", "tiny-chatml", "--dataset", "chats.jsonl", "--config", "train.yaml",
         "--processes", "2", *args], cwd=workdir, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks follow their agent (PR_SET_PDEATHSIG)
        out, err = proc.communicate()
        pytest.fail(f"chimein train did not finish in {TIMEOUT} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def test_two_processes_train_one_run_resume_after_a_kill_and_match_one_process(workdir):
    # the reference: one process accumulating 2 rows a step
    one = train(load_train_config("train.yaml", output_dir="one"), progress=False)

    # 2 processes, killed (the launcher's whole process group) once the first checkpoint is written
    proc = chimein_train(workdir, "--output-dir", "two", fault="slow")
    deadline = time.monotonic() + TIMEOUT
    while not list(workdir.glob("two/*/checkpoint-2/trainer_state.json")):  # written last
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in tree if "rank" in p.cmdline() and "torchrun" not in p.cmdline()]
    assert len(ranks) == 2 and all(p.ppid() != proc.pid for p in ranks)  # under the torchrun agent
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive  # the ranks live in sessions of their own; they die with their agent
    out_dir = next(workdir.glob("two/*"))
    assert out_dir.name == one.run_name  # the number of processes is not part of the run's settings
    assert not (out_dir / "adapter").exists()
    run_id = (out_dir / "mlflow_run_id").read_text()

    # relaunched with --resume: from the checkpoint, into the same MLflow run
    code, out, err = finish(chimein_train(workdir, "--output-dir", "two", "--resume"))
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "checkpoint-2" in out, out
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (out_dir / "checkpoint-4").iterdir()}

    # one MLflow run (rank 0's), finished, its loss logged once per step, one registered version
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chimein").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([one.run_id, run_id])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["trainer.processes"] == "2"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert set(steps) == {1, 2, 3, 4}
    assert sorted(steps) == [1, 2, 3, 4]  # one point per step: 3, made again after the kill, logged once
    assert [v.version for v in client.search_model_versions(f"run_id='{run_id}'")] == [2]
    adapter = [a.path for a in client.list_artifacts(run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in adapter and "adapter/chimein.json" in adapter
    assert (workdir / "store" / "adapters" / one.run_name).is_dir()  # published locally, once

    # 2 processes × 1 row a step = 1 process × 2 rows accumulated: the same adapter
    a = load_file(one.adapter_dir / "adapter_model.safetensors")
    b = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert not (out_dir / "launch").exists()  # the launch's job files are cleaned up


def test_a_failing_rank_fails_the_command_with_its_error(workdir):
    code, out, err = finish(chimein_train(workdir, fault="crash"))
    assert code == 1
    message = " ".join(err.split())
    assert "error: training on 2 processes failed: rank 1 raised RuntimeError: simulated crash on rank 1" \
        in message, err[-3000:]


def test_the_flows_way_relays_rank_0s_progress_and_returns_its_result(workdir, caplog):
    """The retrain flow's task calls train() with a progress_log on its Prefect logger."""
    log = logging.getLogger("test.progress")
    cfg = load_train_config("train.yaml", **{"trainer.processes": 2, "trainer.max_steps": 2})
    with caplog.at_level(logging.INFO, logger="test.progress"):
        result = train(cfg, progress=False, callbacks=[progress_log(log)])
    assert isinstance(result, TrainResult) and isinstance(result.adapter_dir, Path)
    assert result.steps == 2 and result.registered == "chimein-tiny-chatml/1"
    assert (result.adapter_dir / "chimein.json").is_file()
    lines = [r.getMessage() for r in caplog.records if r.name == "test.progress"]
    assert any(line.startswith("step 2/2  loss ") for line in lines), lines[-20:]


def test_global_batch_stays_the_configured_one():
    assert distributed.per_rank_accumulation(4, 1) == 4
    assert distributed.per_rank_accumulation(4, 2) == 2
    assert distributed.per_rank_accumulation(4, 4) == 1
    with pytest.raises(ValueError, match=r"number of processes that divides 2.*multiple of 4"):
        distributed.per_rank_accumulation(2, 4)


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    distributed.check_processes(2, 2)
    with pytest.raises(HardwareError, match=r"one process per GPU and this host has 2 GPUs "
                                            r"\(CUDA_VISIBLE_DEVICES=0,1\): use --processes 2 or fewer"):
        distributed.check_processes(4, 4)


def test_a_checkpoint_resumes_only_on_the_processes_that_wrote_it(workdir):
    cfg = load_train_config("train.yaml")
    preset = load_preset("tiny-chatml")
    plan = plan_run(cfg, preset, "ds-x", resume=False)
    assert plan.name == plan_run(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"processes": 2})}), preset, "ds-x", resume=True).name
    ckpt = plan.out_dir / "checkpoint-2"
    ckpt.mkdir()
    for rank in (0, 1):
        (ckpt / f"rng_state_{rank}.pth").touch()
    with pytest.raises(ValueError, match="written by 2 processes; resume it with --processes 2"):
        plan_run(cfg, preset, "ds-x", resume=True)
    two = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"processes": 2})})
    assert plan_run(two, preset, "ds-x", resume=True).checkpoint == str(ckpt)


def test_misuse_is_refused_before_any_work(workdir, monkeypatch):
    # only progress callbacks cross into the ranks
    two = load_train_config("train.yaml", **{"trainer.processes": 2})
    with pytest.raises(ValueError, match="only progress_log callbacks"):
        train(two, callbacks=[TrainerCallback()])
    # torchrun around `chimein train` would run the whole pipeline in every process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"chimein train --processes N"):
        train(load_train_config("train.yaml"))
    monkeypatch.delenv("WORLD_SIZE")
    r = CliRunner().invoke(app, ["train", "--preset", "tiny-chatml", "--dataset", "chats.jsonl",
                                 "--config", "train.yaml", "--processes", "3"])
    assert r.exit_code == 1 and "number of processes that divides 2" in " ".join(r.output.split())
    assert not (workdir / "mlflow.db").exists() and not (workdir / "outputs").exists()
