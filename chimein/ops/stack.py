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
    """A stack's directory, ports and pool. `mlflow_store`: the SQLite file its MLflow server serves
    (None: root/mlflow.db); `chimein up` passes ./mlflow.db, the store `make run` and `chimein train`
    write without MLFLOW_TRACKING_URI, so the UI on :5000 shows their runs and champion. A worker that
    joins servers elsewhere (another host's) names them: `prefect_url` (a Prefect API URL) and
    `mlflow_url` replace the loopback ports."""

    root: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = "gpu"
    mlflow_store: Path | None = None
    prefect_url: str | None = None
    mlflow_url: str | None = None

    @property
    def prefect_api(self) -> str:
        return (self.prefect_url or f"http://127.0.0.1:{self.prefect_port}/api").rstrip("/")

    @property
    def local(self) -> bool:
        """Whether its Prefect server is this host's stack (not a shared one elsewhere)."""
        return self.prefect_api == f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return self.prefect_api.removesuffix("/api")

    @property
    def mlflow_uri(self) -> str:
        return (self.mlflow_url or f"http://127.0.0.1:{self.mlflow_port}").rstrip("/")

    @property
    def store(self) -> Path:
        """The MLflow server's SQLite file; its artifacts go beside it, in mlruns/ (as `make run`'s)."""
        return (self.mlflow_store or self.root / "mlflow.db").resolve()

    def env(self) -> dict[str, str]:
        """What every stack process, and the flow runs the worker starts, should see."""
        return {**os.environ, "PREFECT_HOME": str(self.root / "prefect"),
                "PREFECT_API_URL": self.prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # the UI calls the API on the stack's port (its default is :4200 whatever the port);
                # the v1 UI, as the v2 one fetches Amplitude's config even with analytics off
                "PREFECT_SERVER_UI_API_URL": self.prefect_api, "PREFECT_SERVER_UI_V2_ENABLED": "false",
                "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
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


def _prefect(stack: Stack, *args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run the prefect CLI against the stack; `env`: changes to its environment (None removes)."""
    environ = {k: v for k, v in (stack.env() | (env or {})).items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=environ,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


# The Prefect server answers 503 for errors a client may retry (its SQLite database busy, as when a
# worker and `prefect deploy` write at once); its own client retries 429, 502 and 503, so do we.
API_RETRY_CODES = (429, 502, 503)
API_TRIES = 6
API_RETRY_WAIT_S = 0.5  # doubled each try, or the server's Retry-After when it sends one


def _api(stack: Stack, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(stack.prefect_api + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    for attempt in range(API_TRIES):
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                data = r.read()
            return json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            if e.code not in API_RETRY_CODES or attempt == API_TRIES - 1:
                raise
            after = e.headers.get("Retry-After", "")
            e.close()
            time.sleep(float(after) if after.replace(".", "", 1).isdigit() else API_RETRY_WAIT_S * 2 ** attempt)


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


POOL_DESCRIPTION = (
    "chimein's flow runs (infra/prefect.yaml). Each worker runs them on its own host: on a GPU when "
    "it has one (`chimein worker --gpu N` pins one), else on the CPU, where only the small offline "
    "model trains in reasonable time.")


def _deploy_for_cpu(stack: Stack) -> str:
    """On a stack without a GPU, the nightly deployment's default run (its schedule, Quick run)
    trains the offline preset on the CPU with conf/train/offline-cpu.yaml instead of a 7B model
    that would stop at once every night."""
    from chimein.paths import CPU_TRAIN_CONFIG
    from chimein.presets import DEFAULT_PRESET

    d = _api(stack, "GET", "/deployments/name/retrain/nightly-retrain")
    params = d["parameters"]
    params["params"] = params.get("params", {}) | {"preset": DEFAULT_PRESET, "train_config": CPU_TRAIN_CONFIG}
    _api(stack, "PATCH", f"/deployments/{d['id']}", {
        "parameters": params, "description": f"{d['description']} This host has no CUDA device, so "
        f"`chimein up` set its model to {DEFAULT_PRESET} (the offline preset, about 10 minutes on a CPU)."})
    return f"deployed with {DEFAULT_PRESET} on the CPU (no CUDA device here; the 7B presets need a GPU worker)"


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
    `gpu:N`, or (None) the unpinned one, which sees every GPU and holds no slot. The servers it
    joins are the stack's, or those `prefect_url` / `mlflow_url` name (a worker on another host):
    the server must answer and have the pool, else nothing starts."""
    _check_server(stack)
    name, env = "worker", {}
    if gpu is not None:
        _gpu_limit(stack, gpu)
        name, env = f"worker-gpu{gpu}", {"CUDA_VISIBLE_DEVICES": str(gpu), "CHIMEIN_GPU": str(gpu)}
    stack.root.mkdir(parents=True, exist_ok=True)
    state = _start(stack, name, [
        sys.executable, "-m", "prefect", "worker", "start", "--pool", stack.pool, "--type", "process",
        "--name", f"chimein-{name}-{socket.gethostname()}", "--limit", "1"], env=env)
    if stack.local:  # a pool shared with other hosts keeps the limit its owner set
        _pool_limit(stack)
    return state


def _check_server(stack: Stack) -> None:
    """The Prefect server answers at stack.prefect_api and has the pool; else a RuntimeError that
    names the URL and the fix."""
    try:
        _api(stack, "GET", f"/work_pools/{urllib.parse.quote(stack.pool)}")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise RuntimeError(f"the Prefect server at {stack.prefect_api} answered {e.code} {e.reason}") from None
        raise RuntimeError(
            f"the Prefect server at {stack.prefect_api} has no work pool {stack.pool!r}: create it and "
            "the deployments there first (`chimein up` on that host, or `prefect deploy --prefect-file "
            "infra/prefect.yaml --all` as infra/README.md says)") from None
    except OSError as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(
            f"no Prefect server answers at {stack.prefect_api} ({reason}): start the stack (`chimein "
            "up`), or point PREFECT_API_URL (or --prefect-api-url) at the shared server") from None


def up(stack: Stack, workers: int = 0, cuda: bool | None = None) -> dict[str, str]:
    """Start (or find running) the servers, create the pool, deploy, start a worker; `workers`
    N > 0: one per GPU 0..N-1 instead, each pinned to its GPU and slot. `cuda`: whether this host's
    workers have a GPU (None: ask torch); without one the nightly deployment runs the offline preset."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    stack.root.mkdir(parents=True, exist_ok=True)
    _check_port(stack, "prefect-server", stack.prefect_port, "--prefect-port")
    _check_port(stack, "mlflow-server", stack.mlflow_port, "--mlflow-port")
    status = {
        "prefect-server": _start(stack, "prefect-server", [
            sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(stack.prefect_port)], stack.prefect_port, f"{stack.prefect_api}/health"),
        # artifacts beside the store, as a local client (`make run`) lays them out, so runs logged
        # through the server and runs logged to the file directly read alike; proxied artifacts of
        # experiments made by an older stack (mlflow-artifacts:/) are still served from mlartifacts/
        "mlflow-server": _start(stack, "mlflow-server", [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(stack.mlflow_port),
            "--backend-store-uri", f"sqlite:///{stack.store}",
            "--default-artifact-root", str(stack.store.parent / "mlruns"),
            "--artifacts-destination", str(stack.store.parent / "mlartifacts"), "--workers", "1"],
            stack.mlflow_port, f"{stack.mlflow_uri}/health"),
    }
    # the pool's jobs set no environment of their own: a flow run gets its worker's (the servers it
    # joined, its GPU), so one pool serves workers on hosts that reach the servers by other names
    _prefect(stack, "work-pool", "create", stack.pool, "--type", "process", "--overwrite",
             "--base-job-template", str(REPO / "infra" / "work-pools" / "process.json"))
    _api(stack, "PATCH", f"/work_pools/{stack.pool}", {"description": POOL_DESCRIPTION})
    paused = _paused(stack)
    # without CHIMEIN_REPO: `prefect deploy` would write the deploying shell's value into the
    # deployments' pull step; left out, each worker resolves it from its own environment
    _prefect(stack, "deploy", "--prefect-file", str(REPO / "infra" / "prefect.yaml"), "--all",
             env={"CHIMEIN_REPO": None})
    _keep_paused(stack, paused)
    if not cuda:
        status["nightly-retrain"] = _deploy_for_cpu(stack)
    if workers:
        status |= {f"worker-gpu{gpu}": worker(stack, gpu) for gpu in range(workers)}
    else:
        status["worker"] = worker(stack)
    return status


def down(stack: Stack) -> dict[str, str]:
    """Stop the workers and the servers, each a whole process group (SIGTERM, then SIGKILL)."""
    return {name: _stop(stack.root / f"{name}.pid") for name in (*_workers(stack), "mlflow-server", "prefect-server")}
