"""`chimein bridge matrix` on a real homeserver: Synapse on loopback (tests/integration/synapse.py),
two scripted people and the bot in a room, the bot a real `chimein` process.

The assistant is the tiny chatml model (random weights) at chattiness 2.0, so it speaks only when
addressed (forced): what is tested here is the bridge — what it reads, where it answers, that
it never answers twice — not the model's judgement (the benchmarks measure that)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.synapse import Account, Synapse

pytest.importorskip("synapse")
pytest.importorskip("nio")

WAIT_S = 90  # the longest wait for one thing to happen (a reply, a start); every wait is bounded


class Bot:
    """The bridge as a process of its own (killable like a real deployment)."""

    def __init__(self, hs: Synapse, account, state: Path, log: Path):
        self.hs, self.account, self.state, self.log = hs, account, state, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "CHIMEIN_MATRIX_PASSWORD": self.account.password, "PYTHONUNBUFFERED": "1"}
        env.pop("CHIMEIN_MATRIX_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chimein.cli", "bridge", "matrix", "--homeserver", self.hs.url,
             "--user", self.account.user_id, "--base", "tiny-chatml", "--chattiness", "2.0",
             "--max-new-tokens", "6", "--state", str(self.state), "--catch-up", "600",
             "--record-dir", str(self.state.parent / "recordings")],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True, env=env, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(self.proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + WAIT_S
        while not any("following" in line for line in lines):
            assert self.proc.poll() is None, f"the bridge exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the bridge did not start: {self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0


def text(body: str, mention=None, thread: str | None = None) -> dict:
    content = {"msgtype": "m.text", "body": body, "m.mentions": {"user_ids": [mention]} if mention else {}}
    if thread:
        content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread, "is_falling_back": True,
                                   "m.in_reply_to": {"event_id": thread}}
    return content


def replies_to(hs, who, room, bot_id) -> dict[str, list[dict]]:
    """The bot's messages in the room, by the event each answers."""
    out: dict[str, list[dict]] = {}
    for ev in hs.messages(who, room):
        if ev["sender"] == bot_id:
            target = ev["content"].get("m.relates_to", {}).get("m.in_reply_to", {}).get("event_id")
            out.setdefault(target, []).append(ev)
    return out


def wait_for_reply(hs, who, room, bot_id, event_id) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = replies_to(hs, who, room, bot_id).get(event_id)
        if got:
            return got[0]
        time.sleep(0.3)
    raise AssertionError(f"no reply to {event_id} within {WAIT_S} s")


