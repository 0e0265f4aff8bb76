"""The conversations a server keeps, by id: least recently used first, within a number of
conversations and a budget of cache memory. The model's thread and the request threads share it.

    store = ConversationStore(max_conversations=256, max_cache_mb=2048)
    state = store.before("room-1")          # the stored conversation (a new one is stored at once)
    ...                                     # the assistant decides a message on `state`
    store.after("room-1", state, decision)  # most recently used now; the limits applied
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from chimein.runtime.state import ConversationState


class ConversationStore:
    def __init__(self, max_conversations: int = 256, max_cache_mb: float = 2048):
        self.max_conversations, self.max_cache_bytes = max_conversations, max_cache_mb * 2**20
        self._lock = threading.Lock()
        self._conversations: OrderedDict[str, ConversationState] = OrderedDict()  # least recently used first
        self._cache_bytes: dict[str, int] = {}  # each conversation's cache, measured after its last message
        self._stats = {"conversations": 0, "cache_bytes": 0}  # read without the lock (/healthz)

    def __len__(self) -> int:
        return self._stats["conversations"]

    def __contains__(self, cid: str) -> bool:
        with self._lock:
            return cid in self._conversations

    @property
    def cache_bytes(self) -> int:
        """The caches' memory as measured after each conversation's last message."""
        return self._stats["cache_bytes"]

    def before(self, cid: str) -> ConversationState:
        """The stored conversation a message is decided on; a new one is stored at once, so a
        delete while it is decided is seen."""
        with self._lock:
            state = self._conversations.get(cid)
            if state is None:
                state = self._conversations[cid] = ConversationState()
                self._cache_bytes[cid] = 0
            return state

    def after(self, cid: str, state: ConversationState, result: object) -> None:
        """Once a message is decided (`result`: its Decision or the exception that refused it): the
        conversation becomes the most recently used and the limits are applied — unless it was
        deleted meanwhile; a conversation whose first message failed is not kept."""
        with self._lock:
            if self._conversations.get(cid) is not state:  # deleted meanwhile
                return
            if isinstance(result, BaseException) and not state.messages:
                del self._conversations[cid]
                self._cache_bytes.pop(cid, None)
                self._stats["conversations"] = len(self._conversations)
            else:
                self._keep(cid, state)

    def delete(self, cid: str) -> bool:
        """Forget a conversation; whether there was one."""
        with self._lock:
            deleted = self._conversations.pop(cid, None) is not None
            self._stats.update(conversations=len(self._conversations),
                               cache_bytes=self._stats["cache_bytes"] - self._cache_bytes.pop(cid, 0))
        return deleted

    def _keep(self, cid: str, state: ConversationState) -> None:
        """Store a conversation as the most recently used; then, least recently used first, drop
        whole conversations beyond the count and caches beyond the bytes (under the lock)."""
        self._conversations[cid] = state
        self._conversations.move_to_end(cid)
        self._cache_bytes[cid] = state.nbytes()
        while len(self._conversations) > self.max_conversations:
            self._cache_bytes.pop(self._conversations.popitem(last=False)[0])
        total = sum(self._cache_bytes.values())
        for old, st in self._conversations.items():
            if total <= self.max_cache_bytes:
                break
            total -= self._cache_bytes[old]
            self._cache_bytes[old] = 0
            st.drop_cache()
        self._stats.update(conversations=len(self._conversations), cache_bytes=total)
