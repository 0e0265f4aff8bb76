"""Model tasks: train (a retry resumes the same MLflow run), evaluate, publish, promote.

Each MLflow run made in a flow run links to it (`flow_run_tags`), and each training run to its
MLflow page (the `mlflow-run` link artifact, with a tracking server).

Several workers: training holds the concurrency slot of the worker's GPU (`gpu_slot`), and a flow
run trains in its own output directory while another trains the same thing (`claim_output_dir`)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from chimein.evaluate.metrics import HEADLINE_METRICS
from chimein.models import adapters
from chimein.ops import tracking
from chimein.runtime.state import DEFAULT_CHATTINESS
from chimein.train.config import TrainConfig
from chimein.train.launch import train
from chimein.train.rows import TokenizedData
from chimein.train.run import TrainResult
from chimein.train.trainer import progress_log


def flow_run_tags() -> dict[str, str]:
    """MLflow tags that link a run to the Prefect flow run it is made in, and name the flow as the
    run's source: prefect.flow_run_id and _name always, prefect.flow_run_url when a Prefect server
    is configured (a temporary one has no UI to link to). Empty outside a flow run."""
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    if flow_run.id is None:
        return {}
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
            **tracking.source_tags(f"prefect flow {flow_run.flow_name}", "JOB")}
    if ui := get_current_settings().ui_url:
        tags["prefect.flow_run_url"] = f"{ui.rstrip('/')}/flow-runs/flow-run/{flow_run.id}"
    if worker := os.environ.get("PREFECT__WORKER_NAME"):  # set by the worker that started this run
        tags["prefect.worker_name"] = worker
    if (gpu := os.environ.get("CHIMEIN_GPU")) is not None:
        tags |= {"chimein.gpu_slot": f"gpu:{gpu}", "chimein.cuda_visible_devices":
                 os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    return tags


@contextmanager
def gpu_slot():
    """Hold the concurrency slot `gpu:N` of the GPU this worker is pinned to (`chimein worker --gpu
    N` sets CHIMEIN_GPU=N and CUDA_VISIBLE_DEVICES=N, and creates the limit with one slot): one
    training per GPU, whichever worker, pool or deployment starts it. Outside such a worker
    (`make run`, `chimein up` without --workers) there is nothing to hold."""
    from prefect.concurrency.sync import concurrency

    gpu = os.environ.get("CHIMEIN_GPU")
    if gpu is None:
        yield None
        return
    # strict: a missing limit would silently limit nothing; `chimein worker --gpu N` creates it
    with concurrency(f"gpu:{gpu}", occupy=1, strict=True):
        yield f"gpu:{gpu}"


@contextmanager
def claim_output_dir(config: TrainConfig):
    """The config to train with, its output directory held by this flow run while it trains.
    The same preset, data and settings train in OUTPUT_DIR/RUN_NAME/, so a rerun resumes or reuses
    that run; while another flow run trains the very same thing (two identical runs triggered at
    once, on two workers), this one trains apart, in OUTPUT_DIR/flow-runs/FLOW_RUN_ID/RUN_NAME/,
    with its own checkpoints and MLflow run. The claim is an OS file lock on this host: a killed
    run leaves nothing held."""
    from prefect.runtime import flow_run

    settings = config.model_dump_json(exclude={"output_dir": True, "trainer": {"processes"}})
    claims = Path(config.output_dir) / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    with open(claims / f"{hashlib.sha256(settings.encode()).hexdigest()[:16]}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield config.model_copy(update={
                "output_dir": str(Path(config.output_dir) / "flow-runs" / (flow_run.id or str(os.getpid())))})
        else:
            yield config  # closing the file releases the lock


def link_mlflow_run(run_id: str, what: str = "the MLflow run") -> None:
    """A link artifact to the run's page on the tracking server (none for a local store)."""
    if url := tracking.run_url(tracking.client(), run_id):
        create_link_artifact(key="mlflow-run", description=what, link=url)


def retry_training(task, task_run, state) -> bool:
    """Retry a failed training (it resumes from its last checkpoint) unless no retry can mend
    it: a damaged or missing dataset, a known trap, a preset this host cannot run, a bad config."""
    from pydantic import ValidationError

    from chimein.data.dataset import DamagedDataset
    from chimein.models.loading import PadTokenError
    from chimein.presets import HardwareError
    from chimein.train.trainer import TrainingGuardError

    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (DamagedDataset, FileNotFoundError, TrainingGuardError, HardwareError,
                                PadTokenError, ValidationError, ValueError))


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_training)
def train_adapter(config: TrainConfig, parent_run_id: str | None = None,
                  tokenized: str | None = None) -> TrainResult:
    """tokenized: the train split's token rows (tasks.preprocess.tokenize_dataset), else
    tokenized here. Progress goes to the flow run's log."""
    # resume=True: a Prefect retry continues from the last checkpoint in the same MLflow run
    with gpu_slot(), claim_output_dir(config) as claimed:
        result = train(claimed, resume=True, progress=False, parent_run_id=parent_run_id,
                       data=TokenizedData.load(tokenized) if tokenized else None, tags=flow_run_tags(),
                       callbacks=[progress_log(get_run_logger())])
    if claimed is not config:  # trained apart: its own name too, so it publishes as its own adapter
        result = dataclasses.replace(result, run_name=f"{result.run_name}--{claimed.output_dir[-8:]}")
        tracking.client().update_run(result.run_id, name=result.run_name)
    create_markdown_artifact(key="training", description="training summary", markdown=(
        f"### {result.run_name}\n\n| | |\n|---|---|\n| MLflow run | `{result.run_id}` |\n"
        f"| steps | {result.steps} |\n| train loss | {result.final_loss:.4f} |\n"
        f"| labelled tokens | {result.labelled_tokens} |\n| registered | {result.registered} |\n"
        f"| chattiness | {(result.chattiness or {}).get('threshold', DEFAULT_CHATTINESS):.3f} "
        f"({(result.chattiness or {}).get('source', 'default')}) |\n"
        f"| tracking store | `{result.tracking_uri}` |\n"))
    link_mlflow_run(result.run_id)
    return result


