"""Preprocessing task: a dataset version's train split as token rows with assistant masks, for one
model preset, cached on both (and this code) in the store, where `make clean` deletes it.

    tokenized = tokenize_dataset(load_preset("tiny-chatml"), "local:ds-…")
    result = train_adapter(config, tokenized=tokenized)

The rows are written to store/tokenized/PRESET--VERSION--MAX_LENGTH--PRESET_HASH/ (rows/,
examples.txt with the labelled spans marked, tokenized.json); a cache hit whose directory was
deleted tokenizes again (tasks.data.WhileArtifactExists). The preset is passed whole, so a changed
preset (chat template settings, max length, pad policy) is a new key, not stale rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from chimein.data.dataset import resolve_dataset
from chimein.paths import store_dir
from chimein.presets import ModelPreset
from chimein.train.rows import tokenize_train_split
from tasks.data import CACHE, ONE_AT_A_TIME, WhileArtifactExists


def tokenized_exists(path: str) -> bool:
    return (Path(path) / "tokenized.json").is_file()  # written last


@task(cache_policy=WhileArtifactExists(policy=INPUTS + TASK_SOURCE, exists=tokenized_exists)
      .configure(**ONE_AT_A_TIME), result_storage=CACHE, persist_result=True, task_run_name="tokenize-{preset.name}")
def tokenize_dataset(preset: ModelPreset, dataset: str, max_length: int | None = None) -> str:
    """The directory of the token rows (training.TokenizedData) of `dataset`'s train split
    (local:ds-…, hub:ORG/NAME@ds-…) for `preset`; max_length None: the preset's."""
    ds, version = resolve_dataset(dataset)
    data = tokenize_train_split(preset, ds, version, max_length)
    digest = hashlib.sha256(preset.model_dump_json().encode()).hexdigest()[:6]
    out = data.save(store_dir() / "tokenized" / f"{preset.name}--{version}--{data.max_length}--{digest}")
    s = data.summary
    create_table_artifact(key="tokenized", description=f"{version}:train for {preset.name}, at most "
                          f"{data.max_length} tokens a row", table=[
        {"preset": preset.name, "dataset": version, "rows": s.conversations, "too_long": data.too_long,
         "truncated": s.truncated, "tokens": s.tokens, "labelled_tokens": data.labelled_tokens,
         "user_messages": s.user_turns, "speak": s.speak, "silence": s.silence}])
    create_markdown_artifact(key="examples", description=f"how {preset.name} sees the data", markdown=(
        f"### {preset.name} on {version}:train\n\nLabelled tokens (what the model learns to produce) "
        "are wrapped in ⟦ ⟧; everything else is context only.\n\n"
        + "\n\n".join(f"```\n{e}\n```" for e in data.examples)))
    return str(out)
