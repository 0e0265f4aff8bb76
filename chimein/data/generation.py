"""Synthetic group-chat generation: one interface over Replicate, OpenAI-compatible servers and
the offline curated corpus; robust to messy output, rate limits and restarts.

    chimein generate --source offline --count 200 --out data/conversations.jsonl

Each request i gets its own seed derived from the run seed, and from it a topic, participant
names, group size and turn count, so a run is reproducible. Every finished request is recorded
in a ledger beside the output (`OUT.jsonl.ledger`, an accepted conversation included), then an
accepted conversation is appended to the output; each line is written whole and fsynced. A
restarted run with the same config (`resume`) skips finished requests, so no successful API call
is spent twice: it cuts off a partial last line that a kill left, and restores to the output a
conversation the ledger recorded but the output lacks. Ctrl-C waits for the requests in flight and
records them before it stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chimein.conversation import Conversation, InvalidConversation, load_conversations, parse_conversation
from chimein.data.generation_config import (
    GenerationConfig,
    RequestSpec,
    plan_request,
    prompt_template,
    render_prompt,
)
from chimein.data.providers import SOURCES, ClientError, Completion, MalformedReply, RetryableError

log = logging.getLogger(__name__)


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


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C: the requests in flight were waited for and recorded; `resume` continues the run."""

    def __init__(self, stats: GenerationStats):
        super().__init__("interrupted")
        self.stats = stats


class _Stopped(Exception):
    """Ctrl-C during a retry's pause: the request is not recorded, and a resumed run sends it."""


def _with_retries(fn, cfg: GenerationConfig, stats: GenerationStats, lock: threading.Lock,
                  stop: threading.Event):
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
            if stop.wait(min(delay, cfg.backoff_max_s) * random.uniform(0.5, 1.5)):  # jitter spreads retries
                raise _Stopped from None
            delay *= 2


# --- the files: output and ledger ---------------------------------------------------------------


def _append_line(f, obj) -> None:
    """One whole line in one write, on disk before anything else happens: a kill leaves at most a
    partial last line, which a resumed run cuts off."""
    os.write(f.fileno(), (json.dumps(obj, ensure_ascii=False) + "\n").encode())
    os.fsync(f.fileno())


def _json_object(line: bytes) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_conversation(line: bytes) -> bool:
    try:
        parse_conversation(json.loads(line))
    except (ValueError, InvalidConversation):
        return False
    return True


def _complete_lines(path: Path, valid: Callable[[bytes], bool]) -> list[bytes]:
    """The lines of a file this module appends to. A last line without its newline is the write a
    kill cut short: it is cut off the file (and reported), unless it is valid (an edited file)."""
    data = path.read_bytes()
    tail = data.rpartition(b"\n")[2]
    if tail and valid(tail):
        with path.open("ab") as f:
            f.write(b"\n")
    elif tail:
        with path.open("r+b") as f:
            f.truncate(len(data) - len(tail))
            os.fsync(f.fileno())
        log.warning("%s: cut a partial last line (%d bytes) left by an interrupted write", path, len(tail))
        data = data[:len(data) - len(tail)]
    return [x for x in data.splitlines() if x.strip()]


def _load_state(out: Path, ledger_path: Path, fingerprint: str) -> tuple[bool, set[int], set[str]]:
    """What earlier runs left: whether the ledger has its header, the requests they finished, and
    the hashes of the valid conversations in `out`. Repairs what a kill leaves behind (see
    _complete_lines), and appends to `out` an accepted conversation that the ledger recorded but
    `out` lacks."""
    objs, entries = [], []
    if ledger_path.exists():
        objs = [_json_object(x) for x in _complete_lines(ledger_path, lambda x: _json_object(x) is not None)]
        header = (objs[0] or {}) if objs else {}
        if objs and header.get("fingerprint") != fingerprint:
            raise GenerationAborted(
                f"{out} was generated with a different config (fingerprint "
                f"{header.get('fingerprint')} vs {fingerprint}); resume with the same source, "
                "model, seed, prompt and lists, or choose another --out")
        entries = [e for e in objs[1:] if e and "i" in e]
        if len(objs) - 1 > len(entries):  # e.g. a second header, written by an older version
            log.warning("%s: ignored %d line(s) that are not request entries", ledger_path,
                        len(objs) - 1 - len(entries))
    seen: set[str] = set()
    if out.exists():
        _complete_lines(out, _is_conversation)
        report = load_conversations(out)
        if report.rejected:
            log.warning("%s: %d invalid line(s) are not counted (`chimein validate %s` lists them)",
                        out, len(report.rejected), out)
        seen = {conversation_hash(c) for c in report.conversations}
    missing = [e for e in entries if e.get("outcome") == "accepted" and e["hash"] not in seen
               and "conversation" in e]
    if missing:
        with out.open("ab", buffering=0) as out_f:
            for e in missing:
                _append_line(out_f, e["conversation"])
                seen.add(e["hash"])
        log.warning("%s: restored %d conversation(s) that the ledger recorded but the file lacked",
                    out, len(missing))
    return bool(objs), {e["i"] for e in entries}, seen


