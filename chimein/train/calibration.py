"""The chattiness threshold of a trained adapter, calibrated on the validation split by the runtime
itself (the same decisions chat and serve make)."""

from __future__ import annotations

from chimein.presets import ModelPreset
from chimein.runtime.state import DEFAULT_CHATTINESS


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
