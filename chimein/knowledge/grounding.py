"""Passages in the conversation: which passages of the group's documents a new user message is
shown with (the model reads them before it: chimein.formatting), the same at run time, in the
grounded training chats and in evaluation.
"""

from __future__ import annotations

from dataclasses import replace

from chimein.conversation import Conversation, Message

KNOWLEDGE_PASSAGES = 2  # passages retrieved per user message
RECENT_MESSAGES = 12  # a passage shown with one of the last this many messages is not shown again


def with_passages(knowledge, messages: list[Message], msg: Message) -> tuple[Message, list[str]]:
    """The new user message `msg` with the passages of the group's documents it retrieves
    (`Message.passages`, which the model reads before it: chimein.formatting), and where they
    come from. The query is the message with the user message before it (which often holds the
    subject of a short follow-up); a passage counts only when it shares a word with the query
    (besides stopwords), and one shown in the last RECENT_MESSAGES messages is not repeated.
    Without knowledge, `msg` as it is."""
    if knowledge is None:
        return msg, []
    shown = {p for m in messages[-RECENT_MESSAGES:] for p in m.passages}
    users = [m.content for m in messages if m.role == "user"][-1:] + [msg.content]
    hits = [h for h in knowledge.search(" ".join(users), k=2 * KNOWLEDGE_PASSAGES + len(shown))
            if h.lexical is not None and h.passage.render() not in shown][:KNOWLEDGE_PASSAGES]
    if not hits:
        return msg, []
    return replace(msg, passages=tuple(h.passage.render() for h in hits)), [h.passage.where() for h in hits]


def recent_passages(messages: list[Message]) -> list[str]:
    """The passages shown with the last two user messages, best first: what a reply may use."""
    users = [m for m in messages if m.role == "user"][-2:]
    return list(dict.fromkeys(p for m in reversed(users) for p in m.passages))


def attach_all(knowledge, conversation: Conversation) -> Conversation:
    """`conversation` as the assistant would have seen it with `knowledge`: every user message with
    the passages it retrieves given the messages before it (evaluation, grounded chats)."""
    msgs: list[Message] = []
    for m in conversation.messages:
        msgs.append(with_passages(knowledge, msgs, replace(m, passages=()))[0] if m.role == "user" else m)
    return Conversation(tuple(msgs))
