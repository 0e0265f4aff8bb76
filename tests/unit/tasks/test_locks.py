"""The cached tasks' locks: a lock whose run was killed never blocks the next run; a live one holds.
(Prefect 3.9 names a holder by a uuid4 and gives cache-key locks no expiration: the lock a killed
generation left was waited on for ever.)"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from tasks.locks import StoreLocks, holder_gone, this_process

KEY = "0123abcd"


@pytest.fixture
def locks(tmp_path):
    return StoreLocks(tmp_path / "locks")


def lock_file(locks: StoreLocks, content: dict):
    path = locks._lock_path_for_key(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def test_a_lock_left_in_prefects_own_format_by_a_killed_run_is_taken_over_and_logged(locks, caplog):
    path = lock_file(locks, {"holder": str(uuid.uuid4()), "expiration": None})  # what the kill left
    with caplog.at_level(logging.WARNING, logger="chimein.locks"):
        assert not locks.is_locked(KEY)
    assert not path.exists()
    assert any("took over the lock" in r.getMessage() and "is gone" in r.getMessage() for r in caplog.records)
    assert locks.acquire_lock(KEY, "next-run", acquire_timeout=5)


def test_a_lock_whose_process_was_killed_is_taken_over_a_live_ones_holds(locks):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(proc.pid).create_time()
        lock_file(locks, {"holder": "a", "expiration": None,
                          "process": {"host": this_process()["host"], "pid": proc.pid, "started": started}})
        assert locks.is_locked(KEY)
        assert not locks.acquire_lock(KEY, "b", acquire_timeout=0.3)  # held: b waits, then gives up
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert locks.acquire_lock(KEY, "b", acquire_timeout=5)
        assert json.loads(locks._lock_path_for_key(KEY).read_text())["process"]["pid"] == this_process()["pid"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_pid_reused_by_another_process_does_not_keep_a_lock():
    me = this_process()
    assert not holder_gone(me)
    assert holder_gone(me | {"started": me["started"] - 3600})  # same pid, another process
    assert not holder_gone(me | {"host": "another-host", "pid": 1})  # cannot be checked from here: held


def test_two_holders_take_turns_and_release_frees_it(locks):
    assert locks.acquire_lock(KEY, "first")
    info = json.loads(locks._lock_path_for_key(KEY).read_text())
    assert info["holder"] == "first" and info["process"] == this_process()
    got = []
    waiter = threading.Thread(target=lambda: got.append(locks.acquire_lock(KEY, "second", acquire_timeout=10)))
    waiter.start()
    time.sleep(0.5)
    assert not got  # waiting while the first holds it
    locks.release_lock(KEY, "first")
    waiter.join(timeout=10)
    assert got == [True] and locks.is_lock_holder(KEY, "second")
    locks.release_lock(KEY, "second")
    assert not locks.is_locked(KEY)
