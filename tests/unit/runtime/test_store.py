"""The server's conversation store on its own, without HTTP or a model: least recently used
first, bounded in count and cache memory, deletes respected while a message is decided."""

from __future__ import annotations

import torch

from chimein.conversation import Message
from chimein.runtime.state import ConversationState, Decision
from chimein.runtime.store import ConversationStore

MB = 2**20


def decided(store: ConversationStore, cid: str, cache_mb: float = 0.0) -> ConversationState:
    """A message decided on `cid`: the state holds a message and `cache_mb` of last logits."""
    state = store.before(cid)
    state.messages.append(Message("user", "hi", "Ann"))
    state.fed, state.last_logits = [1], torch.zeros(int(cache_mb * MB), dtype=torch.uint8)
    store.after(cid, state, Decision(False, 0.1))
    return state


def test_a_new_conversation_is_stored_at_once_and_kept_after_its_message():
    store = ConversationStore()
    state = store.before("a")
    assert "a" in store and store.before("a") is state  # the same state for the next message
    decided(store, "a", 0.5)
    assert len(store) == 1 and store.cache_bytes == MB // 2


def test_beyond_the_count_the_least_recently_used_conversation_goes():
    store = ConversationStore(max_conversations=2)
    for cid in ("a", "b"):
        decided(store, cid)
    decided(store, "a")  # a is now the most recently used
    decided(store, "c")
    assert "a" in store and "c" in store and "b" not in store and len(store) == 2


def test_beyond_the_memory_caches_are_dropped_least_recently_used_first_and_the_messages_stay():
    store = ConversationStore(max_cache_mb=2.5)
    a, b, c = (decided(store, cid, 1.0) for cid in ("a", "b", "c"))
    assert a.last_logits is None and a.fed == [] and a.messages  # only a's cache went
    assert b.last_logits is not None and c.last_logits is not None
    assert store.cache_bytes == 2 * MB and len(store) == 3


def test_a_conversation_deleted_while_its_message_is_decided_stays_deleted():
    store = ConversationStore()
    state = store.before("a")
    assert store.delete("a") and not store.delete("a")
    state.messages.append(Message("user", "hi", "Ann"))
    store.after("a", state, Decision(False, 0.1))
    assert "a" not in store and len(store) == 0


def test_a_refused_first_message_leaves_nothing_a_refused_later_one_keeps_the_conversation():
    store = ConversationStore()
    state = store.before("new")
    store.after("new", state, ValueError("refused"))
    assert "new" not in store and len(store) == 0
    decided(store, "old")
    state = store.before("old")
    store.after("old", state, ValueError("refused"))
    assert "old" in store
