"""Passages in the conversation: which passages of the group's documents a new user message is
shown with (the model reads them before it: chimein.formatting), the same at run time, in the
grounded training chats and in evaluation.
"""

from __future__ import annotations

from dataclasses import replace

from chimein.conversation import Conversation, Message

KNOWLEDGE_PASSAGES = 2  # passages retrieved per user message
# a passage is shown at most once in any RECENT user messages in a row: it is still close
# by (on the grounded benchmark the answering passage is then among the last 3 messages' at 26 of
# 31 questions; 20 when it was never repeated within 12 messages, as it ends up far from the question)
RECENT = 3


def with_passages(knowledge, messages: list[Message], msg: Message) -> tuple[Message, list[str]]:
    """The new user message `msg` with the passages of the group's documents it retrieves
    (`Message.passages`, which the model reads before it: chimein.formatting), and where they
    come from. The query is the message with the user message before it (which often holds the
    subject of a short follow-up); a passage counts only when it shares a word with the query
    (besides stopwords), and one shown with the last RECENT - 1 user messages is not repeated.
    Without knowledge, `msg` as it is."""
    if knowledge is None:
        return msg, []
    shown = set(recent_passages(messages, RECENT - 1))
    users = [m.content for m in messages if m.role == "user"][-1:] + [msg.content]
    hits = [h for h in knowledge.search(" ".join(users), k=2 * KNOWLEDGE_PASSAGES + len(shown))
            if h.lexical is not None and h.passage.render() not in shown][:KNOWLEDGE_PASSAGES]
    if not hits:
        return msg, []
    return replace(msg, passages=tuple(h.passage.render() for h in hits)), [h.passage.where() for h in hits]


def recent_passages(messages: list[Message], last: int = RECENT) -> list[str]:
    """The passages shown with the `last` user messages, the latest first: what a reply may use."""
    users = [m for m in messages if m.role == "user"][-last:] if last > 0 else []
    return list(dict.fromkeys(p for m in reversed(users) for p in m.passages))


def attach_all(knowledge, conversation: Conversation) -> Conversation:
    """`conversation` as the assistant would have seen it with `knowledge`: every user message with
    the passages it retrieves given the messages before it (evaluation, grounded chats)."""
    msgs: list[Message] = []
    for m in conversation.messages:
        msgs.append(with_passages(knowledge, msgs, replace(m, passages=()))[0] if m.role == "user" else m)
    return Conversation(tuple(msgs))
