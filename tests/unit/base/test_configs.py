"""Every YAML file in conf/ loads and validates against its pydantic model (unknown keys fail)."""

from __future__ import annotations

import pytest

from chimein.data.generation_config import load_generation_config
from chimein.paths import conf_dir
from chimein.presets import load_preset
from chimein.train.config import load_train_config

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


def test_deployment_parameters_validate_against_their_flows():
    """infra/prefect.yaml passes parameters to the flows' params models (unknown keys fail), so a
    renamed field breaks this test rather than the nightly run."""
    import importlib

    import yaml

    from chimein.paths import conf_dir

    infra = yaml.safe_load((conf_dir().parent / "infra" / "prefect.yaml").read_text())
    for deployment in infra["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        flow.validate_parameters(deployment["parameters"])  # raises ParameterTypeError naming the field


def test_cli_and_flows_name_presets_and_train_configs_alike():
    """`--preset` and `--train-config NAME` as the flows' `preset` and `train_config` (the old
    `--model` and `--config` still work)."""
    from typer.testing import CliRunner

    from chimein.cli import app
    from chimein.paths import train_config_path

    assert train_config_path("offline-cpu") == str(conf_dir() / "train" / "offline-cpu.yaml")
    for options in (["--preset", "tiny-chatml", "--train-config", "no-such-config"],
                    ["--model", "tiny-chatml", "--config", "no-such-config"]):
        r = CliRunner().invoke(app, ["train", *options, "--dataset", "chats.jsonl"])
        assert r.exit_code == 1 and "conf/train/no-such-config.yaml" in r.output, r.output
