"""The thresholds of a trained adapter, calibrated on the validation split by the runtime itself
(the same decisions and replies chat and serve make): chattiness (when to speak) and confidence
(when a reply is said as a guess)."""

from __future__ import annotations

import math

from chimein.presets import ModelPreset
from chimein.runtime.state import CONFIDENCE_TOKENS, DEFAULT_CHATTINESS, DEFAULT_CONFIDENCE


def calibrate_chattiness(model, tokenizer, preset: ModelPreset, ds, version: str,
                         max_fir: float | None = None) -> dict:
    """The threshold on p_speak with the best balanced accuracy on the validation split (among
    those with a false-interruption rate <= max_fir), scored by the runtime itself: the same
    decisions chat and serve make."""
    from chimein.data.dataset import split_conversations
    from chimein.evaluate.metrics import calibrate_threshold, evaluate
    from chimein.runtime.assistant import GroupChatAssistant

    convs = split_conversations(ds["validation"]) if "validation" in ds else []
    if not convs:
        return {"threshold": DEFAULT_CHATTINESS, "origin": "default",
                "source": f"default ({version} has no validation split)"}
    model.config.use_cache = True
    records = evaluate(GroupChatAssistant(model, tokenizer, preset), convs, replies=False)
    labels = [r.label for r in records]
    if len(set(labels)) < 2:
        return {"threshold": DEFAULT_CHATTINESS, "origin": "default",
                "source": f"default ({version}:validation has one class only)"}
    threshold, m = calibrate_threshold(labels, [r.p_speak for r in records], max_fir)
    bound = f", false interruptions <= {max_fir:g}" if max_fir is not None else ""
    return {"threshold": threshold, "origin": "calibrated", "source": f"calibrated on {version}:validation{bound}",
            "decisions": len(records), "balanced_accuracy": m["balanced_accuracy"],
            "missed_intervention_rate": m["missed_intervention_rate"],
            "false_interruption_rate": m["false_interruption_rate"]}


# the most confident errors a calibrated confidence threshold lets through, as a share of the
# validation replies it is calibrated on: below the threshold a reply is said as a guess
MAX_CONFIDENT_ERROR = 0.1


def confidence_threshold(scored: list[tuple[float, bool]], max_error: float = MAX_CONFIDENT_ERROR) -> float:
    """The lowest threshold on confidence (replies below it are hedged) whose confident errors,
    (confidence >= it, wrong), are at most `max_error` of `scored` ((confidence, right) pairs):
    it keeps as many replies as the bound allows. Above every confidence (hedge them all) when none
    meets it."""
    n = len(scored)
    for t in sorted({c for c, _ in scored}):
        if sum(c >= t and not right for c, right in scored) <= max_error * n:
            return t
    return math.nextafter(max((c for c, _ in scored), default=1.0), math.inf)


def calibrate_confidence(model, tokenizer, preset: ModelPreset, ds, version: str,
                         max_error: float = MAX_CONFIDENT_ERROR) -> dict:
    """The confidence threshold below which a reply is said as a guess, calibrated on the
    validation split: the model replies (forced, hedging and tools off) at each reply of the split
    that states a checkable fact (a number or a name the chat had not said: answers.reference_keys),
    and the threshold lets at most `max_error` of those replies through confidently wrong."""
    from chimein.data.dataset import split_conversations
    from chimein.evaluate.answers import reference_keys, states
    from chimein.evaluate.metrics import forced_decisions
    from chimein.runtime.assistant import GroupChatAssistant

    convs = split_conversations(ds["validation"]) if "validation" in ds else []
    keys = {}
    for c, conv in enumerate(convs):
        msgs = conv.messages
        for i in range(1, len(msgs)):
            if msgs[i].role == "assistant" and msgs[i - 1].role == "user":
                if found := reference_keys(msgs[i].content, " ".join(m.content for m in msgs[:i])):
                    keys[c, i - 1] = found
    if not keys:
        return {"threshold": DEFAULT_CONFIDENCE, "origin": "default",
                "source": f"default ({version}:validation has no reply stating a checkable fact)"}
    model.config.use_cache = True
    bot = GroupChatAssistant(model, tokenizer, preset, hedge=False, tools=False)
    decisions = forced_decisions(bot, convs, frozenset(keys), tokens=CONFIDENCE_TOKENS)
    scored = [(d.confidence if d.confidence is not None else 1.0, states(d.response, keys[k]))
              for k, d in decisions.items()]
    threshold = confidence_threshold(scored, max_error)
    kept = [right for c, right in scored if c >= threshold]
    return {"threshold": threshold, "origin": "calibrated",
            "source": f"calibrated on {version}:validation, confident errors <= {max_error:g}",
            "replies": len(scored), "right": sum(r for _, r in scored) / len(scored),
            "said_plainly": len(kept) / len(scored), "confident_errors": (len(kept) - sum(kept)) / len(scored)}
