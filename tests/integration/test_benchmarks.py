"""The benchmarks run (on the CPU, at their smallest) and what they compare is equal: the batched
server's decisions are the one-at-a-time server's, over HTTP; gpu_qlora's tiny mode trains, times
and compares one-by-one and batched decisions. Their speeds are not asserted (shared machines)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_throughput_batched_server_decides_as_the_serial_one():
    out = subprocess.run([sys.executable, "benchmarks/serve_throughput.py", "--base", "tiny-chatml",
                          "--concurrency", "1,4", "--messages", "2", "--warm", "1", "--chattiness", "0.5",
                          "--max-new-tokens", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+) │.*│\s+([\d.]+)x\s+(\d+)/(\d+)\s+(\S+)\s+(\d+)%$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "4"], out.stdout
    for conversations, ratio, same, total, dp, spoke in rows:
        assert int(total) == 2 * int(conversations) and same == total  # every decision and reply
        assert float(dp) < 1e-4 and float(ratio) > 0


def test_gpu_qlora_tiny_mode_trains_and_serves(tmp_path):
    result = tmp_path / "r.json"
    out = subprocess.run([sys.executable, "benchmarks/gpu_qlora.py", "--tiny", "--families", "llama-2-7b-chat",
                          "--steps", "2", "--messages", "3", "--serve-conversations", "2",
                          "--out", str(result)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (family,) = json.loads(result.read_text())["results"]
    assert family["preset"] == "tiny-llama-2"
    trained = {label.strip(): row for label, row in family["train"].items() if "error" not in row}
    assert {"TRL SFTTrainer (the method)", "decision-weighted loss"} <= set(trained)
    assert all(row["tokens_per_s"] > 0 and row["s_per_step"] > 0 for row in trained.values())
    assert family["runtime"]["messages"] == 3
    for mode in ("decide", "reply"):
        assert family["serving"][mode]["max_p_speak_diff"] < 1e-4  # fp32 on a CPU: the same decisions


def test_gpu_qlora_processes_mode_trains_on_two_ranks(tmp_path):
    """--processes 2: the same training on two DDP ranks under torchrun (gloo on a CPU); rank 0
    reports the global batch and tokens over both ranks."""
    result = tmp_path / "r.json"
    out = subprocess.run([sys.executable, "benchmarks/gpu_qlora.py", "--tiny", "--families", "zephyr-7b-beta",
                          "--steps", "2", "--serve-conversations", "0", "--processes", "2",
                          "--out", str(result)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["processes"] == 2 and report["global_batch"] == "4 x 2"
    (family,) = report["results"]
    trained = [row for row in family["train"].values() if "error" not in row]
    assert len(trained) >= 2 and all(row["tokens_per_s"] > 0 for row in trained)


def test_concurrent_training_runs_both_ways_and_the_second_waits():
    out = subprocess.run([sys.executable, "benchmarks/concurrent_training.py", "--preset", "tiny-chatml",
                          "--train-config", "", "--steps", "2", "--skip-no-slot"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    rows = re.findall(r"^(one alone|one after the other|together, the slot)\s+([\d.]+)\s+([\d.]+)x$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["one alone", "one after the other", "together, the slot"], out.stdout
    assert all(float(seconds) > 0 for _, seconds, _ in rows)
    assert "the second training said it waited: yes" in out.stdout and out.stdout.startswith("CPU: ")
