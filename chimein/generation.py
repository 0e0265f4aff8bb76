"""Synthetic group-chat generation: one interface over Replicate, OpenAI-compatible servers and
the offline curated corpus; robust to messy output, rate limits and restarts.

    chimein generate --source offline --count 200 --out data/conversations.jsonl

Each request i gets its own seed derived from the run seed, and from it a topic, participant
names, group size and turn count, so a run is reproducible. Every accepted conversation is
appended to the output file as it arrives, and every finished request to a ledger beside it
(`OUT.jsonl.ledger`); a restarted run with the same config skips finished requests, so no
successful API call is spent twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from chimein.conversation import Conversation, InvalidConversation, load_conversations, parse_conversation
from chimein.paths import conf_dir

DEFAULT_MODELS = {
    "replicate": "mistralai/mixtral-8x7b-instruct-v0.1",  # as in the original article
    "openai": "gpt-4o-mini",
    "offline": "chimein-curated-corpus",
}
API_KEYS = {"openai": "OPENAI_API_KEY", "replicate": "REPLICATE_API_TOKEN"}


class GenerationConfig(BaseModel):
    """How to generate conversations. conf/generation/default.yaml holds the topic and name lists."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["offline", "openai", "replicate"] = Field(
        "offline", description="offline: the curated corpus + augmentation (no key, no network)."
    )
    count: int = Field(200, gt=0, description="Accepted conversations wanted in the output.")
    seed: int = Field(0, description="Run seed; request i's seed is derived from it.")
    model: str | None = Field(None, description="Model id; default per source (DEFAULT_MODELS).")
    base_url: str | None = Field(
        None, description="API base URL: any OpenAI-compatible server (vLLM, Ollama, llama.cpp), "
        "or a Replicate-compatible one. Default: the client's (OPENAI_BASE_URL / REPLICATE_BASE_URL)."
    )
    prompt: str = Field("generate-conversation", description="conf/prompts/NAME.txt")
    topics: list[str] = Field(min_length=1)
    names: list[str] = Field(min_length=5)
    group_size: tuple[int, int] = Field((2, 5), description="Participants per chat, inclusive range.")
    turns: tuple[int, int] = Field((10, 12), description="User messages per chat, inclusive range.")
    temperature: float = 0.8
    max_tokens: int = 2048
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(5, ge=0, description="Retries of one request on 429/5xx/timeouts.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry, with jitter.")
    backoff_max_s: float = 30.0
    timeout_s: float = 120.0
    max_requests: int | None = Field(
        None, description="Stop after this many requests even if count is not reached (default 3 x count)."
    )

    @property
    def model_id(self) -> str:
        return self.model or DEFAULT_MODELS[self.source]

    def fingerprint(self) -> str:
        """What must match for a resumed run to continue the same sequence of requests."""
        keys = ("source", "seed", "prompt", "topics", "names", "group_size", "turns", "temperature",
                "max_tokens")
        data = {k: getattr(self, k) for k in keys} | {"model": self.model_id,
                                                       "prompt_text": prompt_template(self.prompt)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_generation_config(path: str | Path | None = None, **overrides) -> GenerationConfig:
    path = Path(path) if path else conf_dir() / "generation" / "default.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationConfig.model_validate(data)


def prompt_template(name: str) -> str:
    path = conf_dir() / "prompts" / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} does not exist")
    return path.read_text(encoding="utf-8")


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    index: int
    seed: int
    topic: str
    names: tuple[str, ...]
    turns: int


def plan_request(cfg: GenerationConfig, index: int) -> RequestSpec:
    """Request `index` of the run, fully determined by the run seed."""
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{index}".encode()).digest()[:4], "big")
    rng = random.Random(seed)
    k = rng.randint(*cfg.group_size)
    return RequestSpec(index, seed, rng.choice(cfg.topics), tuple(rng.sample(cfg.names, k)),
                       rng.randint(*cfg.turns))


def render_prompt(template: str, spec: RequestSpec) -> str:
    return template.format(topic=spec.topic, names=", ".join(spec.names),
                           n_names=len(spec.names), turns=spec.turns)


# --- messy model output → a valid conversation ------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")


