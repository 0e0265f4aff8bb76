"""JSON Lines of conversations → a tokenized dataset with assistant masks, plus reports.

Writes into the output directory:
  dataset/        a `datasets.Dataset` (save_to_disk): input_ids, assistant_masks, decision_masks
                  (the "(silence)"/"(response)" tokens), n_turns, n_speak, truncated — what
                  SFTTrainer consumes
  examples.txt    a few rendered conversations with the labelled spans marked ⟦ ⟧
  rejected.jsonl  every rejected line in file order: line number, kind, reason (`problem`) and the
                  line as read (`raw`)
  summary.json    the counts printed at the end
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chimein.conversation import ConversationFileError, LoadReport, Rejection, load_conversations
from chimein.formatting import TooLong, encode, marker_pattern, show_labelled
from chimein.models.loading import load_tokenizer
from chimein.presets import load_preset


@dataclass
class PreprocessSummary:
    preset: str
    data: str
    out: str
    max_length: int
    conversations: int = 0  # rows written
    rejected: int = 0
    rejected_by_kind: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # conversations that lost trailing turns to fit max_length
    user_turns: int = 0
    speak: int = 0
    silence: int = 0
    tokens: int = 0
    labelled_tokens: int = 0


def tokenize_conversations(conversations, lines, source: str, preset, tokenizer,
                           summary: PreprocessSummary, n_examples: int = 3,
                           progress: bool = False) -> tuple[dict, list[Rejection], list[str]]:
    """Rows (input_ids, assistant_masks, …) for SFTTrainer, the conversations rejected as too
    long, and rendered examples; counts go into `summary`."""
    from rich.progress import track

    pattern = marker_pattern(tokenizer, preset)
    rows = {"input_ids": [], "assistant_masks": [], "decision_masks": [], "n_turns": [], "n_speak": [],
            "truncated": []}
    rejected, examples = [], []
    items = list(zip(conversations, lines))
    for conv, line in track(items, description="tokenizing", disable=not progress):
        try:
            ex = encode(conv, tokenizer, preset, summary.max_length, pattern)
        except TooLong as e:
            rejected.append(Rejection(source, line, "too_long", str(e),
                                      json.dumps(conv.to_json(), ensure_ascii=False)))
            continue
        for k in rows:
            rows[k].append(getattr(ex, k))
        summary.truncated += ex.truncated
        summary.user_turns += ex.n_turns
        summary.speak += ex.n_speak
        summary.tokens += len(ex.input_ids)
        summary.labelled_tokens += sum(ex.assistant_masks)
        if len(examples) < n_examples:
            examples.append(f"# {source}:{line} — {ex.n_turns} turns, {ex.n_speak} spoken, "
                            f"{len(ex.input_ids)} tokens, {sum(ex.assistant_masks)} labelled"
                            f"{' (truncated)' if ex.truncated else ''}\n{show_labelled(ex)}")
    summary.conversations = len(rows["input_ids"])
    summary.silence = summary.user_turns - summary.speak
    return rows, rejected, examples


class NothingUsable(ValueError):
    """Every conversation was rejected; `rejected` says which lines and why."""

    def __init__(self, message: str, rejected: list[Rejection]):
        super().__init__(message)
        self.rejected = rejected


def _too_long_fix(max_length: int) -> str:
    return f"raise --max-length (now {max_length}) or shorten the conversation's first exchange"


EXAMPLES_LEGEND = ("Labelled tokens (what the model learns to produce) are wrapped in ⟦ ⟧; "
                   "everything else is context only.\n\n")


def preprocess(preset_name: str, data: str | Path, out: str | Path, max_length: int | None = None,
               strict: bool = False, n_examples: int = 3,
               progress: bool = False) -> tuple[PreprocessSummary, list[Rejection]]:
    """Validate, format, tokenize and mask a conversation file for one model preset; the summary
    and every rejected line, in file order."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    preset = load_preset(preset_name)
    report: LoadReport = load_conversations(data, strict=strict)
    tokenizer = load_tokenizer(preset)
    summary = PreprocessSummary(preset.name, str(data), str(out), max_length or preset.max_length)
    rows, too_long, examples = tokenize_conversations(
        report.conversations, report.lines, str(data), preset, tokenizer, summary, n_examples, progress)
    if strict and too_long:
        raise ConversationFileError(f"{too_long[0]}. To keep it, {_too_long_fix(summary.max_length)}; "
                                    "or drop --strict to skip such conversations (listed in rejected.jsonl).")
    rejected = sorted(report.rejected + too_long, key=lambda r: r.line)

    summary.rejected = len(rejected)
    summary.rejected_by_kind = dict(sorted(Counter(r.kind for r in rejected).items()))
    if summary.conversations == 0:
        fix = f"; for too_long, {_too_long_fix(summary.max_length)}" if too_long else ""
        raise NothingUsable(f"{data}: no usable conversation ({summary.rejected} rejected: "
                            f"{summary.rejected_by_kind}){fix}", rejected)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows).save_to_disk(str(out / "dataset"))
    (out / "examples.txt").write_text(EXAMPLES_LEGEND + "\n\n".join(examples) + "\n", encoding="utf-8")
    with (out / "rejected.jsonl").open("w", encoding="utf-8") as f:
        for r in rejected:
            f.write(json.dumps({"line": r.line, "kind": r.kind, "problem": r.problem, "raw": r.raw},
                               ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary, rejected
