"""The text-log parsers of `chimein.data.importers`: IRC logs and WhatsApp's "Export chat"."""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from datetime import date, datetime, time, timedelta
from pathlib import Path

from chimein.data.importers.common import ChatMessage, Speaker
from chimein.data.importers.lines import (
    _WA_ANDROID,
    _WA_DELETED,
    _WA_IOS,
    _WA_MEDIA,
    _irc_parse,
)
from chimein.data.importers.sniff import _decode, _wrong


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


