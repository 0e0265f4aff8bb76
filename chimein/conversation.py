"""Conversations: the interchange format, its validation, and JSON Lines loading.

A conversation is a JSON array of messages, one conversation per line:

    [{"role": "user", "name": "Alice", "content": "who wrote the Da Vinci Code?"},
     {"role": "assistant", "content": "Dan Brown."}]

An assistant message only ever follows the user message it answers; silence is the absence of an
assistant message. Everything that reads conversations from outside (files, generators, the HTTP
API) goes through `parse_conversation`, so the rules live in one place.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MAX_MESSAGE_CHARS = 4000  # longer is almost surely a paste or a generator gone wrong
MAX_NAME_CHARS = 32
MAX_PASSAGES = 4  # passages of the group's documents shown with one user message
MAX_PASSAGE_CHARS = 1500

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    name: str | None = None  # normalised speaker name; user messages only
    # passages of the group's documents retrieved when the message arrived (user messages only):
    # the model reads them before the message (chimein.formatting), best first
    passages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]

    @property
    def n_user(self) -> int:
        return sum(m.role == "user" for m in self.messages)

    @property
    def n_speak(self) -> int:
        return sum(m.role == "assistant" for m in self.messages)

    def to_json(self) -> list[dict]:
        return [
            {"role": m.role, "content": m.content} if m.role == "assistant"
            else {"role": m.role, "name": m.name, "content": m.content}
            | ({"passages": list(m.passages)} if m.passages else {})
            for m in self.messages
        ]


class InvalidConversation(ValueError):
    """A conversation breaks a rule; `kind` is a short code used to count rejections."""

    def __init__(self, kind: str, problem: str):
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


class ConversationFileError(ValueError):
    """Strict loading stopped at the first bad line; the message names file, line and fix."""


@dataclass(frozen=True)
class Rejection:
    source: str
    line: int
    kind: str
    problem: str
    raw: str = ""  # the rejected line as read, so nothing is lost

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.problem}"


@dataclass
class LoadReport:
    """What a lenient load kept and what it rejected, with reasons."""

    conversations: list[Conversation] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # line number of each kept conversation
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def rejected_by_kind(self) -> Counter:
        return Counter(r.kind for r in self.rejected)


def normalize_name(name: str) -> str:
    """A speaker name that cannot break the "{name}: {content}" line or the chat template.

    NFKC folds look-alike characters; control characters and line breaks become spaces; colons
    (the name/content separator) and template brackets are dropped; whitespace is collapsed and
    the result bounded to MAX_NAME_CHARS.
    """
    name = unicodedata.normalize("NFKC", name)
    name = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in name)
    name = "".join(c for c in name if c not in ":<>[]|{}")
    return " ".join(name.split())[:MAX_NAME_CHARS].strip()


def parse_conversation(obj: object, max_message_chars: int = MAX_MESSAGE_CHARS) -> Conversation:
    """Validate one decoded JSON value; raise InvalidConversation naming the first problem."""
    if not isinstance(obj, list):
        raise InvalidConversation(
            "not_a_list", f"expected a JSON array of messages, got {type(obj).__name__}"
        )
    if not obj:
        raise InvalidConversation("empty_conversation", "conversation has no messages")
    messages: list[Message] = []
    for i, raw in enumerate(obj, start=1):
        where = f"message {i}"
        if not isinstance(raw, dict):
            raise InvalidConversation(
                "not_an_object", f"{where}: expected an object, got {type(raw).__name__}"
            )
        role = raw.get("role")
        if role is None:
            raise InvalidConversation("missing_key", f"{where}: missing key 'role'")
        if role not in ("user", "assistant"):
            raise InvalidConversation(
                "unknown_role", f"{where}: unknown role {role!r} (expected 'user' or 'assistant')"
            )
        allowed = {"role", "content", "name", "passages"} if role == "user" else {"role", "content"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise InvalidConversation(
                "unknown_key",
                f"{where}: unexpected key(s) {', '.join(map(repr, unknown))} for a {role} message "
                f"(allowed: {', '.join(sorted(allowed))})",
            )
        if "content" not in raw:
            raise InvalidConversation("missing_key", f"{where}: missing key 'content'")
        content = raw["content"]
        if not isinstance(content, str):
            raise InvalidConversation(
                "wrong_type", f"{where}: 'content' must be a string, got {type(content).__name__}"
            )
        content = content.strip()
        if not content:
            raise InvalidConversation("empty_content", f"{where}: empty content")
        try:  # JSON can spell a lone UTF-16 surrogate ("\ud800"); tokenizers cannot take it
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidConversation(
                "invalid_text",
                f"{where}: content has a lone surrogate (U+{ord(content[e.start]):04X}) at character "
                f"{e.start + 1}, which is not Unicode text; fix the encoding where the text was made "
                "(a UTF-16 pair split in two, or a surrogate escaped alone in the JSON)",
            ) from None
        if len(content) > max_message_chars:
            raise InvalidConversation(
                "message_too_long",
                f"{where}: content is {len(content)} characters, over the limit of "
                f"{max_message_chars}; split or shorten the message",
            )
        name, passages = None, ()
        if role == "user":
            passages = _passages(raw.get("passages", []), where)
            raw_name = raw.get("name")
            if raw_name is None:
                raise InvalidConversation(
                    "missing_name", f"{where}: user message without a 'name' (who is speaking?)"
                )
            if not isinstance(raw_name, str):
                raise InvalidConversation(
                    "wrong_type", f"{where}: 'name' must be a string, got {type(raw_name).__name__}"
                )
            name = normalize_name(raw_name)
            if not name:
                raise InvalidConversation(
                    "missing_name", f"{where}: name {raw_name!r} is empty once normalised"
                )
        elif i == 1:
            raise InvalidConversation(
                "starts_with_assistant",
                "conversation starts with an assistant message; it must start with a user message",
            )
        elif messages[-1].role == "assistant":
            raise InvalidConversation(
                "consecutive_assistant",
                f"{where}: two assistant messages in a row; merge them into one reply",
            )
        messages.append(Message(role=role, content=content, name=name, passages=passages))
    return Conversation(tuple(messages))


def _passages(raw: object, where: str) -> tuple[str, ...]:
    """A user message's 'passages': a list of at most MAX_PASSAGES non-empty strings."""
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise InvalidConversation("wrong_type", f"{where}: 'passages' must be a list of strings")
    passages = tuple(p.strip() for p in raw)
    if len(passages) > MAX_PASSAGES:
        raise InvalidConversation(
            "too_many_passages", f"{where}: {len(passages)} passages, over the limit of {MAX_PASSAGES}; "
            "keep the best ones")
    for j, p in enumerate(passages, 1):
        if not p:
            raise InvalidConversation("empty_content", f"{where}: passage {j} is empty")
        if len(p) > MAX_PASSAGE_CHARS:
            raise InvalidConversation(
                "message_too_long", f"{where}: passage {j} is {len(p)} characters, over the limit of "
                f"{MAX_PASSAGE_CHARS}; index the documents in smaller sections")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidConversation("invalid_text", f"{where}: passage {j} has a lone surrogate, "
                                      "which is not Unicode text; fix its encoding") from None
    return passages


