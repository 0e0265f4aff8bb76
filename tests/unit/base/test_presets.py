"""Every preset in conf/ validates; pad-token guard and policies; where models load from."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from chimein.models.assets import asset_dir
from chimein.models.loading import (
    PadTokenError,
    check_pad_token,
    load_tokenizer,
    model_source,
    resolve_pad_token,
)
from chimein.paths import conf_dir
from chimein.presets import FAMILIES, ModelPreset, chat_template, list_presets, load_preset
from tests.conftest import preset_and_tokenizer

REQUIRED = {"zephyr-7b-beta", "llama-2-7b-chat", "openchat-3.5-0106", "smollm2-135m-instruct",
            "tiny-zephyr", "tiny-llama-2", "tiny-openchat", "tiny-chatml"}


def test_required_presets_exist():
    assert REQUIRED <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates(name):
    preset = load_preset(name)
    assert preset.name == name
    assert preset.family in FAMILIES
    assert chat_template(preset.family)  # the family's template file exists
    assert preset.lora_target_modules


def test_seven_b_presets_name_their_hub_repos():
    assert load_preset("zephyr-7b-beta").hub_id == "HuggingFaceH4/zephyr-7b-beta"
    assert load_preset("llama-2-7b-chat").hub_id == "meta-llama/Llama-2-7b-chat-hf"
    assert load_preset("openchat-3.5-0106").hub_id == "openchat/openchat-3.5-0106"
    assert load_preset("smollm2-135m-instruct").hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["tiny-zephyr", "tiny-llama-2", "tiny-openchat", "tiny-chatml"])
def test_tiny_presets_are_tiny_and_use_the_family_tokenizer(name):
    from transformers import AutoConfig

    preset, tokenizer = preset_and_tokenizer(name)
    config = AutoConfig.from_pretrained(asset_dir(preset.asset))
    assert (config.num_hidden_layers, config.hidden_size) == (2, 64)
    assert config.vocab_size == len(tokenizer)


def test_unknown_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((conf_dir() / "models" / "tiny-chatml.yaml").read_text() + "lora_rank: 8\n")
    with pytest.raises(ValidationError, match="lora_rank"):
        load_preset(str(bad))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny-chatml"):
        load_preset("no-such-model")


def test_preset_needs_a_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfamily: chatml\npad_token: unk\nlora_target_modules: [q_proj]\n")
    with pytest.raises(ValidationError, match="hub_id or an asset"):
        load_preset(str(bad))


def _raw_smollm2_tokenizer():
    """SmolLM2's tokenizer as shipped: its pad token is <|im_end|>, which is also EOS."""
    return AutoTokenizer.from_pretrained(asset_dir("smollm2-135m-instruct"))


def test_pad_equal_to_eos_is_refused_with_the_fix():
    tok = _raw_smollm2_tokenizer()
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    with pytest.raises(PadTokenError, match=r"pad token equals EOS .*<\|im_end\|>.*UNK"):
        check_pad_token(tok)


def test_unk_policy_resolves_pad():
    tok = _raw_smollm2_tokenizer()
    resolve_pad_token(tok, "unk")
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_add_policy_adds_a_new_token():
    tok = _raw_smollm2_tokenizer()
    n = len(tok)
    resolve_pad_token(tok, "add")
    assert tok.pad_token == "<pad>" and len(tok) == n + 1


def test_unk_policy_refuses_unk_equal_to_eos_and_names_the_fix():
    tok = _raw_smollm2_tokenizer()
    tok.unk_token = tok.eos_token
    with pytest.raises(PadTokenError, match="'add'"):
        resolve_pad_token(tok, "unk")


def test_explicit_pad_token_must_exist():
    tok = _raw_smollm2_tokenizer()
    with pytest.raises(PadTokenError, match="not in the tokenizer's vocabulary"):
        resolve_pad_token(tok, "<|pad_0|>")


@pytest.mark.parametrize("name", ["zephyr-7b-beta", "llama-2-7b-chat", "openchat-3.5-0106",
                                  "smollm2-135m-instruct"])
def test_presets_resolve_pad_distinct_from_eos(name):
    tok = load_tokenizer(load_preset(name))
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id


def test_model_source_prefers_a_built_asset_then_the_hub(monkeypatch, tmp_path):
    zephyr = load_preset("zephyr-7b-beta")
    # tokenizer-only asset: the tokenizer is local, the weights come from the Hub
    assert model_source(zephyr, need_weights=False) == str(asset_dir("zephyr-tokenizer"))
    assert model_source(zephyr, need_weights=True) == "HuggingFaceH4/zephyr-7b-beta"
    smol = load_preset("smollm2-135m-instruct")
    assert model_source(smol, need_weights=True) == str(asset_dir("smollm2-135m-instruct"))
    # nothing built: Hub ids, and a clear error for a preset that only exists as an asset
    monkeypatch.setenv("CHIMEIN_CACHE", str(tmp_path))
    assert model_source(smol, need_weights=True) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="chimein assets"):
        model_source(load_preset("tiny-chatml"), need_weights=True)


def test_a_preset_that_needs_a_gpu_is_refused_without_cuda_before_any_download(monkeypatch):
    import time

    import torch

    from chimein.presets import HardwareError, check_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {n for n in list_presets() if load_preset(n).needs_gpu} == \
        {"zephyr-7b-beta", "llama-2-7b-chat", "openchat-3.5-0106"}
    start = time.perf_counter()
    with pytest.raises(HardwareError, match=r"needs a CUDA GPU, and this host \(.+\) has no CUDA device: "
                       r"torch .+\. .*`chimein worker --gpu 0` on a GPU host.*allow_cpu"):
        check_hardware(load_preset("zephyr-7b-beta"))
    assert time.perf_counter() - start < 10
    check_hardware(load_preset("zephyr-7b-beta"), allow_cpu=True)  # the override
    check_hardware(load_preset("smollm2-135m-instruct"))  # a CPU preset


def test_train_command_refuses_a_7b_preset_without_cuda(tmp_path, monkeypatch):
    import time

    import torch
    from typer.testing import CliRunner

    from chimein.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    start = time.perf_counter()
    r = CliRunner().invoke(app, ["train", "--preset", "zephyr-7b-beta", "--dataset", "local:ds-none"])
    assert r.exit_code == 1 and "needs a CUDA GPU" in r.output and "--allow-cpu" in r.output
    assert time.perf_counter() - start < 10


def test_presets_have_no_dtype_and_stored_ones_still_load():
    """torch_dtype was set in every preset and read by nothing: gone, an unknown key in conf/;
    an adapter trained before still carries it in chimein.json and loads."""
    stored = load_preset("tiny-chatml").model_dump() | {"torch_dtype": "float32"}
    with pytest.raises(ValidationError, match="torch_dtype"):
        ModelPreset.model_validate(stored)
    assert ModelPreset.from_stored(stored) == load_preset("tiny-chatml")
