"""The parsers of `chimein.data.importers`, one per format: each turns its export into streams of
ChatMessage (a channel's timeline, or one thread), counting what it skips; the package applies the
rules common to all formats."""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from chimein.data.importers.common import ChatImportError, ChatMessage, Speaker, _when
from chimein.data.importers.sniff import _decode, _json, _wrong
from chimein.data.importers.textlogs import _irc, _whatsapp

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


PARSERS = {"matrix": _matrix, "discord": _discord, "irc": _irc, "whatsapp": _whatsapp}
