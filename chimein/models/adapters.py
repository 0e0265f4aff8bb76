"""Trained adapters: publish (Hub or local store) with a model card, and read their `chimein.json`
(`adapter_meta`). Loading one on its base is `chimein.models.loading.load_adapter`.

    chimein train ... --publish local            # store/adapters/NAME/
    chimein train ... --publish hub:ORG/NAME     # needs HF_TOKEN; private by default

An adapter directory holds the PEFT adapter, the tokenizer it was trained with (pad token and chat
template included) and `chimein.json` (the preset, dataset version and MLflow run), so loading
needs nothing but the reference.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from chimein.paths import hub_repo, store_dir


def model_card(meta: dict, repo_id: str | None = None) -> str:
    preset = meta["preset"]
    base = preset.get("hub_id") or preset.get("asset")
    hp = meta.get("hyperparameters", {})
    metrics = meta.get("metrics", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in hp.items())
    mrows = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"""---
base_model: {base}
library_name: peft
tags: [chimein, lora, qlora, group-chat]
---
# {repo_id or meta.get('name', 'chimein adapter')}

A LoRA adapter for **{base}** that makes it a group-chat assistant that knows when to chime in:
after every user message (`"Name: text"`) it answers `(silence)` or `(response) …`. Trained with
[chimein](https://pypi.org/project/chimein/) on dataset `{meta['dataset_version']}` (loss on the
assistant's turns only); MLflow run `{meta.get('mlflow_run_id', '-')}`.

| hyperparameter | value |
|---|---|
{rows}

| metric | value |
|---|---|
{mrows}
"""


def publish_adapter(adapter_dir: str | Path, name: str, target: str = "local", private: bool = True) -> str:
    """Publish a trained adapter to a target: `local` (store/adapters/NAME) or `hub:ORG/NAME`
    (see paths.hub_repo); the reference to load it by (local:NAME, hub:ORG/NAME)."""
    repo = hub_repo(target)
    return publish_local(adapter_dir, name) if repo is None else publish_hub(adapter_dir, repo, private=private)


def publish_local(adapter_dir: str | Path, name: str) -> str:
    target = store_dir() / "adapters" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(adapter_dir, target)
    (target / "README.md").write_text(model_card(adapter_meta(target)), encoding="utf-8")
    return f"local:{name}"


def publish_hub(adapter_dir: str | Path, repo_id: str, private: bool = True) -> str:
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PermissionError("HF_TOKEN is not set; export HF_TOKEN=... to publish to the Hub, "
                              "or use --publish local")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    card = Path(adapter_dir) / "README.md"
    card.write_text(model_card(adapter_meta(adapter_dir), repo_id), encoding="utf-8")
    api.upload_folder(repo_id=repo_id, folder_path=str(adapter_dir),
                      commit_message=f"chimein adapter, dataset {adapter_meta(adapter_dir)['dataset_version']}")
    return f"hub:{repo_id}"


def adapter_path(ref: str | Path) -> str:
    """A directory or Hub repo id that PeftModel.from_pretrained reads."""
    ref = str(ref)
    if ref.startswith("hub:"):
        return ref[4:]
    if ref.startswith("local:"):
        path = store_dir() / "adapters" / ref[6:]
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter {ref[6:]!r} in {path.parent}")
        return str(path)
    if not Path(ref).is_dir():
        raise FileNotFoundError(f"{ref}: not an adapter directory, local:NAME or hub:ORG/NAME")
    return ref


def adapter_meta(ref: str | Path) -> dict:
    """chimein.json of an adapter (a directory, local:NAME or hub:ORG/NAME): its preset, dataset
    version, MLflow run, hyperparameters, calibrated chattiness. Its one reader."""
    from huggingface_hub import hf_hub_download

    path = adapter_path(ref)
    meta_file = Path(path) / "chimein.json" if Path(path).is_dir() else \
        Path(hf_hub_download(path, "chimein.json", token=os.environ.get("HF_TOKEN")))
    return json.loads(meta_file.read_text())
