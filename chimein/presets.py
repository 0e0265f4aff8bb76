"""Model presets (conf/models/*.yaml), chat-template families, and tokenizer loading.

A preset names a model and everything that differs between model families: the Hub id, the
family (which fixes the chat template, the end-of-turn token and the template's marker text), the
pad-token policy, the LoRA target modules and the dtype. Loading goes through
`transformers.AutoTokenizer.from_pretrained` whether the files come from the Hub or from a local
asset built by `chimein assets`, so the offline path is the Hub path after download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from chimein.assets import asset_dir, asset_has_weights
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
    torch_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Compute dtype where the hardware has it; fp16 collapsed Llama-2's loss."
    )
    max_length: int = Field(1024, gt=0, description="Max tokens per training row; longer conversations lose whole trailing turns.")

    @model_validator(mode="after")
    def _has_a_source(self) -> ModelPreset:
        if not self.hub_id and not self.asset:
            raise ValueError(f"preset {self.name!r} needs a hub_id or an asset (or both)")
        return self

    @property
    def eot_token(self) -> str:
        return FAMILIES[self.family].eot_token


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return conf_dir() / "models" / f"{name_or_path}.yaml"


def list_presets() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "models").glob("*.yaml"))


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


class PadTokenError(ValueError):
    pass


def resolve_pad_token(tokenizer, policy: str) -> None:
    """Give the tokenizer a pad token distinct from EOS, following the preset's policy."""
    if policy == "unk":
        if tokenizer.unk_token is None or tokenizer.unk_token == tokenizer.eos_token:
            raise PadTokenError(
                f"pad policy 'unk' needs an UNK token distinct from EOS ({tokenizer.eos_token!r}), "
                f"but UNK is {tokenizer.unk_token!r}; set the preset's pad_token to 'add' instead"
            )
        tokenizer.pad_token = tokenizer.unk_token
    elif policy == "add":
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    else:
        if policy not in tokenizer.get_vocab():
            raise PadTokenError(
                f"pad token {policy!r} is not in the tokenizer's vocabulary; use 'unk', 'add' or "
                "an existing token"
            )
        tokenizer.pad_token = policy
    check_pad_token(tokenizer)


def check_pad_token(tokenizer) -> None:
    """Refuse a tokenizer whose pad token is missing or equal to EOS."""
    if tokenizer.pad_token is None:
        raise PadTokenError(
            "tokenizer has no pad token; set the preset's pad_token policy ('unk', 'add' or a token)"
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise PadTokenError(
            f"pad token equals EOS ({tokenizer.eos_token!r}): padded positions are masked out of "
            "the loss, so the model never learns to emit EOS and generates forever. Set "
            "tokenizer.pad_token to a distinct token, e.g. UNK (the preset's pad_token: 'unk'), "
            "or add one (pad_token: 'add')"
        )


def model_source(preset: ModelPreset, need_weights: bool) -> str:
    """Where from_pretrained reads: the local asset when it is built (and has what is needed),
    else the Hub id (the normal Hub download path)."""
    if preset.asset:
        local = asset_dir(preset.asset)
        if local is not None and (asset_has_weights(preset.asset) or not need_weights):
            return str(local)
    if preset.hub_id:
        return preset.hub_id
    raise FileNotFoundError(
        f"preset {preset.name!r} needs the local asset {preset.asset!r}, which is not built; "
        "run `chimein assets` (or `make run`) first"
    )


def load_tokenizer(preset: ModelPreset):
    """The preset's tokenizer with its family's chat template and a resolved pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source(preset, need_weights=False))
    tokenizer.chat_template = chat_template(preset.family)
    eot_ids = tokenizer(preset.eot_token, add_special_tokens=False).input_ids
    if len(eot_ids) != 1:
        raise ValueError(
            f"end-of-turn token {preset.eot_token!r} of family {preset.family!r} is not a single "
            f"token in {preset.name}'s tokenizer (got {eot_ids}); the family is wrong for this model"
        )
    resolve_pad_token(tokenizer, preset.pad_token)
    return tokenizer
