"""`chimein up|worker|down`: the local stack (Prefect server, MLflow server, the GPU work pool and
its workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chimein.cli.common import app, console, err, fail


def _stack(directory: Path, prefect_port: int, mlflow_port: int):
    from chimein.ops.stack import Stack

    return Stack(directory.resolve(), prefect_port, mlflow_port)


@app.command()
def up(
    directory: Annotated[Path, typer.Option("--dir", help="Databases, artifacts, logs and pids.")] = Path(".stack"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    workers: Annotated[int, typer.Option(
        min=0, help="One worker per GPU 0..N-1, each pinned to its GPU and its `gpu:N` slot; 0: one "
        "worker that sees every GPU.")] = 0,
) -> None:
    """Start the local stack: Prefect and MLflow servers, the GPU work pool, deployments, a worker."""
    from chimein.ops.stack import up as start

    stack = _stack(directory, prefect_port, mlflow_port)
    with err.status("starting the local stack"):
        try:
            status = start(stack, workers)
        except RuntimeError as e:
            fail(str(e))
    for name, state in status.items():
        console.print(f"{name}: {state}")
    console.print(f"Prefect UI  http://127.0.0.1:{prefect_port}\nMLflow UI   {stack.mlflow_uri}\n"
                  f"export PREFECT_API_URL={stack.prefect_api} MLFLOW_TRACKING_URI={stack.mlflow_uri}",
                  soft_wrap=True)


@app.command()
def worker(
    gpu: Annotated[int, typer.Option(min=0, help="The GPU it runs on (CUDA_VISIBLE_DEVICES) and whose "
                                     "`gpu:N` slot its trainings hold.")],
    directory: Annotated[Path, typer.Option("--dir", help="The stack's directory.")] = Path(".stack"),
    prefect_port: Annotated[int, typer.Option(help="The stack's Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="The stack's MLflow server port.")] = 5000,
) -> None:
    """Add a worker for one GPU to the running local stack (`chimein up`); `chimein down` stops it."""
    from chimein.ops.stack import worker as start_worker

    stack = _stack(directory, prefect_port, mlflow_port)
    try:
        state = start_worker(stack, gpu)
    except (RuntimeError, OSError) as e:
        fail(f"{e} (is the stack up? `chimein up --dir {directory}`)")
    console.print(f"worker-gpu{gpu}: {state}")


@app.command()
def down(
    directory: Annotated[Path, typer.Option("--dir", help="The stack's directory.")] = Path(".stack"),
) -> None:
    """Stop the local stack (the data stays in its directory); exit status 1 if something is left."""
    from chimein.ops.stack import down as stop

    status = stop(_stack(directory, 0, 0))
    for name, state in status.items():
        console.print(f"{name}: {state}")
    if set(status.values()) - {"stopped", "not running"}:
        raise typer.Exit(1)
