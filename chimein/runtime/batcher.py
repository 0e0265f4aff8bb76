"""The model's own thread in a server: messages that arrive together are decided together.

    batcher = Batcher(bot, store.before, store.after, max_batch=16)
    decision = batcher.submit("room-1", "Ann", "who wrote Dune?", force=False)   # from any thread
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.state import ConversationState, Decision


class Batcher:
    """The model's own thread: `submit` queues a message for a conversation and waits for its
    Decision; the thread takes every waiting message (one per conversation, in arrival order, at
    most `max_batch`) and decides them together with `bot.add_many`. A message comes with its
    conversation's state, or with a key: then `before(key)` gives the state when the message is
    taken and `after(key, state, result)` is called once it is decided (both on the model's
    thread). The thread starts with the first message and ends after `idle_s` without one (so a
    dropped app does not keep its model alive).

    Clients answered by one pass send their next messages a moment later: rather than start a
    pass with the first of them (and the rest wait a whole pass), the thread waits for as many
    as the recent passes had while they keep coming (each within `gap_s` of the last, `gather_s`
    at most). A lone conversation never waits."""

    def __init__(self, bot: GroupChatAssistant, before, after, max_batch: int = 16, idle_s: float = 10.0,
                 gather_s: float = 0.1, gap_s: float = 0.01):
        self.bot, self.before, self.after = bot, before, after
        self.max_batch, self.idle_s, self.gather_s, self.gap_s = max_batch, idle_s, gather_s, gap_s
        self.waiting: list[tuple[object, ConversationState | None, tuple, Future]] = []
        self.cond = threading.Condition()
        self.running = False
        self.sizes: list[int] = []  # how many messages each of the last passes decided

    def submit(self, key: str | None, name: str, content: str, force: bool,
               state: ConversationState | None = None) -> Decision:
        """Decide a message of the stored conversation `key`, or of `state` (key None: a
        conversation of its own); blocks until done, raises what it raised."""
        fut: Future = Future()
        with self.cond:
            self.waiting.append((key if state is None else object(), state, (name, content, force), fut))
            if not self.running:
                self.running = True
                threading.Thread(target=self._run, name="chimein-model", daemon=True).start()
            self.cond.notify()
        return fut.result()

    def _take(self) -> list[tuple[object, ConversationState | None, tuple, Future]]:
        """The next batch: empty when the thread has been idle for `idle_s` (it then ends)."""
        with self.cond:
            if not self.waiting and not self.cond.wait_for(lambda: self.waiting, self.idle_s):
                self.running = False
                return []
            expected = min(max(self.sizes[-8:], default=1), self.max_batch)
            until = time.monotonic() + self.gather_s
            while (n := len(self.waiting)) < expected and (left := until - time.monotonic()) > 0:
                if not self.cond.wait_for(lambda: len(self.waiting) > n, min(self.gap_s, left)):
                    break  # no newcomer within gap_s: the others are not on their way
            taken, keys, left = [], set(), []
            for item in self.waiting:
                if len(taken) < self.max_batch and item[0] not in keys:
                    taken.append(item)
                    keys.add(item[0])
                else:  # the conversation's earlier message goes first
                    left.append(item)
            self.waiting = left
            return taken

    def _run(self) -> None:
        while taken := self._take():
            try:
                states = [st if st is not None else self.before(key) for key, st, _, _ in taken]
                results = self.bot.add_many([(st, *msg) for st, (_, _, msg, _) in zip(states, taken)])
                for (key, given, _, fut), st, result in zip(taken, states, results):
                    if given is None:
                        self.after(key, st, result)
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
                self.sizes = (self.sizes + [len(taken)])[-100:]
            except BaseException as e:  # noqa: BLE001 — every waiting request is answered; the thread goes on
                for *_, fut in taken:
                    if not fut.done():
                        fut.set_exception(e)
