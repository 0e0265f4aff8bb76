"""The cached tasks' locks (Prefect's SERIALIZABLE cache isolation), as files in the store that say
who holds them, so that a killed run never blocks the next.

Prefect's file locks name their holder by a uuid4 and, for cache keys, never expire: a run killed
while it held one (SIGKILL, an OOM kill, a preempted node) left a lock that every later run waited
on for ever. Ours also record the holding process — host, pid and the process's start time (a pid
is reused; pid + start time is not) — and are created whole in one step (a hard link of a written
file), so a lock file always names its holder. A lock whose process is gone is taken over, with a
warning that names it. A lock held on another host (a store shared over a network filesystem)
cannot be checked from here and stays held until its holder releases it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import psutil
from prefect.locking.filesystem import FileSystemLockManager

log = logging.getLogger("chimein.locks")


def this_process() -> dict:
    """What names the holding process: host, pid, start time (seconds since the epoch)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def holder_gone(process: dict | None) -> bool:
    """Whether the process that took a lock is gone: none recorded (a lock of Prefect's own format,
    left by a chimein that did not record it: only killed runs left those), or one on this host
    whose pid is free or now belongs to another process."""
    if not process:
        return True
    if process.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(process["pid"])).create_time() - float(process["started"])) > 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True


class StoreLocks(FileSystemLockManager):
    """Prefect's FileSystemLockManager with lock files that name the holding process, kept
    relative like the store (resolved against the working directory at run time)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.lock_files_directory = directory  # not resolved at import: the store is cwd-relative

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        self._ensure_lock_files_directory_exists()
        path = Path(self._lock_path_for_key(key))
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        expiration = (None if hold_timeout is None else
                      datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=hold_timeout))
        body = json.dumps({"holder": holder, "expiration": None if expiration is None else expiration.isoformat(),
                           "process": this_process()})
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                left = None if deadline is None else max(deadline - time.monotonic(), 0.1)
                if not self.wait_for_lock(key, left):
                    return False
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            tmp.write_text(body)
            try:
                os.link(tmp, path)  # atomic, and fails if the lock exists: never a half-written lock
            except FileExistsError:
                if not self.is_lock_holder(key, holder):
                    continue  # another run took it first: wait for it
            finally:
                tmp.unlink(missing_ok=True)
            self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
            return True

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        info = _read(path)
        if info is None:
            self._locks.pop(key, None)
            return False
        if (expiration := info.get("expiration")) is not None:
            if datetime.datetime.fromisoformat(expiration) > datetime.datetime.now(datetime.timezone.utc):
                return True
        elif not holder_gone(info.get("process")):
            return True
        # expired, or its holder is gone: taken over, once, by whichever run checks it first
        with open(path.parent / ".takeover", "w") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            if _read(path) == info:  # still the same lock (not one a live run took meanwhile)
                path.unlink(missing_ok=True)
                if expiration is None:
                    log.warning(f"took over the lock {path}: its holder {info.get('holder')} "
                                f"({_describe(info.get('process'))}) is gone (a killed run)")
        self._locks.pop(key, None)
        return self.is_locked(key) if path.exists() else False


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # an empty file: Prefect's own manager creates it before it writes
        return {}


def _describe(process: dict | None) -> str:
    if not process:
        return "no process recorded"
    return f"pid {process['pid']} on {process['host']}, gone"