def test_the_bot_in_a_room_on_a_real_homeserver(tmp_path):
    with Synapse(tmp_path) as hs:
        ann, ben = hs.register("ann", admin=True, displayname="Ann"), hs.register("ben", displayname="Ben")
        bot_account = hs.register("chimein", displayname="chimein")
        room = hs.api(ann, "POST", "/createRoom", {"preset": "private_chat", "name": "friends",
                                                   "invite": [ben.user_id, bot_account.user_id]})["room_id"]
        hs.api(ben, "POST", f"/rooms/{room}/join", {})
        # the backlog, before the bot ever ran: read, never answered
        backlog = hs.send(ann, room, text("@chimein are you there yet?", bot_account.user_id))
        state = tmp_path / "bridge.json"
        bot = Bot(hs, bot_account, state, tmp_path / "bridge.log")
        bot.start()  # joins on the invite
        try:
            deadline = time.monotonic() + WAIT_S
            while bot_account.user_id not in hs.api(ann, "GET", f"/rooms/{room}/joined_members")["joined"]:
                assert time.monotonic() < deadline, "the bot never joined"
                time.sleep(0.3)

            # small talk: silence
            hs.send(ann, room, text("morning! how was the hike?"))
            talk = hs.send(ben, room, text("great, we did the whole ridge"))
            deadline = time.monotonic() + WAIT_S
            while talk not in json.loads(state.read_text())["handled"]:
                assert time.monotonic() < deadline, "the small talk was never handled"
                time.sleep(0.2)
            before_crash = state.read_text()  # what a crash before the next writes leaves behind

            # addressed in the room: a rich reply to that message, nobody pinged
            asked = hs.send(ann, room, text("chimein, how many cm is 3 inches?", bot_account.user_id))
            reply = wait_for_reply(hs, ann, room, bot_account.user_id, asked)
            assert reply["content"]["m.mentions"] == {} and reply["content"]["msgtype"] == "m.text"
            assert "rel_type" not in reply["content"]["m.relates_to"]
            assert "7.62 cm" in reply["content"]["body"]  # the exact tool answered (chimein.knowledge.tools)

            # another bot's notice, even one that names it: never answered
            notice = hs.send(ben, room, {"msgtype": "m.notice", "body": "chimein: build #12 passed",
                                         "m.mentions": {"user_ids": [bot_account.user_id]}})

            # addressed in a thread: the reply is in that thread
            root = hs.send(ben, room, text("thread for the trip on saturday"))
            in_thread = hs.send(ben, room, text("@chimein what weekday is 2026-12-12?", bot_account.user_id,
                                                thread=root))
            reply = wait_for_reply(hs, ann, room, bot_account.user_id, in_thread)
            rel = reply["content"]["m.relates_to"]
            assert rel["rel_type"] == "m.thread" and rel["event_id"] == root and reply["content"]["m.mentions"] == {}

            # a room's chattiness: /chimein quiet, acknowledged as a notice, kept in the state file
            quiet = hs.send(ann, room, text("/chimein quiet"))
            ack = wait_for_reply(hs, ann, room, bot_account.user_id, quiet)
            assert ack["content"]["msgtype"] == "m.notice" and "quiet" in ack["content"]["body"]
            assert json.loads(state.read_text())["rooms"][room]["level"] == "quiet"

            # killed and restarted: what was answered is not answered again (not even when the
            # crash lost the state file's record of it); what came while it was down is answered once
            bot.kill()
            # ... and its saved login was logged out meanwhile: it logs in again by itself
            hs.api(Account(bot_account.user_id, json.loads(before_crash)["access_token"], ""), "POST", "/logout", {})
            state.write_text(before_crash)
            missed = hs.send(ann, room, text("@chimein are you back? what is 12 * 7?", bot_account.user_id))
            bot.start()
            assert "84" in wait_for_reply(hs, ann, room, bot_account.user_id, missed)["content"]["body"]

            # the homeserver restarts under the bot: it carries on
            hs.restart()
            after = hs.send(ann, room, text("@chimein still there? 2 km in miles?", bot_account.user_id))
            wait_for_reply(hs, ann, room, bot_account.user_id, after)

            # rate limited (429 with retry-after): every reply arrives, once
            hs.limit_messages(ann, bot_account.user_id, per_second=1, burst=1)
            burst = [hs.send(ben, room, text(f"@chimein what is {n} + {n}?", bot_account.user_id)) for n in (3, 4, 5)]
            for event_id in burst:
                wait_for_reply(hs, ann, room, bot_account.user_id, event_id)

            # recording, with the room's consent: labels from its reactions, personal data scrubbed
            record = hs.send(ann, room, text("/chimein record on"))
            assert "records this room" in wait_for_reply(hs, ann, room, bot_account.user_id, record)["content"]["body"]
            asked_too = hs.send(ann, room, text("@chimein my mail is ann@example.org, what is 6 * 7?",
                                                bot_account.user_id))
            unwanted = wait_for_reply(hs, ann, room, bot_account.user_id, asked_too)["event_id"]
            hs.send(ben, room, {"m.relates_to": {"rel_type": "m.annotation", "event_id": unwanted, "key": "👎"}},
                    "m.reaction")
            hs.send(ann, room, text("which platform does the 10:15 to leeds leave from?"))
            poke = hs.send(ann, room, text("@chimein??", bot_account.user_id))
            wait_for_reply(hs, ann, room, bot_account.user_id, poke)
            stop_recording = hs.send(ann, room, text("/chimein record off"))
            wait_for_reply(hs, ann, room, bot_account.user_id, stop_recording)
            hs.send(ann, room, text("not recorded any more"))
            time.sleep(2)  # anything sent twice would be in by now
        finally:
            code = bot.stop()
        log = (tmp_path / "bridge.log").read_text()
        assert code == 0, log[-3000:]
        answered = replies_to(hs, ann, room, bot_account.user_id)
        assert backlog not in answered and notice not in answered  # the backlog was read, not answered
        assert set(answered) == {asked, in_thread, quiet, missed, after, *burst, record, asked_too, poke,
                                 stop_recording}  # silence on small talk
        assert all(len(r) == 1 for r in answered.values()), {k: len(r) for k, r in answered.items()}
        assert "429" in log or "ratelimited" in log.lower()  # the rate limit was hit, and waited out
        assert "logging in again" in log

        from chimein.data.feedback import load_feedback

        report = load_feedback(tmp_path / "recordings")
        assert report.labels == {"interruption": 1, "missed": 1}  # the 👎 reply, and the poke
        [conv] = report.conversations
        said = [(m.role, m.content) for m in conv.messages]
        assert said[0] == ("user", "@chimein my mail is [email], what is 6 * 7?")  # scrubbed; its reply removed
        assert said[1] == ("user", "which platform does the 10:15 to leeds leave from?")
        assert said[2][0] == "assistant" and len(said) == 3  # the poke's reply moved to the missed question
        recorded = " ".join(f.read_text() for f in (tmp_path / "recordings").glob("*/*.jsonl"))
        assert "ann@example.org" not in recorded and "not recorded any more" not in recorded
