"""Chat exports → conversations: a group's own history, from where it already talks.

    result = import_chat("slack", "export.zip", assistant="U024BE7LH", channel="general")
    result.conversations, result.skipped, result.speakers

One parser per format turns its export into streams of messages (a channel's timeline, or one
thread); `_conversations` then applies the same rules to every format:

- **Who is who.** The account named by `assistant` (an id, a user name or a display name) becomes
  the assistant; everyone else is a user, named by their display name where the export has one
  (normalised with `normalize_name`). An assistant that never speaks in the file is an error that
  lists the top speakers found.
- **Threads** (Matrix `m.thread`, Slack `thread_ts`) become conversations of their own: the root
  message and its replies, taken out of the channel's timeline (a root answered in its thread would
  otherwise be a silent turn in the timeline). Discord threads are separate files of
  DiscordChatExporter: pass the folder to import a channel and its threads at once; a Discord
  reply keeps its place in the timeline.
- **Splitting.** A new conversation starts after `gap_minutes` without a message (not inside a
  thread: a reply a day later still answers its thread), and before the user message that would
  exceed `max_messages` user messages (each one a decision point; the default of 30 keeps a
  conversation of short chat lines within the presets' 1024 tokens, so preprocessing does not cut
  its end off). A conversation left with no user message is dropped (`no_user_message`, counted
  in conversations); one where the assistant never spoke is kept: it is all silence, real data.
- **The assistant's turns.** Consecutive assistant messages become one turn (joined by newlines),
  as the format has at most one assistant turn after each user message. An assistant message
  before its conversation's first user message is dropped (`assistant_first`), and so is the
  assistant's reply to a message that was dropped (`reply_to_skipped`): kept, it would answer
  the wrong message.
- **Dropped messages**, each counted under its reason (`REASONS`): other bots' messages (Matrix
  `m.notice`, Slack `bot_message`/bot users, Discord `isBot`; the assistant's own are kept whatever
  their kind); bot commands (a first word such as `!help`, `/giphy`, `.weather`: `!`, `/` or `.`
  then a lowercase letter), kept as user messages with `keep_commands`; system events (joins,
  leaves, topic changes, pins, reactions, membership and other state); edits (the original text is
  kept); deleted messages; attachments, stickers and embeds without text; empty messages; lines of
  a text log that are no message of its format (`unparsed`).
- **Actions** (`/me waves`: Matrix `m.emote`, Slack `me_message`, IRC `* nick waves`) are kept as
  the user's message `*waves*`.
- **Over-long messages** are truncated to `MAX_MESSAGE_CHARS` (ending in "…") and counted in
  `truncated`, not dropped: dropping one would move the assistant's answer onto another message.
- Every conversation written is checked by `parse_conversation`, so the output loads with
  `load_conversations` and passes `chimein validate`.

Per format, what is read: `matrix` Element's JSON export (`{"room_name", "messages": [events]}`),
a JSON list of events or JSON Lines of events (rich-reply fallbacks `> <@x:y> …` stripped to the
reply; display names from membership events); `slack` the export folder or .zip (`users.json`,
one folder per channel of day files; `<@U123>` mentions become `@name`); `discord`
DiscordChatExporter JSON, one file or a folder of them; `irc` text logs (`[12:34] <nick> hi`,
`[12:34:56] <nick> hi`, `12:34 <nick> hi`, weechat's `2024-01-02 12:34:56<TAB>nick<TAB>hi`, HexChat's
`Jan 02 12:34:56 <nick> hi`; irssi's day-change and HexChat's logging lines carry the date, otherwise
a clock going backwards starts a new day);
`whatsapp` the "Export chat" text (or the .zip with it), Android (`12/31/23, 9:41 PM - Name: hi`)
or iOS (`[31/12/2023, 21:41:05] Name: hi`), continuation lines joined (day or month first decided
from the whole file).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from chimein.conversation import MAX_MESSAGE_CHARS, Conversation, normalize_name, parse_conversation

FORMATS = ("matrix", "slack", "discord", "irc", "whatsapp")
DEFAULT_GAP_MINUTES = 60.0
DEFAULT_MAX_MESSAGES = 30  # user messages per conversation; ~30 short chat lines fit 1024 tokens

REASONS = {
    "system": "system and state events: joins, leaves, topic or name changes, pins, reactions, calls",
    "encrypted": "end-to-end encrypted events (export from a client that decrypts them, e.g. Element)",
    "edit": "edits of earlier messages (the original text is kept)",
    "deleted": "deleted or redacted messages, and the deletions themselves",
    "media": "attachments, images, stickers or embeds without text",
    "bot": "other bots' messages (the assistant's own are kept)",
    "command": "bot commands (!help, /giphy, .weather …); --keep-commands keeps them",
    "empty": "messages with no text",
    "unparsed": "lines that are no message of the format",
    "assistant_first": "the assistant speaking before its conversation's first user message",
    "reply_to_skipped": "the assistant's reply to a dropped message (it would answer the wrong one)",
    "no_user_message": "conversations (not messages) left with no user message",
}

WHAT = {
    "matrix": "a Matrix room export",
    "slack": "a Slack export",
    "discord": "DiscordChatExporter JSON",
    "irc": "an IRC log",
    "whatsapp": "a WhatsApp chat export",
}

HOW = {
    "matrix": "Element's JSON export (Room info → Export chat → Format: JSON), a JSON list of events or "
              "JSON Lines of events",
    "slack": "the export's .zip or its unzipped folder, with users.json, channels.json and one folder "
             "of day files per channel (Workspace settings → Import/Export data → Export)",
    "discord": "a JSON file of DiscordChatExporter (--format Json), or a folder of them",
    "irc": "a text log with lines like `[12:34] <nick> message`, `12:34 <nick> message`, weechat's "
           "`2024-01-02 12:34:56<TAB>nick<TAB>message` or HexChat's `Jan 02 12:34:56 <nick> message`",
    "whatsapp": "the .txt (or .zip) of WhatsApp's Export chat, with lines like "
                "`12/31/23, 9:41 PM - Name: message` or `[31/12/2023, 21:41:05] Name: message`",
}

COMMAND = re.compile(r"[!/.][a-z][\w-]*(\s|$)")  # !help, /giphy cats, .weather; not ".NET", "/r/x"


class ChatImportError(ValueError):
    """The file cannot be imported as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Speaker:
    id: str  # the account: Matrix user id, Slack user or bot id, Discord author id, nick or name
    name: str  # its display name as the export has it
    aliases: tuple[str, ...] = ()  # other names `assistant` may be given as

    @property
    def label(self) -> str:
        return self.name if self.name == self.id else f"{self.name} ({self.id})"


