"""Are the replies right? Every assistant turn of the shipped benchmark is annotated
(`cases/*.answers.jsonl`): `fact` (the right reply hinges on a checkable fact: keys, any one of
which in a reply shows it states the fact, and optional known-wrong strings) or `open` (advice,
opinion, a social reply: many replies are right).

At each factual turn the system is made to reply (forced, with the reference history before it,
so the figure does not depend on the decision), and the reply is judged without any network:

    right       it contains a key and no known-wrong string
    hedged      otherwise, it says plainly that it is not sure (or that the sources do not say)
    wrong       neither: a confident error

    answer_accuracy        right / factual turns
    hedge_rate             hedged / factual turns
    confident_error_rate   wrong / factual turns

Matching is on case-folded text with whitespace collapsed (and full-width forms folded, NFKC), so
"Canberra", "CANBERRA" and "Ｃａｎｂｅｒｒａ" match the key "canberra". The annotations are part of
the benchmark: their fingerprint (`answers-…`) stamps every answer score, and two scores compare
only when it matches.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ANSWER_METRICS = ("answer_accuracy", "hedge_rate", "confident_error_rate", "factual_turns")
Verdict = Literal["right", "hedged", "wrong"]

# saying plainly that it is not sure, or that what it was given does not say: a whole phrase, so a
# reply that merely contains "sure" ("sure, it's 1985") is not a hedge
HEDGES = re.compile("|".join([
    r"\bnot (?:\w+ )?(?:sure|certain|confident)\b", r"\bunsure\b", r"\buncertain\b",
    r"\bi (?:do not|don't|dont) (?:really |actually )?know\b", r"\bno idea\b", r"\bcan(?:'|no)?t (?:say|tell|recall|remember) for sure\b",
    r"\b(?:i'm|i am) not able to (?:check|verify|confirm)\b", r"\bcan(?:'|no)?t (?:check|verify|confirm)\b",
    r"\b(?:the )?(?:documents?|sources?|notes?|handbook|faq|passages?) (?:do not|don't|does not|doesn't) (?:say|mention|cover)\b",
    r"\bbetter (?:check|double-check|look it up)\b",
    "不确定", "不太确定", "不敢肯定", "不知道", "不清楚", "不太清楚", "没有把握", "无法确认", "资料里没有", "文档里没有",
    "文件里没有", "没有提到", "建议查一下", "最好查一下",
]), re.IGNORECASE)


@dataclass(frozen=True)
class Answer:
    """What is right at one assistant turn of the benchmark."""

    chat: str  # the chat's id, e.g. "en-01"
    turn: int  # index of the assistant message in the chat
    kind: Literal["fact", "open", "unanswered"]  # unanswered: the grounded benchmark's (evaluate.grounded)
    keys: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()
    note: str = ""


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def contains(text: str, key: str) -> bool:
    """Whether normalized `text` contains `key`, starting at a word's start when the key starts
    with a letter or digit: "advantage" is not in "disadvantage", "1985" not in "21985"."""
    key = normalize(key)
    if key[:1].isascii() and key[:1].isalnum():
        return re.search(r"(?<![a-z0-9])" + re.escape(key), text) is not None
    return key in text


def judge(reply: str | None, answer: Answer) -> Verdict:
    """A reply at a factual turn: right, hedged or a confident error."""
    text = normalize(reply or "")
    if any(contains(text, k) for k in answer.keys) and not any(contains(text, w) for w in answer.wrong):
        return "right"
    return "hedged" if HEDGES.search(text) else "wrong"


def answer_metrics(verdicts: list[Verdict]) -> dict[str, float]:
    """The three rates over the factual turns judged (and how many there were)."""
    n, counts = len(verdicts), Counter(verdicts)
    if not n:
        return {}
    return {"answer_accuracy": counts["right"] / n, "hedge_rate": counts["hedged"] / n,
            "confident_error_rate": counts["wrong"] / n, "factual_turns": n}


class AnnotationError(ValueError):
    """An answers file that does not fit its chats: the message names the file, line and fix."""


def load_answers(path: Path, chats: dict[str, list], kinds: tuple[str, ...] = ("fact", "open")) -> list[Answer]:
    """The annotations of `path`, checked against the chats they annotate (id → messages, each with
    a `role`): every assistant turn annotated exactly once with one of `kinds`, facts with keys
    (other kinds without), no key given away by the question it answers (the user messages since
    the previous assistant turn)."""
    answers, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
            a = Answer(row["id"], int(row["turn"]), row["kind"], tuple(row.get("keys", ())),
                       tuple(row.get("wrong", ())), row.get("note", ""))
        except (ValueError, KeyError, TypeError) as e:
            raise AnnotationError(f"{where}: not an annotation ({e}); expected "
                                  '{"id", "turn", "kind": "fact"|"open", "keys": [...]}') from None
        messages = chats.get(a.chat)
        if messages is None or not 0 <= a.turn < len(messages) or messages[a.turn].role != "assistant":
            raise AnnotationError(f"{where}: {a.chat} has no assistant message at turn {a.turn}")
        if a.kind not in kinds or (a.kind == "fact") != bool(a.keys):
            raise AnnotationError(f"{where}: kind must be fact (with keys) or {' or '.join(kinds[1:])} (without)")
        if (a.chat, a.turn) in seen:
            raise AnnotationError(f"{where}: {a.chat} turn {a.turn} is annotated twice")
        question = []
        for m in reversed(messages[:a.turn]):
            if m.role == "assistant":
                break
            question.append(normalize(m.content))
        if given := [k for k in a.keys if any(contains(q, k) for q in question)]:
            raise AnnotationError(f"{where}: the question already contains the key(s) {given}: echoing "
                                  "it would count as right; choose keys only the answer contains")
        seen.add((a.chat, a.turn))
        answers.append(a)
    missing = [(chat, i) for chat, messages in chats.items() for i, m in enumerate(messages)
               if m.role == "assistant" and (chat, i) not in seen]
    if missing:
        raise AnnotationError(f"{path.name}: {len(missing)} assistant turns are not annotated, e.g. "
                              f"{missing[:3]}; add a line for each (kind fact or open)")
    return answers


def fingerprint(answers: list[Answer]) -> str:
    rows = sorted(json.dumps([a.chat, a.turn, a.kind, sorted(a.keys), sorted(a.wrong)], ensure_ascii=False)
                  for a in answers)
    return "answers-" + hashlib.sha256("\n".join(rows).encode()).hexdigest()[:12]


# A reference reply's checkable tokens, for data without annotations (the validation split the
# confidence threshold is calibrated on): its numbers and capitalised names, less those the
# conversation already said and the words that start a sentence.
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\d+(?:[.,:]\d+)*")  # "1974年": CJK is no boundary to break
_NAME = re.compile(r"(?<![\w'’])[A-Z][a-z]{2,}(?:\s+[A-Z][a-z]+)*")


def reference_keys(reference: str, history: str) -> tuple[str, ...]:
    """Keys for `reference` (a reply in a chat whose messages before it are `history`): the
    numbers and names it states that `history` does not contain. Empty: nothing to check."""
    said = normalize(history)
    keys = [m.group() for m in _NUMBER.finditer(reference)]
    for m in _NAME.finditer(reference):
        before = reference[:m.start()].rstrip()
        if before and before[-1] not in ".!?:;—-–\"“(":  # not the first word of a sentence
            keys.append(m.group())
    return tuple(dict.fromkeys(k for k in keys if not _token(k).search(said)))


def _token(key: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9.])" + re.escape(normalize(key)) + r"(?![a-z0-9]|[.,]\d)")


def states(reply: str | None, keys: tuple[str, ...]) -> bool:
    """Whether `reply` states one of `keys` as a whole token ("5" is not in "50")."""
    text = normalize(reply or "")
    return any(_token(k).search(text) for k in keys)