@task(task_run_name="evaluate-{on}")
def evaluate_adapter(result: TrainResult, on: str = "benchmark", dataset: str | None = None,
                     chattiness: float | None = None, limit: int | None = None, tools: bool = True,
                     hedge: bool = True) -> dict:
    """Decision metrics of the adapter (decisions only, no generation), logged on its training
    run with what makes them comparable (promotion.EvalStamp):

    on="benchmark": the shipped hand-written benchmark, as bench.* (decides promotion);
    on="heldout": the dataset version's held-out test split, as heldout.* (a quick check).
    chattiness None: the adapter's calibrated threshold. limit: the first N conversations only.
    tools, hedge: what shapes the forced replies at factual turns (stamped, see EvalStamp.honesty)."""
    from chimein.evaluate.benchmark import load_eval_set
    from chimein.evaluate.run import record, score
    from chimein.runtime.assistant import GroupChatAssistant

    evalset = load_eval_set("benchmark" if on == "benchmark" else dataset)
    fingerprint, total = evalset.fingerprint, evalset.total_decisions
    bot = GroupChatAssistant.from_adapter(str(result.adapter_dir), chattiness=chattiness, tools=tools, hedge=hedge)
    scored = score(bot, evalset, limit, replies=False)  # the same path as `chimein eval`
    record(tracking.client(), result.run_id, scored)
    metrics, stamp = scored.metrics, scored.stamp
    keys = ["decisions", *HEADLINE_METRICS]
    create_table_artifact(
        key=f"evaluation-{on}", description=f"{scored.prefix}.*: {fingerprint}, {stamp.decisions} of {total} "
        f"decisions, chattiness {bot.chattiness:.3f} ({bot.threshold.source})",
        table=[{k.replace("_", " "): f"{metrics[k]:.3f}" if isinstance(metrics[k], float) else metrics[k]
               for k in keys}])
    return metrics | {"fingerprint": fingerprint, "complete": stamp.complete, "total_decisions": total,
                      "chattiness": bot.chattiness, "chattiness_source": bot.threshold.source}


@task
def index_knowledge(folder: str) -> str:
    """The group's documents indexed (or the saved index loaded, when up to date), what was indexed
    and skipped in the log and as a table artifact; the folder's absolute path, for chimein.json."""
    from chimein.knowledge.index import KnowledgeIndex

    index, report = KnowledgeIndex.open(folder)  # KnowledgeError (a ValueError) names the problem
    get_run_logger().info(f"the group's documents {folder}: {index.describe()}"
                          + (f"; skipped {len(report.skipped)}: " + "; ".join(f"{f} ({why})" for f, why in report.skipped)
                             if report.skipped else ""))
    create_table_artifact(key="knowledge", description=f"the group's documents: {folder}",
                          table=[{"passages": len(index.passages), "files": len({p.source for p in index.passages}),
                                  "skipped": len(report.skipped)}])
    return str(Path(folder).resolve())


@task
def evaluate_grounded(result: TrainResult, chattiness: float | None = None, tools: bool = True,
                      hedge: bool = True) -> dict:
    """The adapter on the grounded benchmark (chimein.evaluate.grounded): chats about invented
    organisations with their documents as its knowledge; grounded.* on its training run, with the
    benchmark's fingerprint as the grounded.fingerprint tag. It does not decide promotion."""
    from chimein.evaluate.grounded import load_grounded, record_grounded, score_grounded
    from chimein.runtime.assistant import GroupChatAssistant

    bench = load_grounded()
    bot = GroupChatAssistant.from_adapter(str(result.adapter_dir), chattiness=chattiness, tools=tools, hedge=hedge)
    scored = score_grounded(bot, bench)
    metrics = scored["metrics"]
    record_grounded(tracking.client(), result.run_id, scored)
    create_table_artifact(
        key="evaluation-grounded", description=f"grounded.*: {bench.fingerprint}, with each organisation's "
        "documents as knowledge", table=[{k.replace("_", " "): f"{v:.3f}" if isinstance(v, float) else v
                                          for k, v in metrics.items()}])
    return metrics | {"fingerprint": bench.fingerprint}


@task(retries=2, retry_delay_seconds=30)
def publish_adapter(result: TrainResult, target: str = "local") -> str:
    return adapters.publish_adapter(result.adapter_dir, result.run_name, target)


@task
def promote_if_better(result: TrainResult, metric: str, alias: str = "champion") -> dict:
    """Move `alias` to the new registered version only if it beats the holder on the same
    benchmark, both scored in full (chimein.evaluate.promotion); the verdict says why either way."""
    from chimein.evaluate.promotion import Verdict, promote

    if not result.registered:
        verdict = Verdict(False, "the adapter is not registered in MLflow (see the run's "
                                 "chimein.registered tag)")
    else:
        verdict = promote(tracking.client(), result.registered, metric, alias)
    return {"moved": verdict.move, "reason": verdict.reason}
