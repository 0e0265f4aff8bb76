"""Trained adapters: publish (Hub or local store) with a model card, and load back on their base.

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

from chimein.dataset import store_dir
from chimein.presets import ModelPreset


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


def _meta(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "chimein.json").read_text())


def publish_local(adapter_dir: str | Path, name: str) -> str:
    target = store_dir() / "adapters" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(adapter_dir, target)
    (target / "README.md").write_text(model_card(_meta(target)), encoding="utf-8")
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
    card.write_text(model_card(_meta(adapter_dir), repo_id), encoding="utf-8")
    api.upload_folder(repo_id=repo_id, folder_path=str(adapter_dir),
                      commit_message=f"chimein adapter, dataset {_meta(adapter_dir)['dataset_version']}")
    return f"hub:{repo_id}"


def adapter_path(ref: str) -> str:
    """A directory or Hub repo id that PeftModel.from_pretrained reads."""
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


def adapter_meta(ref: str) -> dict:
    """chimein.json of an adapter: its preset, dataset version, MLflow run, hyperparameters."""
    from huggingface_hub import hf_hub_download

    path = adapter_path(ref)
    meta_file = Path(path) / "chimein.json" if Path(path).is_dir() else \
        Path(hf_hub_download(path, "chimein.json", token=os.environ.get("HF_TOKEN")))
    return json.loads(meta_file.read_text())


def load_adapter(ref: str, quantize: bool = True):
    """(model, tokenizer): the base named by the adapter's preset, with the adapter on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from chimein.training import QuantSettings, load_base_model

    path = adapter_path(ref)
    meta = adapter_meta(ref)
    preset = ModelPreset.model_validate(meta["preset"])
    tokenizer = AutoTokenizer.from_pretrained(path, token=os.environ.get("HF_TOKEN"))
    # the compute dtype it was trained with (bf16 on GPUs, and on CPUs when asked for)
    dtype = meta.get("hyperparameters", {}).get("compute_dtype", "auto")
    base = load_base_model(preset, QuantSettings(load_in_4bit=quantize, compute_dtype=dtype), tokenizer)
    model = PeftModel.from_pretrained(base, path, token=os.environ.get("HF_TOKEN"))
    # compute LoRA in the dtype it was trained in (TRL trains QLoRA adapters in bf16); in fp32
    # the logits would drift from what training saw
    adapter_dtype = getattr(torch, meta.get("adapter_dtype", "float32"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(adapter_dtype)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer
