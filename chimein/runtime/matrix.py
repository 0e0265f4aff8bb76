"""The assistant in Matrix rooms (matrix-nio): `chimein bridge matrix`.

    bridge = MatrixBridge(bot, "https://matrix.example.org", "@chimein:example.org",
                          state_path, password=os.environ["CHIMEIN_MATRIX_PASSWORD"])
    asyncio.run(bridge.run())

It joins the rooms it is invited to and reads every message. Each room, and each thread in a
room, is a conversation of its own, decided by the runtime. Messages that arrive together in
several rooms are decided together (runtime.batcher). It replies only when it decides to speak:
in the thread when the message was in one, else as a rich reply to the message. Every reply
carries an empty `m.mentions`, so nobody is pinged by accident.

What it never does:
- answer the backlog it finds at its first start: it reads it as context;
- answer its own messages or other bots' notices (`m.notice`);
- answer an event twice. Handled events and the sync token are saved in the state file, and a
  reply is sent with a transaction id made from the event it answers. The homeserver keeps a
  retry under the same login to one message, and the login is saved and restored.

It survives a homeserver restart and rate limits: matrix-nio retries a request that hit a rate
limit after the server's retry-after (429), and one that could not connect with backoff. After its own restart it answers the messages it missed if
they are at most `catch_up_s` old, and only reads older ones.

`/chimein quiet|normal|chatty` in a room sets that room's chattiness, and `/chimein status` says it.
`/chimein record on` (off by default, announced in the room) records the room for training, with
personal data scrubbed (chimein.data.feedback), and so do the reactions to the assistant's
replies, which label them. `/chimein record off` stops, and `/chimein forget` deletes what was
recorded. Recordings older than the retention are deleted.
Only unencrypted rooms are read: matrix-nio's end-to-end encryption needs libolm, which is not
installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from chimein.conversation import InvalidConversation, parse_conversation
from chimein.data.feedback import Recorder
from chimein.data.importers import strip_reply_fallback
from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.batcher import Batcher
from chimein.runtime.bridge_state import HANDLED_KEPT, BridgeState
from chimein.runtime.store import ConversationStore

log = logging.getLogger("chimein.matrix")

# a room's chattiness, from the assistant's own threshold t: quiet halves the distance to 1
# (it speaks only when surer), chatty halves t
LEVELS = ("quiet", "normal", "chatty")
COMMAND = re.compile(r"^\s*[/!]chimein\b\s*(\S*)", re.IGNORECASE)
MAX_MESSAGES = 400  # a conversation longer than this keeps its last half (the model reads a window anyway)
EVENT_TEXT_KEPT = 500  # recent messages kept to start a thread's conversation with its root


def room_threshold(level: str, threshold: float) -> float | None:
    """The p(speak) threshold of a room at `level`, from the assistant's own (None: its own)."""
    if level == "quiet":
        return threshold + (1 - threshold) / 2
    if level == "chatty":
        return threshold / 2
    return None


def txn_id(event_id: str) -> str:
    """The transaction id of the reply to `event_id`: the same on every try, so the homeserver
    keeps one message however often the send is retried under the same login."""
    return "chimein-" + hashlib.sha256(event_id.encode()).hexdigest()[:32]


@dataclass
class Incoming:
    """A room message the assistant reads."""

    room: str
    event_id: str
    sender: str
    name: str
    body: str
    ts: int  # origin_server_ts, ms
    thread: str | None  # the thread's root event id
    addressed: bool  # names the bot (m.mentions, @localpart) or replies to one of its messages

    @property
    def key(self) -> str:
        return self.room if self.thread is None else f"{self.room} {self.thread}"


class MatrixBridge:
    def __init__(self, bot: GroupChatAssistant, homeserver: str, user_id: str, state_path: Path,
                 password: str | None = None, token: str | None = None, device_name: str = "chimein",
                 catch_up_s: float = 300, max_batch: int = 16, max_conversations: int = 256,
                 sync_timeout_ms: int = 30_000, record_dir: Path | None = None, retention_days: float = 30):
        from nio import AsyncClient, AsyncClientConfig

        if not (password or token):
            raise ValueError("the bridge needs the bot account's password or access token: set "
                             "CHIMEIN_MATRIX_PASSWORD or CHIMEIN_MATRIX_TOKEN")
        self.bot, self.user_id, self.state_path = bot, user_id, Path(state_path)
        self.password, self.token, self.device_name = password, token, device_name
        self.catch_up_s, self.sync_timeout_ms = catch_up_s, sync_timeout_ms
        self.state = BridgeState.load(self.state_path)
        if self.state.user_id and self.state.user_id != user_id:
            raise ValueError(f"the state file {self.state_path} belongs to {self.state.user_id}, not {user_id}: "
                             "give each bot account its own --state file")
        # matrix-nio's own retries: 429s after the server's retry-after, connection errors with
        # backoff up to 10 s, both without end (a homeserver restart or a rate limit loses nothing)
        self.client = AsyncClient(homeserver, user_id, config=AsyncClientConfig(
            store_sync_tokens=False, encryption_enabled=False, max_limit_exceeded=None, max_timeouts=None,
            max_timeout_retry_wait_time=10))
        self.store = ConversationStore(max_conversations)
        self.batcher = Batcher(bot, self._before, self.store.after, max_batch=max_batch)
        self.handled = set(self.state.handled)
        self.sent: set[str] = set()  # event ids of the bot's own replies (a reply to one addresses it)
        self.texts: dict[str, tuple[str, str]] = {}  # recent event id -> (name, body): a thread's root
        self.recorder = Recorder(record_dir or self.state_path.with_name(self.state_path.stem + "-recordings"),
                                 retention_days)
        self.pruned_day = None  # the day the recordings were last pruned
        self.joining: set[str] = set()  # rooms just joined: what precedes its join event is backlog
        self.stats = {"read": 0, "decided": 0, "replied": 0, "skipped": 0}
        self.stopping = asyncio.Event()

    # ---- conversations

    def _before(self, key: str):
        """The stored conversation of a room or thread, with the room's chattiness (on the model's thread)."""
        state = self.store.before(key)
        level = self.state.rooms.get(key.split(" ")[0], {}).get("level", "normal")
        state.chattiness = room_threshold(level, self.bot.chattiness)
        if len(state.messages) > MAX_MESSAGES:
            state.messages[:] = state.messages[-MAX_MESSAGES // 2:]
            state.drop_cache()
        return state

    def _read_only(self, msg: Incoming, assistant: bool = False) -> None:
        """A message taken in as context, not decided: the backlog, or the bot's own earlier replies."""
        state = self._before(msg.key)
        if not state.messages and msg.thread and msg.thread in self.texts:
            self._seed_thread(state, msg.thread)
        try:
            m = parse_conversation([{"role": "assistant", "content": msg.body} if assistant else
                                    {"role": "user", "name": msg.name, "content": msg.body}]).messages[0]
        except InvalidConversation as e:
            log.info(f"{msg.event_id}: not read ({e.problem})")
            return
        state.messages.append(m)
        self.store.after(msg.key, state, None)
        self.stats["read"] += 1

    def _seed_thread(self, state, root: str) -> None:
        name, body = self.texts[root]
        try:
            state.messages.extend(parse_conversation([{"role": "user", "name": name, "content": body}]).messages)
        except InvalidConversation:
            pass

    # ---- Matrix

    async def login(self) -> None:
        from nio import LoginResponse

        if self.state.access_token:  # the saved login: the same device, so its transaction ids still dedupe
            self.client.restore_login(self.state.user_id, self.state.device_id, self.state.access_token)
            return
        if self.token:
            self.client.restore_login(self.user_id, self.device_name, self.token)
            self.client.access_token = self.token
            who = await self.client.whoami()
            device = getattr(who, "device_id", None) or self.device_name
            self.client.restore_login(self.user_id, device, self.token)
        else:
            resp = await self.client.login(self.password, device_name=self.device_name)
            if not isinstance(resp, LoginResponse):
                raise PermissionError(f"login as {self.user_id} failed: {getattr(resp, 'message', resp)}")
        self.state.user_id, self.state.device_id = self.user_id, self.client.device_id
        self.state.access_token = self.client.access_token
        self.state.save(self.state_path)

    async def run(self) -> None:
        """Log in, read the backlog (answering nothing older than catch_up_s), then follow the rooms
        until `stopping` is set."""
        from nio import SyncResponse

        await self.login()
        first, delay = True, 1.0
        try:
            while not self.stopping.is_set():
                try:
                    sync = asyncio.ensure_future(self.client.sync(
                        timeout=0 if first else self.sync_timeout_ms, since=self.state.next_batch,
                        full_state=first))
                    stop = asyncio.ensure_future(self.stopping.wait())
                    done, _ = await asyncio.wait({sync, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if sync not in done:
                        sync.cancel()
                        break
                    stop.cancel()
                    resp = sync.result()
                except (OSError, asyncio.TimeoutError) as e:  # the homeserver is down or restarting
                    resp = e
                if getattr(resp, "status_code", None) == "M_UNKNOWN_TOKEN" and self.state.access_token:
                    # the saved login was logged out (or the account's password changed): log in afresh
                    log.warning("the saved login is no longer valid: logging in again")
                    self.state.access_token = self.state.device_id = ""
                    await self.login()
                    continue
                if not isinstance(resp, SyncResponse):
                    log.warning(f"sync failed ({getattr(resp, 'message', None) or resp!r}); again in {delay:.0f} s")
                    await self._sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 1.0
                await self._process(resp, first, backlog=first and self.state.next_batch is None)
                self.state.next_batch = resp.next_batch
                self.state.save(self.state_path)
                if first:
                    said = (f"following {len(self.client.rooms)} room(s) as {self.user_id}"
                            + (f", joining {len(self.joining)}" if self.joining else ""))
                    log.info(said)
                    print(f"chimein: {said}", flush=True)
                first = False
        finally:
            await self.client.close()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def recording(self, room: str) -> bool:
        return bool(self.state.rooms.get(room, {}).get("record"))

    async def _process(self, resp, first: bool, backlog: bool) -> None:
        """One sync's invites (joined) and messages. backlog: what the first start finds, read
        only; else a message at most catch_up_s old is decided. The bot's own messages are read
        as its replies in the first sync only (later ones are in the conversations already)."""
        if (today := time.strftime("%Y-%m-%d", time.gmtime())) != self.pruned_day:
            if gone := self.recorder.prune():
                log.info(f"deleted {gone} recording file(s) older than {self.recorder.retention_days:g} days")
            self.pruned_day = today
        for room_id in resp.rooms.invite:
            log.info(f"invited to {room_id}: joining")
            self.joining.add(room_id)
            await self.client.join(room_id)
        by_key: dict[str, list[tuple[Incoming, bool]]] = {}
        now = time.time() * 1000
        # what the bot already answered, as the rooms show it: after a crash before the state file
        # was written, these are not answered again
        answered = {((e.source.get("content") or {}).get("m.relates_to") or {}).get("m.in_reply_to", {}).get("event_id")
                    for info in resp.rooms.join.values() for e in info.timeline.events
                    if e.source.get("sender") == self.user_id}
        for room_id, info in resp.rooms.join.items():
            for event in info.timeline.events:
                ev = event.source
                if room_id in self.joining and ev.get("type") == "m.room.member" and \
                        ev.get("state_key") == self.user_id and (ev.get("content") or {}).get("membership") == "join":
                    self.joining.discard(room_id)  # what follows its own join is news
                if ev.get("type") == "m.reaction" and self.recording(room_id) and not backlog:
                    rel = (ev.get("content") or {}).get("m.relates_to") or {}
                    if rel.get("rel_type") == "m.annotation" and ev.get("event_id") not in self.handled:
                        self.recorder.reaction(room_id, ev["event_id"], int(ev.get("origin_server_ts", 0)),
                                               rel.get("event_id", ""), str(rel.get("key", "")))
                        self._mark(ev["event_id"])
                msg = self._incoming(room_id, ev)
                if msg is None:
                    continue
                if msg.sender == self.user_id:
                    self.sent.add(msg.event_id)
                    if first:  # its replies before a restart: context
                        by_key.setdefault(msg.key, []).append((msg, False))
                    continue
                live = (not backlog and room_id not in self.joining and msg.event_id not in answered
                        and now - msg.ts <= self.catch_up_s * 1000)
                by_key.setdefault(msg.key, []).append((msg, live))
        # rooms and threads side by side (the batcher decides what arrives together in one pass),
        # each one's messages in order
        await asyncio.gather(*(self._conversation(items) for items in by_key.values()))

    def _incoming(self, room_id: str, ev: dict) -> Incoming | None:
        if ev.get("type") != "m.room.message" or ev.get("event_id") in self.handled:
            return None
        content = ev.get("content") or {}
        relates = content.get("m.relates_to") or {}
        if content.get("msgtype") not in ("m.text", "m.emote") or relates.get("rel_type") == "m.replace":
            if content.get("msgtype") == "m.notice":  # other bots' (and our own) notices
                self.stats["skipped"] += 1
            return None
        body = strip_reply_fallback(str(content.get("body", ""))).strip()
        if not body:
            return None
        thread = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
        replied = (relates.get("m.in_reply_to") or {}).get("event_id")
        mentions = (content.get("m.mentions") or {}).get("user_ids") or []
        localpart = self.user_id.split(":")[0]
        addressed = (self.user_id in mentions or localpart.lower() in body.lower()
                     or (replied in self.sent and not relates.get("is_falling_back")))
        sender = ev.get("sender", "")
        room = self.client.rooms.get(room_id)
        name = (room.user_name(sender) if room else None) or sender.split(":")[0].lstrip("@")
        msg = Incoming(room_id, ev["event_id"], sender, name, body, int(ev.get("origin_server_ts", 0)),
                       thread, addressed)
        self.texts[msg.event_id] = (name, body)
        while len(self.texts) > EVENT_TEXT_KEPT:
            self.texts.pop(next(iter(self.texts)))
        return msg

    async def _conversation(self, items: list[tuple[Incoming, bool]]) -> None:
        for msg, live in items:
            if msg.sender == self.user_id:
                self._read_only(msg, assistant=True)
            elif command := COMMAND.match(msg.body):
                if live:
                    await self._command(msg, msg.body[command.end(1):].strip().lower(), command.group(1).lower())
            else:
                if self.recording(msg.room) and live:
                    self.recorder.message(msg.room, msg.event_id, msg.ts, msg.name, msg.body, thread=msg.thread,
                                          addressed=msg.addressed)
                if live:
                    await self._decide(msg)
                else:
                    self._read_only(msg)
            self._mark(msg.event_id)

    def _mark(self, event_id: str) -> None:
        """`event_id` will not be handled again, also after a restart."""
        self.handled.add(event_id)
        self.state.handled.append(event_id)
        if len(self.state.handled) > 2 * HANDLED_KEPT:
            self.state.handled = self.state.handled[-HANDLED_KEPT:]
            self.handled = set(self.state.handled)
        self.state.save(self.state_path)

    async def _decide(self, msg: Incoming) -> None:
        if msg.addressed:  # it will write: the room sees it typing meanwhile
            await self.client.room_typing(msg.room, True, timeout=30_000)
        state = self._before(msg.key)
        if not state.messages and msg.thread and msg.thread in self.texts:
            self._seed_thread(state, msg.thread)
        try:
            d = await asyncio.to_thread(self.batcher.submit, msg.key, msg.name, msg.body, msg.addressed)
        except InvalidConversation as e:
            log.info(f"{msg.event_id} in {msg.room}: not decided ({e.problem})")
            return
        except Exception:  # noqa: BLE001 — one message's failure does not stop the bridge
            log.exception(f"{msg.event_id} in {msg.room}: the assistant failed on it")
            return
        finally:
            if msg.addressed:
                await self.client.room_typing(msg.room, False)
        self.stats["decided"] += 1
        log.info(f"{msg.room} {msg.name}: p_speak {d.p_speak:.3f} -> {'speak' if d.speak else 'silent'}"
                 + (" (hedged)" if d.hedged else "") + (f" [{d.tool}]" if d.tool else ""))
        if d.speak and d.response:
            await self.reply(msg, d.response)

    async def reply(self, msg: Incoming, text: str, notice: bool = False) -> str | None:
        """Send `text` in answer to `msg`: in its thread, else as a rich reply; nobody pinged."""
        relates: dict = {"m.in_reply_to": {"event_id": msg.event_id}}
        if msg.thread:
            relates = {"rel_type": "m.thread", "event_id": msg.thread, "is_falling_back": True} | relates
        content = {"msgtype": "m.notice" if notice else "m.text", "body": text, "m.mentions": {},
                   "m.relates_to": relates}
        event_id = await self._send(msg.room, content, txn_id(msg.event_id))
        if event_id:
            self.sent.add(event_id)
            self.stats["replied"] += 1
            if not notice and self.recording(msg.room):
                self.recorder.message(msg.room, event_id, int(time.time() * 1000), "chimein", text, assistant=True,
                                      thread=msg.thread)
        return event_id

    async def _send(self, room: str, content: dict, txn: str) -> str | None:
        """room_send with a transaction id of its own (matrix-nio retries rate limits and lost
        connections with it, so the room gets one message); None when the homeserver refused it."""
        from nio import RoomSendResponse

        resp = await self.client.room_send(room, "m.room.message", content, tx_id=txn)
        if isinstance(resp, RoomSendResponse):
            return resp.event_id
        log.error(f"the homeserver refused a message to {room}: {getattr(resp, 'message', resp)}")
        return None

    async def _command(self, msg: Incoming, rest: str, arg: str) -> None:
        rooms = self.state.rooms.setdefault(msg.room, {})
        days = f"{self.recorder.retention_days:g} days"
        if arg == "record" and rest in ("on", "off"):
            rooms["record"] = rest == "on"
            self.state.save(self.state_path)
            said = (f"chimein records this room from now on, to learn this group's habits: your messages and "
                    f"reactions to its replies (👎 or 'not now, bot' when it interrupted, 👍 or ✅ when it helped, "
                    f"'@bot??' when it should have spoken). Emails, phone numbers and links with keys are removed "
                    f"first; recordings are deleted after {days}. '/chimein record off' stops, "
                    "'/chimein forget' deletes them." if rest == "on" else
                    f"chimein stopped recording this room. What it recorded is deleted after {days}; "
                    "'/chimein forget' deletes it now.")
        elif arg == "forget":
            said = ("chimein deleted what it recorded in this room." if self.recorder.forget(msg.room)
                    else "chimein had nothing recorded in this room.")
        elif arg in LEVELS:
            rooms["level"] = arg
            self.state.save(self.state_path)
            threshold = room_threshold(arg, self.bot.chattiness)
            said = (f"chimein is {arg} in this room now: it speaks when p(speak) ≥ "
                    f"{self.bot.chattiness if threshold is None else threshold:.2f}")
        elif arg in ("", "status"):
            level = rooms.get("level", "normal")
            said = (f"chimein is {level} in this room, recording {'on' if rooms.get('record') else 'off'} "
                    f"({self.bot.describe()})")
        else:
            said = "usage: /chimein quiet | normal | chatty | status | record on | record off | forget"
        await self.reply(msg, said, notice=True)