# --- the run ------------------------------------------------------------------------------------


def generate(cfg: GenerationConfig, out: str | Path, resume: bool = False,
             on_progress: Callable[[GenerationStats], None] | None = None) -> GenerationStats:
    """Generate until `cfg.count` conversations are in `out`; see the module docstring. Ctrl-C
    raises GenerationInterrupted once the requests in flight are recorded."""
    out = Path(out)
    ledger_path = out.with_name(out.name + ".ledger")
    fingerprint = cfg.fingerprint()
    stats = GenerationStats(cfg.source, cfg.model_id)
    has_header, done, seen = False, set(), set()
    if out.exists() or ledger_path.exists():
        if not resume:
            raise FileExistsError(f"{out} already exists; pass --resume to continue it, or choose "
                                  "another --out")
        has_header, done, seen = _load_state(out, ledger_path, fingerprint)
    # fails fast on a missing API key, unless nothing is left to ask for (a complete file needs none)
    complete = SOURCES[cfg.source](cfg) if len(seen) < cfg.count else None
    template = prompt_template(cfg.prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.skipped = len(done)
    stats.total_accepted = len(seen)
    max_requests = cfg.max_requests or 3 * cfg.count
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()
    # offline does no I/O: one worker keeps the output order, and so the file, reproducible
    workers = 1 if cfg.source == "offline" else cfg.concurrency

    def work(spec: RequestSpec) -> Completion:
        prompt = render_prompt(template, spec)
        return _with_retries(lambda: complete(prompt, spec), cfg, stats, lock, stop)

    # Ctrl-C stops new requests and lets those in flight finish, to record what was paid for; a
    # second Ctrl-C interrupts at once. Only where Python's own handler is in place (main thread).
    previous = signal.getsignal(signal.SIGINT)
    catch_ctrl_c = (threading.current_thread() is threading.main_thread()
                    and previous is signal.default_int_handler)

    def on_ctrl_c(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)

    with out.open("ab", buffering=0) as out_f, ledger_path.open("ab", buffering=0) as led_f, \
            ThreadPoolExecutor(workers) as pool:
        if not has_header:
            _append_line(led_f, {"fingerprint": fingerprint, "source": cfg.source, "model": cfg.model_id,
                                 "seed": cfg.seed, "prompt": cfg.prompt if cfg.source != "offline" else "-"})
        if catch_ctrl_c:
            signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            indices = (i for i in range(max_requests) if i not in done)
            in_flight: dict[Future, RequestSpec] = {}

            def fill():
                while (not stop.is_set() and len(in_flight) < workers
                       and stats.total_accepted + len(in_flight) < cfg.count):
                    i = next(indices, None)
                    if i is None:
                        return
                    spec = plan_request(cfg, i)
                    in_flight[pool.submit(work, spec)] = spec

            fill()
            told = False
            while in_flight:
                finished, _ = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
                if stop.is_set() and not told:
                    log.warning("interrupted: recording the %d requests in flight before stopping (Ctrl-C "
                                "again to abandon them: a resumed run pays for them again)", len(in_flight))
                    told = True
                for fut in finished:
                    spec = in_flight.pop(fut)
                    entry = {"i": spec.index, "seed": spec.seed}
                    conv = None
                    try:
                        completion = fut.result()
                    except _Stopped:
                        continue
                    except MalformedReply as e:
                        entry |= {"outcome": "rejected", "reason": "malformed_reply", "detail": str(e)[:300]}
                        stats.rejected["malformed_reply"] += 1
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
                                conv = None
                            else:
                                seen.add(h)
                                entry |= {"outcome": "accepted", "hash": h, "conversation": conv.to_json()}
                                stats.accepted += 1
                                stats.total_accepted += 1
                    # the ledger line is what makes a request done; a kill before the output line
                    # is repaired on resume from the conversation in it
                    _append_line(led_f, entry)
                    if conv is not None:
                        _append_line(out_f, entry["conversation"])
                    if on_progress:
                        on_progress(stats)
                fill()
        finally:
            if catch_ctrl_c:
                signal.signal(signal.SIGINT, previous)
    stats.wall_s = round(time.monotonic() - started, 3)
    if stop.is_set() and stats.total_accepted < cfg.count:
        raise GenerationInterrupted(stats)
    return stats


def seed_for_date(seed: int, day) -> int:
    """The generation seed of a nightly run: the run seed and the night's date, hashed, so each
    night draws new requests and the same night always draws the same ones."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{day.isoformat()}".encode()).digest()[:4], "big")
