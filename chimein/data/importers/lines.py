"""The line formats of text logs (IRC, WhatsApp): what `textlogs` parses and what `sniff` uses to
tell one export from another."""

from __future__ import annotations

import re
from datetime import date

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
_WA_DATE = r"(\d{1,4}[/.\-]\d{1,2}[/.\-]\d{1,4})"
_WA_TIME = r"(\d{1,2}:\d{2}(?::\d{2})?(?:[\s\u202f]?[AaPp]\.?\s?[Mm]\.?)?)"
_WA_ANDROID = re.compile(rf"^\u200e?{_WA_DATE},?\s{_WA_TIME}\s[-–]\s(.*)$")
_WA_IOS = re.compile(rf"^\u200e?\[{_WA_DATE},?\s{_WA_TIME}\]\s(.*)$")
_WA_MEDIA = re.compile(r"^(<Media omitted>|<attached: .*>|(image|video|audio|sticker|GIF|document|"
                       r"Contact card) omitted|null|.* \(file attached\))$", re.IGNORECASE)
_WA_DELETED = re.compile(r"^(This message was deleted|You deleted this message|Waiting for this message"
                         r".*)\.?$", re.IGNORECASE)
