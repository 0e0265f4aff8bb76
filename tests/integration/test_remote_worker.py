"""Integration: a worker on a second host joins a shared server, as infra/README.md says.

The "tracking host" is a real Prefect server on 127.0.0.2 (another loopback address, on a free
port: not this host's stack on 127.0.0.1:4200), set up as the README's production steps do (the pool
from infra/work-pools/process.json, `prefect deploy` of infra/prefect.yaml from a shell without
CHIMEIN_REPO). The "GPU host" starts `chimein worker --gpu 0` with only PREFECT_API_URL and
MLFLOW_TRACKING_URI exported; it says which server it joined, and runs the nightly deployment's
flow, whose MLflow run lands in the store MLFLOW_TRACKING_URI names. Without a server, or with a
Prefect URL but no MLflow one, the worker refuses to start, naming the URL and the fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from chimein.ops.stack import REPO, Stack, down

from .test_stack import stack_processes

HOST = "127.0.0.2"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shell(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tracking_host(tmp_path):
    """A Prefect server on HOST with the pool and the deployments, as the README sets one up."""
    port = free_port()
    api = f"http://{HOST}:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "CHIMEIN_REPO"} | {
        "PREFECT_HOME": str(tmp_path / "tracking-host"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = open(tmp_path / "prefect-server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "prefect-server.log").read_text()
            time.sleep(0.5)
        prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
        for args in (["work-pool", "create", "gpu", "--type", "process",
                      "--base-job-template", "infra/work-pools/process.json"],
                     ["deploy", "--prefect-file", "infra/prefect.yaml", "--all"]):
            r = shell(*prefect, *args, env=env)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield api
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_a_worker_on_another_host_joins_the_shared_server_and_runs_a_flow(tmp_path, tracking_host):
    api, host_dir = tracking_host, tmp_path / "gpu-host"
    store = f"sqlite:///{tmp_path / 'shared-mlflow.db'}"
    # the GPU host's shell, as the README's "a pool of GPU hosts" says: two exports, then the worker
    env = {k: v for k, v in os.environ.items() if k not in ("CHIMEIN_REPO", "PREFECT_HOME")} | {
        "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": store, "CHIMEIN_STORE": str(tmp_path / "store"),
        "PREFECT_WORKER_QUERY_SECONDS": "2"}
    try:
        r = shell(sys.executable, "-m", "chimein.cli", "worker", "--gpu", "0", "--dir", str(host_dir), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"worker-gpu0: started; joined the Prefect server {api} (pool gpu)" in r.stdout
        assert f"log to MLflow at {store}" in r.stdout

        client = httpx.Client(base_url=api, timeout=30)
        deployment = client.get("/deployments/name/retrain/nightly-retrain").json()
        params = {"preset": "tiny-chatml", "train_config": "defaults", "max_steps": 2, "benchmark": False,
                  "heldout_limit": 1, "generation": {"count": 8}, "data_dir": str(tmp_path / "generated"),
                  "output_dir": str(tmp_path / "train")}
        created = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": {"params": params}})
        assert created.status_code == 201, created.text[:1000]
        deadline = time.monotonic() + 600
        while (run := client.get(f"/flow_runs/{created.json()['id']}").json())["state"]["type"] not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.monotonic() < deadline, run["state"]
            time.sleep(1)
        worker_log = (host_dir / "worker-gpu0.log").read_text(errors="replace")
        assert run["state"]["type"] == "COMPLETED", worker_log[-4000:]
        assert run["work_pool_name"] == "gpu" and run["name"].startswith("tiny-chatml--offline-8--")

        # its MLflow run is in the store the worker's MLFLOW_TRACKING_URI names, with the worker's name
        mlflow_client = mlflow.MlflowClient(store)
        (mlrun,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("chimein").experiment_id])
        assert mlrun.data.tags["prefect.flow_run_id"] == run["id"]
        assert mlrun.data.tags["prefect.worker_name"] == f"chimein-worker-gpu0-{socket.gethostname()}"
        assert mlrun.data.tags["chimein.gpu_slot"] == "gpu:0"
    finally:
        status = down(Stack(host_dir))
    assert status["worker-gpu0"] == "stopped" and not stack_processes(host_dir)


def test_a_worker_without_a_reachable_server_or_mlflow_uri_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    unreachable = f"http://{HOST}:{free_port()}/api"  # nothing listens there
    r = shell(sys.executable, "-m", "chimein.cli", "worker", "--gpu", "0", "--dir", str(tmp_path),
              env=env | {"PREFECT_API_URL": unreachable, "MLFLOW_TRACKING_URI": "http://tracking.invalid:5000"})
    assert r.returncode == 1
    message = " ".join(r.stderr.split())
    assert f"no Prefect server answers at {unreachable}" in message and "PREFECT_API_URL" in message
    assert not list(Path(tmp_path).glob("*.pid")) and not stack_processes(tmp_path)

    r = shell(sys.executable, "-m", "chimein.cli", "worker", "--dir", str(tmp_path),
              env={k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"} | {"PREFECT_API_URL": unreachable})
    assert r.returncode == 1 and "MLFLOW_TRACKING_URI is not set" in " ".join(r.stderr.split())