def load_conversations(
    path: str | Path, strict: bool = False, max_message_chars: int = MAX_MESSAGE_CHARS
) -> LoadReport:
    """Load a JSON Lines file of conversations.

    strict: raise ConversationFileError at the first bad line. Otherwise keep every valid
    conversation and record each rejected line with its reason. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected JSON Lines of conversations)")
    report = LoadReport()
    with path.open("rb") as f:  # decode line by line: one bad byte must not lose the file
        for lineno, data in enumerate(f, start=1):
            line = data.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a BOM from Windows editors
            if not line.strip():
                continue
            try:
                try:
                    data.decode("utf-8")
                    obj = json.loads(line)
                except UnicodeDecodeError as e:
                    raise InvalidConversation("invalid_utf8", f"not UTF-8: byte {e.start} is invalid")
                except json.JSONDecodeError as e:
                    raise InvalidConversation("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
                except RecursionError:
                    raise InvalidConversation("invalid_json", "invalid JSON: nested too deeply")
                report.conversations.append(parse_conversation(obj, max_message_chars))
                report.lines.append(lineno)
            except InvalidConversation as e:
                if strict:
                    raise ConversationFileError(
                        f"{path}:{lineno}: {e.problem}. Fix the line, or load leniently to skip "
                        "bad conversations and get a report."
                    ) from None
                report.rejected.append(Rejection(str(path), lineno, e.kind, e.problem, line))
    return report
