"""One training at a time on a host without CUDA: a second one waits for the first and says so
(two at once shared 2 cores with twice the threads and each ran ~20x slower than alone)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from chimein.train.launch import cpu_slot

HOLD = """
import logging, sys, time
from chimein.train.launch import cpu_slot
with cpu_slot(logging.getLogger("holder")):
    print("holding", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMEIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CHIMEIN_GPU", raising=False)
    monkeypatch.delenv("CHIMEIN_CPU_SLOT", raising=False)


def holder(seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_training_waits_for_the_first_and_says_which(caplog):
    first = holder(1.5)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="test.slot"):
            with cpu_slot(logging.getLogger("test.slot")):
                assert time.monotonic() - started > 1.0  # entered only once the first let go
        lines = [r.getMessage() for r in caplog.records if r.name == "test.slot"]
        assert lines[0].startswith(f"waiting for the CPU: another training holds it (pid {first.pid} since ")
        assert lines[1].startswith("the CPU is free after ")
    finally:
        first.kill()
        first.wait(timeout=10)


def test_a_killed_holder_leaves_the_slot_free():
    first = holder(60)
    first.kill()
    first.wait(timeout=10)
    started = time.monotonic()
    with cpu_slot(logging.getLogger("test.slot")):
        assert time.monotonic() - started < 5


def test_a_worker_pinned_to_a_gpu_does_not_wait(monkeypatch):
    first = holder(60)
    try:
        monkeypatch.setenv("CHIMEIN_GPU", "0")  # its GPU's slot decides (tasks.model.gpu_slot)
        started = time.monotonic()
        with cpu_slot(logging.getLogger("test.slot")):
            assert time.monotonic() - started < 5 and first.poll() is None
    finally:
        first.kill()
        first.wait(timeout=10)
