"""Integration: `chimein up` starts real Prefect and MLflow servers on free loopback ports, a real
worker on the process pool runs the nightly retrain deployment (tiny preset), `chimein down`
stops everything — every time, leaving no process and no bound port; `up` refuses a port held by
something else and keeps what a user paused."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import mlflow
import psutil
import pytest

from chimein.ops.stack import Stack, _alive, down, up

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
        on_cpu = "deployed with smollm2-135m-instruct on the CPU (no CUDA device here; the 7B presets need a GPU worker)"
        assert up(stack, cuda=False) == {"prefect-server": "started", "mlflow-server": "started",
                                         "nightly-retrain": on_cpu, "worker": "started"}
        assert up(stack, cuda=False) == {"prefect-server": "running", "mlflow-server": "running",
                                         "nightly-retrain": on_cpu, "worker": "running"}
        nightly = httpx.get(f"{stack.prefect_api}/deployments/name/retrain/nightly-retrain").json()
        # a CPU stack's nightly run (and Quick run) trains the offline preset, not a 7B one that stops at once
        assert nightly["parameters"]["params"]["preset"] == "smollm2-135m-instruct"
        assert nightly["parameters"]["params"]["train_config"] == "offline-cpu"
        assert "no CUDA device" in nightly["description"] and "03:00 Europe/Berlin" in nightly["description"]
        # the pull step names no path of this clone: each worker resolves CHIMEIN_REPO itself
        assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $CHIMEIN_REPO }}"}}]
        pool = httpx.get(f"{stack.prefect_api}/work_pools/gpu").json()
        assert "on the CPU" in pool["description"]
        assert pool["base_job_template"]["variables"]["properties"]["env"]["default"] == {}

        params = {"preset": "tiny-chatml", "train_config": "defaults", "max_steps": 2, "heldout_limit": 1,
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


def chimein(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chimein.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def live(match) -> list[psutil.Process]:
    """Processes for which match(process) holds, zombies aside (only their parent can reap them)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and match(p):
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def live_members(pgids: set[int]) -> list[psutil.Process]:
    return live(lambda p: os.getpgid(p.pid) in pgids)


def stack_processes(root) -> list[psutil.Process]:
    """Every process that runs with the stack's environment (`up` gives it to all it starts)."""
    return live(lambda p: p.environ().get("PREFECT_HOME") == str(root / "prefect"))


