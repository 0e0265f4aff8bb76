"""`chimein generate` killed at random points (Ctrl-C and SIGKILL) against the local fake OpenAI API
and resumed each time: the file ends with exactly `count` valid, distinct conversations, and no
request is paid for twice, except those a SIGKILL cut off in flight (their replies never reached
the process; the API has no way to send them again)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from chimein.conversation import load_conversations
from chimein.data.generation import conversation_hash
from tests.fakes.fake_llm import FakeLLM

COUNT = 20
# (signal, when): "first" = as the first request of the run reaches the server (no reply yet),
# "random" = after a seeded random number of requests and a seeded random pause.
PLAN = [(signal.SIGKILL, "first"), (signal.SIGINT, "first"), (signal.SIGKILL, "random"),
        (signal.SIGINT, "random"), ("SIGINT then SIGKILL", "random"), (signal.SIGKILL, "random")]


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _recorded(ledger: Path) -> set[int]:
    lines = ledger.read_text().splitlines()[1:] if ledger.exists() else []
    return {json.loads(x)["seed"] for x in lines}


def test_killed_and_resumed_runs_end_with_count_conversations_and_pay_once(tmp_path):
    rng = random.Random(10)
    out, ledger = tmp_path / "c.jsonl", tmp_path / "c.jsonl.ledger"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-not-real"}
    may_repeat = Counter()  # seed → SIGKILLs that cut it off in flight
    with FakeLLM("openai", delay=0.1, jitter=0.3) as fake:
        cmd = [str(Path(sys.executable).with_name("chimein")), "generate", "--source", "openai",
               "--base-url", fake.base_url, "--count", str(COUNT), "--concurrency", "4", "--out", str(out)]
        for k, (sig, when) in enumerate(PLAN):
            before = len(fake.requests)
            with (tmp_path / f"run{k}.log").open("w") as log:
                proc = subprocess.Popen(cmd + ["--resume"] * (k > 0), env=env, stdout=log, stderr=log)
            try:
                n = 1 if when == "first" else rng.randint(1, 4)
                _wait_for(lambda: len(fake.requests) >= before + n or proc.poll() is not None, 60)
                if when == "random":
                    time.sleep(rng.uniform(0, 0.3))
                if sig == "SIGINT then SIGKILL":  # killed while it waits for the requests in flight
                    proc.send_signal(signal.SIGINT)
                    time.sleep(rng.uniform(0, 0.2))
                    sig = signal.SIGKILL
                proc.send_signal(sig)
                rc = proc.wait(timeout=60)  # a Ctrl-C stops by itself once what is in flight is recorded
            finally:
                proc.kill()
            time.sleep(0.5)  # the server reads what the client sent before it died
            sent = {b["seed"] for b in fake.requests[before:]}
            lost = sent - _recorded(ledger)
            log = (tmp_path / f"run{k}.log").read_text()
            if sig == signal.SIGINT:
                assert not lost, log  # Ctrl-C waits for the requests in flight and records them
                if when == "first":
                    assert rc == 130 and "interrupted" in log, log
            may_repeat.update(lost)
        r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"{COUNT} of {COUNT}" in r.stdout
    report = load_conversations(out)
    assert len(report.conversations) == COUNT and not report.rejected
    assert len({conversation_hash(c) for c in report.conversations}) == COUNT
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert "fingerprint" in entries[0] and all("i" in e for e in entries[1:])
    assert sum(e["outcome"] == "accepted" for e in entries[1:]) == COUNT
    # each request (its seed) reached the server once, plus once per SIGKILL that cut it off
    assert {s: n for s, n in fake.seen.items() if n > 1 + may_repeat[s]} == {}
    assert sum(may_repeat.values()) <= 4 * sum(s != signal.SIGINT for s, _ in PLAN)
