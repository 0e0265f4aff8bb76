"""Real-chat noise at silent turns (chimein.data.noise): every decision of the chat is kept, the
lines are those real channels have, and none comes from the shipped benchmark."""

from __future__ import annotations

import random

from chimein.data.corpus import load_corpus
from chimein.data.noise import add_noise, noise_lines
from chimein.evaluate.benchmark import load_benchmark


def inserted(noisy, original) -> list[int]:
    """The indices of `noisy`'s messages that are not `original`'s, which must be a subsequence of it."""
    out, j = [], 0
    for i, m in enumerate(noisy.messages):
        if j < len(original.messages) and m == original.messages[j]:
            j += 1
        else:
            out.append(i)
    assert j == len(original.messages), "an original message was lost or moved"
    return out


def test_noise_goes_only_where_the_assistant_was_silent():
    for seed, conv in enumerate(load_corpus()[:60]):
        noisy = add_noise(conv, seed)
        added = inserted(noisy, conv)
        assert added and all(noisy.messages[i].role == "user" for i in added)
        for i in added:  # never answered, and never where an original message was answered
            assert i + 1 == len(noisy.messages) or noisy.messages[i + 1].role == "user"
            assert i > 0
        assert add_noise(conv, seed) == noisy  # deterministic


def test_the_offline_source_adds_noise_to_its_share_of_chats(tmp_path):
    from chimein.conversation import load_conversations
    from chimein.data.generation import generate
    from chimein.data.generation_config import load_generation_config

    plain, noisy = tmp_path / "plain.jsonl", tmp_path / "noisy.jsonl"
    generate(load_generation_config(source="offline", count=80, noise=0.0), plain)
    cfg = load_generation_config(source="offline", count=80, noise=0.5)
    generate(cfg, noisy)
    assert cfg.fingerprint() != load_generation_config(source="offline", count=80, noise=0.0).fingerprint()
    a, b = (load_conversations(p).conversations for p in (plain, noisy))
    changed = sum(x != y for x, y in zip(a, b))
    assert 25 <= changed <= 55  # about half
    assert [m for c in a for m in c.messages if m.role == "assistant"] == \
        [m for c in b for m in c.messages if m.role == "assistant"]


def test_kept_apart_from_the_benchmark():
    rng = random.Random(0)
    lines = {text.lower() for _ in range(5000) for _, text in noise_lines(rng, ["Ann", "Ben"])}
    bench = {m.content.lower() for c in load_benchmark().conversations for m in c.messages if len(m.content) > 12}
    assert not lines & bench, lines & bench