def extract_conversation(text: str) -> Conversation:
    """The first JSON array of messages in `text` (in a code fence or amid prose), repaired where
    safe and validated. Raises InvalidConversation naming why it was rejected."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    last_error: InvalidConversation | None = None
    for chunk in candidates:
        for start in (m.start() for m in re.finditer(r"\[", chunk)):
            for attempt in (chunk[start:], _TRAILING_COMMA.sub(r"\1", chunk[start:])):
                try:
                    obj, _ = decoder.raw_decode(attempt)
                except json.JSONDecodeError:
                    continue
                if not (isinstance(obj, list) and obj and all(isinstance(m, dict) for m in obj)):
                    break  # an array, but not of messages: try the next '['
                try:
                    return parse_conversation(_repair(obj))
                except InvalidConversation as e:
                    last_error = e
                    break
    if last_error is not None:
        raise last_error
    raise InvalidConversation("no_json", "no JSON array of messages found in the model's output")


def _repair(messages: list[dict]) -> list[dict]:
    """Fix what models commonly get wrong and is safe to fix: role case, a name on the assistant,
    and explicit "(silence)" messages (silence is the absence of a message)."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("role"), str):
            m["role"] = m["role"].strip().lower()
        if m.get("role") == "assistant":
            m.pop("name", None)
            content = m.get("content")
            if isinstance(content, str) and content.strip().lower().strip("()") in ("silence", ""):
                continue
            if isinstance(content, str) and content.startswith("(response)"):
                m["content"] = content[len("(response)"):].strip()
        out.append(m)
    return out


def conversation_hash(conv: Conversation) -> str:
    """Normalised text hash: case and whitespace do not make a conversation new."""
    norm = [(m.role, (m.name or "").lower(), " ".join(m.content.lower().split()))
            for m in conv.messages]
    return hashlib.sha256(json.dumps(norm).encode()).hexdigest()[:20]


# --- sources ------------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    tokens_in: int | None = None
    tokens_out: int | None = None


