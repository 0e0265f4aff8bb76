"""Cost of exact assistant masks: chimein's encode() vs the bare chat template + tokenizer.

    .venv/bin/python benchmarks/bench_preprocess.py [--repeat 5]

For each family, both are timed side by side on the bundled sample conversations; the ratio is
what rendering twice (placeholders + real) and mapping offsets costs on top of tokenizing.
"""

from __future__ import annotations

import argparse
import time

from chimein.conversation import load_conversations
from chimein.formatting import chat_turns, encode, marker_pattern
from chimein.models.loading import load_tokenizer
from chimein.paths import sample_data
from chimein.presets import load_preset


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    convs = load_conversations(sample_data()).conversations
    print(f"{len(convs)} conversations, best of {args.repeat}")
    print(f"{'preset':<16}{'template+tokenize':>20}{'chimein encode':>18}{'ratio':>8}")
    for name in ["tiny-zephyr", "tiny-llama-2", "tiny-openchat", "tiny-chatml"]:
        preset = load_preset(name)
        tok = load_tokenizer(preset)
        pattern = marker_pattern(tok, preset)
        turns = [chat_turns(c, pattern) for c in convs]

        def bare():
            for t in turns:
                tok(tok.apply_chat_template(t, tokenize=False), add_special_tokens=False)

        def ours():
            for c in convs:
                encode(c, tok, preset, 10_000, pattern)

        b, o = best_of(bare, args.repeat), best_of(ours, args.repeat)
        print(f"{name:<16}{b * 1e3:>17.1f} ms{o * 1e3:>15.1f} ms{o / b:>7.2f}x")


if __name__ == "__main__":
    main()
