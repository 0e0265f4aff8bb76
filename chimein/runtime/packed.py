"""Many conversations in one forward pass: their new tokens packed one after the other in a single
batch-1 sequence, each attending only to its own KV cache (a custom attention function switched in
for that pass), so the projections and MLPs run on real tokens only — no padding. The decisions
and replies equal those made one conversation at a time (the runtime's tests).

    decisions = bot.add_many([(state_a, "Ann", "hi", False), (state_b, "Bo", "assistant?", False)])
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from typing import NamedTuple

from chimein.conversation import Message, parse_conversation
from chimein.knowledge import grounding
from chimein.runtime import honesty
from chimein.runtime.state import (
    CONFIDENCE_TOKENS,
    Branches,
    ConversationState,
    Decision,
    common_prefix,
    new_cache,
)


def add_many(bot, requests: list[tuple[ConversationState, str, str, bool]],
             reply: bool = True) -> list[Decision | Exception]:
    """Several conversations' new messages at once, as (state, name, content, force): the
    decisions that `add` would make on each, in shared forward passes — the new tokens of all
    of them packed into one sequence, each attending to its own KV cache (`decide_batch`),
    and the replies of those that speak generated together, a token of each per pass. A server gathers
    the messages that arrive together and calls this. Each result is the Decision or the
    exception that refused or failed that message (its conversation is then as it was, less
    its cache, as with `add`); a conversation may appear only once. Afterwards `state` is the
    last one given."""
    if len({id(r[0]) for r in requests}) < len(requests):
        raise ValueError("a conversation may appear only once in add_many: its messages are in order")
    results: list[Decision | Exception | None] = [None] * len(requests)
    window = getattr(bot.model.config, "sliding_window", None) or math.inf
    # nothing to batch, or a sliding window that a context might reach (it would evict keys
    # that cropping cannot restore): one by one
    if len(requests) == 1 or window <= bot.max_context_tokens + bot.max_new_tokens + 64:
        for i, (state, name, content, force) in enumerate(requests):
            bot.use(state)
            try:
                results[i] = bot.add(name, content, force=force, reply=reply)
            except Exception as e:  # noqa: BLE001 — the caller answers each message on its own
                results[i] = e
        return results
    ready: list[tuple[int, ConversationState, list[Message], Branches]] = []
    sources: dict[int, list[str]] = {}  # where each message's passages come from
    for i, (state, name, content, _) in enumerate(requests):
        before = list(state.messages)
        try:
            msg = parse_conversation([{"role": "user", "name": name, "content": content}]).messages[0]
            bot.use(state)
            msg, sources[i] = grounding.with_passages(bot.knowledge, state.messages, msg)
            state.messages.append(msg)
            ready.append((i, state, before, bot._window()))
        except Exception as e:  # noqa: BLE001
            state.messages[:] = before
            results[i] = e
    for group in [ready[i:i + 32] for i in range(0, len(ready), 32)]:
        try:
            decisions = decide_batch(bot, [(st, br) for _, st, _, br in group])
            speakers = []
            for (i, st, _, br), d in zip(group, decisions):
                d.speak = requests[i][3] or d.p_speak >= st.threshold(bot.chattiness)
                d.passages = sources[i]
                results[i] = d
                bot.use(st)
                if d.speak and reply and not (bot.tools and honesty.answer_with_tool(d, st.messages, bot.pattern)):
                    speakers.append((st, br, d, honesty.addressed(requests[i][2], requests[i][3])))
            if speakers and bot.responder is not None:  # replies from the responder, one by one
                for st, br, d, addressed in speakers:
                    bot.use(st)
                    bot._respond(d, br, addressed)
            elif speakers:
                generate_batch(bot, speakers)
        except Exception as e:  # noqa: BLE001 — the whole group failed: each as `add` would
            for i, st, before, _ in group:
                st.messages[:] = before
                st.drop_cache()
                results[i] = e
    return results


def decide_batch(bot, items: list[tuple[ConversationState, Branches]]) -> list[Decision]:
    """`GroupChatAssistant._decide` for several conversations in one forward pass, packed: each one's new tokens
    and branch tokens (its tree, as `GroupChatAssistant._decide` builds it) one after the other in a single
    sequence, so the projections and MLPs run on real tokens only (no padding); attention is
    computed per conversation over its own cache (`packed`). Each state then holds a cache
    of exactly its context, as after `GroupChatAssistant._decide`."""
    import torch

    segments, trees = [], []
    for st, br in items:
        tree = build_tree(bot, st, br)
        trees.append(tree)
        if st.cache is None:
            st.cache = new_cache(bot.model.config)
        segments.append((st.cache, len(tree.ids), tree.bias))
    offsets = [0]
    for tree in trees:
        offsets.append(offsets[-1] + len(tree.ids))
    keep = sorted({o + r for o, tree in zip(offsets, trees) for r in tree.keep})
    row = {x: k for k, x in enumerate(keep)}
    device = bot.model.device
    with torch.no_grad(), packed(bot.model, segments):
        logits = bot.model(input_ids=torch.tensor([[t for tree in trees for t in tree.ids]], device=device),
                            position_ids=torch.tensor([[p for tree in trees for p in tree.positions]],
                                                      device=device),
                            use_cache=False, logits_to_keep=torch.tensor(keep, device=device)).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    rows, toks = [], []  # every scored token of every branch, gathered at once
    for o, tree in zip(offsets, trees):
        rows += [row[o + r] for r in tree.score_rows]
        toks += tree.score_tokens
    picked = iter(logp[rows, toks].tolist() if rows else [])
    decisions = []
    for (st, br), o, tree in zip(items, offsets, trees):
        scores = [sum(next(picked) for _ in range(k)) for k in tree.counts]
        if len(tree.ids) > tree.new:
            st.cache.crop(tree.new - len(tree.ids))
        st.fed, st.last_logits = list(br.context), logits[row[o + tree.new - 1]].clone()
        decisions.append(bot._decision(scores, len(br.context)))
    return decisions


def decide_two_pass(bot, branches: Branches) -> Decision:
    """The decision as two passes: the context, then a batch of two over the branches on a
    copy of the cache (used where a sliding window rules out cropping the branches away)."""
    import copy

    import torch

    context, sil, resp = branches
    bot._feed(context)
    logp_first = torch.log_softmax(bot.state.last_logits.float(), -1)
    rest = [b[:-1] for b in (sil, resp)]
    width = max(len(r) for r in rest)
    rest_logp = [[] for _ in rest]
    if width:
        pad = bot.tokenizer.pad_token_id
        batch = torch.tensor([r + [pad] * (width - len(r)) for r in rest], device=bot.model.device)
        cache = copy.deepcopy(bot.state.cache)
        cache.batch_repeat_interleave(2)
        with torch.no_grad():
            logits = bot.model(input_ids=batch, cache=cache, use_cache=True).logits
        for i, branch in enumerate((sil, resp)):
            lp = torch.log_softmax(logits[i].float(), -1)
            rest_logp[i] = [lp[j, branch[j + 1]].item() for j in range(len(branch) - 1)]
    scores = [logp_first[b[0]].item() + sum(lp) if b else 0.0 for b, lp in zip((sil, resp), rest_logp)]
    return bot._decision(scores, len(context))


def build_tree(bot, st: ConversationState, br: Branches) -> Tree:
    """What `GroupChatAssistant._decide` feeds for `br` over `st`'s cache (cropped here to what it shares with
    the context): the new context tokens, then each branch's diverging tokens, each branch
    attending to the cache, the context and its own earlier tokens only."""
    import torch

    context, sil, resp = br
    n = common_prefix(st.fed, context)
    if n == len(context):  # already fed: feed its last token again to get its logits
        n -= 1
    if st.cache is not None and n < len(st.fed):
        st.cache.crop(n - len(st.fed))
    new = context[n:]
    rest = [b[:-1] for b in (sil, resp)]  # the last token of a branch is only scored
    ids, positions, first = list(new), list(range(n, len(context))), []
    for r in rest:
        first.append(len(ids))
        ids += r
        positions += range(len(context), len(context) + len(r))
    q = len(ids)
    allowed = torch.ones(q, q, dtype=torch.bool).tril_()
    for f, r in zip(first, rest):
        allowed[f:f + len(r), len(new):f] = False  # a branch does not see the other one
    mask = torch.cat([torch.ones(q, n, dtype=torch.bool), allowed], 1)
    dtype = bot.model.get_input_embeddings().weight.dtype
    bias = torch.zeros(q, n + q, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    # logits rows: the context's last token predicts each branch's first, then its own tokens
    keep = [len(new) - 1] + [f + j for f, r in zip(first, rest) for j in range(len(r))]
    score_rows, score_tokens = [], []
    for f, branch in zip(first, (sil, resp)):
        for j, tok in enumerate(branch):
            score_rows.append(len(new) - 1 if j == 0 else f + j - 1)
            score_tokens.append(tok)
    return Tree(ids, positions, bias[None, None].to(bot.model.device), len(new), keep,
                 score_rows, score_tokens, [len(sil), len(resp)])


def generate_batch(bot, speakers: list[tuple[ConversationState, Branches, Decision, bool]]) -> None:
    """`GroupChatAssistant._respond` for several conversations at once, packed like `decide_batch`: first each
    one's "(response)" tokens, then greedy decoding with one token of each per pass, until
    each ends. Each state ends as after `GroupChatAssistant._respond`: the reply added (or, unsure
    and unaddressed, withdrawn), the cache holding what was fed."""
    import torch

    device = bot.model.device
    dtype = bot.model.get_input_embeddings().weight.dtype
    stops = {bot.eot_id, bot.tokenizer.eos_token_id}
    feeds = [list(br.response) for _, br, _, _ in speakers]  # what each feeds next
    outs: list[list[int]] = [[] for _ in speakers]
    lowest = [1.0] * len(speakers)  # each reply's confidence (GroupChatAssistant._generate)
    live = list(range(len(speakers)))
    for step in range(bot.max_new_tokens + 1):
        segments, ids, positions = [], [], []
        for b in live:
            st, feed = speakers[b][0], feeds[b]
            q, n = len(feed), len(st.fed)
            causal = torch.ones(q, n + q, dtype=torch.bool).tril_(n)
            bias = torch.zeros(q, n + q, dtype=dtype).masked_fill_(~causal, torch.finfo(dtype).min)
            segments.append((st.cache, q, bias[None, None].to(device)))
            ids += feed
            positions += range(n, n + q)
            st.fed = st.fed + feed
        keep = torch.tensor(list(itertools.accumulate(len(feeds[b]) for b in live)), device=device) - 1
        with torch.no_grad(), packed(bot.model, segments):
            logits = bot.model(input_ids=torch.tensor([ids], device=device),
                                position_ids=torch.tensor([positions], device=device),
                                use_cache=False, logits_to_keep=keep).logits[0]
        probs = torch.softmax(logits.float(), -1)
        top, toks = (x.tolist() for x in probs.max(-1))
        still = []
        for i, b in enumerate(live):
            speakers[b][0].last_logits = logits[i].clone()
            if toks[i] in stops or step == bot.max_new_tokens:
                continue
            outs[b].append(toks[i])
            if len(outs[b]) <= CONFIDENCE_TOKENS:
                lowest[b] = min(lowest[b], top[i])
            feeds[b] = [toks[i]]
            still.append(b)
        live = still
        if not live:
            break
    for (st, _, d, addressed), out, low in zip(speakers, outs, lowest):
        d.response, d.completion_tokens, d.confidence = bot._reply_text(out), len(out), low
        st.messages.append(Message("assistant", d.response))
        honesty.settle(d, st.messages, bot.confidence.threshold, bot.hedge, addressed or not bot.withdraw)


class Tree(NamedTuple):
    """One conversation's part of a packed decision (see build_tree)."""

    ids: list[int]  # the new context tokens, then each branch's diverging tokens
    positions: list[int]
    bias: object  # [1, 1, len(ids), cached + len(ids)] additive attention mask
    new: int  # how many of `ids` are the context's
    keep: list[int]  # the rows whose logits are needed
    score_rows: list[int]  # the row scoring each branch token, "(silence)"'s then "(response)"'s
    score_tokens: list[int]
    counts: list[int]  # how many of those are "(silence)"'s, "(response)"'s