def bound(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_up_down_five_times_leaves_no_process_and_keeps_what_the_user_paused(tmp_path):
    root, prefect_port, mlflow_port = tmp_path / "stack", free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    names = ("prefect-server", "mlflow-server", "worker")
    try:
        for cycle in range(5):
            r = chimein("up", "--dir", str(root), "--prefect-port", str(prefect_port),
                        "--mlflow-port", str(mlflow_port), "--mlflow-store", str(tmp_path / "mlflow.db"), timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            assert all(f"{n}: started" in r.stdout for n in names), r.stdout
            # the link opens the experiment's runs table (MLflow's UI would start on its GenAI view)
            experiment = mlflow.MlflowClient(f"http://127.0.0.1:{mlflow_port}").get_experiment_by_name("chimein")
            assert (f"MLflow UI   http://127.0.0.1:{mlflow_port}/#/experiments/{experiment.experiment_id}/runs"
                    "?workflowType=machine_learning") in r.stdout
            assert f"MLflow store sqlite:///{tmp_path / 'mlflow.db'}" in r.stdout and (tmp_path / "mlflow.db").is_file()
            pgids = {os.getpgid(p.pid) for p in stack_processes(root)}
            assert len(pgids) == 3, stack_processes(root)  # a group per service

            deployments = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
            nightly = deployments["nightly-retrain"]
            (schedule,) = nightly["schedules"]
            if cycle == 0:  # the user pauses the nightly deployment and its schedule (UI toggles)
                assert not nightly["paused"] and schedule["active"]
                httpx.post(f"{api}/deployments/{nightly['id']}/pause_deployment").raise_for_status()
                httpx.patch(f"{api}/deployments/{nightly['id']}/schedules/{schedule['id']}",
                            json={"active": False}).raise_for_status()
            else:  # `up` deployed again and kept both paused; the others stay as they were
                assert nightly["paused"] and not schedule["active"], (cycle, nightly)
                assert not deployments["compare-7b"]["paused"] and not deployments["generate"]["paused"]

            r = chimein("down", "--dir", str(root), timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert all(f"{n}: stopped" in r.stdout for n in names), r.stdout
            assert not live_members(pgids) and not stack_processes(root), (cycle, live_members(pgids))
            assert not bound(prefect_port) and not bound(mlflow_port), cycle
            assert not list(root.glob("*.pid"))
    finally:
        down(Stack(root))  # after a failure, the next tests must find free ports
    assert "not running" in chimein("down", "--dir", str(root), timeout=120).stdout


class AlwaysHealthy(http.server.BaseHTTPRequestHandler):
    """Another program on the port (another stack's server, say): answers 200 to everything."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_PATCH = do_PUT = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("taken", ["prefect-port", "mlflow-port"])
def test_up_refuses_a_port_held_by_another_process_and_starts_nothing(tmp_path, taken):
    stack = Stack(tmp_path / "stack", free_port(), free_port())
    port = stack.prefect_port if taken == "prefect-port" else stack.mlflow_port
    if taken == "prefect-port":  # a plain socket, bound but not answering
        other = socket.socket()
        other.bind(("127.0.0.1", port))
        other.listen()
    else:  # a server that answers every health check
        other = http.server.HTTPServer(("127.0.0.1", port), AlwaysHealthy)
        threading.Thread(target=other.serve_forever, daemon=True).start()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        with pytest.raises(RuntimeError) as e:
            up(stack)
        assert f"port {port}" in str(e.value) and f"--{taken}" in str(e.value)
        assert not list(stack.root.glob("*.pid"))
        assert {p.pid for p in psutil.Process().children(recursive=True)} <= children
        other_port = stack.mlflow_port if taken == "prefect-port" else stack.prefect_port
        assert not bound(other_port)  # the other server was not started either
    finally:
        down(stack)
        if isinstance(other, socket.socket):
            other.close()
        else:
            other.shutdown()
            other.server_close()


@pytest.mark.parametrize("leader", ["reaped", "zombie"])
def test_down_stops_a_group_whose_leader_died(tmp_path, leader):
    """MLflow's server can die and leave its workers (and the port) behind, as a zombie when its
    parent does not reap it: `down` stops the rest of the group, without a ProcessLookupError."""
    parent = subprocess.Popen([sys.executable, "-c", f"""
import psutil, subprocess, time
p = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!"], start_new_session=True,
                     stdout=subprocess.PIPE, text=True)
print(p.pid, psutil.Process(p.pid).create_time(), p.stdout.readline(), flush=True)
if {leader == "reaped"}:
    p.wait()
time.sleep(300)  # a parent that does not reap: the leader stays a zombie
"""], stdout=subprocess.PIPE, text=True)
    leader_pid, leader_started, worker_pid = parent.stdout.readline().split()
    leader_pid, worker_pid = int(leader_pid), int(worker_pid)
    try:
        deadline = time.monotonic() + 10
        while psutil.pid_exists(leader_pid) and psutil.Process(leader_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert psutil.Process(worker_pid).is_running()
        stack = Stack(tmp_path / "stack")
        stack.root.mkdir()
        (stack.root / "mlflow-server.pid").write_text(json.dumps(
            {"pid": leader_pid, "started": float(leader_started), "port": None}))
        started = time.monotonic()
        status = down(stack)
        assert status["mlflow-server"] == "stopped", status
        assert time.monotonic() - started < 10  # SIGTERM was enough: no waiting for a zombie to die
        assert not live_members({leader_pid})
        assert not (stack.root / "mlflow-server.pid").exists()
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)
