"""The curated offline corpus, its deterministic augmentation, and leakage-proof split keys.

The corpus (chimein/data/corpus/*.jsonl) is written by hand: group chats in which the assistant
speaks when addressed or when it can fill in a missing fact, and is silent otherwise. To reach a
requested count the offline source augments it: participants are renamed consistently (in the
`name` fields and where they are mentioned), and the group grows by lurkers who drop a short
reaction after a silent turn. Augmentation never touches what the assistant says.

`group_key` is invariant under that augmentation (participant names masked, reactions ignored),
so the dataset split keeps every variant of a conversation on the same side: no augmentation of a
training conversation can leak into the test split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re

from chimein.conversation import Conversation, Message, load_conversations
from chimein.paths import sample_data

CORPUS_DIR = sample_data().parent
REACTIONS = ("😂", "lol", "same", "true", "haha yes", "👍", "agreed", "omg", "nice", "ok", "yep",
             "🙌", "fair", "hmm")


@functools.cache
def load_corpus() -> tuple[Conversation, ...]:
    """Every conversation of the curated corpus, strictly validated (it ships with the code)."""
    convs: list[Conversation] = []
    for path in sorted(CORPUS_DIR.glob("*.jsonl")):
        convs.extend(load_conversations(path, strict=True).conversations)
    return tuple(convs)


def offline_version() -> str:
    """A hash of everything the offline source's output depends on besides its settings: the corpus
    files, and the code that augments them and writes the grounded chats. A change to any of them
    is new data: a new generation file and dataset version, never a resumed or cached old one."""
    import inspect

    from chimein.data import grounded, noise

    h = hashlib.sha256()
    for path in sorted(CORPUS_DIR.glob("*.jsonl")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for source in (inspect.getsource(augment), inspect.getsource(grounded), inspect.getsource(noise)):
        h.update(source.encode())
    return h.hexdigest()[:16]


def participants(conv: Conversation) -> list[str]:
    return list(dict.fromkeys(m.name for m in conv.messages if m.role == "user"))


# CJK text has no spaces: a name there is delimited by anything but a letter or digit of an
# alphabetic script ("小艾你来吗" mentions 小艾; "Anaïs" does not mention Ana)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_EDGE_BEFORE, _EDGE_AFTER = rf"(?<![^\W{_CJK}])", rf"(?![^\W{_CJK}])"


def _name_pattern(names) -> re.Pattern | None:
    names = sorted(set(names), key=len, reverse=True)
    if not names:
        return None
    return re.compile(_EDGE_BEFORE + "(" + "|".join(map(re.escape, names)) + ")" + _EDGE_AFTER,
                      re.IGNORECASE)


def augment(conv: Conversation, spec, pool: list[str]) -> Conversation:
    """A variant of `conv` for request `spec`: participants renamed from `spec.names` (then the
    pool), plus one lurker per name the requested group size adds. Deterministic in spec.seed."""
    rng = random.Random(spec.seed)
    old = participants(conv)
    taken = {n.lower() for n in old}
    fresh = [n for n in list(spec.names) + rng.sample(pool, len(pool)) if n.lower() not in taken]
    fresh = list(dict.fromkeys(fresh))
    mapping = {o.lower(): n for o, n in zip(old, fresh)}
    lurkers = fresh[len(old):len(old) + max(0, len(spec.names) - len(old))]
    pattern = _name_pattern(old)

    def rename(text: str) -> str:
        if pattern is None:
            return text

        def sub(m: re.Match) -> str:
            new = mapping[m[0].lower()]
            return new.lower() if m[0].islower() else new

        return pattern.sub(sub, text)

    msgs = [Message(m.role, rename(m.content), mapping.get((m.name or "").lower()), m.passages) for m in conv.messages]
    # a reaction may follow a user message that the assistant did not answer, never the first
    slots = [i for i in range(1, len(msgs)) if msgs[i].role == "user"
             and (i + 1 == len(msgs) or msgs[i + 1].role == "user")]
    for name in lurkers:
        if not slots:
            break
        at = rng.choice(slots) + 1
        msgs.insert(at, Message("user", rng.choice(REACTIONS), name))
        slots = [s + (s >= at) for s in slots if s != at - 1]
    return Conversation(tuple(msgs))


def group_key(conv: Conversation) -> str:
    """Same for a conversation and all its augmentations: the first message and the assistant's
    messages, with participant names masked."""
    pattern = _name_pattern(participants(conv))
    mask = (lambda t: pattern.sub("@", t)) if pattern else (lambda t: t)
    first = next(m.content for m in conv.messages if m.role == "user")
    parts = [mask(first)] + [mask(m.content) for m in conv.messages if m.role == "assistant"]
    return hashlib.sha256(json.dumps([" ".join(p.lower().split()) for p in parts]).encode()).hexdigest()[:20]
