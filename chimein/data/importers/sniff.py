"""Reading an export's bytes, and telling a wrong format apart: the error names the format a file
looks like (`chimein import irc` for an IRC log given as WhatsApp, say)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from chimein.data.importers.common import HOW, WHAT, ChatImportError
from chimein.data.importers.lines import _WA_ANDROID, _WA_IOS, _irc_parse


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


def _wrong(path: Path, fmt: str, detail: str) -> ChatImportError:
    guess = _guess(path)
    if guess == "chimein":
        return ChatImportError(f"{path}: this is already in chimein's conversation format (JSON Lines "
                               "of conversations), no import needed: check it with `chimein validate`")
    if guess and guess != fmt:
        return ChatImportError(f"{path}: this looks like {WHAT[guess]}, not {WHAT[fmt]}: use "
                               f"`chimein import {guess}`")
    return ChatImportError(f"{path}: not {WHAT[fmt]} ({detail}); expected {HOW[fmt]}")


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
