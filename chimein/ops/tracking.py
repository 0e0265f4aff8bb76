"""MLflow, in one place: the store, experiments, runs (their source, description, dataset input and
per-step metrics), the loss plot, model registration, evaluations and `models:/`/`runs:/` lookup.

    from chimein.ops import tracking
    client = tracking.client()                       # MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment_id = tracking.experiment_id(client, "chimein")
    print(tracking.ui_hint(run_id))                  # where to look at a run

Names, the same on every run:

    loss                per optimizer step; train_loss: the run's mean, logged once at the end
    data.*              the training rows (labelled_tokens, rows, truncated, too_long)
    bench.*, heldout.*  an evaluation on the shipped benchmark / a dataset version's test split
    file.*              an evaluation on a JSON Lines file (`chimein eval --data FILE`)

How an evaluation is recorded on a run is chimein.evaluate.records. No Prefect here (the core library never imports it): the link to
a flow run arrives as tags (tasks.model.flow_run_tags).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chimein.presets import ModelPreset

DEFAULT_EXPERIMENT = "chimein"
# MLflow 3's UI opens an experiment by its kind: this one is "Machine learning" (runs, metrics,
# models), not the GenAI view (traces, "Detect issues") it infers for an experiment without runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE = "mlflow.note.content"  # the description shown on run, experiment and model pages
STEP_METRICS = ("loss", "grad_norm", "learning_rate", "epoch", "train_loss", "train_runtime")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the working directory (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def client():
    """An MlflowClient on `tracking_uri()`; MLflow's fluent API (start_run, log_model) uses the same."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # it would call home
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(name: str, kind: str = "LOCAL") -> dict[str, str]:
    """What the UI shows as a run's Source (MLflow would show the script that runs Python, e.g.
    prefect/engine.py): the command, or the Prefect flow (kind JOB)."""
    return {"mlflow.source.name": name, "mlflow.source.type": kind}


# --- experiments and runs -------------------------------------------------------------------------


def experiment_id(client, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, created on first use; either way of the machine-learning kind."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={
                EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1],
                NOTE: "chimein: QLoRA training runs of the group-chat assistant, their evaluations "
                      "(bench.*, heldout.*) and preset comparisons (parent runs named compare--…)."})
        except MlflowException:  # another worker created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND[0] not in experiment.tags:  # made before chimein set it; a kind chosen in the UI stays
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


# MLflow 3.17 and 3.18 open every experiment in the GenAI view (traces, "Detect issues") unless the
# page's URL asks for the other one: the UI keeps a global GenAI / Model training switch in the
# browser's local storage, starting on GenAI, and no server option or experiment tag changes that
# start (the `mlflow.experimentKind` tag only names the kind). Every link chimein prints or stores
# therefore carries the query parameter that opens the runs view.
RUNS_VIEW = "workflowType=machine_learning"
UI_START_S = 40  # `mlflow ui` / `mlflow server` on 2 cores: up to this many seconds before it answers


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A page of the MLflow UI at `base` that opens in the runs view: the experiment's runs table,
    or (run_id) the run's page."""
    page = f"experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/#/{page}?{RUNS_VIEW}"


def run_url(client, run_id: str) -> str | None:
    """The run's page on the tracking server; None for a local store (no server to link to)."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return ui_url(uri, client.get_run(run_id).info.experiment_id, run_id)


def ui_hint(run_id: str) -> str:
    """One line saying where to look at a run: its page on the tracking server, or the command that
    serves this local store and the page to open once it is up."""
    c = client()
    if url := run_url(c, run_id):
        return f"MLflow run: {url}"
    page = ui_url("http://127.0.0.1:5000", c.get_run(run_id).info.experiment_id, run_id)
    return (f"open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri()}  (it can take up to "
            f"{UI_START_S} s to answer), then {page}")


def log_dataset(client, run_id: str, version: str, source: str, counts: dict[str, int],
                context: str = "training") -> None:
    """The dataset version as the run's input (the UI's Datasets column): named after where it
    lives, its digest the version, its profile the conversations per split. `source` is a local
    directory or hub:ORG/NAME."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if source.startswith("hub:"):
        name = source[4:].partition("@")[0]
        origin = HuggingFaceDatasetSource(path=name, revision=version)
    else:
        name, origin = "chimein-conversations", LocalArtifactDatasetSource(str(Path(source).resolve()))
    dataset = Dataset(name=name, digest=version, source_type=origin._get_source_type(),
                      source=origin.to_json(), profile=json.dumps(counts))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def mlflow_logger(client, run_id: str):
    from transformers import TrainerCallback

    class MlflowLogger(TrainerCallback):
        """Per-step metrics to one run, by id (MLflow's active run is per thread). A resumed run
        logs only the steps the run has no point for yet: the steps an interrupted attempt made
        after its last checkpoint are made again, and keep their first point (one per step)."""

        def __init__(self):
            self.last = None  # (time, tokens seen)
            self.logged: dict[str, set[int]] = {}  # on resume: the steps each metric has already

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step:  # resumed from a checkpoint
                self.logged = {k: {m.step for m in client.get_metric_history(run_id, k)}
                               for k in (*STEP_METRICS, "tokens_per_s")}

        def on_log(self, args, state, control, logs=None, **kwargs):
            from mlflow.entities import Metric

            now = time.time()
            metrics = {k: float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and k in STEP_METRICS}
            seen = state.num_input_tokens_seen
            if self.last and seen > self.last[1] and now > self.last[0]:
                metrics["tokens_per_s"] = (seen - self.last[1]) / (now - self.last[0])
            self.last = (now, seen)
            stamp = int(now * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, state.global_step)
                                              for k, v in metrics.items() if math.isfinite(v)
                                              and state.global_step not in self.logged.get(k, ())])

    return MlflowLogger()


