"""A stronger responder, when the deployer has one: the local adapter decides at every message
(cheap, ~100 ms on a CPU), and only when it speaks does the reply come from a large model behind
any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp). A group where the assistant
speaks at a quarter of the messages pays the large model for that quarter.

    bot = GroupChatAssistant.from_adapter("local:NAME", responder=OpenAIResponder("gpt-4o-mini"))
    chimein chat --adapter local:NAME --responder openai:gpt-4o-mini [--responder-base-url URL]

What the endpoint gets: the method's instruction (the assistant of a group chat, that has decided
to reply now; brief; plain about what it does not know), then the conversation with each person's
name in the API's `name` field and the assistant's earlier replies as its own turns, and the
passages retrieved from the group's documents when the assistant has them (`knowledge=`).

When the endpoint fails (refused, an HTTP error, a timeout, an empty answer), nothing crashes and
no message is lost: the reply comes from the local model instead, and the Decision says so
(`responder_error`). `stats` counts calls, failures, tokens and seconds, for cost and latency.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass

from chimein.conversation import Message

RESPONDER_PROMPT = (
    "You are the assistant in a group chat between several people. Most of the time you stay "
    "silent; you have decided that you should reply to the last message now, because you were "
    "addressed or can add a useful fact. Reply with the message only: brief, in the language of "
    "the chat, as a friend in the chat would write. If you are not sure of a fact, say plainly "
    "that you are not sure instead of guessing."
)
PASSAGES_PROMPT = (
    "Passages from the group's own documents that may answer the last message, best first. Use "
    "a fact from them when one answers; if none does and the question is about the group's own "
    "affairs, say that the documents do not say.\n\n{passages}"
)


def api_name(name: str | None) -> str:
    """A person's name as the OpenAI API's `name` field allows it: [A-Za-z0-9_-]{1,64}."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name or "user")[:64] or "user"


class ResponderError(RuntimeError):
    """The responder gave no reply; the message says why."""


@dataclass
class ResponderStats:
    calls: int = 0  # replies asked for
    failures: int = 0  # of those, not given (the local model replied instead)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # waiting for the endpoint, all calls together

    def summary(self) -> dict:
        served = self.calls - self.failures
        return asdict(self) | {"mean_latency_s": self.seconds / self.calls if self.calls else None,
                               "served": served}


class OpenAIResponder:
    """Replies from an OpenAI-compatible chat completions endpoint (OPENAI_API_KEY; a local
    server given by `base_url` needs no key)."""

    def __init__(self, model: str, base_url: str | None = None, timeout_s: float = 30.0,
                 max_tokens: int = 256, prompt: str = RESPONDER_PROMPT):
        import openai

        key = os.environ.get("OPENAI_API_KEY")
        if not key and not base_url:
            raise ResponderError("the responder needs OPENAI_API_KEY (export it), or "
                                 "--responder-base-url for a local OpenAI-compatible server")
        # one try: a slow or failing endpoint costs the conversation one timeout, then the local reply
        self.client = openai.OpenAI(api_key=key or "none", base_url=base_url, timeout=timeout_s, max_retries=0)
        self.model, self.max_tokens, self.prompt = model, max_tokens, prompt
        self.name = f"openai:{model}"
        self.stats = ResponderStats()

    def request(self, messages: list[Message], passages: list[str] = ()) -> list[dict]:
        """The chat completion's messages for a conversation (ending with the message to answer),
        with the passages retrieved from the group's documents, if any."""
        out = [{"role": "system", "content": self.prompt}]
        if passages:
            out.append({"role": "system", "content": PASSAGES_PROMPT.format(passages="\n\n".join(passages))})
        for m in messages:
            if m.role == "assistant":
                out.append({"role": "assistant", "content": m.content})
            else:  # the name also leads the text: the name field cannot hold every name as written
                out.append({"role": "user", "name": api_name(m.name), "content": f"{m.name}: {m.content}"})
        return out

    def reply(self, messages: list[Message], passages: list[str] = ()) -> str:
        import openai

        self.stats.calls += 1
        start = time.perf_counter()
        try:
            r = self.client.chat.completions.create(model=self.model, messages=self.request(messages, passages),
                                                    temperature=0, max_tokens=self.max_tokens)
            choices = getattr(r, "choices", None)  # a proxy's HTML page comes back as a str
            if not isinstance(choices, list):
                raise ResponderError(f"the endpoint answered something that is not a chat completion: "
                                     f"{str(r)[:80]!r}")
            text = (choices[0].message.content or "").strip() if choices else ""
            if not text:
                raise ResponderError("the endpoint answered with no text")
        except (openai.OpenAIError, ResponderError) as e:
            self.stats.failures += 1
            raise ResponderError(f"{self.name}: {e}") from None
        finally:
            self.stats.seconds += time.perf_counter() - start
        if getattr(r, "usage", None):
            self.stats.prompt_tokens += r.usage.prompt_tokens or 0
            self.stats.completion_tokens += r.usage.completion_tokens or 0
        return text


def load_responder(spec: str | None, base_url: str | None = None) -> OpenAIResponder | None:
    """`openai:MODEL` (any OpenAI-compatible endpoint: `base_url`) → a responder; None → none."""
    if not spec:
        return None
    kind, _, model = spec.partition(":")
    if kind != "openai" or not model:
        raise ResponderError(f"responder {spec!r}: use openai:MODEL, e.g. openai:gpt-4o-mini "
                             "(with --responder-base-url for vLLM, Ollama or llama.cpp)")
    return OpenAIResponder(model, base_url)