@dataclass(frozen=True)
class ChatMessage:
    speaker: Speaker
    text: str
    time: datetime | None
    is_bot: bool = False
    skip: str | None = None  # a reason of REASONS the parser found (media, deleted)
    in_thread: bool = False  # a thread is one topic: no gap splits it


@dataclass
class ImportResult:
    conversations: list[Conversation]
    skipped: Counter[str] = field(default_factory=Counter)  # reason (a key of REASONS) → count
    speakers: Counter[str] = field(default_factory=Counter)  # speaker label → messages, as found
    assistant: str = ""  # the label of the account that became the assistant
    truncated: int = 0  # messages cut to MAX_MESSAGE_CHARS

    @property
    def messages(self) -> int:
        return sum(c.n_user for c in self.conversations)

    @property
    def assistant_turns(self) -> int:
        return sum(c.n_speak for c in self.conversations)


def import_chat(fmt: str, path: str | Path, assistant: str, *, gap_minutes: float = DEFAULT_GAP_MINUTES,
                max_messages: int = DEFAULT_MAX_MESSAGES, keep_commands: bool = False,
                channel: str | None = None) -> ImportResult:
    """Read one export of `fmt` (see FORMATS) into conversations, with `assistant` as the assistant.

    channel: slack only, import this channel (default all). Raises ChatImportError.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ChatImportError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
    if channel is not None and fmt != "slack":
        raise ChatImportError("--channel picks a channel of a Slack export; a(n) "
                              f"{fmt} export is one channel already")
    if gap_minutes <= 0 or max_messages < 1:
        raise ChatImportError("gap_minutes must be above 0 and max_messages at least 1")
    if not path.exists():
        raise ChatImportError(f"{path}: no such file or folder")
    if path.is_dir() and fmt not in ("slack", "discord"):
        raise _wrong(path, fmt, "it is a folder")
    skipped: Counter = Counter()
    streams = _slack(path, skipped, channel) if fmt == "slack" else PARSERS[fmt](path, skipped)

    speakers: dict[str, Speaker] = {}
    counts: Counter = Counter()
    for m in (m for stream in streams for m in stream):
        speakers.setdefault(m.speaker.id, m.speaker)
        counts[m.speaker.id] += 1
    if not counts:
        raise ChatImportError(f"{path}: no messages in it, only "
                              + (", ".join(f"{n} {k}" for k, n in skipped.most_common()) or "nothing"))
    me = _find_assistant(assistant, speakers, counts, f"{path} (channel {channel})" if channel else str(path))
    conversations, truncated = [], 0
    for stream in streams:
        convs, cut = _conversations(stream, me, timedelta(minutes=gap_minutes), max_messages,
                                    keep_commands, skipped)
        conversations += convs
        truncated += cut
    return ImportResult(conversations, skipped,
                        Counter({speakers[i].label: n for i, n in counts.items()}), me.label, truncated)


def write_conversations(conversations: list[Conversation], out: Path) -> None:
    """JSON Lines, one conversation per line (the format `load_conversations` reads)."""
    with out.open("w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")


# --- the rules every format shares -----------------------------------------------------------

def _find_assistant(given: str, speakers: dict[str, Speaker], counts: Counter, where: str) -> Speaker:
    """The speaker `given` names: by id, else by name or alias (case-insensitive, normalised)."""
    if given in speakers:
        return speakers[given]
    key = normalize_name(given.removeprefix("@")).casefold()
    matches = [s for s in speakers.values()
               if key and key in {normalize_name(n.removeprefix("@")).casefold()
                                  for n in (s.id, s.name, *s.aliases) if n}]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ChatImportError(f"--assistant {given!r} names several accounts in {where}: "
                              f"{', '.join(s.label for s in matches)}; pass the id of the one meant")
    top = ", ".join(f"{speakers[i].label} ({n})" for i, n in counts.most_common(10))
    raise ChatImportError(f"--assistant {given!r} never speaks in {where}; its top speakers "
                          f"(messages): {top}. Pass one of these ids or names.")


def _clean(text: str) -> str:
    text = text.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a broken export: not text a tokenizer takes
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _bounded(text: str) -> tuple[str, bool]:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text, False
    return text[:MAX_MESSAGE_CHARS - 1].rstrip() + "…", True


def _conversations(stream: list[ChatMessage], me: Speaker, gap: timedelta, max_messages: int,
                   keep_commands: bool, skipped: Counter) -> tuple[list[Conversation], int]:
    """One stream of messages (a timeline or a thread) → conversations; see the module's rules."""
    out: list[Conversation] = []
    turns: list[dict] = []
    seen = False  # a message of any kind since the last split
    n_user = truncated = 0
    dropped = False  # the last message from a user was dropped
    last: datetime | None = None

    def close() -> None:
        nonlocal turns, seen, n_user, dropped
        if turns:
            out.append(parse_conversation(turns))  # raises if a rule above let a bad one through
        elif seen:
            skipped["no_user_message"] += 1
        turns, seen, n_user, dropped = [], False, 0, False

    for m in stream:
        if m.time is not None and not m.in_thread:
            if last is not None and m.time - last > gap:
                close()
            last = m.time
        seen = True
        mine = m.speaker.id == me.id
        text = _clean(m.text)
        reason = m.skip or (
            None if mine else "bot" if m.is_bot
            else "command" if not keep_commands and COMMAND.match(text) else None
        ) or (None if text else "empty")
        if reason:
            skipped[reason] += 1
            dropped = dropped or not mine
            continue
        if not mine:
            if n_user == max_messages:
                close()
            text, cut = _bounded(text)
            truncated += cut
            name = normalize_name(m.speaker.name) or normalize_name(m.speaker.id) or "someone"
            turns.append({"role": "user", "name": name, "content": text})
            n_user += 1
            dropped = False
        elif dropped:
            skipped["reply_to_skipped"] += 1
        elif not n_user:
            skipped["assistant_first"] += 1
        elif turns[-1]["role"] == "assistant":
            turns[-1]["content"], cut = _bounded(turns[-1]["content"] + "\n" + text)
            truncated += cut
        else:
            text, cut = _bounded(text)
            truncated += cut
            turns.append({"role": "assistant", "content": text})
    close()
    return out, truncated


