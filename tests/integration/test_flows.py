"""Prefect flows and tasks: the retrain flow end to end (Prefect's own temporary server), caching
of generation at the HTTP layer, and champion promotion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from chimein.train.run import TrainResult
from tests.fakes.fake_llm import FakeLLM, conversation_text

RUN_RETRAIN = """
import json, sys
from unittest import mock
from flows.retrain import RetrainParams, retrain
params = RetrainParams.model_validate_json(sys.argv[1])
if len(sys.argv) > 2:  # what a scheduled run sees: its scheduled start time (Prefect's way to set it)
    import datetime
    import prefect.runtime.flow_run
    with mock.patch.object(prefect.runtime.flow_run, "scheduled_start_time",
                           datetime.datetime.fromisoformat(sys.argv[2]), create=True):
        summary = retrain(params)
else:
    summary = retrain(params)
print("SUMMARY " + json.dumps(summary, default=str))
"""


def run_retrain(params: dict, cwd: Path, env: dict, scheduled: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN_RETRAIN, json.dumps(params), *([scheduled] if scheduled else [])],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def flow_env(tmp_path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "CHIMEIN_STORE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OPENAI_API_KEY": "sk-test-not-real",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


def test_retrain_flow_end_to_end_and_cached(tmp_path):
    from chimein.data.feedback import Recorder
    from chimein.evaluate.benchmark import load_benchmark
    from chimein.evaluate.grounded import load_grounded
    from chimein.evaluate.metrics import REPLY_METRICS
    from tests.unit.knowledge.test_index import HANDBOOK

    env = flow_env(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "handbook.md").write_text(HANDBOOK, encoding="utf-8")
    recordings = tmp_path / "recordings"  # what `chimein bridge matrix` recorded in a room that agreed
    rec = Recorder(recordings)
    rec.message("!r:hs", "$1", 1_790_000_000_000, "Ann", "what time is the match on saturday?")
    rec.message("!r:hs", "$2", 1_790_000_001_000, "chimein", "It starts at 3pm.", assistant=True)
    rec.reaction("!r:hs", "$3", 1_790_000_002_000, "$2", "👍")
    with FakeLLM("openai") as fake:
        params = {"preset": "tiny-chatml", "train_config": None, "max_steps": 2, "heldout_limit": 1,
                  "generation": {"source": "openai", "count": 10, "base_url": fake.base_url,
                                 "feedback": str(recordings)},
                  "knowledge": str(docs)}
        first = run_retrain(params, tmp_path, env)
        calls = len(fake.requests)
        second = run_retrain(params, tmp_path, env)
        assert len(fake.requests) == calls == 10  # the rerun made no generation request
        third = run_retrain(params | {"refresh": True, "max_steps": 1, "benchmark_limit": 3, "hedge": False},
                            tmp_path, env)
        assert len(fake.requests) == 2 * calls  # refresh regenerates
    # the first version scored on the whole benchmark takes the alias; a partial score never does
    assert first["registered"] == "chimein-tiny-chatml/1" and first["champion"]["moved"] is True
    assert second["run_id"] == first["run_id"]  # same data and settings: nothing retrained
    assert third["registered"] == "chimein-tiny-chatml/2" and third["champion"]["moved"] is False
    assert "promotion needs the whole benchmark" in third["champion"]["reason"]
    partial = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(third["run_id"]).data
    assert partial.tags["bench_partial.complete"] == "false" and "bench.fingerprint" not in partial.tags
    assert partial.tags["bench_partial.honesty"] == "tools"  # the run's switches: tools on, hedging off
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(first["run_id"])
    bench = load_benchmark()
    assert run.data.params["preset.name"] == "tiny-chatml"
    # both metric sets, each with what makes it comparable
    assert run.data.metrics["bench.decisions"] == bench.decisions
    assert run.data.tags["bench.fingerprint"] == bench.fingerprint == first["benchmark_fingerprint"]
    assert run.data.tags["bench.complete"] == "true" and "bench.balanced_accuracy" in run.data.metrics
    assert run.data.tags["bench.honesty"] == "tools+hedge"  # the defaults, as chat and serve run
    # the flow scores decisions only: no reply metric is logged for replies never generated ...
    assert not [k for k in run.data.metrics if k.split(".")[-1] in REPLY_METRICS], run.data.metrics
    # ... but the replies forced at the benchmark's factual turns are judged, with their annotations
    assert run.data.metrics["bench.factual_turns"] == len(bench.factual())
    rates = [run.data.metrics[f"bench.{k}"] for k in ("answer_accuracy", "hedge_rate", "confident_error_rate")]
    assert sum(rates) == pytest.approx(1.0) and run.data.tags["bench.answers"] == bench.answers_fingerprint
    assert "heldout.factual_turns" not in run.data.metrics  # a held-out split has no annotations
    assert run.data.tags["heldout.fingerprint"] == first["dataset"].removeprefix("local:") + ":test"
    assert run.data.tags["heldout.decisions"] == str(int(run.data.metrics["heldout.decisions"]))
    assert float(run.data.tags["bench.chattiness"]) == pytest.approx(run.data.metrics["calibration.threshold"])
    assert [m.step for m in client.get_metric_history(first["run_id"], "loss")] == [1, 2]
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(first["run_id"], "adapter")}
    assert str(client.get_model_version_by_alias("chimein-tiny-chatml", "champion").version) == "1"
    assert first["dataset"].startswith("local:ds-") and first["adapter"].startswith("local:tiny-chatml--")
    # the group's documents: indexed by the run and named in the adapter's chimein.json
    meta = json.loads(Path(client.download_artifacts(first["run_id"], "adapter/chimein.json", str(tmp_path))).read_text())
    assert meta["knowledge"] == str(docs.resolve()) and (docs / ".chimein-index" / "manifest.json").is_file()
    # both sources of the data: on the run (metrics and the dataset input's profile) and in the dataset card
    assert run.data.metrics["data.source.openai"] == 10 and run.data.metrics["data.source.feedback"] == 1
    [given] = run.inputs.dataset_inputs
    assert json.loads(given.dataset.profile)["source:feedback"] == 1
    card = (tmp_path / "store" / "datasets" / first["dataset"].removeprefix("local:") / "README.md").read_text()
    assert "| sources | openai 10 · feedback 1 |" in card and "confirmed 1" in card
    # and the grounded benchmark, scored with its own documents
    assert run.data.tags["grounded.fingerprint"] == load_grounded().fingerprint == first["grounded_fingerprint"]
    assert run.data.metrics["grounded.answered_turns"] == 31 and 0 <= run.data.metrics["grounded.answered_accuracy"] <= 1


def test_a_knowledge_folder_with_nothing_to_index_stops_the_run_before_any_work(tmp_path):
    env = flow_env(tmp_path)
    (tmp_path / "empty").mkdir()
    params = {"preset": "tiny-chatml", "train_config": None, "max_steps": 1, "knowledge": str(tmp_path / "empty"),
              "generation": {"source": "offline", "count": 4}}
    proc = subprocess.run([sys.executable, "-c", RUN_RETRAIN, json.dumps(params)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "no passage to index: add Markdown (.md) or text (.txt) files" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-3000:]
    assert not list(tmp_path.rglob("conversations-*"))  # stopped before generating anything


def test_nightly_runs_retrain_on_new_data_and_never_pay_twice(tmp_path):
    """Two nights: two dataset versions and two training runs; the same night again (here through
    the flow run's scheduled start time, as a scheduled run gets it) makes no request."""
    env = flow_env(tmp_path)
    with FakeLLM("openai") as fake:
        params = {"preset": "tiny-chatml", "train_config": None, "max_steps": 1, "heldout_limit": 1,
                  "benchmark_limit": 2, "nightly": True,
                  "generation": {"source": "openai", "count": 6, "base_url": fake.base_url}}
        night1 = run_retrain(params | {"night": "2026-11-01"}, tmp_path, env)
        night2 = run_retrain(params | {"night": "2026-11-02"}, tmp_path, env)
        assert len(fake.requests) == 12
        again = run_retrain(params, tmp_path, env, scheduled="2026-11-01T03:00:00+01:00")
        assert len(fake.requests) == 12  # night 1 re-triggered: its data is reused, nothing paid again
    assert night1["dataset"] != night2["dataset"]
    assert night1["run_id"] != night2["run_id"] and night1["run_name"] != night2["run_name"]
    assert again["dataset"] == night1["dataset"] and again["run_id"] == night1["run_id"]


def test_cached_data_that_was_deleted_is_made_again(tmp_path):
    """`make clean && make run`, then parts of the outputs deleted by hand: a cache hit always
    names data that exists (else it is made again), and only data that is gone is paid for again."""
    env = flow_env(tmp_path)
    store = tmp_path / "store"
    with FakeLLM("openai") as fake:
        params = {"preset": "tiny-chatml", "train_config": None, "max_steps": 1, "heldout_limit": 1,
                  "benchmark": False, "generation": {"source": "openai", "count": 6, "base_url": fake.base_url}}
        run_retrain(params, tmp_path, env)
        # what `make clean` deletes (the store is CHIMEIN_STORE here, as the MLflow database is)
        shutil.rmtree(tmp_path / "outputs")
        shutil.rmtree(store)
        (tmp_path / "mlflow.db").unlink()
        after_clean = run_retrain(params, tmp_path, env)  # failed: "no dataset 'ds-…' in store/datasets"
        assert len(fake.requests) == 12  # the conversations were gone: generated again
        # the dataset version alone: rebuilt from the conversations on disk, nothing paid
        shutil.rmtree(store / "datasets")
        rebuilt = run_retrain(params, tmp_path, env)
        assert len(fake.requests) == 12 and rebuilt["dataset"] == after_clean["dataset"]
        assert (store / "datasets" / rebuilt["dataset"].removeprefix("local:") / "info.json").is_file()
        # the conversations alone, answered differently this time: new data, a new dataset version
        shutil.rmtree(tmp_path / "outputs" / "generated")
        fake.script = [conversation_text(1000 + i) for i in range(6)]
        regenerated = run_retrain(params, tmp_path, env)
        assert len(fake.requests) == 18 and regenerated["dataset"] != rebuilt["dataset"]
        # the whole store, the cache with it: the conversations on disk are reused, nothing paid
        shutil.rmtree(store)
        again = run_retrain(params, tmp_path, env)
        assert len(fake.requests) == 18 and again["dataset"] == regenerated["dataset"]
    assert (store / "prefect-cache").is_dir()  # the cache is in the store, which `make clean` deletes


def _registered_versions(tmp_path, evaluations):
    """Registered versions of one model whose runs carry bench.balanced_accuracy and the stamp
    of the evaluation: (value, fingerprint, decisions scored, chattiness source)."""
    from chimein.evaluate.records import BENCH, EvalStamp, log_evaluation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("chimein-probe")
    exp = client.create_experiment("probe")
    results = []
    for value, fingerprint, decisions, source in evaluations:
        run = client.create_run(exp)
        log_evaluation(client, run.info.run_id, BENCH, {"balanced_accuracy": value, "decisions": decisions},
                       EvalStamp(fingerprint, decisions, 600, 0.3, source))
        mv = client.create_model_version("chimein-probe", f"runs:/{run.info.run_id}/model", run.info.run_id)
        results.append(TrainResult(run.info.run_id, "probe", Path("."), "ds-x", 1, 1.0, 1, None, uri,
                                   f"chimein-probe/{mv.version}"))
    return client, results


def test_champion_moves_only_on_the_same_whole_benchmark(tmp_path, monkeypatch):
    from tasks.model import promote_if_better

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, versions = _registered_versions(tmp_path, [
        (0.80, "bench-a", 600, "calibrated"),  # v1: the first whole-benchmark score
        (0.95, "bench-a", 120, "calibrated"),  # v2: better, but on a subset
        (0.95, "bench-b", 600, "calibrated"),  # v3: better, on another benchmark
        (0.95, "bench-a", 600, "fixed"),       # v4: better, at a fixed threshold
        (0.70, "bench-a", 600, "calibrated"),  # v5: comparable and worse
        (0.90, "bench-a", 600, "calibrated"),  # v6: comparable and better
    ])

    def champion():
        return str(client.get_model_version_by_alias("chimein-probe", "champion").version)

    verdicts = [promote_if_better.fn(v, "balanced_accuracy") for v in versions]
    assert [v["moved"] for v in verdicts] == [True, False, False, False, False, True]
    assert "promotion needs the whole benchmark" in verdicts[1]["reason"]
    assert "not comparable" in verdicts[2]["reason"] and "bench-b" in verdicts[2]["reason"]
    assert "not comparable" in verdicts[3]["reason"] and "fixed" in verdicts[3]["reason"]
    assert "not better" in verdicts[4]["reason"]
    assert champion() == "6"
    # the verdict is on each run, for the MLflow UI
    assert client.get_run(versions[2].run_id).data.tags["chimein.promotion"].startswith("kept: not comparable")


def test_champion_without_a_benchmark_score_is_never_replaced_blindly(tmp_path, monkeypatch):
    from tasks.model import promote_if_better

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, (old, new) = _registered_versions(tmp_path, [(0.5, "bench-a", 600, "calibrated")] * 2)
    client.set_registered_model_alias("chimein-probe", "champion", "1")
    client.delete_tag(old.run_id, "bench.fingerprint")  # e.g. scored before the benchmark existed
    verdict = promote_if_better.fn(new, "balanced_accuracy")
    assert not verdict["moved"] and "--log-to-run" in verdict["reason"]


@pytest.mark.parametrize("exc, retry", [(RuntimeError("429 again"), True), (ValueError("bad"), False)])
def test_io_retries_skip_the_callers_errors(exc, retry):
    from prefect.states import Failed

    from chimein.data.providers import MissingAPIKey
    from tasks.data import retry_io

    assert retry_io(None, None, Failed(data=exc)) is retry
    assert retry_io(None, None, Failed(data=MissingAPIKey("OPENAI_API_KEY is not set"))) is False


RUN_COMPARE = """
import json, sys
from flows.compare import CompareParams, compare
rows = compare(CompareParams.model_validate_json(sys.argv[1]))
print("SUMMARY " + json.dumps(rows, default=str))
"""


def test_compare_flow_makes_child_runs_and_a_comparison(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "CHIMEIN_STORE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    params = {"presets": ["tiny-chatml", "tiny-llama-2"], "experiment": "presets",
              "retrain": {"train_config": None, "max_steps": 2, "heldout_limit": 1, "benchmark_limit": 2,
                          "generation": {"count": 8}}}
    proc = subprocess.run([sys.executable, "-c", RUN_COMPARE, json.dumps(params)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("SUMMARY "))[8:])
    assert [r["preset"] for r in rows] == ["tiny-chatml", "tiny-llama-2"]
    assert rows[0]["dataset"] == rows[1]["dataset"]  # one dataset version for all presets
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    # the parent in the experiment asked for, and the children with it (not in the default one)
    exp = client.get_experiment_by_name("presets")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName LIKE 'compare--%'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} == {r["run_id"] for r in rows}
    assert client.get_experiment_by_name("chimein") is None
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.source.name"] == "prefect flow compare"
    assert all(c.data.tags["prefect.flow_run_id"] != parent.data.tags["prefect.flow_run_id"] for c in children)
    assert all(r["train_loss"] == pytest.approx(c.data.metrics["train_loss"])
               for r in rows for c in children if c.info.run_id == r["run_id"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.json", "loss_by_preset.png"}


# --- the deployment form, run names, the summary, the hardware check (issue 11) -------------------


def test_retrain_form_offers_choices_and_no_internals():
    """What the Prefect UI renders for the retrain deployment: choices where the values are known,
    a pattern for publish targets, and only the parameters a user sets."""
    from prefect.utilities.callables import parameter_schema

    from chimein.evaluate.metrics import HEADLINE_METRICS
    from chimein.presets import list_presets
    from flows.generate import generate
    from flows.retrain import retrain

    schema = parameter_schema(retrain).model_dump()
    assert list(schema["properties"]) == ["params"] and "parent_run_id" not in json.dumps(schema)
    form = schema["definitions"]["RetrainParams"]["properties"]
    assert form["preset"]["enum"] == list_presets() and "zephyr-7b-beta" in form["preset"]["enum"]
    assert form["promote_metric"]["enum"] == list(HEADLINE_METRICS)
    assert schema["definitions"]["GenerationSettings"]["properties"]["source"]["enum"] == \
        ["offline", "openai", "replicate"]
    assert form["publish"]["pattern"] == form["publish_dataset"]["pattern"] == r"^(local|hub:[\w.-]+/[\w.-]+)$"
    assert form["allow_cpu"]["default"] is False
    assert list(parameter_schema(generate).model_dump()["properties"]) == ["params"]


def test_flow_parameters_refuse_what_the_form_would():
    from pydantic import ValidationError

    from chimein.paths import hub_repo
    from flows.retrain import RetrainParams

    for bad in ({"preset": "gpt-5"}, {"publish": "s3:bucket"}, {"promote_metric": "accuracy"},
                {"generation": {"source": "ollama"}}, {"no_such_setting": 1}):
        with pytest.raises(ValidationError):
            RetrainParams.model_validate(bad)
    assert RetrainParams(publish="hub:org/chimein-adapter").publish == "hub:org/chimein-adapter"
    assert hub_repo("local") is None and hub_repo("hub:org/name") == "org/name"
    with pytest.raises(ValueError, match="'local' or 'hub:ORG/NAME'"):
        hub_repo("hub:no-slash")


def test_retrain_summary_says_what_was_decided_and_why():
    from flows.retrain import summary_markdown

    bench = {"decisions": 600, "balanced_accuracy": 0.5, "f1": 0.81234, "missed_intervention_rate": 0.1,
             "false_interruption_rate": 0.04, "precision": 0.7, "recall": 0.9, "macro_f1": 0.6,
             "format_compliance": 1.0, "chattiness": 0.3, "answer_accuracy": 0.25, "hedge_rate": 0.5,
             "confident_error_rate": 0.25}
    md = summary_markdown({"run_name": "tiny-chatml--ds-1--abc", "run_id": "r1", "preset": "tiny-chatml",
                           "run_url": "http://127.0.0.1:5000/#/experiments/1/runs/r1?workflowType=machine_learning",
                           "dataset": "local:ds-1", "adapter": "local:tiny-chatml--ds-1--abc",
                           "registered": "chimein-tiny-chatml/2", "train_loss": 1.23456,
                           "champion": {"moved": False, "reason": "balanced_accuracy 0.500 < 0.700: not better"},
                           "benchmark": bench, "benchmark_fingerprint": "bench-x", "heldout": {}},
                          "balanced_accuracy")
    assert "**champion** (balanced accuracy): not moved — balanced_accuracy 0.500 < 0.700: not better" in md
    header = next(line for line in md.splitlines() if line.startswith("| evaluation"))
    assert "| balanced accuracy |" in header and "| false interruption rate |" in header
    assert "| answer accuracy | hedge rate | confident error rate |" in header
    row = next(line for line in md.splitlines() if line.startswith("| benchmark"))
    assert "bench-x" in row and "| 0.500 |" in row and "| 0.812 |" in row and "| 600 |" in row
    assert "| 0.250 | 0.500 | 0.250 |" in row
    assert "held-out" not in md  # not scored: no row
    for line in ("| adapter | `local:tiny-chatml--ds-1--abc` |", "| registered model | chimein-tiny-chatml/2 |",
                 "| train loss | 1.235 |", "| preset | tiny-chatml |",
                 "| MLflow run | [r1](http://127.0.0.1:5000/#/experiments/1/runs/r1?workflowType=machine_learning) |"):
        assert line in md


RUN_STOPPED = """
import json, sys, time
from prefect.client.orchestration import get_client
from flows.retrain import RetrainParams, retrain
state = retrain(RetrainParams.model_validate_json(sys.argv[1]), return_state=True)
with get_client(sync_client=True) as client:
    run = client.read_flow_run(state.state_details.flow_run_id)
print("RESULT " + json.dumps({"state": state.type.value, "message": state.message, "name": run.name,
                              "seconds": (run.end_time - run.start_time).total_seconds()}))
"""


def test_a_7b_preset_on_a_machine_without_cuda_stops_at_once(tmp_path):
    """The nightly deployment's preset on a CPU worker: the run fails in seconds, before any API
    call or download, naming the pool to use and the override; its name says what ran."""
    import datetime

    env = flow_env(tmp_path) | {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    params = {"preset": "zephyr-7b-beta", "train_config": None, "generation": {"source": "offline"}}
    proc = subprocess.run([sys.executable, "-c", RUN_STOPPED, json.dumps(params)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert result["state"] == "FAILED" and result["seconds"] < 10
    # what is wrong here (this host has no CUDA device), not "run it on the gpu pool" (it already is)
    assert "needs a CUDA GPU, and this host" in proc.stderr and "has no CUDA device: " in proc.stderr
    assert "`gpu` work pool" not in proc.stderr and "allow_cpu" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing generated, nothing trained
    today = datetime.datetime.now(datetime.timezone.utc).date()  # a scheduled start time is UTC
    assert result["name"] == f"zephyr-7b-beta--offline-300--{today}"


RUN_GENERATE = """
import json, sys
from prefect.client.orchestration import get_client
from flows.generate import GenerateParams, generate
state = generate(GenerateParams.model_validate_json(sys.argv[1]), return_state=True)
with get_client(sync_client=True) as client:
    name = client.read_flow_run(state.state_details.flow_run_id).name
print("RESULT " + json.dumps({"dataset": state.result(), "name": name}))
"""


def test_generate_flow_takes_a_params_model_and_names_its_run(tmp_path):
    import datetime

    env = flow_env(tmp_path)
    params = {"generation": {"source": "offline", "count": 6, "seed": 3}}
    proc = subprocess.run([sys.executable, "-c", RUN_GENERATE, json.dumps(params)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    today = datetime.datetime.now(datetime.timezone.utc).date()  # a scheduled start time is UTC
    assert result["dataset"].startswith("local:ds-") and result["name"] == f"offline-6--{today}"
    assert len(list((tmp_path / "outputs" / "generated").glob("conversations-*.jsonl"))) == 1


def test_promotion_tags_the_model_version_with_its_scores_and_the_verdict(tmp_path, monkeypatch):
    from tasks.model import promote_if_better

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, (whole, partial) = _registered_versions(tmp_path, [(0.8, "bench-a", 600, "calibrated"),
                                                               (0.9, "bench-a", 100, "calibrated")])
    for v in (whole, partial):
        promote_if_better.fn(v, "balanced_accuracy")
    tags = client.get_model_version("chimein-probe", "1").tags
    assert tags["bench.balanced_accuracy"] == "0.8000" and tags["bench.fingerprint"] == "bench-a"
    assert tags["bench.complete"] == "true" and tags["chimein.promotion"].startswith("moved: first version")
    tags = client.get_model_version("chimein-probe", "2").tags
    assert tags["bench_partial.balanced_accuracy"] == "0.9000" and "bench.balanced_accuracy" not in tags
    assert tags["chimein.promotion"].startswith("kept:") and "whole benchmark" in tags["chimein.promotion"]
