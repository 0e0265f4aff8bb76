"""Data tasks: generation (cached on its inputs and code, retried on I/O) and the dataset."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from chimein.dataset import build_dataset, publish_hub, publish_local
from chimein.generation import ClientError, GenerationAborted, GenerationConfig, MissingAPIKey, generate


def retry_io(task, task_run, state) -> bool:
    """Retry a failed I/O step unless the failure is the caller's: a bad key, a refused request,
    a 4xx. (429/5xx are already retried inside generation, per request.)"""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (MissingAPIKey, GenerationAborted, ClientError, PermissionError,
                                FileNotFoundError, ValueError))


# Cached on the config and this code: rerunning with the same parameters makes no API call.
@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=2,
      retry_delay_seconds=[30, 120], retry_condition_fn=retry_io)
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


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=2, retry_delay_seconds=60,
      retry_condition_fn=retry_io)
def build_and_publish_dataset(data: str, publish: str = "local", test_fraction: float = 0.1,
                              seed: int = 0) -> str:
    """The dataset version's location (local:ds-… or hub:ORG/NAME@ds-…)."""
    ds, info = build_dataset(data, test_fraction=test_fraction, seed=seed)
    info = publish_local(ds, info) if publish == "local" else publish_hub(ds, info, publish.removeprefix("hub:"))
    create_table_artifact(key="dataset", description=f"dataset {info.version}", table=[
        {"version": info.version, "train": info.train, "validation": info.validation, "test": info.test,
         "user_messages": info.user_turns, "speak": info.speak,
         "silence_ratio": round(info.silence_ratio, 3), "source": info.source,
         "location": info.location}])
    return info.location
