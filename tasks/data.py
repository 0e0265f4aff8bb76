"""Data tasks: generation (cached on its inputs and code, retried on I/O) and the dataset.

A cache hit names a file or a dataset version, so it is only as good as that artifact: the cache
lives in the store beside the datasets (`make clean` deletes both), and a record whose artifact
was deleted is passed over, so the task runs again (generation then resumes its ledger: only
conversations that are gone are paid for again).

Two flow runs that want the same data at once (two workers, two runs triggered together) take
turns: each cached task holds a lock on its cache key while it runs (Prefect's SERIALIZABLE cache
isolation), so one run makes the file or dataset version and the other waits, then reuses it; no
two runs write the same file, and no request is paid for twice. A lock whose run was killed is
taken over by the next run (tasks/locks.py)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError

from chimein.data.dataset import DamagedDataset, build_dataset, check_version, publish_dataset
from chimein.data.generation import ClientError, GenerationAborted, GenerationConfig, generate
from chimein.data.providers import MissingAPIKey
from chimein.paths import store_dir
from tasks.locks import StoreLocks

# not ~/.prefect/storage, which outlives the files its records name (a Path: Prefect makes it a
# LocalFileSystem, resolved against the working directory at run time, like the store itself)
CACHE = store_dir() / "prefect-cache"


# the cached tasks' isolation: one computation per cache key at a time, the others wait and reuse it
ONE_AT_A_TIME = {"isolation_level": "SERIALIZABLE", "lock_manager": StoreLocks(CACHE / "locks")}


@dataclass(kw_only=True)
class WhileArtifactExists(CachePolicy):
    """`policy`'s key, but a hit must name an artifact that `exists`: a record whose artifact was
    deleted is passed over for a key derived from it, and the task runs again (a policy chooses
    only the key; it cannot make Prefect overwrite a record). Wrap the whole policy: one added to
    this would change the key after the check."""

    policy: CachePolicy
    exists: Callable[[Any], bool]

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        records = task_ctx.result_store
        while key and records.exists(key) and not self.exists(records.read(key).result):
            key = hashlib.sha256(f"{key}:artifact deleted".encode()).hexdigest()
        return key


@dataclass(kw_only=True)
class FileContent(CachePolicy):
    """The content of the file that input `name` names: new data under the same path (e.g.
    conversations generated again after a delete) is a new key, not the old dataset version."""

    name: str

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        with open(inputs[self.name], "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(kw_only=True)
class GenerationFingerprint(CachePolicy):
    """The generation config's fingerprint: with the offline source it covers the corpus and the
    code that augments it and writes the grounded chats, which the config's fields do not."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return inputs["config"].fingerprint()


def dataset_exists(location: str) -> bool:
    """A local version counts when its files are those it was built with (a missing, truncated or
    changed file: the task runs again and rebuilds it). A Hub version outlives `make clean`, and
    checking it would cost a request: trusted."""
    if location.startswith("hub:"):
        return True
    try:
        check_version(store_dir() / "datasets" / location.removeprefix("local:"))
    except DamagedDataset as e:
        _warn(f"{e}: made again")
        return False
    return True


def _warn(message: str) -> None:
    """To the flow run's log when there is one (a cache policy runs inside the task run)."""
    try:
        get_run_logger().warning(message)
    except MissingContextError:
        logging.getLogger("chimein.cache").warning(message)


def retry_io(task, task_run, state) -> bool:
    """Retry a failed I/O step unless the failure is the caller's: a bad key, a refused request,
    a 4xx. (429/5xx are already retried inside generation, per request.)"""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (MissingAPIKey, GenerationAborted, ClientError, PermissionError,
                                FileNotFoundError, ValueError, DamagedDataset))


