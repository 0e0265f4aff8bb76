"""Every YAML file in conf/ loads and validates against its pydantic model (unknown keys fail)."""

from __future__ import annotations

import pytest

from chimein.generation import load_generation_config
from chimein.paths import conf_dir
from chimein.presets import load_preset
from chimein.training import load_train_config

LOADERS = {
    "models": load_preset,
    "generation": load_generation_config,
    "train": lambda path: load_train_config(path, dataset="placeholder.jsonl"),
}
ALL = sorted(conf_dir().rglob("*.yaml"))


def test_conf_has_yaml_files_of_every_kind():
    assert {p.parent.name for p in ALL} == set(LOADERS)


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_validates(path):
    assert LOADERS[path.parent.name](str(path)) is not None


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_unknown_keys_fail(kind, tmp_path):
    src = next(p for p in ALL if p.parent.name == kind)
    bad = tmp_path / kind / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text(src.read_text() + "\nno_such_setting: 1\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        LOADERS[kind](str(bad))