# --- reading files, and telling a wrong format apart ----------------------------------------

def _wrong(path: Path, fmt: str, detail: str) -> ChatImportError:
    guess = _guess(path)
    if guess == "chimein":
        return ChatImportError(f"{path}: this is already in chimein's conversation format (JSON Lines "
                               "of conversations), no import needed: check it with `chimein validate`")
    if guess and guess != fmt:
        return ChatImportError(f"{path}: this looks like {WHAT[guess]}, not {WHAT[fmt]}: use "
                               f"`chimein import {guess}`")
    return ChatImportError(f"{path}: not {WHAT[fmt]} ({detail}); expected {HOW[fmt]}")


def _guess(path: Path) -> str | None:
    """Which format a file looks like, from its first 64 KiB; None if none."""
    try:
        if path.is_dir():
            if (path / "users.json").is_file() or (path / "channels.json").is_file():
                return "slack"
            first = next(iter(sorted(path.glob("*.json"))), None)
            return _guess(first) if first else None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = {n.rsplit("/", 1)[-1] for n in z.namelist()}
            return ("slack" if names & {"users.json", "channels.json"}
                    else "whatsapp" if "_chat.txt" in names else None)
        with path.open("rb") as f:
            head = f.read(65536).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    except OSError:
        return None
    lines = head.splitlines()[:200]
    whatsapp = sum(bool(_WA_ANDROID.match(line) or _WA_IOS.match(line)) for line in lines)
    irc = sum(_irc_parse(line)[0] == "say" for line in lines)
    if whatsapp or irc:  # before JSON: "[12:34] <nick> hi" starts like a JSON array
        return "whatsapp" if whatsapp >= irc else "irc"
    if not head.startswith(("{", "[")):
        return None
    if '"guild"' in head and '"messages"' in head:
        return "discord"
    if '"origin_server_ts"' in head or '"room_name"' in head:
        return "matrix"
    if '"role"' in head and '"content"' in head:
        return "chimein"
    return "slack" if '"ts"' in head and '"type"' in head else None


