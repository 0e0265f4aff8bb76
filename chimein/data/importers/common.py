"""What every format of `chimein.data.importers` shares: the reasons a message is skipped, the
messages and speakers the parsers yield, and the rules (`_conversations`) that turn them into
conversations."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

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


# --- times ----------------------------------------------------------------------------------


def _when(seconds) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(seconds), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
