"""MLflow as the user sees it, read back through the MLflow client from a real SQLite store: one
tiny training run made inside a Prefect flow run (Prefect's own temporary server), with the
preprocessing task in front of it, then evaluated with `chimein eval`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from chimein.data.corpus import CORPUS_DIR
from chimein.evaluate.records import eval_prefix
from chimein.ops import tracking

PREFECT_UI = "http://prefect.example:4200"  # a configured server's UI; the run itself is local

TRAIN_IN_A_FLOW = """
import json, sys
from prefect import flow
from chimein.presets import load_preset
from chimein.train.config import load_train_config
from tasks.model import train_adapter
from tasks.preprocess import tokenize_dataset

@flow(name="tiny-train")
def tiny_train(config):
    from prefect.runtime import flow_run

    preset = load_preset(config.model)
    tokenized = tokenize_dataset(preset, config.dataset, config.max_length)
    again = tokenize_dataset(preset, config.dataset, config.max_length, return_state=True)
    result = train_adapter(config, tokenized=tokenized)
    return {"flow_run_id": flow_run.id, "tokenized": tokenized, "again": again.name,
            "again_path": again.result(), "run_id": result.run_id, "version": result.dataset_version,
            "registered": result.registered, "adapter_dir": str(result.adapter_dir),
            "train_loss": result.final_loss, "run_name": result.run_name}

config = load_train_config(model="tiny-chatml", dataset="chats.jsonl", max_length=256, **{
    "trainer.max_steps": 3, "trainer.per_device_train_batch_size": 2,
    "trainer.gradient_accumulation_steps": 1, "lora.r": 8, "trainer.learning_rate": 1e-3})
print("RESULT " + json.dumps(tiny_train(config)))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run in a flow run, shared by this module's tests (each only reads it)."""
    root = tmp_path_factory.mktemp("tracking")
    (root / "chats.jsonl").write_text(
        "".join((CORPUS_DIR / "part-0.jsonl").read_text().splitlines(keepends=True)[:12]))
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "CHIMEIN_STORE": str(root / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PREFECT_UI_URL": PREFECT_UI,
           "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", TRAIN_IN_A_FLOW], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT "))[7:])
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return SimpleNamespace(root=root, env=env, log=proc.stdout + proc.stderr, client=client,
                           run=client.get_run(out["run_id"]), **out)


def test_the_run_has_its_dataset_as_input_and_a_description(trained):
    run, version = trained.run, trained.version
    (dataset_input,) = run.inputs.dataset_inputs
    ds = dataset_input.dataset
    assert (ds.name, ds.digest, ds.source_type) == ("chimein-conversations", version, "local")
    assert json.loads(ds.source)["uri"] == str(trained.root / "store" / "datasets" / version)
    counts = json.loads(ds.profile)
    assert set(counts) == {"train", "validation", "test"} and counts["train"] > 0
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    note = run.data.tags["mlflow.note.content"]
    assert "tiny-chatml" in note and version in note and f"{counts['train']} train" in note


def test_the_experiment_is_of_the_machine_learning_kind(trained):
    experiment = trained.client.get_experiment(trained.run.info.experiment_id)
    assert experiment.name == "chimein"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]


def test_the_run_links_to_its_prefect_flow_run_and_names_the_flow_as_source(trained):
    tags = trained.run.data.tags
    assert tags["prefect.flow_run_id"] == trained.flow_run_id
    assert tags["prefect.flow_run_url"] == f"{PREFECT_UI}/flow-runs/flow-run/{trained.flow_run_id}"
    assert tags["prefect.flow_run_name"]
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("prefect flow tiny-train", "JOB")
    assert trained.flow_run_id in tags["mlflow.note.content"]


