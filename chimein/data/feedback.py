"""Feedback from live chats: what the Matrix bridge records in the rooms that agreed to it, and the
conversations with implicit labels that training learns from.

    recorder = Recorder(record_dir, retention_days=30)   # the bridge writes through it
    report = load_feedback(record_dir)                   # -> conversations, labels, skipped

A room records only after `/chimein record on` (announced in the room; off by default). Personal
data is scrubbed before anything is written (`scrub`): email addresses, phone numbers, links that
carry keys or tokens, and Matrix user ids. Files older than the retention are deleted
(`Recorder.prune`).

Layout: RECORD_DIR/<room hash>/<YYYY-MM-DD>.jsonl, one event per line:

    {"type": "message", "id": "$e", "ts": 1700000000000, "thread": null, "name": "Ann",
     "text": "…", "assistant": false, "addressed": false}
    {"type": "reaction", "id": "$r", "ts": …, "target": "$e", "key": "👎"}

Labels (`load_feedback`), from how the room answered the assistant:
- interruption: a reply that got a 👎 (or ❌, 🙅, 🤫) reaction, or "not now, bot" and the like in
  one of the two messages after it. The reply is removed, so the turn becomes silence, and the
  "not now" line is dropped.
- missed: the assistant stayed silent, then someone poked it ("@bot??", "bot?"). The poke is
  dropped, so the reply it then gave follows the message it should have answered.
- confirmed: a reply that got ✅, 👍, 🙏 or ❤️. It is kept.
- unrated: any other reply (but the one a poke got). It is kept as the assistant said it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from chimein.conversation import Conversation, InvalidConversation, parse_conversation

NEGATIVE = {"👎", "👎🏻", "👎🏼", "👎🏽", "👎🏾", "👎🏿", "❌", "🙅", "🙅‍♂️", "🙅‍♀️", "🤫"}
POSITIVE = {"✅", "✔️", "👍", "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "🙏", "❤️", "💯"}
NOT_NOW = re.compile(r"\b(not now|nobody asked|no one asked|shut up|be quiet|stop talking|go away|not you)\b"
                     r"|没问你|不用你|别说了|闭嘴|安静", re.IGNORECASE)
# a message that only calls the assistant: its name (or a mention) and question marks or a hello
POKE = re.compile(r"^\s*@?(bot|chimein|assistant|助手|机器人)\b[\s,:：，]*(\?+|？+|hello\??|hey\??|hallo\??|"
                  r"anyone\??|you there\??|在吗[？?]*)?\s*[?？!！]*\s*$", re.IGNORECASE)
GAP_S = 3600  # a new conversation after an hour without messages
MAX_USER_MESSAGES = 30  # per conversation (as `chimein import`)

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w/])\+?\d[\d\s().-]{6,}\d(?![\w/])")
_KEYED_LINK = re.compile(r"https?://\S*[?&#](token|key|sig|signature|auth|access_token|code|password|pwd|secret|"
                         r"session|sid|apikey|api_key)=\S*", re.IGNORECASE)
_MXID = re.compile(r"@([\w.=-]+):[\w.-]+(:\d+)?")


def scrub(text: str) -> str:
    """`text` without personal data: emails, phone numbers and links with keys or tokens become
    [email], [phone], [link]; a Matrix id @ann:example.org becomes @ann."""
    text = _KEYED_LINK.sub("[link]", text)
    text = _EMAIL.sub("[email]", text)
    text = _MXID.sub(r"@\1", text)
    return _PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m.group()) >= 7 else m.group(), text)


def room_folder(room_id: str) -> str:
    """A room's folder name: a hash, so the room's address is not in the path."""
    return hashlib.sha256(room_id.encode()).hexdigest()[:16]


class Recorder:
    """Writes the recorded rooms' events (scrubbed) under `root`, a file per room and UTC day."""

    def __init__(self, root: Path, retention_days: float = 30):
        self.root, self.retention_days = Path(root), retention_days

    def _write(self, room_id: str, ts_ms: int, record: dict) -> None:
        day = datetime.fromtimestamp(ts_ms / 1000, timezone.utc).strftime("%Y-%m-%d")
        folder = self.root / room_folder(room_id)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{day}.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def message(self, room_id: str, event_id: str, ts_ms: int, name: str, text: str, assistant: bool = False,
                thread: str | None = None, addressed: bool = False) -> None:
        self._write(room_id, ts_ms, {"type": "message", "id": event_id, "ts": ts_ms, "thread": thread,
                                     "name": scrub(name), "text": scrub(text), "assistant": assistant,
                                     "addressed": addressed})

    def reaction(self, room_id: str, event_id: str, ts_ms: int, target: str, key: str) -> None:
        self._write(room_id, ts_ms, {"type": "reaction", "id": event_id, "ts": ts_ms, "target": target,
                                     "key": key[:32]})

    def forget(self, room_id: str) -> bool:
        """Delete everything recorded in a room; whether there was anything."""
        folder = self.root / room_folder(room_id)
        existed = folder.exists()
        shutil.rmtree(folder, ignore_errors=True)
        return existed

    def prune(self, now: float | None = None) -> int:
        """Delete the day files older than the retention; how many."""
        cutoff = (now if now is not None else time.time()) - self.retention_days * 86400
        gone = 0
        for f in self.root.glob("*/*.jsonl"):
            try:
                day = datetime.strptime(f.stem, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
            except ValueError:
                continue
            if day + 86400 <= cutoff:  # the whole day is past the retention
                f.unlink()
                gone += 1
        return gone


@dataclass
class FeedbackReport:
    conversations: list[Conversation] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)  # interruption, missed, confirmed, unrated
    skipped: Counter = field(default_factory=Counter)  # reason -> lines
    rooms: int = 0


