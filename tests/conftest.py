"""Shared fixtures: tiny presets of every family with their real tokenizers (offline assets)."""

from __future__ import annotations

import functools

import pytest

from chimein.assets import build_asset
from chimein.presets import load_preset, load_tokenizer

TINY = ["tiny-zephyr", "tiny-llama-2", "tiny-openchat", "tiny-chatml"]


@functools.cache
def preset_and_tokenizer(name: str):
    preset = load_preset(name)
    build_asset(preset.asset)  # cached after the first build (`make test` builds all up front)
    return preset, load_tokenizer(preset)


@pytest.fixture(params=TINY)
def family(request):
    """(preset, tokenizer) for each model family."""
    return preset_and_tokenizer(request.param)
