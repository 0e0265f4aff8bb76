"""The group-chat assistant at run time: after each message, speak or stay silent.

    from chimein.runtime.assistant import ConversationState, GroupChatAssistant
    bot = GroupChatAssistant.from_adapter("local:smollm2-135m-instruct--ds-…")
    bot.add("Alice", "who wrote the Da Vinci Code again?")   # Decision(speak=True, p_speak=0.83, response=...)
    bot.reply()                       # answer the last message now, whatever the decision
    bot.reset()                       # a new, empty conversation
    chat = bot.use(ConversationState())   # or switch between conversations (a server keeps one per id)
    bot.add_many([(chat_a, "Ann", "hi", False), (chat_b, "Bo", "assistant?", False)])  # several at once

The decision takes one forward pass: the new message's tokens and the few diverging tokens of the
"(silence)" and "(response)" continuations are fed together over the kept KV cache, each
continuation attending only to the conversation and itself (a tree-shaped attention mask); they
are then cropped from the cache, and p_speak is the response's share of their probability.
Generation runs only when the assistant speaks. The KV cache of the conversation so far is kept, so a new
message costs its own tokens: the runtime renders and tokenizes the whole conversation once per message (a few
ms) and feeds the model only what differs from what it has already seen, rolling the cache back where a
boundary tokenized differently. The ids fed are therefore exactly those of rendering the whole conversation
with the chat template.
"""

from __future__ import annotations

import contextlib
import math

from chimein.conversation import Conversation, Message, parse_conversation
from chimein.formatting import RESPONSE, SILENCE, chat_turns, marker_pattern, neutralize, render
from chimein.knowledge import grounding
from chimein.presets import ModelPreset
from chimein.runtime import honesty, packed
from chimein.runtime.state import (
    CONFIDENCE_TOKENS,
    Branches,
    Chattiness,
    Confidence,
    ConversationState,
    Decision,
    common_prefix,
)

# the instruction of the prompted baselines (docs/evaluation.md): the un-tuned base model
# (`--base`, `--baseline base`) and the OpenAI one
BASELINE_PROMPT = (
    "You are an assistant in a group conversation. Help with relevant information or when you are "
    'directly addressed as "assistant". Do not be overzealous: most of the time the users talk to '
    'each other. Answer "(silence)" when you have nothing important to say, otherwise start your '
    'answer with "(response)".'
)


