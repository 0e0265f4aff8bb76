"""`chimein up|worker|down`: the local stack (Prefect server, MLflow server, the GPU work pool and
its workers), and workers that join a shared server from other hosts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from chimein.cli.common import app, console, err, fail


@app.command()
def up(
    directory: Annotated[Path, typer.Option("--dir", help="Databases, logs and pids of the stack.")] = Path(".stack"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    mlflow_store: Annotated[Path, typer.Option(
        help="The SQLite file the MLflow server serves (artifacts in mlruns/ beside it). Default: "
        "./mlflow.db, where `make run` and `chimein train` log without MLFLOW_TRACKING_URI, so the "
        "UI shows their runs and champion too.")] = Path("mlflow.db"),
    workers: Annotated[int, typer.Option(
        min=0, help="One worker per GPU 0..N-1, each pinned to its GPU and its `gpu:N` slot; 0: one "
        "worker that sees every GPU.")] = 0,
) -> None:
    """Start the local stack: Prefect and MLflow servers, the GPU work pool, deployments, a worker."""
    from chimein.ops import tracking
    from chimein.ops.stack import Stack
    from chimein.ops.stack import up as start

    stack = Stack(directory.resolve(), prefect_port, mlflow_port, mlflow_store=mlflow_store)
    started = time.monotonic()
    with err.status(f"starting the local stack (the MLflow server can take up to {tracking.UI_START_S} s)"):
        try:
            status = start(stack, workers)
        except RuntimeError as e:
            fail(str(e))
    for name, state in status.items():
        console.print(f"{name}: {state}", soft_wrap=True)
    import mlflow

    experiment = tracking.experiment_id(mlflow.MlflowClient(stack.mlflow_uri))
    console.print(f"ready after {time.monotonic() - started:.0f} s\n"
                  f"Prefect UI  {stack.prefect_ui}\n"
                  f"MLflow UI   {tracking.ui_url(stack.mlflow_uri, experiment)}\n"
                  f"MLflow store sqlite:///{stack.store} (mlruns/ beside it)\n"
                  f"export PREFECT_API_URL={stack.prefect_api} MLFLOW_TRACKING_URI={stack.mlflow_uri}",
                  soft_wrap=True)


@app.command()
def worker(
    gpu: Annotated[Optional[int], typer.Option(
        min=0, help="The GPU it runs on (CUDA_VISIBLE_DEVICES) and whose `gpu:N` slot its trainings "
        "hold. Left out: a worker that sees every GPU of the host and holds no slot.")] = None,
    prefect_api_url: Annotated[Optional[str], typer.Option(
        envvar="PREFECT_API_URL", show_envvar=True,
        help="The Prefect server to join, e.g. http://tracking.example.com:4200/api. Default: this "
        "host's stack (--prefect-port).")] = None,
    mlflow_tracking_uri: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_TRACKING_URI", show_envvar=True,
        help="The MLflow server its flow runs log to. Default: this host's stack (--mlflow-port).")] = None,
    directory: Annotated[Path, typer.Option("--dir", help="Where its log and pid file go.")] = Path(".stack"),
    prefect_port: Annotated[int, typer.Option(help="This host's stack's Prefect port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="This host's stack's MLflow port.")] = 5000,
) -> None:
    """Start a worker on the `gpu` pool: of this host's stack (`chimein up`), or of a shared server
    on another host (PREFECT_API_URL / MLFLOW_TRACKING_URI). `chimein down` stops it."""
    from chimein.ops.stack import Stack
    from chimein.ops.stack import worker as start_worker

    stack = Stack(directory.resolve(), prefect_port, mlflow_port, prefect_url=prefect_api_url,
                  mlflow_url=mlflow_tracking_uri)
    if not stack.local and not mlflow_tracking_uri:
        fail(f"the worker joins the Prefect server {stack.prefect_api}, but MLFLOW_TRACKING_URI is not set: "
             "set it (or --mlflow-tracking-uri) to the MLflow server of the same tracking host, e.g. "
             "http://tracking.example.com:5000, so its flow runs log there")
    try:
        state = start_worker(stack, gpu)
    except (RuntimeError, OSError) as e:
        fail(str(e))
    name = "worker" if gpu is None else f"worker-gpu{gpu}"
    console.print(f"{name}: {state}; joined the Prefect server {stack.prefect_api} (pool {stack.pool}), "
                  f"its flow runs log to MLflow at {stack.mlflow_uri}; log {stack.root / name}.log", soft_wrap=True)


@app.command()
def down(
    directory: Annotated[Path, typer.Option("--dir", help="The stack's directory.")] = Path(".stack"),
) -> None:
    """Stop the local stack and its workers (the data stays); exit status 1 if something is left."""
    from chimein.ops.stack import Stack
    from chimein.ops.stack import down as stop

    status = stop(Stack(directory.resolve()))
    for name, state in status.items():
        console.print(f"{name}: {state}")
    if set(status.values()) - {"stopped", "not running"}:
        raise typer.Exit(1)