class RetryableError(Exception):
    """429, 5xx, timeouts and dropped connections: worth another try after a pause."""


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

    client = openai.OpenAI(api_key=_api_key("openai"), base_url=cfg.base_url,
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
        usage = r.usage
        return Completion(r.choices[0].message.content or "",
                          usage.prompt_tokens if usage else None,
                          usage.completion_tokens if usage else None)

    return complete


def replicate_source(cfg: GenerationConfig) -> Callable[[str, RequestSpec], Completion]:
    import httpx
    import replicate
    from replicate.exceptions import ModelError, ReplicateError

    client = replicate.Client(api_token=_api_key("replicate"), base_url=cfg.base_url,
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
        if p.status != "succeeded":
            raise RetryableError(f"prediction {p.id} {p.status}: {p.error}")
        out = p.output
        text = "".join(out) if isinstance(out, list) else str(out or "")
        metrics = p.metrics or {}
        return Completion(text, metrics.get("input_token_count"), metrics.get("output_token_count"))

    return complete


def offline_source(cfg: GenerationConfig) -> Callable[[str, RequestSpec], Completion]:
    from chimein.corpus import augment, load_corpus

    corpus = load_corpus()
    # originals first (in a seeded order), then augmented variants of them
    order = random.Random(cfg.seed).sample(range(len(corpus)), len(corpus))

    def complete(prompt: str, spec: RequestSpec) -> Completion:
        base = corpus[order[spec.index % len(corpus)]]
        conv = base if spec.index < len(corpus) else augment(base, spec, cfg.names)
        return Completion(json.dumps(conv.to_json(), ensure_ascii=False))

    return complete


SOURCES = {"openai": openai_source, "replicate": replicate_source, "offline": offline_source}


# --- the run ------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    source: str
    model: str
    requests: int = 0  # API calls made, retries included
    retries: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason → count
    failed: int = 0  # requests that ran out of retries (tried again on resume)
    skipped: int = 0  # requests already finished by an earlier run
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0
    total_accepted: int = 0  # in the output file, earlier runs included


class GenerationAborted(RuntimeError):
    pass


def _with_retries(fn, cfg: GenerationConfig, stats: GenerationStats, lock: threading.Lock):
    delay = cfg.backoff_s
    for attempt in range(cfg.max_retries + 1):
        with lock:
            stats.requests += 1
            stats.retries += attempt > 0
        try:
            return fn()
        except RetryableError:
            if attempt == cfg.max_retries:
                raise
            time.sleep(min(delay, cfg.backoff_max_s) * random.uniform(0.5, 1.5))  # jitter spreads retries
            delay *= 2


def generate(cfg: GenerationConfig, out: str | Path, resume: bool = False,
             on_progress: Callable[[GenerationStats], None] | None = None) -> GenerationStats:
    """Generate until `cfg.count` conversations are in `out`; see the module docstring."""
    out = Path(out)
    ledger_path = out.with_name(out.name + ".ledger")
    fingerprint = cfg.fingerprint()
    stats = GenerationStats(cfg.source, cfg.model_id)
    done: set[int] = set()
    seen: set[str] = set()
    if out.exists() or ledger_path.exists():
        if not resume:
            raise FileExistsError(f"{out} already exists; pass --resume to continue it, or choose "
                                  "another --out")
        if ledger_path.exists():
            lines = ledger_path.read_text(encoding="utf-8").splitlines()
            header = json.loads(lines[0]) if lines else {}
            if header.get("fingerprint") != fingerprint:
                raise GenerationAborted(
                    f"{out} was generated with a different config (fingerprint "
                    f"{header.get('fingerprint')} vs {fingerprint}); resume with the same source, "
                    "model, seed, prompt and lists, or choose another --out")
            done = {json.loads(x)["i"] for x in lines[1:] if x.strip()}
        if out.exists():
            seen = {conversation_hash(c) for c in load_conversations(out).conversations}
    complete = SOURCES[cfg.source](cfg)  # fails fast on a missing API key
    template = prompt_template(cfg.prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.skipped = len(done)
    stats.total_accepted = len(seen)
    max_requests = cfg.max_requests or 3 * cfg.count
    lock = threading.Lock()
    started = time.monotonic()
    # offline does no I/O: one worker keeps the output order, and so the file, reproducible
    workers = 1 if cfg.source == "offline" else cfg.concurrency

    def work(spec: RequestSpec) -> Completion:
        prompt = render_prompt(template, spec)
        return _with_retries(lambda: complete(prompt, spec), cfg, stats, lock)

    with out.open("a", encoding="utf-8") as out_f, ledger_path.open("a", encoding="utf-8") as led_f, \
            ThreadPoolExecutor(workers) as pool:
        if not done:
            led_f.write(json.dumps({"fingerprint": fingerprint, "source": cfg.source,
                                    "model": cfg.model_id, "seed": cfg.seed,
                                    "prompt": cfg.prompt if cfg.source != "offline" else "-"}) + "\n")
        indices = (i for i in range(max_requests) if i not in done)
        in_flight: dict[Future, RequestSpec] = {}

        def fill():
            while len(in_flight) < workers and stats.total_accepted + len(in_flight) < cfg.count:
                i = next(indices, None)
                if i is None:
                    return
                spec = plan_request(cfg, i)
                in_flight[pool.submit(work, spec)] = spec

        fill()
        while in_flight:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in finished:
                spec = in_flight.pop(fut)
                entry = {"i": spec.index, "seed": spec.seed}
                try:
                    completion = fut.result()
                except RetryableError:
                    stats.failed += 1  # not recorded as done: a resumed run tries it again
                    continue
                except ClientError as e:
                    if e.status in (401, 403, 404):
                        for f in in_flight:
                            f.cancel()
                        raise GenerationAborted(
                            f"{cfg.source} refused the request ({e}); check the API key and the "
                            f"model id {cfg.model_id!r}") from None
                    entry |= {"outcome": "rejected", "reason": "client_error", "detail": str(e)[:300]}
                    stats.rejected["client_error"] += 1
                else:
                    stats.tokens_in += completion.tokens_in or 0
                    stats.tokens_out += completion.tokens_out or 0
                    entry |= {"tokens_in": completion.tokens_in, "tokens_out": completion.tokens_out}
                    try:
                        conv = extract_conversation(completion.text)
                    except InvalidConversation as e:
                        entry |= {"outcome": "rejected", "reason": e.kind, "detail": e.problem[:300]}
                        stats.rejected[e.kind] += 1
                    else:
                        h = conversation_hash(conv)
                        if h in seen:
                            entry |= {"outcome": "duplicate", "hash": h}
                            stats.duplicates += 1
                        else:
                            seen.add(h)
                            out_f.write(json.dumps(conv.to_json(), ensure_ascii=False) + "\n")
                            out_f.flush()
                            entry |= {"outcome": "accepted", "hash": h}
                            stats.accepted += 1
                            stats.total_accepted += 1
                led_f.write(json.dumps(entry) + "\n")
                led_f.flush()
                if on_progress:
                    on_progress(stats)
            fill()
    stats.wall_s = round(time.monotonic() - started, 3)
    return stats


def seed_for_date(seed: int, day) -> int:
    """The generation seed of a nightly run: the run seed and the night's date, hashed, so each
    night draws new requests and the same night always draws the same ones."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{day.isoformat()}".encode()).digest()[:4], "big")
