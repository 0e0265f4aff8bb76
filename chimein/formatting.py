"""Conversations → chat turns → token ids with an exact assistant mask.

Each user message becomes a user turn "{name}: {content}" followed by exactly one assistant turn:
"(silence)", or "(response) " + the reply. No system prompt. The model's chat template renders
the turns; the assistant mask comes from *character offsets* of that rendering, mapped to tokens
through the fast tokenizer's offset mapping — never from searching marker token ids, which
tokenize differently depending on the text before them.

A user message that arrived with passages of the group's documents (`Message.passages`, retrieved
by chimein.knowledge) carries them before the speaker's line, fenced:

    (documents)
    [handbook.md › Fees] Membership is 40 euros a year.
    (end of documents)
    Alice: how much is the fee?

Untrusted text (names, contents and passages) is neutralised first: any special token of the tokenizer and
any marker text of the template family that appears in it gets a zero-width space after its first
character, so it can never be parsed as a special token or open/close a turn; the fences of the
documents block are neutralised the same way everywhere but in the fences themselves, so neither
a document nor a user can close the block or open one.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

from chimein.conversation import Conversation, normalize_name
from chimein.presets import FAMILIES, ModelPreset

SILENCE = "(silence)"
RESPONSE = "(response)"
ZWSP = "\u200b"
DOCUMENTS, END_DOCUMENTS = "(documents)", "(end of documents)"
_FENCES = re.compile(f"{re.escape(END_DOCUMENTS)}|{re.escape(DOCUMENTS)}", re.IGNORECASE)

# Placeholders stand in for contents while the template is rendered once to find its glue text.
_PLACEHOLDER = "\ue000{}\ue001"


class TemplateError(ValueError):
    """The chat template does not render turn contents verbatim, so offsets cannot be trusted."""


class TooLong(ValueError):
    """Even the first exchange of a conversation does not fit in max_length."""


def marker_pattern(tokenizer, preset: ModelPreset) -> re.Pattern:
    """Everything user text must not contain verbatim: added/special tokens and template markers."""
    markers = set(tokenizer.added_tokens_encoder) | set(FAMILIES[preset.family].markers)
    markers = sorted((m for m in markers if m), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, markers)))


def neutralize(text: str, pattern: re.Pattern) -> str:
    """Break every marker occurrence with a zero-width space; repeat until none is left
    (breaking one occurrence can leave an overlapping one intact)."""
    while pattern.search(text):
        text = pattern.sub(lambda m: m[0][0] + ZWSP + m[0][1:], text)
    return text


def chat_turns(conversation: Conversation, pattern: re.Pattern) -> list[dict]:
    """User/assistant turns, strictly alternating, one assistant turn per user message."""
    msgs = conversation.messages
    turns: list[dict] = []
    for i, m in enumerate(msgs):
        if m.role != "user":
            continue
        # neutralise the whole turn: a name and its ": " together can spell a marker
        user = neutralize(neutralize(f"{normalize_name(m.name or '')}: {m.content}", pattern), _FENCES)
        if m.passages:
            docs = "\n".join(neutralize(neutralize(p, pattern), _FENCES) for p in m.passages)
            user = neutralize(f"{DOCUMENTS}\n{docs}\n{END_DOCUMENTS}\n{user}", pattern)
        turns.append({"role": "user", "content": user})
        reply = msgs[i + 1] if i + 1 < len(msgs) and msgs[i + 1].role == "assistant" else None
        content = neutralize(f"{RESPONSE} {reply.content}", pattern) if reply else SILENCE
        turns.append({"role": "assistant", "content": content})
    return turns


@dataclass(frozen=True)
class Rendered:
    text: str
    user_spans: list[tuple[int, int]]  # character spans of the user turns' contents
    assistant_spans: list[tuple[int, int]]  # content plus the end-of-turn token that closes it


def render(turns: list[dict], tokenizer, eot_token: str) -> Rendered:
    """Apply the chat template and locate every turn's content by construction.

    The template is rendered once with unique placeholders as contents; splitting on them gives
    the template's own text between turns, so the offsets of the real contents are exact. The real
    rendering must equal that reconstruction, else the template altered a content (TemplateError).
    """
    placeholders = [_PLACEHOLDER.format(i) for i in range(len(turns))]
    probe = tokenizer.apply_chat_template(
        [{"role": t["role"], "content": p} for t, p in zip(turns, placeholders)], tokenize=False
    )
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    pieces, pos, cursor = [], 0, 0
    user_spans, assistant_spans = [], []
    for turn, ph in zip(turns, placeholders):
        at = probe.find(ph, pos)
        if at < 0:
            raise TemplateError(f"the chat template dropped a {turn['role']} turn")
        pieces.append(probe[pos:at])
        cursor += at - pos
        start, cursor = cursor, cursor + len(turn["content"])
        pieces.append(turn["content"])
        pos = at + len(ph)
        if turn["role"] == "user":
            user_spans.append((start, cursor))
        elif turn["role"] == "assistant":  # a system turn has no span (Llama-2 folds it into [INST])
            glue_after = probe[pos:]
            eot_at = glue_after.find(eot_token)
            if eot_at < 0 or glue_after[:eot_at].strip():
                raise TemplateError(
                    f"no {eot_token!r} closes the assistant turn; is the preset's family right?"
                )
            assistant_spans.append((start, cursor + eot_at + len(eot_token)))
    pieces.append(probe[pos:])
    if "".join(pieces) != text:
        raise TemplateError(
            "the chat template changed a turn's content (e.g. stripped or escaped it); "
            "offsets would be wrong. Use a template that inserts contents verbatim"
        )
    return Rendered(text, user_spans, assistant_spans)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    assistant_masks: list[int]
    n_turns: int  # user turns kept (each followed by one assistant turn)
    n_speak: int  # of those, how many assistant turns are responses
    truncated: bool  # trailing turns were dropped to fit max_length
    text: str  # the rendered conversation that was tokenized
    offsets: list[tuple[int, int]]  # each token's character range in text
    assistant_spans: list[tuple[int, int]]
    user_spans: list[tuple[int, int]]
    decision_masks: list[int] = ()  # 1 on the tokens that carry the speak/silence decision


def decision_spans(turns: list[dict], assistant_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where each assistant turn decides: the "(response)" label of a reply, or the whole silent
    turn ("(silence)" and the end-of-turn token closing it). The reply text after the label is
    not a decision."""
    contents = [t["content"] for t in turns if t["role"] == "assistant"]
    return [(s, e) if c == SILENCE else (s, s + len(RESPONSE))
            for c, (s, e) in zip(contents, assistant_spans)]


