"""Per-message decision latency as a conversation grows, against naive generation and against
the physical limit (a bare forward pass of the same tokens), in fp32 and bf16.

    .venv/bin/python benchmarks/decision_latency.py [--model smollm2-135m-instruct] [--adapter REF]
                                                    [--lengths 5,20,40] [--repeat 3] [--dtypes float32,bfloat16]

(a) naive: render the whole conversation with the chat template and `generate` until the
    end-of-turn token (the decision is whether the text starts with "(silence)");
(b) the decision: GroupChatAssistant.add — the conversation rendered and tokenized, one forward
    pass over the new message's tokens and both continuations' diverging tokens (a tree-shaped
    mask over the KV cache of the conversation so far, the continuations cropped after), the
    probabilities read; generation only when speaking;
(c) the limit: a bare forward pass of exactly the tokens (b) fed, over the same KV cache, plain
    causal attention, the last position's logits — the model's own cost, nothing of chimein's.

Then a forced reply at the longest length: its tokens per second against a bare greedy decoding
loop of as many tokens over the same cache (one token a pass, argmax), the same limit for replies.

All columns are measured side by side in one run, best of --repeat; chattiness is set so (b)
stays silent and the number measures the decision itself. The CPU is named in the header.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from chimein.data.corpus import load_corpus
from chimein.formatting import chat_turns
from chimein.runtime.assistant import GroupChatAssistant


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def replay(bot: GroupChatAssistant, history: list[tuple[str, str]]) -> None:
    bot.reset()
    for name, content in history:
        bot.add(name, content)


def decision(bot: GroupChatAssistant, history: list[tuple[str, str]]) -> tuple[float, torch.Tensor]:
    """(b): seconds of `add` for the last message, and the token ids its forward pass fed."""
    fed = []
    hook = bot.model.register_forward_pre_hook(lambda _m, _a, kw: fed.append(kw["input_ids"]), with_kwargs=True)
    replay(bot, history[:-1])
    fed.clear()
    try:
        t = time.perf_counter()
        bot.add(*history[-1])
        return time.perf_counter() - t, fed[0]
    finally:
        hook.remove()


def bare_forward(bot: GroupChatAssistant, history: list[tuple[str, str]], ids: torch.Tensor) -> float:
    """(c): a forward pass of `ids` over the cache of the conversation before the last message."""
    replay(bot, history[:-1])
    t = time.perf_counter()
    with torch.no_grad():
        # the last position's logits, asked by index: as logits_to_keep=1 an adapter's output layer
        # copies its matrix in bf16 (GroupChatAssistant._feed)
        bot.model(input_ids=ids, cache=bot.state.cache, use_cache=True,
                  logits_to_keep=torch.tensor([ids.shape[1] - 1]))
    return time.perf_counter() - t


def reply_speed(bot: GroupChatAssistant, history: list[tuple[str, str]], repeat: int) -> tuple[int, float, float]:
    """(tokens, the forced reply's tokens/s, a bare decoding loop's tokens/s over the same cache)."""
    tools, bot.tools = bot.tools, False  # the model's own reply, not a tool's answer
    try:
        spent, tokens = [], 0
        for _ in range(repeat):
            replay(bot, history[:-1])
            t = time.perf_counter()
            bot.add(*history[-1], reply=False)
            decided = time.perf_counter() - t
            replay(bot, history[:-1])  # the same state again, and the same message made to reply
            t = time.perf_counter()
            d = bot.add(*history[-1], force=True)
            spent.append(time.perf_counter() - t - decided)
            tokens = d.completion_tokens
        # the limit: from the cache the decision leaves (the context), the "(response)" prefix in
        # one pass, then one token a pass, argmax: the passes the reply makes, nothing else
        replay(bot, history)  # silent: the conversation with the last message, as the reply sees it
        context, _, resp = bot._branch_ids()
        bare = []
        for _ in range(repeat):
            bot.reset()
            bot._feed(context)
            cache = bot.state.cache
            t = time.perf_counter()
            with torch.no_grad():
                logits = bot.model(input_ids=torch.tensor([resp]), cache=cache, use_cache=True,
                                   logits_to_keep=torch.tensor([len(resp) - 1])).logits[0, -1]
                for _ in range(tokens):
                    tok = torch.argmax(torch.softmax(logits.float(), -1)).view(1, 1)
                    logits = bot.model(input_ids=tok, cache=cache, use_cache=True).logits[0, -1]
            bare.append(time.perf_counter() - t)
        return tokens, tokens / max(min(spent), 1e-9), tokens / max(min(bare), 1e-9)
    finally:
        bot.tools = tools


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="a trained adapter instead of the base model")
    ap.add_argument("--lengths", default="5,20,40")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="cap for the naive generate and the reply")
    args = ap.parse_args()
    kw = {"chattiness": 2.0, "max_context_tokens": 100_000, "max_new_tokens": args.max_new_tokens}
    bot = (GroupChatAssistant.from_adapter(args.adapter, **kw) if args.adapter
           else GroupChatAssistant.from_preset(args.model, **kw))
    lengths = [int(x) for x in args.lengths.split(",")]
    history = user_messages(max(lengths))
    print(f"{bot.preset.name}{' + adapter' if args.adapter else ''} on {cpu_name()}, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeat}; naive generate capped at "
          f"{args.max_new_tokens} new tokens")
    for dtype in args.dtypes.split(","):
        bot.model.to(getattr(torch, dtype))
        naive(bot, history[:2], 2), decision(bot, history[:2]), reply_speed(bot, history[:3], 1)  # warm-up
        print(f"\n{dtype}")
        print(f"{'turns':>6}{'new tokens':>12}{'naive (a)':>12}{'decision (b)':>15}{'bare pass (c)':>16}"
              f"{'a / b':>8}{'b / c':>8}")
        for n in lengths:
            a = min(naive(bot, history[:n], args.max_new_tokens) for _ in range(args.repeat))
            runs = [decision(bot, history[:n]) for _ in range(args.repeat)]
            b, ids = min(runs, key=lambda r: r[0])
            c = min(bare_forward(bot, history[:n], ids) for _ in range(args.repeat))
            print(f"{n:>6}{ids.shape[1]:>12}{a * 1e3:>9.0f} ms{b * 1e3:>12.1f} ms{c * 1e3:>13.1f} ms"
                  f"{a / b:>7.1f}x{b / c:>7.2f}x")
        tokens, reply, limit = reply_speed(bot, history[:max(lengths)], args.repeat)
        if tokens < 4:
            print(f"reply at {max(lengths)} turns: {tokens} tokens, too short to time (try --adapter)")
            continue
        print(f"reply at {max(lengths)} turns: {tokens} tokens, {reply:.1f} tokens/s; bare decoding loop "
              f"{limit:.1f} tokens/s ({limit / reply:.2f}x the reply's speed)")


if __name__ == "__main__":
    main()
