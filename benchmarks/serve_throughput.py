"""Decisions per second of the HTTP server with many conversations at once: one request at a
time (today's serial server, `--max-batch 1`) vs messages batched over their own KV caches
(`--max-batch 16`, the default), side by side in one run.

    .venv/bin/python benchmarks/serve_throughput.py [--base smollm2-135m-instruct | --adapter REF]
                                                    [--concurrency 1,4,16] [--messages 6]

For each server (a real `chimein serve` on loopback) and each concurrency C, C clients each own a
conversation and post its user messages one after the other (a message, wait for the decision,
the next), all at once; decisions/s is the messages decided over the wall time, and p50/p95 the
latency a client saw. The first `--warm` messages of every conversation are sent before timing
(its first message feeds the whole chat template, a cost a long-running server rarely pays). Both servers get the same conversations (from the bundled corpus), so their
decisions are compared too: same speak/silence and reply, and the largest difference in p_speak.
By default the assistant is kept silent (chattiness 2) so the figure is the decision itself;
`--chattiness 0` makes it reply to every message (up to `--max-new-tokens`; replies are
generated together too).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = ["--adapter", args.adapter] if args.adapter else ["--base", args.base]
    cmd = [sys.executable, "-m", "chimein.cli", "serve", *model, "--chattiness", str(args.chattiness),
           "--port", str(port), "--max-batch", str(max_batch), "--max-new-tokens", str(args.max_new_tokens)]
    log = tempfile.TemporaryFile()  # not a pipe: a server that logs much would block on a full one
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit("the server did not answer /healthz within 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    with_group = os.getpgid(proc.pid) if proc.poll() is None else None
    if with_group:
        os.killpg(with_group, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(with_group, signal.SIGKILL)
        proc.wait(timeout=30)


def conversations(n: int, messages: int) -> list[list[tuple[str, str]]]:
    """n conversations of `messages` user messages each, from the corpus (different ones)."""
    from chimein.data.corpus import load_corpus

    msgs = [(m.name, m.content) for c in load_corpus() for m in c.messages if m.role == "user"]
    return [[msgs[(k * messages + i) % len(msgs)] for i in range(messages)] for k in range(n)]


def drive(url: str, tag: str, convs: list[list[tuple[str, str]]], timeout: float, first: int = 0):
    """Every conversation posted by its own client, all at once, from its message `first` on.
    Returns (wall seconds, latencies, decisions by (conversation, message))."""
    latencies: list[float] = []
    decisions: dict[tuple[int, int], dict] = {}
    errors: list[str] = []
    start = threading.Barrier(len(convs) + 1)

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            start.wait()
            for i, (name, content) in enumerate(convs[k][first:], first):
                t = time.perf_counter()
                r = http.post(f"/v1/conversations/{tag}-{k}/messages", json={"name": name, "content": content})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                decisions[k, i] = r.json()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(convs))]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    return wall, latencies, decisions


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="a trained adapter instead of the base model")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--messages", type=int, default=6, help="user messages per conversation, timed")
    ap.add_argument("--warm", type=int, default=2,
                    help="messages per conversation sent before timing, one round at a time (a "
                         "conversation's first message feeds the whole chat template: a server "
                         "that has run a while mostly sees conversations under way)")
    ap.add_argument("--chattiness", type=float, default=2.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="longest reply, in tokens")
    ap.add_argument("--timeout", type=float, default=300, help="per request, seconds")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    results: dict[tuple[str, int], tuple] = {}
    for mode, max_batch in (("serial", 1), ("batched", args.max_batch)):
        proc, url = start_server(args, max_batch)
        try:
            drive(url, f"warm-{mode}", conversations(2, 2), args.timeout)  # first calls pay for setup
            for c in levels:
                convs = conversations(c, args.warm + args.messages)
                if args.warm:  # the conversations under way, as on a server that has run a while
                    for first in range(args.warm):
                        drive(url, f"{mode}-{c}", [conv[:first + 1] for conv in convs], args.timeout, first)
                results[mode, c] = drive(url, f"{mode}-{c}", convs, args.timeout, args.warm)
                wall, lat, _ = results[mode, c]
                print(f"  {mode:>7} · {c:>2} conversations: {c * args.messages / wall:6.2f} decisions/s",
                      flush=True)
            health = httpx.get(f"{url}/healthz").json()
        finally:
            stop_server(proc)
        if mode == "batched":
            print(f"  batched server: {health.get('mean_batch')} messages per forward pass on average "
                  "(the last 100 passes)")
    import torch

    model = args.adapter or f"{args.base} (base)"
    print(f"\n{model}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; "
          f"{args.messages} messages per conversation timed after {args.warm} untimed, "
          f"chattiness {args.chattiness}")
    head = (f"{'conversations':>13} │ {'serial dec/s':>12}{'p50':>8}{'p95':>8} │ {'batched dec/s':>13}{'p50':>8}"
            f"{'p95':>8} │ {'ratio':>6} {'same decisions':>15} {'max Δp':>8} {'spoke':>6}")
    print(head)
    for c in levels:
        (ws, ls, ds), (wb, lb, db) = results["serial", c], results["batched", c]
        same = sum(ds[k]["speak"] == db[k]["speak"] and ds[k]["response"] == db[k]["response"] for k in ds)
        dp = max(abs(ds[k]["p_speak"] - db[k]["p_speak"]) for k in ds)
        n = c * args.messages
        print(f"{c:>13} │ {n / ws:>12.2f}{pct(ls, 50) * 1e3:>6.0f}ms{pct(ls, 95) * 1e3:>6.0f}ms │ "
              f"{n / wb:>13.2f}{pct(lb, 50) * 1e3:>6.0f}ms{pct(lb, 95) * 1e3:>6.0f}ms │ {ws / wb:>5.2f}x "
              f"{f'{same}/{len(ds)}':>15} {dp:>8.1e} {sum(d['speak'] for d in ds.values()) / len(ds):>6.0%}")


if __name__ == "__main__":
    main()
