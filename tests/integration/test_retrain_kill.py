"""A killed retrain never blocks the next: the retrain flow killed (SIGKILL, its whole process group,
as a preempted node or an OOM kill does) during generation, during the dataset build, during
training and during evaluation, each time run again with the same parameters, in one store. Each
rerun gets past the point where the last one died without a manual step; in the end no request was
paid twice, there is one MLflow run and one registered version, the champion is that finished
version, and nothing of the killed runs is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import psutil

from tests.fakes.fake_llm import FakeLLM
from tests.integration.test_flows import flow_env

# The retrain flow, stopped at one point when KILL_AT names it (it prints "AT <point>" and waits
# there to be killed): after 5 generation requests (later ones wait before they are sent, so
# nothing is paid that the ledger does not hold), once the dataset version's files are written
# (not yet renamed into place), once checkpoint-2 is saved, as the benchmark evaluation starts.
RUN = """
import json, os, sys, threading, time
point = os.environ.get("KILL_AT")

def stop_here():
    print(f"AT {point}", flush=True)
    time.sleep(600)

if point == "generation":
    import chimein.data.providers as providers
    real, lock, sent = providers.openai_source, threading.Lock(), [0]
    def openai_source(cfg):
        complete = real(cfg)
        def limited(prompt, spec):
            with lock:
                sent[0] += 1
                n = sent[0]
            if n > 5:
                stop_here()
            return complete(prompt, spec)
        return limited
    providers.SOURCES["openai"] = openai_source
elif point == "dataset":
    import datasets
    save = datasets.DatasetDict.save_to_disk
    def saved(self, *args, **kwargs):
        save(self, *args, **kwargs)
        stop_here()
    datasets.DatasetDict.save_to_disk = saved
elif point == "training":
    from transformers import TrainerCallback
    import chimein.train.run as run
    build = run.build_trainer
    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                stop_here()
    def build_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Stop())
        return trainer
    run.build_trainer = build_trainer
elif point == "evaluation":
    import chimein.evaluate.run as evaluation
    evaluation.score = lambda *args, **kwargs: stop_here()

from flows.retrain import RetrainParams, retrain
summary = retrain(RetrainParams.model_validate_json(sys.argv[1]))
print("SUMMARY " + json.dumps(summary, default=str), flush=True)
"""
TIMEOUT = 420  # seconds for one run of the flow to reach its point, or to finish (on 2 busy cores)


def killed_at(point: str, params: dict, cwd, env, ready=lambda: True) -> str:
    """Run the flow until it stops at `point` (and `ready()`), kill its whole process group, check
    that nothing of it is left; its output."""
    proc = subprocess.Popen([sys.executable, "-c", RUN, json.dumps(params)], cwd=cwd, env=env | {"KILL_AT": point},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, deadline = [], time.monotonic() + TIMEOUT
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while not (f"AT {point}\n" in out and ready()):
        assert proc.poll() is None, f"the flow ended before {point}:\n" + "".join(out)[-4000:]
        assert time.monotonic() < deadline, f"the flow did not reach {point}:\n" + "".join(out)[-4000:]
        time.sleep(0.2)
    tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running after the kill at {point}: {[p.cmdline() for p in alive]}"
    reader.join(timeout=10)
    return "".join(out)


def test_killed_at_every_stage_each_rerun_completes_without_a_manual_step(tmp_path):
    env = flow_env(tmp_path) | {"PREFECT_LOGGING_LEVEL": "INFO"}
    (tmp_path / "train.yaml").write_text("trainer:\n  save_steps: 2\n")
    with FakeLLM("openai", delay=0.05) as fake:
        params = {"preset": "tiny-chatml", "train_config": str(tmp_path / "train.yaml"), "max_steps": 4,
                  "heldout_limit": 1, "generation": {"source": "openai", "count": 12, "base_url": fake.base_url}}
        ledgers = lambda: list((tmp_path / "outputs" / "generated").glob("*.ledger"))  # noqa: E731
        paid = lambda: sum(1 for f in ledgers() for _ in f.open())  # noqa: E731

        killed_at("generation", params, tmp_path, env, ready=lambda: paid() >= 5 + 1)  # the header line
        assert len(fake.requests) == paid() - 1 < 12
        out = killed_at("dataset", params, tmp_path, env)
        assert "took over the lock" in out, out[-3000:]  # the lock the killed generation held
        assert len(fake.requests) == 12  # the ledger resumed: each request paid once
        assert list((tmp_path / "store" / "datasets").glob("ds-*.part"))  # what the kill left
        out = killed_at("training", params, tmp_path, env,
                        ready=lambda: bool(list(tmp_path.glob("outputs/**/checkpoint-2/trainer_state.json"))))
        assert "took over the lock" in out, out[-3000:]  # the dataset's lock
        out = killed_at("evaluation", params, tmp_path, env)
        assert "resumed from checkpoint-2: step 2 of 4 done, 2 to go" in out, out[-3000:]  # in the flow's log

        proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(params)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert len(fake.requests) == 12  # in all, each request paid once
    summary = json.loads(next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("SUMMARY "))[8:])

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("chimein").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]  # one run for the training, resumed
    run = runs[0]
    assert run.info.status == "FINISHED" and "bench.balanced_accuracy" in run.data.metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert [str(v.version) for v in client.search_model_versions("name='chimein-tiny-chatml'")] == ["1"]
    assert str(client.get_model_version_by_alias("chimein-tiny-chatml", "champion").version) == "1"
    assert summary["champion"]["moved"] is True
    assert not list((tmp_path / "store" / "datasets").glob("ds-*.part"))