def _overlaps(offsets, spans) -> list[int]:
    """1 for every token whose character range overlaps one of the (sorted) spans."""
    mask, j = [], 0
    for s, e in offsets:
        e = max(e, s + 1)  # a zero-width token still sits at a position
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] < e))
    return mask


def encode_turns(turns: list[dict], tokenizer, eot_token: str) -> tuple[Rendered, list[int], list[int], list]:
    r = render(turns, tokenizer, eot_token)
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    mask = _overlaps(offsets, r.assistant_spans)
    if any(m and u for m, u in zip(mask, _overlaps(offsets, r.user_spans))):
        raise TemplateError("a token spans both a user turn and an assistant turn; the template "
                            "must separate turns with its own text")
    return r, enc["input_ids"], mask, offsets


def encode(conversation: Conversation, tokenizer, preset: ModelPreset, max_length: int | None = None,
           pattern: re.Pattern | None = None) -> Example:
    """Token ids and assistant mask of one conversation, truncated by whole turns to max_length.

    The mask labels exactly the assistant turns' text and the end-of-turn token closing each.
    A conversation longer than max_length keeps its longest prefix of whole user+assistant
    exchanges that fits; if not even the first fits, TooLong is raised.
    """
    max_length = max_length or preset.max_length
    pattern = pattern or marker_pattern(tokenizer, preset)
    turns = chat_turns(conversation, pattern)
    r, ids, mask, offsets = encode_turns(turns, tokenizer, preset.eot_token)
    truncated = False
    if len(ids) > max_length:
        truncated = True
        # tokens needed to keep exchanges 1..k: up to the end of the k-th assistant turn
        starts = [s for s, _ in offsets]
        ends = [bisect_left(starts, end) for _, end in r.assistant_spans]
        k = sum(e <= max_length for e in ends)
        while True:
            if k == 0:
                raise TooLong(
                    f"the first exchange alone is {ends[0]} tokens, over max_length={max_length}"
                )
            turns = turns[: 2 * k]
            r, ids, mask, offsets = encode_turns(turns, tokenizer, preset.eot_token)
            if len(ids) <= max_length:
                break
            k -= 1  # the template's trailing text did not fit; drop one more exchange
    return Example(
        input_ids=ids,
        assistant_masks=mask,
        n_turns=len(turns) // 2,
        n_speak=sum(t["role"] == "assistant" and t["content"] != SILENCE for t in turns),
        truncated=truncated,
        text=r.text,
        offsets=[tuple(o) for o in offsets],
        assistant_spans=r.assistant_spans,
        user_spans=r.user_spans,
        decision_masks=_overlaps(offsets, decision_spans(turns, r.assistant_spans)),
    )


def show_labelled(example: Example) -> str:
    """The rendered conversation with each labelled run of tokens wrapped in ⟦ ⟧, so a person
    can see exactly what the model will learn to produce."""
    out, pos, inside = [], 0, False
    for (s, e), m in zip(example.offsets, example.assistant_masks):
        if m and not inside:
            out.append(example.text[pos:s] + "⟦")
            pos, inside = s, True
        elif not m and inside:
            out.append(example.text[pos:s] + "⟧")
            pos, inside = s, False
    out.append(example.text[pos:] + ("⟧" if inside else ""))
    return "".join(out)
