"""Dataset step: leakage-free split, content-addressed versions, local store and Hub publishing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from chimein.cli import app
from chimein.data.corpus import load_corpus
from chimein.data.dataset import build_dataset, dataset_card, load_published, publish_hub, publish_local
from chimein.data.generation import generate
from chimein.data.generation_config import load_generation_config
from tests.fakes.fake_hub import FakeHub


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The offline corpus plus 80 augmented variants, as `chimein generate` writes them."""
    out = tmp_path_factory.mktemp("gen") / "conversations.jsonl"
    generate(load_generation_config(count=len(load_corpus()) + 80), out)
    return out


@pytest.fixture
def store(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def test_split_never_separates_a_conversation_from_its_augmentations(generated):
    ds, info = build_dataset(generated, test_fraction=0.2, validation_fraction=0.1)
    train, val, test = (set(ds[s]["group"]) for s in ("train", "validation", "test"))
    assert train and val and test and not train & test and not train & val and not val & test
    total = info.train + info.validation + info.test
    assert total == len(load_corpus()) + 80
    assert 0.1 < info.test / total < 0.3 and 0.03 < info.validation / total < 0.2
    assert (info.source, info.model) == ("offline", "chimein-curated-corpus")


def test_version_is_content_addressed(generated, tmp_path):
    a = build_dataset(generated)[1].version
    assert build_dataset(generated)[1].version == a  # same data, same id
    assert build_dataset(generated, seed=1)[1].version != a  # another split
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(generated.read_text().splitlines(keepends=True)[:-1]))
    assert build_dataset(fewer)[1].version != a


def test_card_states_source_counts_and_ratio(generated):
    _, info = build_dataset(generated)
    card = dataset_card(info, "org/chats")
    for fact in (info.version, "offline", f"{info.train} train, {info.validation} validation, {info.test} test",
                 f"{info.speak} / {info.user_turns - info.speak}", f"{info.silence_ratio:.0%} silence"):
        assert fact in card


def test_local_store_round_trip_and_idempotence(generated, store):
    ds, info = build_dataset(generated)
    publish_local(ds, info)
    assert info.location == f"local:{info.version}"
    stamp = (store / "datasets" / info.version / "info.json").stat().st_mtime_ns
    publish_local(*build_dataset(generated))  # same data: kept as is
    assert (store / "datasets" / info.version / "info.json").stat().st_mtime_ns == stamp
    back = load_published(info.location)
    assert back["train"]["messages"] == ds["train"]["messages"]
    assert back["test"]["group"] == ds["test"]["group"]


def test_unknown_version_lists_known_ones(generated, store):
    ds, info = build_dataset(generated)
    publish_local(ds, info)
    with pytest.raises(FileNotFoundError, match=info.version):
        load_published("local:ds-000000000000")


def test_invalid_lines_are_skipped_and_counted(tmp_path, generated):
    data = tmp_path / "mixed.jsonl"
    data.write_text(generated.read_text().splitlines()[0] + "\n{broken\n")
    _, info = build_dataset(data)
    assert (info.train + info.validation + info.test, info.rejected) == (1, 1)


def test_hub_publish_needs_a_token(generated, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        publish_hub(*build_dataset(generated), "org/chats")


HUB_SCRIPT = """
import json, sys
from chimein.data.dataset import build_dataset, publish_hub, load_published
ds, info = build_dataset(sys.argv[1])
publish_hub(ds, info, "org/chats")
back = load_published(info.location)
print(json.dumps({"location": info.location, "version": info.version,
                  "same": back["train"]["messages"] == ds["train"]["messages"]
                          and back["test"]["messages"] == ds["test"]["messages"]}))
"""


def test_hub_publish_private_with_card_and_version_tag(generated, tmp_path):
    token = "hf_test_token_not_real"
    with FakeHub() as hub:
        # the fake speaks git-lfs "basic" uploads, not the Xet protocol: switch Xet off
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1"}
        proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(generated)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        repo = hub.repos[("dataset", "org/chats")]
        _, files = repo.snapshot(result["version"])  # the version is a tag on the Hub
    assert result["same"] and result["location"] == f"hub:org/chats@{result['version']}"
    assert repo.private
    card = files["README.md"].decode()
    assert result["version"] in card and "silence" in card
    assert any(p.startswith("data/train-") and p.endswith(".parquet") for p in files)
    assert all(token not in d.decode(errors="ignore") for d in files.values())
    assert f"Bearer {token}" in hub.auth_headers


def test_dataset_build_cli(generated, store):
    r = CliRunner().invoke(app, ["dataset", "build", "--data", str(generated)])
    assert r.exit_code == 0, r.output
    version = next(p.name for p in (store / "datasets").iterdir())
    assert version in r.output and "silence" in r.output
    r = CliRunner().invoke(app, ["dataset", "build", "--data", str(generated), "--publish", "s3:x"])
    assert r.exit_code == 1 and "'local' or 'hub:ORG/NAME'" in r.output
