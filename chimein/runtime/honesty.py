"""Say only what is right: exact answers from tools, and a guess said as one.

After the assistant decides to speak, before any reply is generated:

- **a tool's exact answer** — a conversion, a clock time in another zone, a weekday, arithmetic
  (chimein.knowledge.tools, computed by pint / zoneinfo / the standard library) — is the reply,
  word for word: the model never does the arithmetic (`tools=False` turns them off);

and after the local model replied:

- **a guess is said as one.** The reply's confidence is the lowest probability the model gave one
  of its first CONFIDENCE_TOKENS tokens (a name or a number it had to pick among many is where a small model goes wrong).
  Below the adapter's threshold (`Confidence`, calibrated on the validation split), an assistant
  that was addressed says plainly that it is not sure, then what it thinks; one that was not
  addressed withdraws: it stays silent rather than chime in with a guess (`hedge=False` turns this
  off; `withdraw=False` chimes in with the guess, said as one, instead of withdrawing). The
  decision says so: `Decision.hedged`, `Decision.confidence`, `Decision.tool`;

and, with the group's documents (`knowledge=`), each user message is shown to the model with the
passages it retrieves (chimein.knowledge.grounding): the decision and the local reply read them, and the
responder gets them (`Decision.passages` says where they come from).

A message addresses the assistant when it is forced (`reply()`, `add(force=True)`, chat's /force)
or names it: "assistant", "bot", "@…bot", 助手, 机器人.
"""

from __future__ import annotations

import re
from pathlib import Path

from chimein.conversation import Message
from chimein.knowledge.index import CJK
from chimein.runtime.state import Decision

ADDRESS = re.compile(r"\b(?:assistant|bot|chimein)\b|@\w*bot\b|助手|机器人", re.IGNORECASE)

# the words of a hedge, per language; answers.HEDGES recognises them (a test checks it)
HEDGE = {"en": "Not sure about this one, so please double-check: {guess}",
         "zh": "这个我不太确定，仅供参考：{guess}"}


def addressed(content: str, force: bool) -> bool:
    return force or ADDRESS.search(content) is not None


def answer_with_tool(d: Decision, messages: list[Message], pattern: re.Pattern) -> bool:
    """Whether a tool computed an exact answer to the last of `messages` (the few before it are its
    context): then it is the reply, added to them, and the decision names the tool."""
    from chimein.formatting import neutralize
    from chimein.knowledge.tools import tool_answers

    answers = tool_answers([m.content for m in messages])
    if not answers:
        return False
    d.response, d.tool = neutralize(answers[0].text, pattern), answers[0].kind
    messages.append(Message("assistant", d.response))
    return True


def open_knowledge(knowledge):
    """A KnowledgeIndex from a folder's path (indexed, or loaded when up to date); an index or None
    as given."""
    if knowledge is None or not isinstance(knowledge, (str, Path)):
        return knowledge
    from chimein.knowledge.index import KnowledgeIndex

    return KnowledgeIndex.open(knowledge)[0]


def adapter_knowledge(folder: str | None):
    """The documents an adapter was trained for (its chimein.json's `knowledge`), when that folder
    is on this machine; otherwise none, said in the log."""
    if not folder:
        return None
    if not Path(folder).is_dir():
        import logging

        logging.getLogger("chimein").warning(
            f"the adapter names the group's documents {folder}, which is not a folder here: no "
            "documents (pass knowledge= / --knowledge PATH)")
        return None
    return folder


def hedged(guess: str, question: str) -> str:
    """The guess, said as one, in the language of the question."""
    return HEDGE["zh" if CJK.search(question) else "en"].format(guess=guess)


def settle(d: Decision, messages: list, threshold: float, hedge: bool, say_guess: bool) -> None:
    """After a local reply (the last of `messages`, which ends with it): keep it when the model was
    sure enough; otherwise say it as a guess (`say_guess`: addressed, or withdrawing is off), or
    withdraw it (silence)."""
    if not hedge or d.confidence is None or d.confidence >= threshold:
        return
    d.hedged = True
    if say_guess:
        d.response = hedged(d.response, messages[-2].content)
        messages[-1] = Message("assistant", d.response)
    else:
        d.speak, d.response = False, None
        messages.pop()
