"""Per-message decision latency as a conversation grows: naive vs the incremental runtime.

    .venv/bin/python benchmarks/decision_latency.py [--model smollm2-135m-instruct] [--adapter REF]
                                                    [--lengths 2,5,10,20,30,40] [--repeat 3]

(a) naive: render the whole conversation with the chat template and `generate` until the
    end-of-turn token (the decision is whether the text starts with "(silence)");
(b) incremental: GroupChatAssistant.add — one forward pass over the new message's tokens and
    both continuations' diverging tokens (a tree-shaped mask over the KV cache of the
    conversation so far, the continuations cropped after); generation only when speaking.

Both see the same conversation from the bundled corpus; chattiness is set so (b) stays silent and
the number measures the decision itself. Measured side by side in one run, best of --repeat.
"""

from __future__ import annotations

import argparse
import time

import torch

from chimein.data.corpus import load_corpus
from chimein.formatting import chat_turns
from chimein.runtime.assistant import GroupChatAssistant


def user_messages(n: int) -> list[tuple[str, str]]:
    msgs = [(m.name, m.content) for c in load_corpus() for m in c.messages if m.role == "user"]
    return msgs[:n]


def naive(bot: GroupChatAssistant, history: list[tuple[str, str]], max_new_tokens: int) -> float:
    from chimein.conversation import Conversation, Message

    conv = Conversation(tuple(Message("user", c, n) for n, c in history))
    turns = chat_turns(conv, bot.pattern)[:-1]  # the last assistant turn is what we generate
    ids = bot.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    t = time.perf_counter()
    with torch.no_grad():
        bot.model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=bot.eot_id, pad_token_id=bot.tokenizer.pad_token_id)
    return time.perf_counter() - t


def incremental(bot: GroupChatAssistant, history: list[tuple[str, str]]) -> float:
    bot.reset()
    for name, content in history[:-1]:
        bot.add(name, content)
    t = time.perf_counter()
    bot.add(*history[-1])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="a trained adapter instead of the base model")
    ap.add_argument("--lengths", default="2,5,10,20,30,40")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="cap for the naive generate")
    args = ap.parse_args()
    kw = {"chattiness": 2.0, "max_context_tokens": 100_000}
    bot = (GroupChatAssistant.from_adapter(args.adapter, **kw) if args.adapter
           else GroupChatAssistant.from_preset(args.model, **kw))
    lengths = [int(x) for x in args.lengths.split(",")]
    history = user_messages(max(lengths))
    naive(bot, history[:2], 2), incremental(bot, history[:2])  # warm-up: first calls pay for setup
    print(f"{bot.preset.name}{' + adapter' if args.adapter else ''}, CPU threads "
          f"{torch.get_num_threads()}, best of {args.repeat}; naive generate capped at "
          f"{args.max_new_tokens} new tokens")
    print(f"{'turns':>6}{'naive (a)':>14}{'incremental (b)':>18}{'a / b':>9}")
    for n in lengths:
        a = min(naive(bot, history[:n], args.max_new_tokens) for _ in range(args.repeat))
        b = min(incremental(bot, history[:n]) for _ in range(args.repeat))
        print(f"{n:>6}{a * 1e3:>11.0f} ms{b * 1e3:>15.0f} ms{a / b:>8.1f}x")


if __name__ == "__main__":
    main()