def test_each_param_once_and_one_name_per_loss(trained):
    params, metrics = trained.run.data.params, trained.run.data.metrics
    assert not {"model", "dataset", "max_length", "preset.max_length"} & set(params)
    assert (params["preset.name"], params["data.version"], params["data.max_length"]) == \
        ("tiny-chatml", trained.version, "256")
    assert len(set(params.values())) > 10  # the whole config is there
    history = trained.client.get_metric_history(trained.run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert metrics["train_loss"] == pytest.approx(trained.train_loss)
    assert "final_train_loss" not in metrics


def test_the_model_version_has_a_description_and_tags(trained):
    name, version = trained.registered.rsplit("/", 1)
    mv = trained.client.get_model_version(name, version)
    assert mv.run_id == trained.run.info.run_id
    assert mv.tags["chimein.dataset_version"] == trained.version and mv.tags["chimein.preset"] == "tiny-chatml"
    assert mv.tags["chimein.run_name"] == trained.run_name and float(mv.tags["chimein.chattiness"]) > 0
    assert trained.version in mv.description and "3 steps" in mv.description
    assert "tiny-chatml" in trained.client.get_registered_model(name).description


def test_preprocessing_is_a_cached_task_and_progress_reaches_the_flow_log(trained):
    from chimein.train.rows import TokenizedData

    assert trained.again == "Cached" and trained.again_path == trained.tokenized
    data = TokenizedData.load(trained.tokenized)
    assert data.version == trained.version and data.preset.name == "tiny-chatml"
    assert data.labelled_tokens == trained.run.data.metrics["data.labelled_tokens"]
    assert "⟦" in (trained.root / trained.tokenized / "examples.txt").read_text()
    # the run logger's lines (Prefect prints them as `Task run 'train_adapter-…' - step …`)
    lines = [x for x in trained.log.splitlines() if "train_adapter" in x and "tokens/s" in x]
    assert lines and "step 1/3" in lines[0] and "step 3/3" in lines[-1] and "ETA" in lines[-1]


def test_run_url_names_the_runs_experiment(trained, monkeypatch):
    run_id = trained.run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    url = tracking.run_url(trained.client, run_id)
    # the runs view: without the parameter MLflow 3.17's UI opens the GenAI view (traces)
    experiment = trained.run.info.experiment_id
    assert url == f"http://mlflow.example:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    assert experiment != "0"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.env["MLFLOW_TRACKING_URI"])
    assert tracking.run_url(trained.client, run_id) is None
    hint = tracking.ui_hint(run_id)
    assert hint.startswith(
        f"open the MLflow UI: mlflow ui --backend-store-uri {trained.env['MLFLOW_TRACKING_URI']}")
    assert hint.endswith(
        f"then http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning")


def test_eval_logs_one_scheme_on_its_own_run_and_on_the_training_run(trained, monkeypatch):
    """`chimein eval` makes an evaluation run nested under the training run; `--log-to-run` writes
    the same names on the training run itself: the same function wrote both."""
    from typer.testing import CliRunner

    from chimein.cli import app
    from chimein.evaluate.benchmark import load_benchmark

    monkeypatch.chdir(trained.root)
    for k in ("MLFLOW_TRACKING_URI", "CHIMEIN_STORE"):
        monkeypatch.setenv(k, trained.env[k])
    r = CliRunner().invoke(app, ["eval", "--adapter", trained.adapter_dir, "--no-replies", "--log-to-run",
                                 "--out", str(trained.root / "report.json")])
    assert r.exit_code == 0, r.output
    client, train_run_id = trained.client, trained.run.info.run_id
    (child,) = client.search_runs([trained.run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{train_run_id}'")
    assert child.info.run_name == f"eval--fine-tuned--{load_benchmark().fingerprint}"
    assert child.data.tags["mlflow.source.name"] == "chimein eval" and child.data.params["system"] == "fine-tuned"
    assert "report.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    trained_data = client.get_run(train_run_id).data
    bench = {k: v for k, v in child.data.metrics.items() if k.startswith("bench.")}
    assert bench and bench == {k: v for k, v in trained_data.metrics.items() if k.startswith("bench.")}
    stamp = {k: v for k, v in child.data.tags.items() if k.startswith("bench.")}
    assert stamp["bench.complete"] == "true"
    assert stamp == {k: v for k, v in trained_data.tags.items() if k.startswith("bench.")}
    assert "chimein-eval" not in {e.name for e in client.search_experiments()}


def test_flow_run_tags_are_empty_outside_a_flow_run():
    from tasks.model import flow_run_tags

    assert flow_run_tags() == {}


def test_eval_prefixes():
    assert [eval_prefix(d) for d in ("benchmark", "local:ds-1", "hub:o/n@ds-1", "chats.jsonl")] == \
        ["bench", "heldout", "heldout", "file"]


def _recorded_log(name: str) -> tuple[logging.Logger, list[str]]:
    records = []
    log = logging.getLogger(name)
    log.addHandler(handler := logging.Handler())
    handler.emit = lambda record: records.append(record.getMessage())
    log.setLevel(logging.INFO)
    return log, records


def test_progress_log_reports_at_most_every_interval_and_the_last_step():
    from chimein.train.trainer import progress_log

    log, records = _recorded_log("test-progress")
    callback = progress_log(log, every_s=3600)
    state = SimpleNamespace(global_step=0, max_steps=4, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3, 4):
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        callback.on_log(None, state, None, logs={"loss": 2.0 / step})
    callback.on_log(None, state, None, logs={"train_loss": 1.0})  # the run's mean: not a step
    assert len(records) == 2 and records[0].startswith("step 1/4  loss 2.0000")
    assert records[1].startswith("step 4/4  loss 0.5000") and "tokens/s" in records[1]
    assert records[1].endswith("ETA 0m00s")


def test_progress_log_measures_speed_and_eta_after_the_first_steps_warm_up(monkeypatch):
    """The first step carries the warm-up (compiling the decoder layers: ~30 s on 2 cores, where
    a step takes ~3 s): an ETA extrapolated from it said 1h10m for a 6-minute training."""
    from chimein.train import trainer
    from chimein.train.trainer import progress_log

    clock = iter([0.0, 40.0, 43.0, 46.0, 49.0])  # train begins, then steps 1-4 (the first slow)
    monkeypatch.setattr(trainer.time, "monotonic", lambda: next(clock))
    log, records = _recorded_log("test-progress-warm-up")
    callback = progress_log(log, every_s=0)
    state = SimpleNamespace(global_step=0, max_steps=10, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3, 4):
        state.global_step, state.num_input_tokens_seen = step, 300 * step
        callback.on_log(None, state, None, logs={"loss": 1.0})
    assert "first step 40 s, with the warm-up" in records[0] and "8 tokens/s" in records[0]
    assert records[-1].startswith("step 4/10") and "100 tokens/s" in records[-1]
    assert records[-1].endswith("ETA 0m18s")  # 6 steps to go at 3 s each, not at (49 / 4) s


def test_eval_scores_the_responders_replies_and_reports_its_cost(trained, tmp_path, monkeypatch):
    """`chimein eval --responder`: the fine-tuned adapter decides, a (fake) OpenAI-compatible
    endpoint writes each reply, and the report counts its calls, tokens and seconds."""
    import json

    from typer.testing import CliRunner

    from chimein.cli import app
    from tests.fakes.fake_llm import FakeLLM

    monkeypatch.chdir(trained.root)  # the adapter's directory is relative to it
    for k in ("MLFLOW_TRACKING_URI", "CHIMEIN_STORE"):
        monkeypatch.setenv(k, trained.env[k])
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps([{"role": "user", "name": "Ana", "content": "who wrote Dune?"},
                                {"role": "assistant", "content": "Frank Herbert."},
                                {"role": "user", "name": "Ben", "content": "thanks"}]) + "\n")
    with FakeLLM("openai", script=["Frank Herbert.", "You're welcome."]) as fake:
        r = CliRunner().invoke(app, ["eval", "--adapter", trained.adapter_dir, "--data", str(data), "--chattiness",
                                     "0", "--responder", "openai:big", "--responder-base-url", fake.base_url,
                                     "--no-track", "--out", str(tmp_path / "report.json")])
        assert r.exit_code == 0, r.output
        assert len(fake.requests) == 2  # chattiness 0: it speaks at both messages, the responder writes both
    report = json.loads((tmp_path / "report.json").read_text())["systems"]["fine-tuned"]
    assert report["responder"]["calls"] == report["responder"]["served"] == 2
    assert report["responder"]["prompt_tokens"] == 200 and report["metrics"]["response_similarity"] > 0.9
    assert "replies from openai:big: 2 of 2 served" in " ".join(r.output.split())
