"""Prefect flows and tasks: the retrain flow end to end (Prefect's own temporary server), caching
of generation at the HTTP layer, and champion promotion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from chimein.training import TrainResult

from .fake_llm import FakeLLM

RUN_RETRAIN = """
import json, sys
from flows.retrain import RetrainParams, retrain
summary = retrain(RetrainParams.model_validate_json(sys.argv[1]))
print("SUMMARY " + json.dumps(summary, default=str))
"""


def run_retrain(params: dict, cwd: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN_RETRAIN, json.dumps(params)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def test_retrain_flow_end_to_end_and_cached(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "CHIMEIN_STORE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OPENAI_API_KEY": "sk-test-not-real",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with FakeLLM("openai") as fake:
        params = {"preset": "tiny-chatml", "train_config": None, "max_steps": 2, "eval_limit": 1,
                  "generation": {"source": "openai", "count": 10, "base_url": fake.base_url}}
        first = run_retrain(params, tmp_path, env)
        calls = len(fake.requests)
        second = run_retrain(params, tmp_path, env)
        assert len(fake.requests) == calls == 10  # the rerun made no generation request
        third = run_retrain(params | {"refresh": True}, tmp_path, env)
        assert len(fake.requests) == 2 * calls  # refresh regenerates
    assert first["registered"] == "chimein-tiny-chatml/1" and first["champion"] is True
    assert second["run_id"] == first["run_id"]  # same data and settings: nothing retrained
    assert third["registered"] is not None
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(first["run_id"])
    assert run.data.params["preset.name"] == "tiny-chatml" and "eval.macro_f1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(first["run_id"], "loss")] == [1, 2]
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(first["run_id"], "adapter")}
    assert str(client.get_model_version_by_alias("chimein-tiny-chatml", "champion").version) == "1"
    assert first["dataset"].startswith("local:ds-") and first["adapter"].startswith("local:tiny-chatml--")


def _registered_versions(tmp_path, values):
    """Registered versions of one model whose runs carry eval.macro_f1 = value."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("chimein-probe")
    exp = client.create_experiment("probe")
    results = []
    for v in values:
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "eval.macro_f1", v)
        mv = client.create_model_version("chimein-probe", f"runs:/{run.info.run_id}/model", run.info.run_id)
        results.append(TrainResult(run.info.run_id, "probe", Path("."), "ds-x", 1, 1.0, 1, None, uri,
                                   f"chimein-probe/{mv.version}"))
    return client, results


def test_champion_moves_only_when_the_metric_improves(tmp_path, monkeypatch):
    from tasks.model import promote_if_better

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, (v1, v2, v3) = _registered_versions(tmp_path, [0.5, 0.4, 0.7])
    assert promote_if_better.fn(v1, "macro_f1", 0.5)  # first: always champion
    assert not promote_if_better.fn(v2, "macro_f1", 0.4)  # worse: stays with v1
    assert str(client.get_model_version_by_alias("chimein-probe", "champion").version) == "1"
    assert promote_if_better.fn(v3, "macro_f1", 0.7)  # better: moves
    assert str(client.get_model_version_by_alias("chimein-probe", "champion").version) == "3"


@pytest.mark.parametrize("exc, retry", [(RuntimeError("429 again"), True), (ValueError("bad"), False)])
def test_io_retries_skip_the_callers_errors(exc, retry):
    from prefect.states import Failed

    from chimein.generation import MissingAPIKey
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
    params = {"presets": ["tiny-chatml", "tiny-llama-2"],
              "retrain": {"train_config": None, "max_steps": 2, "eval_limit": 1, "generation": {"count": 8}}}
    proc = subprocess.run([sys.executable, "-c", RUN_COMPARE, json.dumps(params)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("SUMMARY "))[8:])
    assert [r["preset"] for r in rows] == ["tiny-chatml", "tiny-llama-2"]
    assert rows[0]["dataset"] == rows[1]["dataset"]  # one dataset version for all presets
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("chimein").experiment_id
    (parent,) = client.search_runs([exp], "tags.mlflow.runName LIKE 'compare--%'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} == {r["run_id"] for r in rows}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.json", "loss_by_preset.png"}