def loss_plot(client, runs: dict[str, str], path: Path, title: str = "loss") -> Path:
    """Per-step `loss` of one or more runs ({label: run_id}) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4) if len(runs) > 1 else (6, 3.5))
    for label, run_id in runs.items():
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
        ax.plot([m.step for m in history], [m.value for m in history], marker=".", label=label)
    ax.set(xlabel="optimizer step", ylabel="train loss (assistant tokens)", title=title)
    if len(runs) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- models ---------------------------------------------------------------------------------------


def register_adapter(model, tokenizer, preset: ModelPreset, run_id: str, tags: dict[str, str],
                     description: str) -> str | None:
    """Log the adapter as an MLflow transformers/PEFT model that references its base, and register
    it as `chimein-PRESET`, the version with `tags` and `description`. Returns "NAME/VERSION", or
    None (with a tag saying why) if this MLflow cannot log it; the adapter is in the run's
    artifacts either way. Needs the run active (mlflow.start_run)."""
    import logging

    import mlflow
    import peft
    import torch
    import transformers

    from chimein.models.loading import model_source

    base = model_source(preset, need_weights=True)
    name = f"chimein-{preset.name}"
    try:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
            task="text-generation",
            # a local base must be named, else MLflow saves the base with LoRA layers injected
            base_model_path=base if Path(base).is_dir() else None,
            # pinned here: MLflow's inferred requirements add torchvision, which is not installed
            pip_requirements=[f"transformers=={transformers.__version__}", f"peft=={peft.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=name)
    except Exception as e:  # noqa: BLE001 — MLflow's flavor support trails transformers releases
        logging.getLogger(__name__).warning("MLflow could not log the PEFT model (%s); the adapter "
                                            "is in the run's artifacts under adapter/", e)
        mlflow.MlflowClient().set_tag(run_id, "chimein.registered", f"no: {type(e).__name__}: {e}"[:500])
        return None
    version = str(info.registered_model_version)
    c = mlflow.MlflowClient()
    if not c.get_registered_model(name).description:
        c.update_registered_model(name, description=f"LoRA adapters of {preset.name} "
                                  f"({preset.hub_id or preset.asset}) that decide when to chime in "
                                  "to a group chat. @champion: the best on the shipped benchmark.")
    c.update_model_version(name, version, description=description)
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    return f"{name}/{version}"


def download_adapter(uri: str) -> str:
    """The adapter directory logged with a registered model (`adapter/` of its run), for
    models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/…"""
    store = tracking_uri()
    db = Path(store.removeprefix("sqlite:///"))
    if store.startswith("sqlite:///") and not db.is_file():  # MLflow would create an empty one
        why = (f"MLFLOW_TRACKING_URI names {db}, which does not exist"
               if os.environ.get("MLFLOW_TRACKING_URI") else
               f"MLFLOW_TRACKING_URI is not set and there is no {db} (the default store of `chimein train`)")
        raise FileNotFoundError(
            f"{uri} is looked up in MLflow, but {why}. Set MLFLOW_TRACKING_URI to your tracking "
            "server, e.g. `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000` (the one `chimein up` "
            "starts), or run from the directory that holds mlflow.db")
    import mlflow

    c = client()
    try:
        if uri.startswith("models:/"):
            name, _, ref = uri[len("models:/"):].partition("@")
            if ref:
                version = c.get_model_version_by_alias(name, ref)
            else:
                name, _, number = uri[len("models:/"):].partition("/")
                version = c.get_model_version(name, number)
            run_id = version.run_id
        else:
            run_id = uri[len("runs:/"):].split("/")[0]
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter")
    except mlflow.exceptions.MlflowException as e:
        raise FileNotFoundError(f"{uri}: {e.message} (MLflow store {store})") from None


def as_param(key, value):
    """An MLflow Param; None is '-'."""
    from mlflow.entities import Param

    return Param(key, "-" if value is None else str(value))