def load_feedback(root: str | Path) -> FeedbackReport:
    """The recorded rooms as conversations, labelled by how the room answered the assistant (see
    the module's doc); unreadable lines and dropped messages are counted with their reason."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no recordings folder {root}: the bridge writes one with --record-dir "
                                "once a room says /chimein record on")
    report = FeedbackReport()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        events = []
        for f in sorted(folder.glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    ev = json.loads(line)
                    if ev["type"] not in ("message", "reaction"):
                        raise KeyError("type")
                    events.append(ev)
                except (ValueError, KeyError, TypeError):
                    report.skipped["unreadable line"] += 1
        if events:
            report.rooms += 1
            _room(events, report)
    return report


def _room(events: list[dict], report: FeedbackReport) -> None:
    events.sort(key=lambda e: e.get("ts", 0))
    reactions: dict[str, set[str]] = {}
    for ev in events:
        if ev["type"] == "reaction":
            reactions.setdefault(ev.get("target"), set()).add(ev.get("key", ""))
    threads: dict[str | None, list[dict]] = {}
    for ev in events:
        if ev["type"] == "message" and isinstance(ev.get("text"), str):
            threads.setdefault(ev.get("thread"), []).append(ev)
    for timeline in threads.values():
        labelled = _labelled(timeline, reactions, report)
        for chunk in _chunks(labelled):
            try:
                report.conversations.append(parse_conversation(chunk))
            except InvalidConversation as e:
                report.skipped[f"conversation rejected ({e.kind})"] += 1


def _labelled(timeline: list[dict], reactions: dict[str, set[str]], report: FeedbackReport) -> list[tuple]:
    """(ts, message dict) in order, with the labels applied."""
    out: list[tuple[int, dict]] = []
    drop: set[int] = set()
    answers_poke = -1  # the index of the reply a poke got: labelled `missed`, not `unrated`
    for i, ev in enumerate(timeline):
        if i in drop:
            report.skipped["'not now' line after an interruption"] += 1
            continue
        ts = ev.get("ts", 0)
        if ev.get("assistant"):
            keys = reactions.get(ev.get("id"), set())
            after = [j for j in range(i + 1, min(i + 3, len(timeline))) if not timeline[j].get("assistant")]
            told_off = [j for j in after if NOT_NOW.search(timeline[j]["text"])]
            if keys & NEGATIVE or told_off:
                report.labels["interruption"] += 1
                drop.update(told_off)
                continue
            if i != answers_poke:
                report.labels["confirmed" if keys & POSITIVE else "unrated"] += 1
            out.append((ts, {"role": "assistant", "content": ev["text"]}))
            continue
        if POKE.match(ev["text"]) and out and out[-1][1]["role"] == "user":
            nxt = timeline[i + 1] if i + 1 < len(timeline) else None
            report.labels["missed"] += 1
            if nxt and nxt.get("assistant"):
                answers_poke = i + 1
            else:
                report.skipped["poke without a reply"] += 1
            continue  # the reply it got now follows the message it should have answered
        out.append((ts, {"role": "user", "name": ev.get("name") or "someone", "content": ev["text"]}))
    return out


def _chunks(labelled: list[tuple[int, dict]]) -> list[list[dict]]:
    """Conversations: a new one after GAP_S without messages or MAX_USER_MESSAGES user messages;
    replies joined into one turn; no conversation starts with the assistant or lacks a user."""
    chunks: list[list[dict]] = []
    last_ts = None
    for ts, m in labelled:
        users = sum(x["role"] == "user" for x in chunks[-1]) if chunks else 0
        if not chunks or (last_ts is not None and ts - last_ts > GAP_S * 1000) or \
                (m["role"] == "user" and users >= MAX_USER_MESSAGES):
            chunks.append([])
        last_ts = ts
        cur = chunks[-1]
        if m["role"] == "assistant":
            if not cur:
                continue
            if cur[-1]["role"] == "assistant":
                cur[-1] = {**cur[-1], "content": cur[-1]["content"] + "\n" + m["content"]}
                continue
        cur.append(m)
    return [c for c in chunks if any(m["role"] == "user" for m in c)]


def merge_feedback(generated: str | Path, feedback_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """The generated conversations followed by the recorded rooms' (load_feedback), in one JSON
    Lines file beside `generated` (or in `out_dir`), named by both contents. `FILE.sources.json`
    beside it says how many came from each source, the feedback's labels and skipped lines, and
    the generated part's lineage; the dataset build reads it (dataset card, MLflow input)."""
    from chimein.data.dataset import lineage

    generated = Path(generated)
    report = load_feedback(feedback_dir)
    gen_lines = [line for line in generated.read_text(encoding="utf-8").splitlines() if line.strip()]
    fb_lines = [json.dumps(c.to_json(), ensure_ascii=False) for c in report.conversations]
    digest = hashlib.sha256("\n".join(fb_lines).encode()).hexdigest()[:12]
    out = Path(out_dir or generated.parent) / f"{generated.stem}+feedback-{digest}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    tmp.write_text("".join(line + "\n" for line in gen_lines + fb_lines), encoding="utf-8")
    origin = lineage(generated)
    sidecar = {"sources": {origin["source"]: len(gen_lines), "feedback": len(fb_lines)},
               "feedback": {"folder": str(Path(feedback_dir).resolve()), "rooms": report.rooms,
                            "labels": dict(report.labels), "skipped": dict(report.skipped)},
               "lineage": origin}
    out.with_name(out.name + ".sources.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False),
                                                         encoding="utf-8")
    tmp.replace(out)
    return out
