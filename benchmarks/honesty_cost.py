"""What saying only what is right costs a `make run`, measured side by side in one run.

    .venv/bin/python benchmarks/honesty_cost.py --adapter local:smollm2-135m-instruct--ds-…
                                                [--dataset local:ds-…] [--make-run-s 559]

Times, on one adapter, the evaluation work of the retrain flow before issue 22 and what it added:

(a) the benchmark's decisions alone (one forward pass per chat: what the flow scored before);
(b) the forced replies at the benchmark's 170 factual turns, judged (answer accuracy, hedge
    rate, confident-error rate), at 32 tokens (FORCED_REPLY_TOKENS) and at 64 for comparison,
    with the verdicts that differ between the two;
(c) the confidence calibration on the adapter's validation split (forced replies at its replies
    that state a checkable fact).

Prints each in seconds, (b)+(c) as a ratio of (a), and, given --make-run-s (a `make run`'s wall
time on this machine), as a share of it. Names the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    with_model = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    name = with_model[0].split(":", 1)[1].strip() if with_model else platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    from chimein.data.dataset import load_published
    from chimein.evaluate.answers import answer_metrics, judge
    from chimein.evaluate.benchmark import load_eval_set
    from chimein.evaluate.metrics import FORCED_REPLY_TOKENS, forced_decisions
    from chimein.evaluate.run import score
    from chimein.models.loading import quiet
    from chimein.runtime.assistant import GroupChatAssistant
    from chimein.train.calibration import calibrate_confidence

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--dataset", help="its dataset version (default: the one it was trained on)")
    ap.add_argument("--make-run-s", type=float, help="a make run's wall time here, in seconds")
    args = ap.parse_args()
    with quiet():
        bot = GroupChatAssistant.from_adapter(args.adapter)
    evalset = load_eval_set("benchmark")
    factual = evalset.benchmark.factual()
    print(f"CPU: {cpu_name()}; {args.adapter}")
    _, decisions = timed(lambda: score(bot, evalset, replies=False, answers=False))
    verdicts, seconds = {}, {}
    for tokens in (FORCED_REPLY_TOKENS, 64):
        got, seconds[tokens] = timed(lambda: forced_decisions(bot, evalset.conversations, frozenset(factual),
                                                              tokens=tokens))
        verdicts[tokens] = {k: judge(d.response, factual[k]) for k, d in got.items()}
    differ = sum(verdicts[FORCED_REPLY_TOKENS][k] != verdicts[64][k] for k in factual)
    ds = load_published(args.dataset or f"local:{bot.adapter_meta['dataset_version']}")
    version = args.dataset or bot.adapter_meta["dataset_version"]
    calibrated, calibration = timed(lambda: calibrate_confidence(bot.model, bot.tokenizer, bot.preset, ds, version))
    rates = answer_metrics(list(verdicts[FORCED_REPLY_TOKENS].values()))
    added = seconds[FORCED_REPLY_TOKENS] + calibration
    print(f"(a) benchmark decisions alone            {decisions:7.1f} s")
    print(f"(b) forced replies, {len(factual)} factual turns, {FORCED_REPLY_TOKENS} tokens {seconds[FORCED_REPLY_TOKENS]:7.1f} s"
          f"   (64 tokens: {seconds[64]:.1f} s; verdicts that differ: {differ})")
    print(f"    right {rates['answer_accuracy']:.3f}, hedged {rates['hedge_rate']:.3f}, "
          f"confidently wrong {rates['confident_error_rate']:.3f}")
    print(f"(c) confidence calibration, {calibrated.get('replies', 0)} validation replies {calibration:7.1f} s"
          f"   (threshold {calibrated['threshold']:.3f})")
    print(f"added (b)+(c): {added:.1f} s = {added / decisions:.2f}x the decisions alone"
          + (f" = {added / args.make_run_s:.1%} of a {args.make_run_s:.0f} s make run" if args.make_run_s else ""))


if __name__ == "__main__":
    main()
