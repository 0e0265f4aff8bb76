"""The generation task's cache key follows what the offline source makes, not only its settings."""

from __future__ import annotations

import shutil

from chimein.data import corpus
from chimein.data.generation_config import load_generation_config
from tasks.data import GenerationFingerprint, generate_conversations


def _policies(policy):
    inner = getattr(policy, "policy", None)
    if inner is not None:
        yield from _policies(inner)
    for p in getattr(policy, "policies", []):
        yield from _policies(p)
    yield policy


def test_the_generation_cache_key_changes_with_the_offline_corpus(tmp_path, monkeypatch):
    """The flow reused the old conversations after the grounded-chat generator changed: the key
    came from the config's fields alone."""
    assert any(isinstance(p, GenerationFingerprint) for p in _policies(generate_conversations.cache_policy))
    cfg = load_generation_config()
    key = GenerationFingerprint().compute_key(None, {"config": cfg}, {})
    edited = tmp_path / "corpus"
    shutil.copytree(corpus.CORPUS_DIR, edited)
    (edited / "part-0.jsonl").write_text((edited / "part-0.jsonl").read_text(encoding="utf-8").replace(
        "lisbon", "porto", 1), encoding="utf-8")
    monkeypatch.setattr(corpus, "CORPUS_DIR", edited)
    assert GenerationFingerprint().compute_key(None, {"config": cfg}, {}) != key
