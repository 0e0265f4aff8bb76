"""What the assistant holds per conversation and what it decides: a conversation's state (its
messages and the model's KV cache of them), a decision, and the token ids a decision is made on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from chimein.conversation import Message

DEFAULT_CHATTINESS = 0.5  # p_speak threshold when none is calibrated or given


@dataclass(frozen=True)
class Threshold:
    """A threshold the assistant acts on and where it came from: `calibrated` with the adapter on
    its validation split, the `default` (calibration was off or impossible), or `fixed` by the
    caller. `source` says it in words (which split, which bound, or why not)."""

    threshold: float = DEFAULT_CHATTINESS
    origin: Literal["calibrated", "default", "fixed"] = "default"
    source: str = "default"

    @classmethod
    def fixed(cls, threshold: float):
        return cls(float(threshold), "fixed", "fixed")

    @classmethod
    def stored(cls, saved: dict | None):
        """From an adapter's chimein.json (threshold, origin, source). Adapters saved before
        `origin` existed say it only in their source's words."""
        if not saved:
            return cls()
        source = saved.get("source", "default")
        origin = saved.get("origin") or ("calibrated" if source.startswith("calibrated") else "default")
        return cls(float(saved["threshold"]), origin, source)


@dataclass(frozen=True)
class Chattiness(Threshold):
    """The p_speak threshold: speak when p_speak >= it."""


DEFAULT_CONFIDENCE = 0.2  # see Confidence
# a reply's confidence is the lowest probability among its first tokens: a fact comes early, and
# the same span is measured however long the reply runs (calibration generates only these)
CONFIDENCE_TOKENS = 32


@dataclass(frozen=True)
class Confidence(Threshold):
    """The hedging threshold on a reply's confidence, the lowest probability the model gave one of
    its first CONFIDENCE_TOKENS tokens: a reply below it that no tool backs is a guess (said as one when addressed, else
    withdrawn). Calibrated on the validation split (chimein.train.calibration); adapters trained
    before that use the default, 0.2: a reply with a token the model gave less than one chance in
    five."""

    threshold: float = DEFAULT_CONFIDENCE


@dataclass
class Decision:
    speak: bool
    p_speak: float  # the response's share of P("(silence)") + P("(response)")
    response: str | None = None  # the reply, when speaking
    format_mass: float = 1.0  # P("(silence)") + P("(response)"): how much the model follows the format
    prompt_tokens: int = 0  # tokens of the conversation the decision was made on (after windowing)
    completion_tokens: int = 0  # tokens generated for the reply; 0 when silent
    responder: str | None = None  # who wrote the reply when not the local model (e.g. openai:gpt-4o-mini)
    responder_error: str | None = None  # why the responder gave no reply (the local model replied)
    # how sure the local model was of its reply: the lowest probability it gave one of its first
    # CONFIDENCE_TOKENS tokens (None: no local reply, or a tool's answer)
    confidence: float | None = None
    hedged: bool = False  # the reply was a guess: said as one ("not sure …"), or withdrawn when unaddressed
    tool: str | None = None  # the tool whose exact answer is the reply (convert, time, weekday, arithmetic)
    passages: list[str] = field(default_factory=list)  # where the passages shown with the message come from


@dataclass
class ConversationState:
    """One conversation as the assistant holds it: its messages, and the model's KV cache of what
    was fed so far (so a new message costs its own tokens). The assistant works on one at a time
    (`bot.state`); keep several and switch with `bot.use(state)`. The messages may be read or
    replaced before a message is added (e.g. a history given at once); the other fields belong to
    the assistant."""

    messages: list[Message] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # token ids whose keys/values are in the cache
    cache: object = None
    last_logits: object = None  # logits after the last fed token
    # this conversation's own threshold on p(speak) (e.g. a room set to quiet), None: the assistant's
    chattiness: float | None = None

    def threshold(self, default: float) -> float:
        return default if self.chattiness is None else self.chattiness

    def nbytes(self) -> int:
        """Memory held for the model: the KV cache and the last logits (the messages are small)."""
        n = self.last_logits.nbytes if self.last_logits is not None else 0
        if self.cache is not None:
            n += sum(t.nbytes for layer in self.cache.layers for t in (layer.keys, layer.values)
                     if t is not None)
        return n

    def drop_cache(self) -> None:
        """Forget what was fed; the messages stay, and the next decision feeds them again."""
        self.fed, self.cache, self.last_logits = [], None, None


class Branches(NamedTuple):
    """A decision's token ids, as the whole rendered conversation tokenizes."""

    context: list[int]  # shared by both continuations: what the cache holds when deciding
    silence: list[int]  # the rest of "(silence)"
    response: list[int]  # the rest of "(response)", where a reply continues


def new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
