"""Two trainings started together on one CPU host, against the same two one after the other.

    .venv/bin/python benchmarks/concurrent_training.py [--preset smollm2-135m-instruct] [--steps 4]

Each training is a real `chimein train` process (its own output directory, store and MLflow
store; the same preset, data and settings), timed whole as a user sees it. Rows, in one run:

  one alone            the reference
  one after the other  the two in sequence
  together, the slot   both started at once: the second waits for the first's CPU slot
  together, no slot    both at once sharing the cores (CHIMEIN_CPU_SLOT=off): what a second
                       retrain did to the first before the slot

Prints the wall time of each row, its ratio to one after the other, and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def start(work: Path, name: str, args, slot: bool) -> subprocess.Popen:
    d = work / name
    d.mkdir(parents=True)
    env = dict(os.environ, CHIMEIN_STORE=str(d / "store"), MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}",
               CHIMEIN_CACHE=os.environ.get("CHIMEIN_CACHE", ""), PYTHONUNBUFFERED="1")
    if not env["CHIMEIN_CACHE"]:
        env.pop("CHIMEIN_CACHE")
    env.pop("CHIMEIN_GPU", None)
    if not slot:
        env["CHIMEIN_CPU_SLOT"] = "off"
    cmd = [sys.executable, "-m", "chimein.cli", "train", "--preset", args.preset, "--dataset", str(args.data),
           "--max-steps", str(args.steps), "--output-dir", str(d / "outputs")]
    if args.train_config:
        cmd += ["--train-config", args.train_config]
    return subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=open(d / "stderr.txt", "w"))


def run(work: Path, label: str, names: list[str], args, together: bool, slot: bool = True) -> float:
    started = time.perf_counter()
    if together:
        procs = [start(work, n, args, slot) for n in names]
    else:
        procs = []
        for n in names:
            p = start(work, n, args, slot)
            p.wait()
            procs.append(p)
    for p, n in zip(procs, names):
        if p.wait() != 0:
            sys.exit(f"{label}: `chimein train` failed; see {work / n / 'stderr.txt'}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m-instruct")
    ap.add_argument("--train-config", default="offline-cpu", help="a name in conf/train/ or a YAML path; '' for none")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps of each training")
    ap.add_argument("--data", type=Path, default=None, help="conversations (default: the sample of the corpus)")
    ap.add_argument("--skip-no-slot", action="store_true", help="leave out the row without the slot (slow)")
    args = ap.parse_args()
    if args.data is None:
        from chimein.paths import sample_data

        args.data = sample_data()
    args.data = args.data.resolve()
    with tempfile.TemporaryDirectory(prefix="chimein-concurrent-") as tmp:
        work = Path(tmp)
        rows = [("one alone", run(work, "one alone", ["alone"], args, together=False))]
        rows.append(("one after the other", run(work, "sequence", ["seq-a", "seq-b"], args, together=False)))
        rows.append(("together, the slot", run(work, "slot", ["slot-a", "slot-b"], args, together=True)))
        if not args.skip_no_slot:
            rows.append(("together, no slot", run(work, "no slot", ["free-a", "free-b"], args, together=True,
                                                  slot=False)))
        waited = "waiting for the CPU" in (work / "slot-a" / "stderr.txt").read_text() + \
            (work / "slot-b" / "stderr.txt").read_text()
    sequential = rows[1][1]
    print(f"CPU: {cpu_name()}; {args.preset}, {args.steps} steps each, train config {args.train_config or 'none'}")
    print(f"{'':22} {'wall s':>8} {'÷ one after the other':>22}")
    for label, seconds in rows:
        print(f"{label:22} {seconds:8.1f} {seconds / sequential:21.2f}x")
    print(f"with the slot, the second training said it waited: {'yes' if waited else 'NO'}")


if __name__ == "__main__":
    main()
