"""The train split of a dataset version as token rows with exact assistant masks: what the
trainer consumes, tokenized once per preset and dataset version (the flows cache it,
tasks/preprocess.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from chimein.data.preprocess import EXAMPLES_LEGEND, PreprocessSummary
from chimein.models.loading import load_tokenizer
from chimein.presets import ModelPreset
from chimein.train.trainer import check_labelled_tokens


@dataclass
class TokenizedData:
    """The train split of a dataset version as token rows for one preset (input_ids,
    assistant_masks, decision_masks, …: what the trainer consumes), with the counts and rendered
    examples of the tokenization. `save`/`load` keep it as a directory (tasks/preprocess.py caches
    it in the store, so a flow tokenizes once per preset and dataset version)."""

    preset: ModelPreset
    version: str  # the dataset version
    max_length: int
    rows: dict[str, list]
    summary: PreprocessSummary
    too_long: int  # conversations left out: their first exchange alone exceeds max_length
    examples: list[str]
    labelled_tokens: int

    def save(self, path: str | Path) -> Path:
        from datasets import Dataset

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(self.rows).save_to_disk(str(path / "rows"))
        (path / "examples.txt").write_text(EXAMPLES_LEGEND + "\n\n".join(self.examples) + "\n", encoding="utf-8")
        meta = {"preset": self.preset.model_dump(), "version": self.version, "max_length": self.max_length,
                "summary": asdict(self.summary), "too_long": self.too_long, "examples": self.examples,
                "labelled_tokens": self.labelled_tokens}
        (path / "tokenized.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))  # last: complete
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenizedData:
        from datasets import load_from_disk

        path = Path(path)
        meta = json.loads((path / "tokenized.json").read_text())
        return cls(ModelPreset.from_stored(meta["preset"]), meta["version"], meta["max_length"],
                   load_from_disk(str(path / "rows")).to_dict(), PreprocessSummary(**meta["summary"]),
                   meta["too_long"], meta["examples"], meta["labelled_tokens"])


def tokenize_train_split(preset: ModelPreset, ds, version: str, max_length: int | None = None) -> TokenizedData:
    """The train split of `ds` (a DatasetDict of dataset version `version`) as token rows with
    exact assistant masks; refused (TrainingGuardError) when nothing is labelled."""
    from chimein.data import preprocess
    from chimein.data.dataset import split_conversations

    tokenizer = load_tokenizer(preset)
    max_length = max_length or preset.max_length
    summary = PreprocessSummary(preset.name, version, "", max_length)
    rows, too_long, examples = preprocess.tokenize_conversations(
        split_conversations(ds["train"]), range(1, len(ds["train"]) + 1), f"{version}:train",
        preset, tokenizer, summary)
    return TokenizedData(preset, version, max_length, rows, summary, len(too_long), examples,
                         check_labelled_tokens(rows))