def _decode(data: bytes, path: Path | str, fmt: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        if _guess(Path(path)) not in (None, fmt, "chimein"):  # a .zip given as a text log, say
            raise _wrong(Path(path), fmt, "not text") from None
        raise ChatImportError(f"{path}: not UTF-8 text (byte {e.start} is invalid); {WHAT[fmt]} is "
                              "UTF-8: export it again, or convert it (iconv -f LATIN1 -t UTF-8)") from None


def _json(data: bytes, path: Path | str, fmt: str):
    try:
        return json.loads(_decode(data, path, fmt))
    except json.JSONDecodeError as e:
        raise _wrong(Path(path), fmt, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _when(seconds) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(seconds), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


# --- matrix ---------------------------------------------------------------------------------

def _matrix_events(path: Path) -> list[dict]:
    text = _decode(path.read_bytes(), path, "matrix")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []  # JSON Lines: one event per line
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise _wrong(path, "matrix", f"line {lineno} is not JSON: {e.msg}") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(
            isinstance(e, dict) and isinstance(e.get("type"), str) and "sender" in e for e in data):
        raise _wrong(path, "matrix", "no list of events with a 'type' and a 'sender'")
    return data


def _localpart(user_id: str) -> str:
    return user_id.removeprefix("@").split(":", 1)[0]


def strip_reply_fallback(body: str) -> str:
    """'> <@x:y> quoted\\n> more\\n\\nreply' → 'reply' (the quote a client adds to a rich reply)."""
    if not body.startswith("> <"):
        return body
    lines = body.split("\n")
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    return "\n".join(lines[i:]).strip()


def _matrix(path: Path, skipped: Counter) -> list[list[ChatMessage]]:
    events = _matrix_events(path)
    names = {e.get("state_key"): e["content"]["displayname"] for e in events
             if e["type"] == "m.room.member" and isinstance(e.get("content"), dict)
             and isinstance(e["content"].get("displayname"), str)}
    roots = {(e.get("content") or {}).get("m.relates_to", {}).get("event_id") for e in events
             if isinstance(e.get("content"), dict) and isinstance(e["content"].get("m.relates_to"), dict)
             and e["content"]["m.relates_to"].get("rel_type") == "m.thread"} - {None}
    main: list[ChatMessage] = []
    threads: dict[str, list[ChatMessage]] = {}
    for e in events:
        kind = e["type"]
        content = e.get("content") if isinstance(e.get("content"), dict) else {}
        relation = content.get("m.relates_to") if isinstance(content.get("m.relates_to"), dict) else {}
        if kind == "m.room.redaction":
            skipped["deleted"] += 1
            continue
        if kind == "m.room.encrypted":
            skipped["encrypted"] += 1
            continue
        if kind not in ("m.room.message", "m.sticker"):
            skipped["system"] += 1
            continue
        if relation.get("rel_type") == "m.replace":
            skipped["edit"] += 1
            continue
        sender = str(e.get("sender") or "unknown")
        speaker = Speaker(sender, names.get(sender) or _localpart(sender), (_localpart(sender),))
        msgtype, body = content.get("msgtype"), content.get("body")
        skip = None
        if not content or "redacted_because" in (e.get("unsigned") or {}):
            skip = "deleted"
        elif kind == "m.sticker" or msgtype not in ("m.text", "m.notice", "m.emote") \
                or not isinstance(body, str):
            skip = "media"
        text = strip_reply_fallback(body) if isinstance(body, str) else ""
        if msgtype == "m.emote" and text.strip():
            text = f"*{text.strip()}*"
        ts = e.get("origin_server_ts")
        thread = relation.get("event_id") if relation.get("rel_type") == "m.thread" else e.get("event_id")
        msg = ChatMessage(speaker, text, _when(ts / 1000) if isinstance(ts, (int, float)) else None,
                          is_bot=msgtype == "m.notice", skip=skip, in_thread=thread in roots)
        (threads.setdefault(thread, []) if thread in roots else main).append(msg)
    return [main, *threads.values()]


# --- slack ----------------------------------------------------------------------------------

def _slack_files(path: Path) -> dict[str, Callable[[], bytes]]:
    """The export's JSON files by path inside it ('users.json', 'general/2024-01-02.json')."""
    if path.is_dir():
        files = [*path.glob("*.json"), *path.glob("*/*.json")]
        return {f.relative_to(path).as_posix(): f.read_bytes for f in files}
    if not zipfile.is_zipfile(path):
        raise _wrong(path, "slack", "neither a folder nor a .zip")
    z = zipfile.ZipFile(path)
    names = [n for n in z.namelist() if n.endswith(".json")]
    tops = [n.rpartition("/")[0] + "/" for n in names
            if n.rsplit("/", 1)[-1] in ("users.json", "channels.json") and "/" in n]
    tops = [] if any(n in ("users.json", "channels.json") for n in names) else tops
    top = min(tops, key=len) if tops else ""  # an export zipped inside a folder
    return {n.removeprefix(top): (lambda n=n: z.read(n)) for n in names if n.startswith(top)}


def _slack(path: Path, skipped: Counter, channel: str | None) -> list[list[ChatMessage]]:
    files = _slack_files(path)
    if "users.json" not in files and "channels.json" not in files:
        raise _wrong(path, "slack", "no users.json or channels.json at its top; pass the export's top "
                                    "folder, not a channel's")
    users = {}
    if "users.json" in files:
        data = _json(files["users.json"](), f"{path}/users.json", "slack")
        users = {u["id"]: u for u in (data if isinstance(data, list) else [])
                 if isinstance(u, dict) and "id" in u}
    channels = sorted({n.split("/")[0] for n in files if n.count("/") == 1})
    if channel is not None:
        if channel.removeprefix("#") not in channels:
            raise ChatImportError(f"no channel {channel!r} in {path}; its channels: "
                                  f"{', '.join(channels) or 'none'}")
        channels = [channel.removeprefix("#")]
    streams = []
    for ch in channels:
        messages = []
        for name in sorted(n for n in files if n.startswith(ch + "/")):
            data = _json(files[name](), f"{path}/{name}", "slack")
            if not isinstance(data, list):
                raise ChatImportError(f"{path}/{name}: a Slack day file is a JSON list of messages, got "
                                      f"{type(data).__name__}")
            messages += [m for m in data if isinstance(m, dict)]
        streams += _slack_channel(messages, users, skipped)
    return streams


def _slack_name(user: dict) -> str:
    profile = user.get("profile") or {}
    return (profile.get("display_name") or profile.get("real_name") or user.get("real_name")
            or user.get("name") or user.get("id") or "")


_SLACK_LINK = re.compile(r"<([^<>|]*)(?:\|([^<>]*))?>")


def _slack_text(text: str, users: dict) -> str:
    """Slack's markup: <@U1> → @name, <#C1|general> → #general, <!here> → @here, <url|label> →
    label, and its three escapes (&lt; &gt; &amp;)."""

    def plain(m: re.Match) -> str:
        target, label = m.group(1), m.group(2)
        if target.startswith("@"):
            user = users.get(target[1:])
            return "@" + (_slack_name(user) if user else label or target[1:])
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            return label or "@" + target[1:].split("^")[0]
        return label or target

    return _SLACK_LINK.sub(plain, text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


KEPT_SUBTYPES = (None, "thread_broadcast", "bot_message", "me_message", "file_share", "tombstone")


def _slack_channel(messages: list[dict], users: dict, skipped: Counter) -> list[list[ChatMessage]]:
    messages = sorted(messages, key=lambda m: float(m.get("ts") or 0))
    roots = {m["thread_ts"] for m in messages if m.get("thread_ts") and m["thread_ts"] != m.get("ts")}
    main: list[ChatMessage] = []
    threads: dict[str, list[ChatMessage]] = {}
    for m in messages:
        subtype = m.get("subtype")
        if subtype == "message_changed":
            skipped["edit"] += 1
            continue
        if subtype == "message_deleted":
            skipped["deleted"] += 1
            continue
        if m.get("type") != "message" or subtype not in KEPT_SUBTYPES:
            skipped["system"] += 1
            continue
        uid, bot_id = m.get("user"), m.get("bot_id")
        if uid:
            user = users.get(uid) or {"id": uid, "profile": m.get("user_profile") or {}}
            profile = user.get("profile") or {}
            speaker = Speaker(uid, _slack_name(user) or uid, tuple(
                a for a in (user.get("name"), user.get("real_name"), profile.get("display_name"),
                            profile.get("real_name"), bot_id) if a))
            is_bot = bool(user.get("is_bot") or bot_id or subtype == "bot_message" or uid == "USLACKBOT")
        else:
            bot_name = m.get("username") or (m.get("bot_profile") or {}).get("name")
            speaker = Speaker(bot_id or bot_name or "unknown bot", bot_name or bot_id or "unknown bot")
            is_bot = True
        text = _slack_text(m.get("text") or "", users)
        skip = ("deleted" if subtype == "tombstone"
                else "media" if not text.strip() and (m.get("files") or m.get("attachments")) else None)
        if subtype == "me_message" and text.strip():
            text = f"*{text.strip()}*"
        thread = m.get("thread_ts")
        msg = ChatMessage(speaker, text, _when(m.get("ts")), is_bot=is_bot, skip=skip,
                          in_thread=thread in roots)
        (threads.setdefault(thread, []) if thread in roots else main).append(msg)
    return [main, *threads.values()]


# --- discord --------------------------------------------------------------------------------

DISCORD_KEPT = ("Default", "Reply")
# a bot's answer to a slash command; DiscordChatExporter writes kinds it has no name for as numbers
DISCORD_COMMANDS = ("ChatInputCommand", "ContextMenuCommand", "20", "23")


def _discord(path: Path, skipped: Counter) -> list[list[ChatMessage]]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise _wrong(path, "discord", "a folder without .json files")
    streams = []
    for f in files:
        data = _json(f.read_bytes(), f, "discord")
        if not (isinstance(data, dict) and isinstance(data.get("messages"), list) and "channel" in data):
            raise _wrong(path, "discord", f"{f.name} has no 'channel' and 'messages' at its top")
        stream = []
        in_thread = "Thread" in str((data["channel"] or {}).get("type", ""))  # GuildPublicThread, …
        for m in data["messages"]:
            if not isinstance(m, dict):
                continue
            kind = m.get("type", "Default")
            if kind in DISCORD_COMMANDS:
                skipped["command"] += 1
                continue
            if kind not in DISCORD_KEPT:
                skipped["system"] += 1
                continue
            author = m.get("author") or {}
            user, tag = str(author.get("name") or ""), author.get("discriminator")
            uid = str(author.get("id") or user or "unknown")
            speaker = Speaker(uid, author.get("nickname") or user or uid,
                              tuple(a for a in (user, f"{user}#{tag}" if tag and tag != "0000" else "") if a))
            content = m.get("content") or ""
            media = m.get("attachments") or m.get("embeds") or m.get("stickers")
            try:
                when = datetime.fromisoformat(m["timestamp"])
            except (KeyError, TypeError, ValueError):
                when = None
            stream.append(ChatMessage(speaker, content, when, is_bot=bool(author.get("isBot")),
                                      skip="media" if not content.strip() and media else None,
                                      in_thread=in_thread))
        streams.append(stream)
    return streams


# --- irc ------------------------------------------------------------------------------------

_IRC_WEECHAT = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})\t([^\t]*)\t(.*)$")
_IRC_BRACKET = re.compile(r"^\[(?:(\d{4}-\d{2}-\d{2})[ T])?(\d{1,2}:\d{2}(?::\d{2})?)\]\s?(.*)$")
_IRC_BARE = re.compile(r"^(\d{1,2}:\d{2}(?::\d{2})?)\s(.*)$")
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_IRC_HEXCHAT = re.compile(rf"^({'|'.join(_MONTHS)}) (\d{{1,2}}) (\d{{2}}:\d{{2}}:\d{{2}})\s(.*)$")  # no year
_IRC_SAY = re.compile(r"^<\s*[~&@%+]?([^>\s]+)>\s?(.*)$")
_IRC_ACTION = re.compile(r"^\*\s+([^*\s]\S*)\s+(.*)$")  # "* nick waves", not "*** Joins:"
_IRC_DAY = re.compile(rf"\b({'|'.join(_MONTHS)})[a-z]*\s+(\d{{1,2}})\b.*?\b(\d{{4}})\b")  # Tue Jan 03 2023


def _irc_parse(line: str) -> tuple[str, tuple]:
    """('say'|'action', (day, clock, nick, text)), ('system', (day, clock)), ('day', (date,)),
    ('blank', ()) or ('unparsed', ()); a day is None, 'YYYY-MM-DD' or '--MM-DD' (HexChat's)."""
    line = line.rstrip("\r")
    if not line.strip():
        return "blank", ()
    if m := _IRC_WEECHAT.match(line):
        day, clock, prefix, text = m.groups()
        prefix = prefix.strip()
        if prefix == "*":
            nick, _, act = text.partition(" ")
            return "action", (day, clock, nick, act)
        if not prefix or prefix.startswith(("-", "<--", "=!=")):  # -->, <--, --: joins, quits, network
            return "system", (day, clock)
        return "say", (day, clock, prefix.lstrip("~&@%+"), text)
    if m := _IRC_BRACKET.match(line):
        day, clock, rest = m.groups()
    elif m := _IRC_BARE.match(line):
        day, (clock, rest) = None, m.groups()
    elif m := _IRC_HEXCHAT.match(line):  # "Jan 02 10:00:01 <nick> hi": month and day, "--MM-DD"
        day, clock, rest = f"--{_MONTHS.index(m[1]) + 1:02d}-{int(m[2]):02d}", m[3], m[4]
    else:
        if line.startswith(("---", "****")):
            d = _IRC_DAY.search(line)
            try:  # irssi "--- Day changed Tue Jan 03 2023", "--- Log opened …", xchat "**** BEGIN …"
                return "day", (date(int(d[3]), _MONTHS.index(d[1]) + 1, int(d[2])),)
            except (TypeError, ValueError):  # no date in the line, or no such day
                return "system", (None, None)
        return "unparsed", ()
    rest = rest.strip()
    if m := _IRC_SAY.match(rest):
        return "say", (day, clock, *m.groups())
    if m := _IRC_ACTION.match(rest):
        return "action", (day, clock, *m.groups())
    if rest.startswith(("-", "*", "<--")):  # -!-, -->, <--, ***, -NickServ-: joins, quits, notices
        return "system", (day, clock)
    return "unparsed", ()


def _irc_day(given: str | None, current: date) -> date:
    if given is None:
        return current
    if given.startswith("--"):
        try:
            return date(current.year, int(given[2:4]), int(given[5:7]))
        except ValueError:  # 29 Feb in a year without it
            return current
    return date.fromisoformat(given)


def _irc(path: Path, skipped: Counter) -> list[list[ChatMessage]]:
    text = _decode(path.read_bytes(), path, "irc")
    stream: list[ChatMessage] = []
    day, last = date(2000, 1, 1), None  # no date in the log: days counted from an arbitrary one
    for line in text.split("\n"):
        kind, parts = _irc_parse(line)
        if kind == "blank":
            continue
        if kind == "unparsed":
            skipped["unparsed"] += 1
            continue
        if kind == "day":
            day = parts[0]
            skipped["system"] += 1
            continue
        when = None
        try:
            clock = time(*map(int, parts[1].split(":"))) if parts[1] else None
        except ValueError:  # 24:00 and the like
            clock = None
        if clock is not None:
            when = datetime.combine(_irc_day(parts[0], day), clock)
            if last is not None and when < last and parts[0] is None:
                when += timedelta(days=1)  # past midnight without a day line
            elif last is not None and when < last and parts[0].startswith("--") and when.month < last.month:
                when += date(when.year + 1, 1, 1) - date(when.year, 1, 1)  # HexChat has no year: a new one
            day, last = when.date(), when
        if kind == "system":
            skipped["system"] += 1
            continue
        nick, said = parts[2], parts[3]
        if kind == "action" and said.strip():
            said = f"*{said.strip()}*"
        stream.append(ChatMessage(Speaker(nick, nick), said, when))
    if not stream:
        raise _wrong(path, "irc", "no line is a message")
    return [stream]


# --- whatsapp -------------------------------------------------------------------------------

_WA_DATE = r"(\d{1,4}[/.\-]\d{1,2}[/.\-]\d{1,4})"
_WA_TIME = r"(\d{1,2}:\d{2}(?::\d{2})?(?:[\s\u202f]?[AaPp]\.?\s?[Mm]\.?)?)"
_WA_ANDROID = re.compile(rf"^\u200e?{_WA_DATE},?\s{_WA_TIME}\s[-–]\s(.*)$")
_WA_IOS = re.compile(rf"^\u200e?\[{_WA_DATE},?\s{_WA_TIME}\]\s(.*)$")
_WA_MEDIA = re.compile(r"^(<Media omitted>|<attached: .*>|(image|video|audio|sticker|GIF|document|"
                       r"Contact card) omitted|null|.* \(file attached\))$", re.IGNORECASE)
_WA_DELETED = re.compile(r"^(This message was deleted|You deleted this message|Waiting for this message"
                         r".*)\.?$", re.IGNORECASE)


def _wa_order(dates: list[str], clocks: list[str]) -> str:
    """'ymd', 'dmy' or 'mdy' for the whole file: a part above 12 settles it; else month first
    with a 12-hour clock (US), day first without."""
    parts = [list(map(int, re.split(r"[/.\-]", d))) for d in dates]
    if any(p[0] > 31 for p in parts):
        return "ymd"
    if any(p[0] > 12 for p in parts):
        return "dmy"
    if any(p[1] > 12 for p in parts) or any(re.search(r"[AaPp]\.?\s?[Mm]", c) for c in clocks):
        return "mdy"
    return "dmy"


def _wa_when(day: str, clock: str, order: str) -> datetime | None:
    a, b, c = map(int, re.split(r"[/.\-]", day))
    y, mo, d = (a, b, c) if order == "ymd" else (c, b, a) if order == "dmy" else (c, a, b)
    numbers = list(map(int, re.findall(r"\d+", clock))) + [0]
    hour, minute, second = numbers[0], numbers[1], numbers[2]
    meridiem = re.sub(r"[^APap]", "", clock).upper()
    hour = hour % 12 + 12 if meridiem == "P" else hour % 12 if meridiem == "A" else hour
    try:
        return datetime(y + 2000 if y < 100 else y, mo, d, hour, minute, second)
    except ValueError:
        return None


def _whatsapp(path: Path, skipped: Counter) -> list[list[ChatMessage]]:
    data = path.read_bytes()
    if zipfile.is_zipfile(path):  # iOS exports a .zip: _chat.txt and the media
        with zipfile.ZipFile(path) as z:
            texts = sorted((n for n in z.namelist() if n.endswith(".txt")),
                           key=lambda n: "_chat.txt" not in n)
            if not texts:
                raise _wrong(path, "whatsapp", "a .zip without a .txt chat in it")
            data = z.read(texts[0])
    text = _decode(data, path, "whatsapp")
    records: list[list[str]] = []  # [date, time, first line, continuation lines …]
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if m := _WA_ANDROID.match(line) or _WA_IOS.match(line):
            records.append(list(m.groups()))
        elif records:
            records[-1].append(line)
        elif line.strip():
            skipped["unparsed"] += 1
    if not records:
        raise _wrong(path, "whatsapp", "no line starts with a date and time")
    order = _wa_order([r[0] for r in records], [r[1] for r in records])
    stream: list[ChatMessage] = []
    for day, clock, rest, *more in records:
        name, sep, said = rest.partition(": ")
        if rest.startswith("\u200e") or not sep or '"' in name or "“" in name:
            skipped["system"] += 1  # "Alice added Bob", "Messages and calls are end-to-end encrypted"
            continue
        system = said.startswith("\u200e")  # iOS marks what WhatsApp wrote with a left-to-right mark
        said = "\n".join([said, *more]).replace("\u200e", "").strip()
        said = said.removesuffix("<This message was edited>").strip()
        skip = "media" if _WA_MEDIA.match(said) else "deleted" if _WA_DELETED.match(said) else None
        if system and not skip:
            skipped["system"] += 1
            continue
        name = name.replace("\u200e", "").strip()
        stream.append(ChatMessage(Speaker(name, name), said, _wa_when(day, clock, order), skip=skip))
    return [stream]


PARSERS = {"matrix": _matrix, "discord": _discord, "irc": _irc, "whatsapp": _whatsapp}
