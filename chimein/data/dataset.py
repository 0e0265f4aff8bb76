"""Conversations → a versioned `datasets.DatasetDict` (train/test), published to the Hub or locally.

    chimein dataset build --data data/conversations.jsonl --publish local
    chimein dataset build --data data/conversations.jsonl --publish hub:ORG/NAME   # needs HF_TOKEN

The split is by conversation group (`corpus.group_key`): a conversation and all its augmentations
land on the same side, so nothing of a training conversation leaks into the test split. The
version id is a hash of the content (same data, same split → same id); later steps record it in
MLflow for lineage. The local store keeps one directory per version, with the size and sha256 of
each of its files recorded when it was built (files.json): a version with a missing, truncated or
changed file is found before it is used (`check_version`) and rebuilt when it is published again.
On the Hub, each version is a tag of the dataset repo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chimein.conversation import Conversation, load_conversations
from chimein.data.corpus import group_key
from chimein.paths import hub_repo, store_dir

log = logging.getLogger(__name__)
MANIFEST = "files.json"  # a local version's files, their bytes and sha256, recorded at build
FORMAT_VERSION = 2  # 2: a validation split; bump when the row layout changes: the same data then gets a new id

@dataclass
class DatasetInfo:
    version: str
    train: int
    test: int
    validation: int
    user_turns: int
    speak: int
    source: str
    model: str
    prompt: str
    rejected: int
    location: str = ""
    # conversations per source (e.g. {"offline": 300, "feedback": 12}) and the feedback's labels,
    # when the data merged several (chimein.data.feedback.merge_feedback)
    sources: dict[str, int] = field(default_factory=dict)
    feedback: dict = field(default_factory=dict)

    @property
    def silence_ratio(self) -> float:
        return 1 - self.speak / max(self.user_turns, 1)


def split_by_group(convs: list[Conversation], test_fraction: float, seed: int,
                   validation_fraction: float = 0.0) -> tuple[list, list, list]:
    """Deterministic (train, validation, test): a group goes to test when its seeded hash falls
    below test_fraction, to validation when it falls in the next validation_fraction. At least
    one group is held out for each non-empty fraction while one is left to train on."""
    keys = [group_key(c) for c in convs]
    score = {k: int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:8], 16) / 16**8
             for k in set(keys)}
    ranked = sorted(score, key=score.get)
    test_groups = {k for k, s in score.items() if s < test_fraction}
    if not test_groups and len(ranked) > 1 and test_fraction > 0:
        test_groups = {ranked[0]}
    val_groups = {k for k, s in score.items()
                  if test_fraction <= s < test_fraction + validation_fraction} - test_groups
    rest = [k for k in ranked if k not in test_groups]
    if not val_groups and len(rest) > 1 and validation_fraction > 0:
        val_groups = {rest[0]}
    split = {k: "test" if k in test_groups else "validation" if k in val_groups else "train"
             for k in score}
    parts = {"train": [], "validation": [], "test": []}
    for c, k in zip(convs, keys):
        parts[split[k]].append((c, k))
    return parts["train"], parts["validation"], parts["test"]


def _rows(pairs) -> dict:
    return {
        "messages": [c.to_json() for c, _ in pairs],
        "group": [k for _, k in pairs],
        "n_user": [c.n_user for c, _ in pairs],
        "n_speak": [c.n_speak for c, _ in pairs],
    }


def content_version(train_rows: dict, test_rows: dict, validation_rows: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "train": train_rows, "test": test_rows,
                       "validation": validation_rows}, sort_keys=True, ensure_ascii=False)
    return "ds-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def sources_of(data: Path) -> dict:
    """What merge_feedback says of a merged file (FILE.sources.json), else {}."""
    sidecar = data.with_name(data.name + ".sources.json")
    return json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}


def lineage(data: Path) -> dict:
    """Source, model and prompt from the generation ledger beside the data (or, for a merged
    file, beside what it was merged from), if there is one."""
    if origin := sources_of(data).get("lineage"):
        return origin
    ledger = data.with_name(data.name + ".ledger")
    if ledger.is_file():
        with ledger.open(encoding="utf-8") as f:
            header = json.loads(f.readline() or "{}")
        if "source" in header:
            return {k: header.get(k, "-") for k in ("source", "model", "prompt")}
    return {"source": "file", "model": "-", "prompt": "-"}


def build_dataset(data: str | Path, test_fraction: float = 0.1, seed: int = 0,
                  validation_fraction: float = 0.1):
    """(DatasetDict, DatasetInfo) from a JSON Lines file; invalid conversations are skipped and
    counted (see `chimein validate` for the reasons). Splits: train; validation (training
    calibrates the adapter's chattiness threshold on it); test (the quick held-out check)."""
    from datasets import Dataset, DatasetDict

    data = Path(data)
    report = load_conversations(data)
    if not report.conversations:
        raise ValueError(f"{data}: no valid conversation ({len(report.rejected)} rejected); "
                         f"see `chimein validate {data}`")
    train, validation, test = split_by_group(report.conversations, test_fraction, seed, validation_fraction)
    train_rows, test_rows, validation_rows = _rows(train), _rows(test), _rows(validation)
    version = content_version(train_rows, test_rows, validation_rows)
    ds = DatasetDict({"train": Dataset.from_dict(train_rows), "validation": Dataset.from_dict(validation_rows),
                      "test": Dataset.from_dict(test_rows)})
    convs = report.conversations
    info = DatasetInfo(version=version, train=len(train), test=len(test), validation=len(validation),
                       user_turns=sum(c.n_user for c in convs), speak=sum(c.n_speak for c in convs),
                       rejected=len(report.rejected), **lineage(data))
    merged = sources_of(data)
    if merged:
        info.sources, info.feedback = merged["sources"], merged.get("feedback", {})
    return ds, info


def dataset_card(info: DatasetInfo, repo_id: str | None = None) -> str:
    title = repo_id or f"chimein dataset {info.version}"
    return f"""---
license: cc-by-4.0
task_categories: [text-generation]
language: [en]
tags: [chimein, group-chat, synthetic]
pretty_name: "{title}"
---
# {title}

Group chats in which an assistant stays silent most of the time and speaks when it is addressed
or can fill in a missing fact; made for [chimein](https://pypi.org/project/chimein/). One row is
one conversation: `messages` is a list of `{{"role", "name", "content"}}`; silence is the absence
of an assistant message after a user message.

| | |
|---|---|
| version | `{info.version}` |
| source | {info.source} |
| generation model | {info.model} |
| prompt | {info.prompt} |
| conversations | {info.train} train, {info.validation} validation, {info.test} test (split by conversation group: no augmentation of a training conversation is in another split) |
| user messages | {info.user_turns} |
| assistant speaks / stays silent | {info.speak} / {info.user_turns - info.speak} ({info.silence_ratio:.0%} silence) |
| rejected while building | {info.rejected} |
""" + (f"| sources | {' · '.join(f'{k} {n}' for k, n in info.sources.items())} |\n" if info.sources else "") + (
        f"| feedback labels (recorded rooms) | {', '.join(f'{k} {n}' for k, n in info.feedback.get('labels', {}).items()) or 'none'} |\n"
        if info.feedback else "")


class DamagedDataset(RuntimeError):
    """A local dataset version whose files are not those it was built with; the message names the
    version, the file and the fix. No retry mends it."""


def _manifest(root: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, "info.json"):
            with open(p, "rb") as f:
                files[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size,
                                                         "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return files


def check_version(path: Path) -> None:
    """Refuse (DamagedDataset) a local version whose files differ from those recorded at build:
    every split's files are there, whole and unchanged. A version built before the record existed
    is checked for the files its splits name."""
    fix = (f"delete {path} and publish it again: the retrain flow rebuilds it from its conversations "
           f"on its next run; by hand, `chimein dataset build --data FILE`")
    if not (path / "info.json").is_file():
        raise DamagedDataset(f"dataset {path.name}: info.json is missing, so the version was never "
                             f"completed; {fix}")
    if (path / MANIFEST).is_file():
        recorded = json.loads((path / MANIFEST).read_text())
    else:  # built before files.json: the files its splits' state.json name
        recorded = {f"{state.parent.name}/{d['filename']}": None for state in path.glob("*/state.json")
                    for d in json.loads(state.read_text()).get("_data_files", [])}
    for name, want in recorded.items():
        file = path / name
        if not file.is_file():
            raise DamagedDataset(f"dataset {path.name}: {file} is missing; {fix}")
        if want is None:
            continue
        if file.stat().st_size != want["bytes"]:
            raise DamagedDataset(f"dataset {path.name}: {file} has {file.stat().st_size} bytes, "
                                 f"{want['bytes']} when it was built (truncated?); {fix}")
        with open(file, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != want["sha256"]:
                raise DamagedDataset(f"dataset {path.name}: {file} changed since it was built; {fix}")


def publish_local(ds, info: DatasetInfo) -> DatasetInfo:
    """Save under store/datasets/VERSION (idempotent: a complete version is kept as is; a damaged
    one, or one a killed build left half-written, is written again)."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    target = store_dir() / "datasets" / info.version
    try:
        check_version(target)
    except DamagedDataset as e:
        if target.exists():
            log.warning(f"{e.args[0].partition('; ')[0]}: rebuilding it")
            shutil.rmtree(target)
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed build left
        ds.save_to_disk(str(tmp))
        (tmp / "README.md").write_text(dataset_card(info), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=2), encoding="utf-8")
        (tmp / "info.json").write_text(json.dumps(asdict(info), indent=2), encoding="utf-8")  # last: complete
        tmp.rename(target)
    info.location = f"local:{info.version}"
    return info


def publish_hub(ds, info: DatasetInfo, repo_id: str, private: bool = True) -> DatasetInfo:
    """push_to_hub (private by default) with a dataset card; the version becomes a tag."""
    from huggingface_hub import DatasetCard, HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PermissionError("HF_TOKEN is not set; export HF_TOKEN=... to publish to the Hub, "
                              "or use --publish local")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    ds.push_to_hub(repo_id, private=private, token=token,
                   commit_message=f"chimein dataset {info.version}")
    DatasetCard(dataset_card(info, repo_id)).push_to_hub(repo_id, repo_type="dataset", token=token)
    api.create_tag(repo_id, tag=info.version, repo_type="dataset", exist_ok=True)
    info.location = f"hub:{repo_id}@{info.version}"
    return info


def publish_dataset(ds, info: DatasetInfo, target: str = "local", private: bool = True) -> DatasetInfo:
    """Publish to a target: `local` or `hub:ORG/NAME` (see hub_repo)."""
    repo = hub_repo(target)
    return publish_local(ds, info) if repo is None else publish_hub(ds, info, repo, private=private)


def load_published(ref: str):
    """A published dataset back: `local:VERSION`, `hub:ORG/NAME[@VERSION]`, or a bare version."""
    from datasets import load_dataset, load_from_disk

    if ref.startswith("hub:"):
        repo, _, revision = ref[4:].partition("@")
        return load_dataset(repo, revision=revision or None, token=os.environ.get("HF_TOKEN"))
    version = ref.removeprefix("local:")
    path = store_dir() / "datasets" / version
    if not path.is_dir():
        known = sorted(p.name for p in (store_dir() / "datasets").glob("ds-*")) if \
            (store_dir() / "datasets").is_dir() else []
        raise FileNotFoundError(f"no dataset {version!r} in {path.parent}; known: "
                                f"{', '.join(known) or 'none'} (build one with `chimein dataset build`)")
    check_version(path)
    return load_from_disk(str(path))


def split_conversations(split) -> list[Conversation]:
    """The conversations of one split (Arrow gives assistant messages a null name; drop it)."""
    from chimein.conversation import parse_conversation

    return [parse_conversation([{k: v for k, v in m.items() if v is not None} for m in msgs])
            for msgs in split["messages"]]


def resolve_dataset(ref: str):
    """(DatasetDict, version) from a published ref (`local:ds-…`, `hub:ORG/NAME@ds-…`, `ds-…`) or a
    JSON Lines path, which is built and published locally first (same data → same version)."""
    path = Path(ref)
    if path.suffix == ".jsonl" or path.is_file():
        ds, info = build_dataset(path)
        publish_local(ds, info)
        return ds, info.version
    version = ref.rpartition("@")[2] if ref.startswith("hub:") else ref.removeprefix("local:")
    return load_published(ref), version
