"""The local stack: a Prefect server, an MLflow tracking server, the GPU work pool, the
deployments and a worker, on loopback — started by `chimein up`, stopped by `chimein down`.

Everything lives in one directory (default ./.stack): the SQLite databases, MLflow's artifacts,
logs and pid files. Both commands are idempotent: a running service is left as it is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stack:
    root: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = "gpu"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """What every stack process, and the flow runs the worker starts, should see."""
        return {**os.environ, "PREFECT_HOME": str(self.root / "prefect"),
                "PREFECT_API_URL": self.prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
                "CHIMEIN_REPO": str(REPO)}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, and it has exited
            return False
    except ChildProcessError:
        pass  # started by another `chimein up`: not ours to reap
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _start(stack: Stack, name: str, cmd: list[str], health: str | None, timeout_s: float = 120) -> str:
    pid_file = stack.root / f"{name}.pid"
    if _alive(pid_file) and (health is None or _healthy(health)):
        return "running"
    log = open(stack.root / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, env=stack.env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)  # its own group: `down` stops children too
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while health and not _healthy(health):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {stack.root / (name + '.log')}")
        time.sleep(0.5)
    return "started"


def _prefect(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=stack.env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def up(stack: Stack) -> dict[str, str]:
    """Start (or find running) the servers, create the pool, deploy, start a worker."""
    stack.root.mkdir(parents=True, exist_ok=True)
    status = {
        "prefect-server": _start(stack, "prefect-server", [
            sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(stack.prefect_port)], f"{stack.prefect_api}/health"),
        "mlflow-server": _start(stack, "mlflow-server", [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(stack.mlflow_port),
            "--backend-store-uri", f"sqlite:///{stack.root / 'mlflow.db'}",
            "--artifacts-destination", str(stack.root / "mlartifacts"), "--workers", "1"],
            f"{stack.mlflow_uri}/health"),
    }
    template = REPO / "infra" / "work-pools" / "process.json"
    job = json.loads(template.read_text())
    job["variables"]["properties"]["env"]["default"] = {"MLFLOW_TRACKING_URI": stack.mlflow_uri}
    (stack.root / "process-pool.json").write_text(json.dumps(job))
    _prefect(stack, "work-pool", "create", stack.pool, "--type", "process", "--overwrite",
             "--base-job-template", str(stack.root / "process-pool.json"))
    _prefect(stack, "work-pool", "set-concurrency-limit", stack.pool, "1")  # one training per GPU
    _prefect(stack, "deploy", "--prefect-file", str(REPO / "infra" / "prefect.yaml"), "--all")
    status["worker"] = _start(stack, "worker", [
        sys.executable, "-m", "prefect", "worker", "start", "--pool", stack.pool, "--type", "process"], None)
    return status


def down(stack: Stack) -> dict[str, str]:
    """Stop the worker and the servers (SIGTERM to their process groups, then SIGKILL)."""
    status = {}
    for name in ("worker", "mlflow-server", "prefect-server"):
        pid_file = stack.root / f"{name}.pid"
        if not _alive(pid_file):
            status[name] = "not running"
            pid_file.unlink(missing_ok=True)
            continue
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGTERM)
        for _ in range(40):
            if not _alive(pid_file):
                break
            time.sleep(0.25)
        else:
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        status[name] = "stopped"
    return status
