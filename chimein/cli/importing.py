"""`chimein import FORMAT FILE --assistant ID`: a group's chat export (Matrix, Slack, Discord, IRC,
WhatsApp) → conversations to evaluate the assistant on, or to train on.

    chimein import slack export.zip --assistant chimebot --out ours.jsonl
    chimein eval --adapter local:NAME --data ours.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from chimein.cli.common import app, console, err, fail
from chimein.data.importers import (
    DEFAULT_GAP_MINUTES,
    DEFAULT_MAX_MESSAGES,
    FORMATS,
    REASONS,
    ChatImportError,
    import_chat,
    write_conversations,
)


@app.command("import")
def import_cmd(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"The export's format: {' | '.join(FORMATS)}.")],
    file: Annotated[Path, typer.Argument(help="The export: a file (Matrix, Discord, IRC, WhatsApp), a Slack "
                                              "export's folder or .zip, or a folder of DiscordChatExporter files.")],
    assistant: Annotated[str, typer.Option(help="The account that becomes the assistant: an id (@bot:server, U024BE7LH, "
                                                "a Discord id), a user name or a display name. Everyone else is a user.")],
    out: Annotated[Optional[Path], typer.Option(help="Output JSON Lines file (default: FILE's stem + .jsonl, here).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
    gap_minutes: Annotated[float, typer.Option(help="Start a new conversation after this long without a message.")] = DEFAULT_GAP_MINUTES,
    max_messages: Annotated[int, typer.Option(help="Most user messages per conversation (a longer stretch is split).")] = DEFAULT_MAX_MESSAGES,
    keep_commands: Annotated[bool, typer.Option(help="Keep bot commands (!help, /giphy …) as user messages instead of dropping them.")] = False,
    channel: Annotated[Optional[str], typer.Option(help="Slack: import only this channel (default: all).")] = None,
) -> None:
    """Turn a chat export into conversations: the --assistant account speaks as the assistant, its
    silences become silent turns, threads become conversations of their own; every message left out
    is counted with its reason (see docs/importing.md)."""
    out = out or Path(file.name.removesuffix(".zip")).with_suffix(".jsonl")
    if out.exists() and file.exists() and out.resolve() == file.resolve():
        fail(f"{out} is the export itself; pass --out with another file")
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to overwrite it, or --out another file")
    try:
        with err.status(f"reading {file}"):
            result = import_chat(fmt, file, assistant, gap_minutes=gap_minutes, max_messages=max_messages,
                                 keep_commands=keep_commands, channel=channel)
    except ChatImportError as e:
        fail(str(e))
    n_user, n_speak = result.messages, result.assistant_turns
    table = Table("", "count", title=f"imported {file} ({fmt}), assistant {result.assistant}")
    table.add_row("conversations written", str(len(result.conversations)))
    table.add_row("user messages", str(n_user))
    table.add_row("assistant turns", f"{n_speak} ({n_speak / max(n_user, 1):.0%} of user messages)")
    table.add_row("truncated messages", str(result.truncated))
    table.add_row("skipped", str(sum(result.skipped.values())))
    console.print(table)
    if result.skipped:
        skipped = Table("reason", "count", "what", title="skipped")
        for reason, n in result.skipped.most_common():
            skipped.add_row(reason, str(n), REASONS[reason])
        console.print(skipped)
    if not result.conversations:
        fail(f"no conversation left to write (see the skipped reasons); {out} not written")
    if n_speak == 0:
        err.print(f"warning: {result.assistant} never speaks in what was kept: every turn is silence",
                  highlight=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_conversations(result.conversations, out)
    console.print(f"wrote {out}; measure the assistant on it: chimein eval --adapter REF --data {out}",
                  highlight=False, soft_wrap=True)


@app.command("feedback")
def feedback_cmd(
    folder: Annotated[Path, typer.Argument(help="The recordings folder of `chimein bridge matrix` (--record-dir).")],
    out: Annotated[Optional[Path], typer.Option(help="Write the labelled conversations to this JSON Lines file.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
) -> None:
    """What the rooms that agreed to be recorded taught: the labels their reactions gave (interruption,
    missed, confirmed, unrated) and the conversations the retrain flow's feedback setting adds."""
    from chimein.data.feedback import load_feedback

    if out and out.exists() and not force:
        fail(f"{out} exists; pass --force to overwrite it, or --out another file")
    try:
        report = load_feedback(folder)
    except FileNotFoundError as e:
        fail(str(e))
    table = Table("", "count", title=f"feedback recorded in {folder}")
    table.add_row("rooms", str(report.rooms))
    table.add_row("conversations", str(len(report.conversations)))
    for label in ("interruption", "missed", "confirmed", "unrated"):
        table.add_row(f"label: {label}", str(report.labels.get(label, 0)))
    for reason, n in report.skipped.most_common():
        table.add_row(f"skipped: {reason}", str(n))
    console.print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_conversations(report.conversations, out)
        console.print(f"wrote {out}; measure the assistant on it: chimein eval --adapter REF --data {out}",
                      highlight=False, soft_wrap=True)