_PACKED_SEGMENTS = threading.local()  # what `packed` gives the attention of the forward it wraps


@contextlib.contextmanager
def packed(model, segments: list[tuple[object, int, object]]):
    """Within it, `model`'s attention treats its (batch-1) input as several conversations packed
    one after the other: `segments` are (the conversation's cache, its number of tokens, its
    additive mask over [cache, own tokens]); each segment's keys and values are appended to its
    own cache and it attends to that cache only. Call the model with use_cache=False."""
    from transformers import AttentionInterface

    if "chimein_packed" not in AttentionInterface._global_mapping:
        AttentionInterface.register("chimein_packed", packed_attention)
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(m, "layer_idx") and hasattr(m, "config")}.values()
    saved = [c._attn_implementation_internal for c in configs]
    _PACKED_SEGMENTS.value = segments
    for c in configs:
        c._attn_implementation_internal = "chimein_packed"
    try:
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation_internal = impl
        _PACKED_SEGMENTS.value = None


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    import torch
    import torch.nn.functional as F

    outs, start = [], 0
    for cache, q, bias in _PACKED_SEGMENTS.value:
        k, v = cache.update(key[:, :, start:start + q], value[:, :, start:start + q], module.layer_idx)
        outs.append(F.scaled_dot_product_attention(query[:, :, start:start + q], k, v, attn_mask=bias,
                                                   scale=scaling, enable_gqa=k.shape[1] != query.shape[1]))
        start += q
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None
