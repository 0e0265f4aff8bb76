"""What a generation run asks for: its settings (source, model, count, sampling; the flows'
`generation` parameter), the lists of topics and names, and each request's own plan (topic,
participants, group size, turns, seed) and prompt, derived from the run seed so a run is
reproducible."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from chimein.paths import conf_dir

DEFAULT_MODELS = {
    "replicate": "mistralai/mixtral-8x7b-instruct-v0.1",  # as in the original article
    "openai": "gpt-4o-mini",
    "offline": "chimein-curated-corpus",
}
API_KEYS = {"openai": "OPENAI_API_KEY", "replicate": "REPLICATE_API_TOKEN"}



# What a generation run chooses: the flows' `generation` parameter, one group of the Prefect run
# form (so its title, docstring and descriptions are written for the person filling it in).
# GenerationConfig adds the topic and name lists and the tuning, from conf/generation/default.yaml.
class GenerationSettings(BaseModel):
    """Where the training conversations come from and how many are made."""

    model_config = ConfigDict(extra="forbid", title="Conversation settings")

    source: Literal["offline", "openai", "replicate"] = Field(
        "offline", title="Source", description="offline: the curated corpus, augmented (no key, no "
        "network); openai: any OpenAI-compatible server; replicate: Replicate's API."
    )
    count: int = Field(300, gt=0, title="Number of conversations", description="Accepted conversations to "
                       "make (300: what the offline-cpu training config's steps are sized for).")
    seed: int = Field(0, title="Seed", description="The same seed makes the same conversations.")
    grounded: float = Field(0.0, ge=0, le=0.5, title="Share of grounded chats", description="offline: this "
                            "share of the conversations are grounded chats, about an invented organisation "
                            "with passages of its documents, so the model learns to answer from them "
                            "(chimein.data.grounded). 0 (default): none; 0.1 doubled the small CPU model's "
                            "right answers from documents but cost 0.02-0.045 of its benchmark decisions.")
    noise: float = Field(0.5, ge=0, le=1, title="Share of noisy chats", description="offline: this share of "
                         "the conversations gets the noise of real chats at silent turns: questions to a person "
                         "by nickname and their answer, other bots' commands, links and pasted logs, one-word "
                         "lines from newcomers (chimein.data.noise). 0.5 (default): false interruptions on the "
                         "benchmark's realistic-noise slice 0.080 -> 0.040 at the same balanced accuracy. 0: none.")
    feedback: str = Field("", title="Feedback from live chats", description="A folder of recordings that "
                          "`chimein bridge matrix` made in rooms that agreed to it (--record-dir): its conversations, "
                          "labelled by how the rooms answered the assistant, are added to the generated ones "
                          "(chimein.data.feedback). The dataset card and the MLflow run count each source. "
                          "Empty: none.")
    model: str = Field("", title="Generator model", description="The model that writes the "
                       "conversations. Empty: the source's default (openai: "
                       f"{DEFAULT_MODELS['openai']}, replicate: {DEFAULT_MODELS['replicate']}).")
    base_url: str = Field(
        "", title="API base URL", description="Any OpenAI-compatible server (vLLM, Ollama, "
        "llama.cpp) or a Replicate-compatible one. Empty: the client's (OPENAI_BASE_URL / "
        "REPLICATE_BASE_URL, else the provider's)."
    )

    @field_validator("model", "base_url", "feedback", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return "" if v is None else v  # configs and API callers written before the fields had defaults


class GenerationConfig(GenerationSettings):
    """How to generate conversations. conf/generation/default.yaml holds the topic and name lists."""

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
        keys = ("source", "seed", "grounded", "noise", "prompt", "topics", "names", "group_size", "turns", "temperature",
                "max_tokens")
        data = {k: getattr(self, k) for k in keys} | {"model": self.model_id,
                                                       "prompt_text": prompt_template(self.prompt)}
        if self.source == "offline":  # what it makes is the corpus and the code that augments and grounds
            from chimein.data.corpus import offline_version

            data["offline"] = offline_version()
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
