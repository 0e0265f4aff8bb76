"""The LLMs that write conversations, behind one interface: a source is a function (prompt,
request) -> Completion. Replicate, any OpenAI-compatible server, and the offline curated corpus.
Errors are sorted into retryable (429, 5xx, timeouts, malformed replies) and not (other 4xx)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable

from chimein.data.generation_config import API_KEYS, GenerationConfig, RequestSpec


@dataclass
class Completion:
    text: str
    tokens_in: int | None = None
    tokens_out: int | None = None


class RetryableError(Exception):
    """429, 5xx, timeouts and dropped connections: worth another try after a pause."""


class MalformedReply(RetryableError):
    """A success status whose body is not a usable reply (a proxy's HTML page, broken JSON, no
    choices): most likely transient, so retried; when the retries run out the request is rejected
    as `malformed_reply`."""


class ClientError(Exception):
    """A 4xx other than 429: retrying the same request will not help."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class MissingAPIKey(RuntimeError):
    pass


def _api_key(source: str) -> str:
    var = API_KEYS[source]
    key = os.environ.get(var)
    if not key:
        raise MissingAPIKey(f"{var} is not set; export {var}=... to use --source {source}")
    return key


def openai_source(cfg: GenerationConfig) -> Callable[[str, RequestSpec], Completion]:
    import openai

    client = openai.OpenAI(api_key=_api_key("openai"), base_url=cfg.base_url or None,
                           max_retries=0, timeout=cfg.timeout_s)  # retries are ours, counted

    def complete(prompt: str, spec: RequestSpec) -> Completion:
        try:
            r = client.chat.completions.create(
                model=cfg.model_id, messages=[{"role": "user", "content": prompt}],
                temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=spec.seed)
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                openai.APIConnectionError) as e:
            raise RetryableError(str(e)) from e
        except openai.APIStatusError as e:
            if e.status_code >= 500:
                raise RetryableError(str(e)) from e
            raise ClientError(f"HTTP {e.status_code}: {e.message}", e.status_code) from e
        except ValueError as e:  # the client parses a JSON content type: JSONDecodeError
            raise MalformedReply(f"the reply is not JSON: {e}") from e
        try:  # the client returns other content types as text, and does not validate the fields
            usage = r.usage
            return Completion(r.choices[0].message.content or "",
                              usage.prompt_tokens if usage else None,
                              usage.completion_tokens if usage else None)
        except (AttributeError, TypeError, IndexError) as e:
            raise MalformedReply(f"the reply has no choices[0].message ({e}): {str(r)[:200]}") from e

    return complete


def replicate_source(cfg: GenerationConfig) -> Callable[[str, RequestSpec], Completion]:
    import httpx
    import replicate
    from replicate.exceptions import ModelError, ReplicateError

    client = replicate.Client(api_token=_api_key("replicate"), base_url=cfg.base_url or None,
                              timeout=httpx.Timeout(cfg.timeout_s))
    owner, name = cfg.model_id.split("/", 1)

    def complete(prompt: str, spec: RequestSpec) -> Completion:
        try:
            p = client.models.predictions.create(
                model=(owner, name), input={"prompt": prompt, "temperature": cfg.temperature,
                                            "max_new_tokens": cfg.max_tokens, "seed": spec.seed})
            p.wait()
        except ReplicateError as e:
            if e.status is not None and (e.status == 429 or e.status >= 500):
                raise RetryableError(str(e)) from e
            raise ClientError(f"HTTP {e.status}: {e.detail or e.title}", e.status) from e
        except (httpx.TimeoutException, httpx.TransportError, ModelError) as e:
            raise RetryableError(str(e)) from e
        except (ValueError, TypeError) as e:  # broken JSON, missing fields, a body that is not an object
            raise MalformedReply(f"the reply is not a prediction: {e}") from e
        if p.status != "succeeded":
            raise RetryableError(f"prediction {p.id} {p.status}: {p.error}")
        out = p.output
        text = "".join(map(str, out)) if isinstance(out, list) else str(out or "")
        metrics = p.metrics or {}
        return Completion(text, metrics.get("input_token_count"), metrics.get("output_token_count"))

    return complete


def offline_source(cfg: GenerationConfig) -> Callable[[str, RequestSpec], Completion]:
    from chimein.data.corpus import augment, load_corpus
    from chimein.data.grounded import grounded_chat
    from chimein.data.noise import add_noise

    corpus = load_corpus()
    # originals first (in a seeded order), then augmented variants of them; a grounded chat in
    # every slot that brings the share of them up to cfg.grounded
    order = random.Random(cfg.seed).sample(range(len(corpus)), len(corpus))

    def complete(prompt: str, spec: RequestSpec) -> Completion:
        grounded_before = grounded_until(spec.index, cfg.grounded)
        if grounded_until(spec.index + 1, cfg.grounded) > grounded_before:
            conv = grounded_chat(spec.seed, cfg.names)
        else:
            k = spec.index - grounded_before
            base = corpus[order[k % len(corpus)]]
            conv = base if k < len(corpus) else augment(base, spec, cfg.names)
            if cfg.noise and random.Random(spec.seed ^ 0x6E6F6973).random() < cfg.noise:
                conv = add_noise(conv, spec.seed)
        return Completion(json.dumps(conv.to_json(), ensure_ascii=False))

    return complete


def grounded_until(index: int, share: float) -> int:
    """How many of the first `index` offline conversations are grounded chats."""
    return int(index * share + 1e-9)


SOURCES = {"openai": openai_source, "replicate": replicate_source, "offline": offline_source}