class GroupChatAssistant:
    def __init__(self, model, tokenizer, preset: ModelPreset, chattiness: float | Chattiness = Chattiness(),
                 max_new_tokens: int = 96, max_context_tokens: int | None = None,
                 system_prompt: str | None = None, responder=None, confidence: float | Confidence = Confidence(),
                 tools: bool = True, hedge: bool = True, withdraw: bool = True, knowledge=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preset = preset
        # the threshold and where it came from; setting `chattiness` to a number fixes it
        self.threshold = chattiness if isinstance(chattiness, Chattiness) else Chattiness.fixed(chattiness)
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens or preset.max_length
        self.system_prompt = system_prompt
        # where replies come from when it speaks: None, the local model; else e.g. an
        # OpenAIResponder (chimein.runtime.responder), with the local model as its fallback
        self.responder = responder
        # saying only what is right (chimein.runtime.honesty): tools' exact answers, and below the
        # confidence threshold a guess said as one (or withdrawn when unaddressed)
        self.confidence = confidence if isinstance(confidence, Confidence) else Confidence.fixed(confidence)
        # withdraw: unaddressed and unsure, stay silent (False: chime in with the guess, said as one)
        self.tools, self.hedge, self.withdraw = tools, hedge, withdraw
        # the group's documents (a KnowledgeIndex, or a folder's path): each user message is shown
        # with the passages it retrieves (grounding.with_passages)
        self.knowledge = honesty.open_knowledge(knowledge)
        self.pattern = marker_pattern(tokenizer, preset)
        self.eot_id = tokenizer.convert_tokens_to_ids(preset.eot_token)
        self.adapter_ref: str | None = None  # what from_adapter loaded; None for a bare base model
        self.adapter_meta: dict = {}  # its chimein.json: preset, dataset version, MLflow run
        self._state = ConversationState()

    @property
    def chattiness(self) -> float:
        """Speak when p_speak >= this (`threshold` says where it came from)."""
        return self.threshold.threshold

    @chattiness.setter
    def chattiness(self, value: float) -> None:
        self.threshold = Chattiness.fixed(value)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_adapter(cls, ref: str, quantize: bool | None = None, chattiness: float | None = None,
                     confidence: float | None = None, knowledge="adapter", **kwargs) -> GroupChatAssistant:
        """From a trained adapter: a directory, local:NAME, hub:ORG/NAME or an MLflow model URI
        (models:/NAME@ALIAS, runs:/…). By default the base is loaded as it was trained (4-bit or
        not), the adapter's calibrated chattiness and confidence thresholds are used, and the
        group's documents it was trained for (`knowledge` in its chimein.json, when that folder is
        here); knowledge=None: none, a folder or a KnowledgeIndex: that one."""
        from chimein.models import adapters
        from chimein.models import loading as models

        given = ref
        if ref.startswith(("models:/", "runs:/")):
            ref = _download_mlflow_adapter(ref)
        meta = adapters.adapter_meta(ref)
        if quantize is None:
            quantize = meta.get("hyperparameters", {}).get("quantization", "nf4") != "none"
        model, tokenizer = models.load_adapter(ref, quantize=quantize)
        preset = ModelPreset.from_stored(meta["preset"])
        if isinstance(knowledge, str) and knowledge == "adapter":  # the documents its chimein.json names
            knowledge = honesty.adapter_knowledge(meta.get("knowledge"))
        bot = cls(model, tokenizer, preset, knowledge=knowledge,
                  chattiness=Chattiness.stored(meta.get("chattiness")) if chattiness is None else chattiness,
                  confidence=Confidence.stored(meta.get("confidence")) if confidence is None else confidence,
                  **kwargs)
        bot.adapter_ref, bot.adapter_meta = given, meta
        return bot

    @classmethod
    def from_preset(cls, name: str, quantize: bool = False, **kwargs) -> GroupChatAssistant:
        """The base model of a preset, un-tuned (the `base` baseline: pass BASELINE_PROMPT)."""
        from chimein.models.loading import QuantSettings, load_base_model, load_tokenizer
        from chimein.presets import load_preset

        preset = load_preset(name)
        tokenizer = load_tokenizer(preset)
        model = load_base_model(preset, QuantSettings(load_in_4bit=quantize), tokenizer)
        model.config.use_cache = True
        return cls(model, tokenizer, preset, **kwargs)

    # --- the conversation ---------------------------------------------------------------------

    @property
    def state(self) -> ConversationState:
        """The conversation the assistant is in (switch with `use`, start anew with `reset`)."""
        return self._state

    def use(self, state: ConversationState) -> ConversationState:
        """Continue `state` from now on: a server keeps one per conversation and switches; the
        cache `state` holds is reused. Returns it."""
        self._state = state
        return state

    def reset(self) -> None:
        """Start a new, empty conversation."""
        self._state = ConversationState()

    @property
    def conversation(self) -> Conversation:
        return Conversation(tuple(self.state.messages))

    def add(self, name: str, content: str, force: bool = False, reply: bool = True) -> Decision:
        """A user message arrives; decide, and reply when speaking (or when `force`d). With
        reply=False only the decision is made (evaluation of decisions alone): nothing is
        generated or added after the message. A message that is refused (InvalidConversation)
        or a failure on the way (even Ctrl-C) leaves the conversation as it was, less its cache."""
        msg = parse_conversation([{"role": "user", "name": name, "content": content}]).messages[0]
        with self._all_or_nothing():
            msg, sources = grounding.with_passages(self.knowledge, self.state.messages, msg)
            self.state.messages.append(msg)
            d, branches = self._decide(self._window())
            d.passages = sources
            d.speak = force or d.p_speak >= self.state.threshold(self.chattiness)
            if d.speak and reply:
                self._respond(d, branches, honesty.addressed(content, force))
        return d

    def add_many(self, requests: list[tuple[ConversationState, str, str, bool]],
                 reply: bool = True) -> list[Decision | Exception]:
        """Several conversations' new messages at once, as (state, name, content, force): the
        decisions that `add` would make on each, in shared forward passes — the new tokens of all
        of them packed into one sequence, each attending to its own KV cache (`packed.decide_batch`),
        and the replies of those that speak generated together, a token of each per pass. A server gathers
        the messages that arrive together and calls this. Each result is the Decision or the
        exception that refused or failed that message (its conversation is then as it was, less
        its cache, as with `add`); a conversation may appear only once. Afterwards `state` is the
        last one given."""
        return packed.add_many(self, requests, reply)

    def reply(self) -> Decision:
        """Answer the last user message now, whatever was decided (chat's /force): a reply the
        assistant already gave to it is replaced. The Decision has the message's p_speak and
        speak=True."""
        msgs = self.state.messages
        with self._all_or_nothing():
            if msgs and msgs[-1].role == "assistant":
                msgs.pop()
            if not msgs:
                raise ValueError("no user message to reply to yet")
            d, branches = self._decide()
            d.speak = True
            self._respond(d, branches, addressed=True)
        return d

    def set_reply(self, reply: str | None) -> None:
        """Replace what the assistant did after the last user message (teacher forcing in
        evaluation, or an edit in an integration): None means silence."""
        if self.state.messages and self.state.messages[-1].role == "assistant":
            self.state.messages.pop()
        if reply is not None:
            self.state.messages.append(Message("assistant", reply))

    def score_conversation(self, conversation: Conversation) -> list[tuple[int, float, float]] | None:
        """(message index, p_speak, format_mass) at every user message of a reference
        conversation replayed with teacher forcing — the decisions `add` would make, in one
        forward pass instead of one per message (evaluation and calibration).

        The conversation's tokens are fed once; after them come both branches of every decision,
        each attending only to its own context (a tree-shaped 4-D attention mask, positions
        continuing from the decision point). Logits are computed only where a branch token is
        scored. Returns None when the tokenization is not prefix-stable or the conversation
        would be windowed: the caller then replays it message by message."""
        import torch

        msgs = conversation.messages
        points = []  # (message index, context, "(silence)" remainder, "(response)" remainder)
        replayed: list[Message] = []  # the history at each decision (the current state is untouched)
        for i, m in enumerate(msgs):
            if m.role != "user":
                continue
            replayed.append(m)
            points.append((i, *self._branch_ids(replayed)))
            if i + 1 < len(msgs) and msgs[i + 1].role == "assistant":
                replayed.append(msgs[i + 1])
        if not points:
            return []
        main = points[-1][1]
        if len(main) + 64 >= self.max_context_tokens or any(
                ctx != main[:len(ctx)] or not ctx for _, ctx, _, _ in points):
            return None
        ids, positions, parents, keep = list(main), list(range(len(main))), [], []
        score_at = []  # per point and branch: the logits rows scoring each of its tokens
        for _, ctx, sil, resp in points:
            rows = []
            for branch in (sil, resp):
                at = [len(ctx) - 1]  # the context's last token predicts the branch's first
                for j, tok in enumerate(branch[:-1]):
                    at.append(len(ids))
                    ids.append(tok)
                    positions.append(len(ctx) + j)
                    parents.append((len(ctx), len(ids) - 1 - j))  # sees ctx and its own branch
                rows.append(at)
            score_at.append(rows)
            keep += [x for r in rows for x in r]
        n, total = len(main), len(ids)
        dtype = self.model.get_input_embeddings().weight.dtype
        allowed = torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:n, :n] = allowed
        for row, (ctx_len, first) in zip(range(n, total), parents):
            mask[row, :ctx_len] = True
            mask[row, first:row + 1] = True
        bias = torch.zeros(total, total, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        kept = sorted(set(keep))
        index = {x: k for k, x in enumerate(kept)}
        device = self.model.device
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=device),
                                position_ids=torch.tensor([positions], device=device),
                                attention_mask=bias[None, None].to(device), use_cache=False,
                                logits_to_keep=torch.tensor(kept, device=device)).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for (i, _, sil, resp), rows in zip(points, score_at):
            scores = [sum(logp[index[r], tok].item() for r, tok in zip(at, branch)) if branch else 0.0
                      for branch, at in zip((sil, resp), rows)]
            p_sil, p_resp = math.exp(scores[0]), math.exp(scores[1])
            total_p = p_sil + p_resp
            out.append((i, p_resp / total_p if total_p > 0 else 0.0, total_p))
        return out

    def describe(self) -> str:
        """One line on what runs: preset, adapter, thresholds and where they came from, tools, device
        and dtype (4-bit or not)."""
        model = f"{self.preset.name} + {self.adapter_ref}" if self.adapter_ref else f"{self.preset.name} (base)"
        weights = "4-bit " if getattr(self.model, "is_loaded_in_4bit", False) else ""
        honest = (f"hedges below {self.confidence.threshold:.3f} ({self.confidence.source})" if self.hedge
                  else "no hedging") + (" · tools" if self.tools else " · no tools") + \
            (f" · documents: {self.knowledge.describe()}" if self.knowledge is not None else "")
        return (f"{model} · chattiness {self.chattiness:.3f} ({self.threshold.source}) · {honest} · "
                f"{self.model.device.type} {weights}{str(self.model.dtype).removeprefix('torch.')}")

    # --- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Restore the messages if what follows fails: a forward pass that failed may have half
        updated the cache, so it is dropped (the next decision feeds the messages again)."""
        st = self.state
        before = list(st.messages)
        try:
            yield
        except BaseException:
            st.messages[:] = before
            st.drop_cache()
            raise

    def _respond(self, d: Decision, branches: Branches, addressed: bool) -> None:
        """The reply, once speaking: a tool's exact answer, else the responder's, else the local
        model's (a guess said as one, or withdrawn when unaddressed: honesty.settle)."""
        if self.tools and honesty.answer_with_tool(d, self.state.messages, self.pattern):
            return
        if self.responder is not None:
            from chimein.runtime.responder import ResponderError

            try:
                text = self.responder.reply(self.state.messages, grounding.recent_passages(self.state.messages))
            except ResponderError as e:  # the local model answers instead: no message is lost
                d.responder_error = str(e)
            else:
                d.response, d.responder = neutralize(text, self.pattern) or "…", self.responder.name
                self.state.messages.append(Message("assistant", d.response))
                return
        d.response, d.completion_tokens, d.confidence = self._generate(branches)
        self.state.messages.append(Message("assistant", d.response))
        honesty.settle(d, self.state.messages, self.confidence.threshold, self.hedge, addressed or not self.withdraw)

    def _turns(self, messages: list[Message] | None = None) -> list[dict]:
        turns = chat_turns(Conversation(tuple(self.state.messages if messages is None else messages)),
                           self.pattern)
        if self.system_prompt:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def _branch_ids(self, messages: list[Message] | None = None) -> tuple[list[int], list[int], list[int]]:
        """(shared context, "(silence)" remainder, "(response)" remainder), each as the whole
        rendered conversation (by default the current one) tokenizes: the shared part is their
        longest common prefix."""
        turns = self._turns(messages)  # chat_turns closed the last user turn with "(silence)"
        # rendered once: what precedes the last assistant turn's content does not depend on it
        r = render(turns, self.tokenizer, self.preset.eot_token)
        head = r.text[:r.assistant_spans[-1][0]]
        s, p = self.tokenizer([head + SILENCE, head + RESPONSE], add_special_tokens=False).input_ids
        n = common_prefix(s, p)
        return s[:n], s[n:], p[n:]

    def _feed(self, ids: list[int]) -> None:
        """Bring the cache to exactly `ids`: roll back to the common prefix, feed the rest."""
        import torch

        st = self.state
        n = common_prefix(st.fed, ids)
        if n == len(ids) and n == len(st.fed):
            return
        if n == len(ids):  # a strict prefix of what is cached: keep one token to get logits
            n -= 1
        if st.cache is not None and n < len(st.fed):
            st.cache.crop(n - len(st.fed))  # transformers 5: a negative count of tokens to drop
        new, last = torch.tensor([ids[n:]], device=self.model.device), torch.tensor([len(ids) - n - 1])
        # the last position's logits, by index: as =1, an adapter's output matrix was copied in bf16
        with torch.no_grad():  # (half a pass)
            out = self.model(input_ids=new, cache=st.cache, use_cache=True, logits_to_keep=last.to(new.device))
        st.cache, st.fed, st.last_logits = out.cache, list(ids), out.logits[0, -1]

    def _decide(self, branches: Branches | None = None) -> tuple[Decision, Branches]:
        """The decision on the current conversation, and the token ids it was made on (what
        `_generate` continues). One forward pass: the context's new tokens and both branches'
        diverging tokens together, each branch attending to the cache, the context and its own
        earlier tokens only (a tree-shaped 4-D mask, positions continuing from the context); the
        branches are then cropped from the cache, which ends holding exactly the context."""
        import torch

        context, sil, resp = branches = branches or Branches(*self._branch_ids())
        st = self.state
        rest = [b[:-1] for b in (sil, resp)]  # the last token of a branch is only scored
        window = getattr(self.model.config, "sliding_window", None)
        if window and len(context) + sum(map(len, rest)) >= window - 1:
            # a sliding-window layer would evict keys that cropping the branches cannot restore
            return packed.decide_two_pass(self, branches), branches
        tree = packed.build_tree(self, st, branches)
        device = self.model.device
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([tree.ids], device=device),
                             position_ids=torch.tensor([tree.positions], device=device),
                             attention_mask=tree.bias, cache=st.cache, use_cache=True,
                             logits_to_keep=torch.tensor(tree.keep, device=device))
        logp = torch.log_softmax(out.logits[0].float(), -1)
        if len(tree.ids) > tree.new:  # transformers 5: a negative count of tokens to drop
            out.cache.crop(tree.new - len(tree.ids))
        # a copy: a view of row 0 would keep every kept row's logits alive with the conversation
        st.cache, st.fed, st.last_logits = out.cache, list(context), out.logits[0, 0].clone()
        row = {x: k for k, x in enumerate(tree.keep)}  # one gather, one transfer (not a sync per token)
        picked = iter(logp[[row[r] for r in tree.score_rows], tree.score_tokens].tolist())
        scores = [sum(next(picked) for _ in range(k)) for k in tree.counts]
        return self._decision(scores, len(context)), branches

    @staticmethod
    def _decision(scores: list[float], prompt_tokens: int) -> Decision:
        """From the log-probabilities of "(silence)" and "(response)"."""
        p_sil, p_resp = math.exp(scores[0]), math.exp(scores[1])
        total = p_sil + p_resp
        return Decision(speak=False, p_speak=p_resp / total if total > 0 else 0.0, format_mass=total,
                        prompt_tokens=prompt_tokens)

    def _generate(self, branches: Branches) -> tuple[str, int, float]:
        """Greedy reply after the "(response)" prefix, until the end-of-turn token; with the number of
        tokens generated and its confidence (the lowest probability of its first CONFIDENCE_TOKENS)."""
        import torch

        context, _, resp = branches
        self._feed(context + resp)
        out: list[int] = []
        logits, lowest = self.state.last_logits, 1.0
        for _ in range(self.max_new_tokens):
            probs = torch.softmax(logits.float(), -1)
            tok = int(torch.argmax(probs))
            if tok == self.eot_id or tok == self.tokenizer.eos_token_id:
                break
            out.append(tok)
            if len(out) <= CONFIDENCE_TOKENS:
                lowest = min(lowest, float(probs[tok]))
            self._feed(self.state.fed + [tok])
            logits = self.state.last_logits
        return self._reply_text(out), len(out), lowest

    def _reply_text(self, ids: list[int]) -> str:
        """A generated reply as text, any chat-format marker in it neutralized; never empty."""
        return neutralize(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), self.pattern) or "…"

    def _window(self) -> Branches:
        """Keep the decision's context under max_context_tokens by dropping whole exchanges from
        the start (to 3/4 of the limit, so the cache is rebuilt rarely). The conversation is
        measured as rendered, not by what the cache holds, so a long message or a whole history
        given at once (the OpenAI endpoint) is windowed too. Returns the decision's token ids of
        the conversation kept."""
        msgs = self.state.messages
        branches = Branches(*self._branch_ids())  # the decision's ids: measured once, used after
        if len(branches.context) + 64 < self.max_context_tokens:
            return branches
        budget = int(self.max_context_tokens * 0.75)
        starts = [i for i, m in enumerate(msgs) if m.role == "user"]
        # the fewest exchanges to drop: a binary search, as fewer exchanges render to fewer tokens;
        # the last user message always stays
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._branch_ids(msgs[starts[mid]:])[0]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        del msgs[:starts[lo]]
        return Branches(*self._branch_ids())


def _download_mlflow_adapter(uri: str) -> str:
    from chimein.ops.tracking import download_adapter  # MLflow lives in chimein.ops.tracking

    return download_adapter(uri)
