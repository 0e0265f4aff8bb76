"""Integration: `chimein up` starts real Prefect and MLflow servers on free loopback ports, a real
worker on the process pool runs the nightly retrain deployment (tiny preset), `chimein down`
stops everything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import mlflow
import pytest

from chimein.stack import Stack, _alive, down, up

pytestmark = pytest.mark.integration

API_SCRIPT = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def schedules():
    async with get_client() as client:
        d = await client.read_deployment_by_name("retrain/nightly-retrain")
        return [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                for s in d.schedules]

out = {"schedules": asyncio.run(schedules())}
run = run_deployment("retrain/nightly-retrain", parameters={"params": json.loads(sys.argv[1])},
                     timeout=900, poll_interval=2)
out["state"] = run.state.type.value
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_stack_runs_the_nightly_deployment(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    stack = Stack(tmp_path / "stack", free_port(), free_port())
    try:
        assert up(stack) == {"prefect-server": "started", "mlflow-server": "started", "worker": "started"}
        assert up(stack) == {"prefect-server": "running", "mlflow-server": "running", "worker": "running"}

        params = {"preset": "tiny-chatml", "train_config": None, "max_steps": 2, "heldout_limit": 1,
                  "generation": {"count": 8}, "data_dir": str(tmp_path / "generated"),
                  "output_dir": str(tmp_path / "train")}
        proc = subprocess.run([sys.executable, "-c", API_SCRIPT, json.dumps(params)], env=stack.env(),
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
        worker_log = (stack.root / "worker.log").read_text(errors="replace")
        assert result["state"] == "COMPLETED", worker_log[-4000:]
        assert result["schedules"] == [{"cron": "0 3 * * *", "timezone": "Europe/Berlin", "active": True}]

        # the flow run logged to the MLflow *server*
        client = mlflow.MlflowClient(stack.mlflow_uri)
        (run,) = client.search_runs([client.get_experiment_by_name("chimein").experiment_id])
        assert run.data.params["preset.name"] == "tiny-chatml" and "bench.balanced_accuracy" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert "adapter/adapter_model.safetensors" in {
            a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
        champion = client.get_model_version_by_alias("chimein-tiny-chatml", "champion")
        assert champion.run_id == run.info.run_id
    finally:
        status = down(stack)
    assert set(status.values()) == {"stopped"}
    assert not any(_alive(stack.root / f"{n}.pid") for n in ("worker", "mlflow-server", "prefect-server"))
    assert down(stack) == {n: "not running" for n in ("worker", "mlflow-server", "prefect-server")}