# Cached on the config and this code (and the offline corpus and generator): rerunning with the
# same parameters makes no API call.
@task(cache_policy=WhileArtifactExists(policy=INPUTS + TASK_SOURCE + GenerationFingerprint(),
                                       exists=lambda out: Path(out).is_file())
      .configure(**ONE_AT_A_TIME), result_storage=CACHE, persist_result=True, retries=2, retry_delay_seconds=[30, 120],
      retry_condition_fn=retry_io)
def generate_conversations(config: GenerationConfig, out_dir: str, fresh: bool = False) -> str:
    """fresh: start over (pays for every request again) instead of resuming the file."""
    out = Path(out_dir) / f"conversations-{config.fingerprint()}-{config.count}.jsonl"
    if fresh:
        for p in (out, out.with_name(out.name + ".ledger")):
            p.unlink(missing_ok=True)
    stats = generate(config, out, resume=True)  # a retry resumes: no finished request is repeated
    if stats.total_accepted < config.count:
        raise RuntimeError(f"only {stats.total_accepted} of {config.count} conversations; a retry "
                           "continues where this stopped")
    create_table_artifact(key="generation", description=f"generation into {out}", table=[
        {"source": stats.source, "model": stats.model, "accepted": stats.total_accepted,
         "requests": stats.requests, "retries": stats.retries, "duplicates": stats.duplicates,
         "rejected": sum(stats.rejected.values()), "tokens_in": stats.tokens_in,
         "tokens_out": stats.tokens_out, "wall_s": stats.wall_s}])
    return str(out)


# Cached on the conversations' content (not only their path), the split settings and this code.
@task(cache_policy=WhileArtifactExists(policy=INPUTS + TASK_SOURCE + FileContent(name="data"),
                                      exists=dataset_exists).configure(**ONE_AT_A_TIME),
      result_storage=CACHE, persist_result=True, retries=2, retry_delay_seconds=60,
      retry_condition_fn=retry_io)
def build_and_publish_dataset(data: str, publish: str = "local", test_fraction: float = 0.1,
                              seed: int = 0) -> str:
    """The dataset version's location (local:ds-… or hub:ORG/NAME@ds-…)."""
    ds, info = build_dataset(data, test_fraction=test_fraction, seed=seed)
    info = publish_dataset(ds, info, publish)
    create_table_artifact(key="dataset", description=f"dataset {info.version}", table=[
        {"version": info.version, "train": info.train, "validation": info.validation, "test": info.test,
         "user_messages": info.user_turns, "speak": info.speak,
         "silence_ratio": round(info.silence_ratio, 3), "source": info.source,
         "location": info.location}])
    return info.location


def check_feedback(feedback: str) -> None:
    """The feedback setting names a folder of recordings (or nothing): said before any work."""
    if feedback and not Path(feedback).is_dir():
        raise ValueError(f"feedback: no recordings folder {feedback} on this worker. Give the folder that "
                         "`chimein bridge matrix --record-dir` writes (rooms that said /chimein record on), or "
                         "leave the setting empty")


@task
def add_feedback(conversations: str, feedback: str) -> str:
    """The generated conversations with the recorded rooms' (chimein.data.feedback.merge_feedback):
    what each source gave and the feedback's labels in the log and as a table artifact."""
    from chimein.data.dataset import sources_of
    from chimein.data.feedback import merge_feedback

    merged = merge_feedback(conversations, feedback)
    meta = sources_of(merged)
    fb = meta["feedback"]
    labels = ", ".join(f"{k} {n}" for k, n in fb["labels"].items()) or "none"
    skipped = ", ".join(f"{k} {n}" for k, n in fb["skipped"].items()) or "none"
    get_run_logger().info(f"feedback from {fb['rooms']} recorded room(s) in {feedback}: "
                          f"{meta['sources']['feedback']} conversations (labels: {labels}; skipped: {skipped}); "
                          + ", ".join(f"{k} {n}" for k, n in meta["sources"].items()))
    create_table_artifact(key="data-sources", description=f"conversations per source in {merged.name}",
                          table=[{"source": k, "conversations": n} for k, n in meta["sources"].items()])
    return str(merged)
