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
from collections import Counter
from datetime import timedelta
from pathlib import Path

from chimein.conversation import Conversation
from chimein.data.importers.common import (  # noqa: F401 — the package's API
    DEFAULT_GAP_MINUTES,
    DEFAULT_MAX_MESSAGES,
    FORMATS,
    REASONS,
    ChatImportError,
    ImportResult,
    Speaker,
    _conversations,
    _find_assistant,
)
from chimein.data.importers.formats import PARSERS, _slack, strip_reply_fallback  # noqa: F401
from chimein.data.importers.sniff import _wrong


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
