"""The local stack: a Prefect server, an MLflow tracking server, the GPU work pool, the
deployments and a worker, on loopback — started by `chimein up`, stopped by `chimein down`.

Everything lives in one directory (default ./.stack): the SQLite databases, MLflow's artifacts,
logs and pid files. Both commands are idempotent: a running service is left as it is. Each service
runs in its own process group, recorded in its pid file with the leader's start time (a reused pid
is not ours) and its port: `down` stops the whole group, also when the leader died or is a zombie,
and checks that the port is free; `up` refuses a port that something else holds, and keeps the
deployments and schedules a user paused.

Several GPUs: `up(stack, workers=N)` (`chimein up --workers N`) starts one worker per GPU 0..N-1
instead of the single unpinned one, and `worker(stack, gpu)` (`chimein worker --gpu N`) adds one.
Worker N sees only its GPU (CUDA_VISIBLE_DEVICES=N), takes one flow run at a time (`--limit 1`),
and the training of its flow runs holds the Prefect global concurrency limit `gpu:N` (one slot,
created here; tasks.model.gpu_slot). Two runs triggered at once thus run side by side, one per
GPU, and a second worker started on the same GPU by mistake waits for the slot instead of sharing
the card. The pool's concurrency limit follows the number of workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


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


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _read(pid_file: Path) -> dict | None:
    """The pid file `_start` wrote: {"pid": group leader, "started": its start time, "port": …}."""
    try:
        info = json.loads(pid_file.read_text())
        return info if isinstance(info, dict) and {"pid", "started"} <= info.keys() else None
    except (FileNotFoundError, ValueError):
        return None


def _group(info: dict | None) -> list[psutil.Process]:
    """The live (not zombie) processes of the group `up` started; empty if none is left."""
    if info is None:
        return []
    pgid, started = info["pid"], info["started"]
    with suppress(ChildProcessError):  # our child (when `up` ran in this process): reap it
        os.waitpid(pgid, os.WNOHANG)
    try:
        if abs(psutil.Process(pgid).create_time() - started) > 1:
            return []  # the pid was reused: that process is not ours
    except psutil.NoSuchProcess:
        pass  # the leader is gone; children may live on in its group
    members = []
    for p in psutil.process_iter():
        with suppress(OSError, psutil.Error):
            if (os.getpgid(p.pid) == pgid and p.create_time() >= started - 1
                    and p.status() != psutil.STATUS_ZOMBIE):
                members.append(p)
    return members


def _listens(members: list[psutil.Process], port: int) -> bool:
    for p in members:
        with suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")):
                return True
    return False


def _alive(pid_file: Path) -> bool:
    return bool(_group(_read(pid_file)))


def _stop(pid_file: Path, timeout_s: float = 15) -> str:
    """SIGTERM the service's process group, SIGKILL what is left after timeout_s, reap, remove the
    pid file, check that its port is free."""
    info = _read(pid_file)
    if not _group(info):
        pid_file.unlink(missing_ok=True)
        return "not running"
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5)):
        with suppress(ProcessLookupError):  # the whole group may be gone (or only zombies) by now
            os.killpg(info["pid"], sig)
        deadline = time.monotonic() + wait_s
        while (left := _group(info)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left:
            break
    else:
        return f"still running after SIGKILL: pids {[p.pid for p in left]}"
    pid_file.unlink(missing_ok=True)
    port, deadline = info.get("port"), time.monotonic() + 5
    while port and not _port_free(port):
        if time.monotonic() > deadline:
            return f"stopped, but port {port} is still in use by another process (see `lsof -i :{port}`)"
        time.sleep(0.2)
    return "stopped"


def _check_port(stack: Stack, name: str, port: int, option: str) -> None:
    """Fail before anything starts if the port is held by something other than this stack."""
    info = _read(stack.root / f"{name}.pid")
    if _group(info):
        if info.get("port") != port:
            raise RuntimeError(f"{name} of {stack.root} runs on port {info.get('port')}, not {port}; "
                               f"`chimein down --dir {stack.root}` first to move it")
    elif not _port_free(port):
        raise RuntimeError(f"port {port} ({name}) is in use by a process that is not this stack's "
                           f"({stack.root}), e.g. another `chimein up`; stop it (`lsof -i :{port}`) or "
                           f"choose a free port with {option}")


def _start(stack: Stack, name: str, cmd: list[str], port: int | None = None, health: str | None = None,
           timeout_s: float = 120, env: dict[str, str] | None = None) -> str:
    pid_file = stack.root / f"{name}.pid"
    log = stack.root / f"{name}.log"
    state = "running"
    if not _group(_read(pid_file)):
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=stack.env() | (env or {}), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                    start_new_session=True)  # its own group: `down` stops children too
        pid_file.write_text(json.dumps(
            {"pid": proc.pid, "started": psutil.Process(proc.pid).create_time(), "port": port}))
        state = "started"
    deadline = time.monotonic() + timeout_s
    # ready when it answers on its port, and the answer comes from its own group
    while port and not (_healthy(health) and _listens(_group(_read(pid_file)), port)):
        if not _alive(pid_file) or time.monotonic() > deadline:
            _stop(pid_file)
            raise RuntimeError(f"{name} did not start on port {port} (stopped it); see {log}")
        time.sleep(0.5)
    return state


def _prefect(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=stack.env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def _api(stack: Stack, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(stack.prefect_api + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        data = r.read()
    return json.loads(data) if data else None


def _paused(stack: Stack) -> dict[str, tuple[bool, list[dict]]]:
    """Deployment id → (paused, the definitions of its paused schedules)."""
    return {d["id"]: (d["paused"], [s["schedule"] for s in d["schedules"] if not s["active"]])
            for d in _api(stack, "POST", "/deployments/filter", {})}


def _keep_paused(stack: Stack, before: dict[str, tuple[bool, list[dict]]]) -> None:
    """`prefect deploy` sends `paused: false` and re-creates slug-less schedules as active
    (PrefectHQ/prefect#19302): pause again what the user had paused."""
    for d in _api(stack, "POST", "/deployments/filter", {}):
        paused, schedules = before.get(d["id"], (False, []))
        if paused and not d["paused"]:
            _api(stack, "POST", f"/deployments/{d['id']}/pause_deployment")
        for s in d["schedules"]:
            if s["active"] and s["schedule"] in schedules:
                _api(stack, "PATCH", f"/deployments/{d['id']}/schedules/{s['id']}", {"active": False})


def _workers(stack: Stack) -> list[str]:
    """The stack's workers that have a pid file: `worker` (unpinned) and `worker-gpuN`."""
    pinned = sorted(p.stem for p in stack.root.glob("worker-gpu*.pid"))
    return ["worker", *sorted(pinned, key=lambda name: int(name.removeprefix("worker-gpu")))]


def _gpu_limit(stack: Stack, gpu: int) -> None:
    """The global concurrency limit `gpu:N` with one slot: created, or set back to one slot and
    active (idempotent; slots a running training holds are kept)."""
    name = f"gpu:{gpu}"
    try:
        _api(stack, "POST", "/v2/concurrency_limits/", {"name": name, "limit": 1, "active": True})
    except urllib.error.HTTPError as e:
        if e.code != 409:  # 409: it exists
            raise
        _api(stack, "PATCH", f"/v2/concurrency_limits/{urllib.parse.quote(name)}", {"limit": 1, "active": True})


def _pool_limit(stack: Stack) -> None:
    """One flow run per worker at a time: the pool takes as many as there are workers."""
    running = sum(_alive(stack.root / f"{name}.pid") for name in _workers(stack))
    _prefect(stack, "work-pool", "set-concurrency-limit", stack.pool, str(max(running, 1)))


def worker(stack: Stack, gpu: int | None = None) -> str:
    """Start (or find running) a worker on the stack's pool: pinned to GPU `gpu` and its slot
    `gpu:N`, or (None) the unpinned one, which sees every GPU and holds no slot."""
    name, env = "worker", {}
    if gpu is not None:
        _gpu_limit(stack, gpu)
        name, env = f"worker-gpu{gpu}", {"CUDA_VISIBLE_DEVICES": str(gpu), "CHIMEIN_GPU": str(gpu)}
    state = _start(stack, name, [
        sys.executable, "-m", "prefect", "worker", "start", "--pool", stack.pool, "--type", "process",
        "--name", f"chimein-{name}", "--limit", "1"], env=env)
    _pool_limit(stack)
    return state


def up(stack: Stack, workers: int = 0) -> dict[str, str]:
    """Start (or find running) the servers, create the pool, deploy, start a worker; `workers`
    N > 0: one per GPU 0..N-1 instead, each pinned to its GPU and slot."""
    stack.root.mkdir(parents=True, exist_ok=True)
    _check_port(stack, "prefect-server", stack.prefect_port, "--prefect-port")
    _check_port(stack, "mlflow-server", stack.mlflow_port, "--mlflow-port")
    status = {
        "prefect-server": _start(stack, "prefect-server", [
            sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(stack.prefect_port)], stack.prefect_port, f"{stack.prefect_api}/health"),
        "mlflow-server": _start(stack, "mlflow-server", [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(stack.mlflow_port),
            "--backend-store-uri", f"sqlite:///{stack.root / 'mlflow.db'}",
            "--artifacts-destination", str(stack.root / "mlartifacts"), "--workers", "1"],
            stack.mlflow_port, f"{stack.mlflow_uri}/health"),
    }
    template = REPO / "infra" / "work-pools" / "process.json"
    job = json.loads(template.read_text())
    job["variables"]["properties"]["env"]["default"] = {"MLFLOW_TRACKING_URI": stack.mlflow_uri}
    (stack.root / "process-pool.json").write_text(json.dumps(job))
    _prefect(stack, "work-pool", "create", stack.pool, "--type", "process", "--overwrite",
             "--base-job-template", str(stack.root / "process-pool.json"))
    paused = _paused(stack)
    _prefect(stack, "deploy", "--prefect-file", str(REPO / "infra" / "prefect.yaml"), "--all")
    _keep_paused(stack, paused)
    if workers:
        status |= {f"worker-gpu{gpu}": worker(stack, gpu) for gpu in range(workers)}
    else:
        status["worker"] = worker(stack)
    return status


def down(stack: Stack) -> dict[str, str]:
    """Stop the workers and the servers, each a whole process group (SIGTERM, then SIGKILL)."""
    return {name: _stop(stack.root / f"{name}.pid") for name in (*_workers(stack), "mlflow-server", "prefect-server")}
