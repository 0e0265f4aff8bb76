"""Loading models, in one place: a preset's tokenizer, its base model (4-bit NF4 or not), and a
trained adapter on its base. Training, the runtime, evaluation and the benchmarks load through here.

    from chimein.models.loading import QuantSettings, load_adapter, load_base_model, load_tokenizer
    tokenizer = load_tokenizer(preset)
    model = load_base_model(preset, QuantSettings(load_in_4bit=False), tokenizer)
    model, tokenizer = load_adapter("local:NAME")

Files come through `from_pretrained`, from the Hub or from a local asset built by `chimein assets`,
so the offline path is the Hub path after download. `quiet()` silences what transformers, peft and
bitsandbytes print while loading (progress bars, known deprecation warnings).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from chimein.models.assets import asset_dir, asset_has_weights

if TYPE_CHECKING:  # chimein.presets re-exports this module's loaders: no import at load time
    from chimein.presets import ModelPreset


class QuantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_in_4bit: bool = Field(True, description="QLoRA: base weights in 4-bit; False trains LoRA on full-precision weights.")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(False, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp32. fp16 only on request: it "
        "collapsed Llama-2's loss to 0.0 in the original.")


# --- tokenizer ------------------------------------------------------------------------------------


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

    from chimein.presets import chat_template

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


# --- base model and adapter -----------------------------------------------------------------------


def resolve_compute_dtype(setting: str):
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(preset: ModelPreset, quant: QuantSettings, tokenizer, attn_implementation: str = "auto"):
    """The preset's base model, 4-bit NF4 when asked (same path on CPU and GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_compute_dtype(quant.compute_dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=quant.double_quant)
        # 4-bit weights are placed as they load and cannot move after: on the rank's own GPU under
        # several processes (LOCAL_RANK, set by torchrun), else the first
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_source(preset, need_weights=True), **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # pad policy 'add'
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # incompatible with gradient checkpointing; inference turns it on
    return model


def load_adapter(ref: str, quantize: bool = True):
    """(model, tokenizer): the base named by the adapter's preset, with the adapter on top, ready
    for inference (eval mode, KV cache on)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from chimein.models.adapters import adapter_meta, adapter_path
    from chimein.presets import ModelPreset

    path = adapter_path(ref)
    meta = adapter_meta(ref)
    preset = ModelPreset.from_stored(meta["preset"])
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


# --- quiet loading --------------------------------------------------------------------------------


# libraries that log warnings through `logging` while loading, e.g. bitsandbytes' "Failed to load
# CPU gemm_4bit_forward from kernels-community" (an optional faster CPU kernel)
QUIET_LOGGERS = ("bitsandbytes", "peft", "accelerate")


@contextlib.contextmanager
def quiet():
    """Silence loading: transformers' and huggingface_hub's progress bars, the warnings that
    transformers, bitsandbytes, peft and accelerate log, and the deprecation and user warnings
    they raise (e.g. transformers' `is_gradient_checkpointing` FutureWarning). Errors still
    surface; everything is restored on exit."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()
