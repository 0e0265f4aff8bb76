"""Model presets (conf/models/*.yaml), chat-template families, and the hardware check.

A preset names a model and everything that differs between model families: the Hub id, the
family (which fixes the chat template, the end-of-turn token and the template's marker text), the
pad-token policy, the LoRA target modules, and whether training it needs a GPU. Loading a preset's
tokenizer and model is chimein.models.loading.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from chimein.paths import conf_dir


@dataclass(frozen=True)
class Family:
    """What a chat-template family fixes, whichever model of the family is used."""

    eot_token: str  # closes every turn, the assistant's included: it must be learned
    markers: tuple[str, ...]  # template text (not special tokens) that opens turns


FAMILIES: dict[str, Family] = {
    # <|user|>\n{user}</s>\n<|assistant|>\n{assistant}</s>\n (HuggingFaceH4/zephyr-7b-beta)
    "zephyr": Family("</s>", ("<|user|>", "<|assistant|>", "<|system|>")),
    # <s>[INST] {user} [/INST] {assistant} </s> (meta-llama/Llama-2-7b-chat-hf)
    "llama-2": Family("</s>", ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    # <s>GPT4 Correct User: {user}<|end_of_turn|>GPT4 Correct Assistant: ... (openchat/openchat-3.5-0106)
    "openchat": Family(
        "<|end_of_turn|>",
        ("GPT4 Correct User:", "GPT4 Correct Assistant:", "GPT4 Correct System:"),
    ),
    # <|im_start|>user\n{user}<|im_end|>\n (SmolLM2-Instruct; markers are special tokens)
    "chatml": Family("<|im_end|>", ()),
}

FamilyName = Literal["zephyr", "llama-2", "openchat", "chatml"]


def chat_template(family: str) -> str:
    """The family's published chat template, without any default system prompt."""
    return (conf_dir() / "chat_templates" / f"{family}.jinja").read_text(encoding="utf-8")


class ModelPreset(BaseModel):
    """One model variant. YAML files in conf/models/ hold one each; unknown keys fail."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Preset name, equal to the YAML file's stem.")
    family: FamilyName = Field(description="Chat-template family; fixes template and end-of-turn token.")
    hub_id: str | None = Field(
        None, description="Hugging Face Hub repo of the weights and tokenizer, used when no local asset is built."
    )
    asset: str | None = Field(
        None,
        description="Local stand-in built by `chimein assets` from registry packages: a full model, "
        "or only the tokenizer for 7B presets (their weights still come from hub_id).",
    )
    pad_token: str = Field(
        description="Pad-token policy: 'unk' (use UNK; it must differ from EOS), 'add' (add a new "
        "'<pad>' token; embeddings are resized), or an existing token such as '<|pad_0|>'. "
        "Pad must never equal EOS: padded positions are ignored by the loss, so the model would "
        "never learn to stop."
    )
    lora_target_modules: list[str] = Field(description="Linear layers that get LoRA adapters.")
    max_length: int = Field(1024, gt=0, description="Max tokens per training row; longer conversations lose whole trailing turns.")
    needs_gpu: bool = Field(
        False, description="Training it needs a CUDA GPU (7B: a ~14 GB download, then days on a CPU): "
        "check_hardware refuses it on a machine without one unless allow_cpu.")

    @model_validator(mode="after")
    def _has_a_source(self) -> ModelPreset:
        if not self.hub_id and not self.asset:
            raise ValueError(f"preset {self.name!r} needs a hub_id or an asset (or both)")
        return self

    @property
    def eot_token(self) -> str:
        return FAMILIES[self.family].eot_token

    @classmethod
    def from_stored(cls, data: dict) -> ModelPreset:
        """The preset as an adapter stored it (chimein.json). Adapters trained before `torch_dtype`
        was removed (it was set in every preset and read by nothing) still carry it."""
        return cls.model_validate({k: v for k, v in data.items() if k != "torch_dtype"})


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return conf_dir() / "models" / f"{name_or_path}.yaml"


def list_presets() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "models").glob("*.yaml"))


DEFAULT_PRESET = "smollm2-135m-instruct"  # the offline default: trains on a CPU in minutes
# a preset name of conf/models/, as a flow parameter: the Prefect form offers the presets that exist
PresetName = Literal[tuple(list_presets())]


def load_preset(name_or_path: str) -> ModelPreset:
    """A preset by name (conf/models/NAME.yaml) or by path to a YAML file."""
    path = preset_path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"unknown model preset {name_or_path!r}: {path} does not exist. "
            f"Known presets: {', '.join(list_presets())}; or pass a path to a YAML file."
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    preset = ModelPreset.model_validate(data)
    if path.parent == conf_dir() / "models" and preset.name != path.stem:
        raise ValueError(f"{path}: name {preset.name!r} must equal the file name {path.stem!r}")
    return preset


class HardwareError(RuntimeError):
    """The preset needs hardware this machine lacks; the message names where to run it."""


def check_hardware(preset: ModelPreset, allow_cpu: bool = False) -> None:
    """Refuse, before anything is downloaded, to train a preset that needs a GPU on a machine
    without CUDA (a worker of the wrong pool would download ~14 GB, then train for days)."""
    if not preset.needs_gpu or allow_cpu:
        return
    import torch

    if not torch.cuda.is_available():
        raise HardwareError(
            f"preset {preset.name!r} needs a CUDA GPU, and this host ({socket.gethostname()}) has no CUDA "
            f"device: {cuda_absence()}. Run it where a worker sees a GPU (`chimein worker --gpu 0` on a GPU "
            f"host, joining this pool's server), pick a CPU preset such as {DEFAULT_PRESET!r}, or set "
            "`allow_cpu: true` (`chimein train --allow-cpu`) to run it on the CPU anyway.")


def cuda_absence() -> str:
    """Why torch sees no CUDA device here, in words."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU (no NVIDIA driver or device)"

