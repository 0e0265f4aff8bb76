"""A damaged dataset version (a split's file deleted or cut short, as a kill or a full disk leaves
it) is found before use, named with its version, file and fix, and rebuilt when it is published
again; a killed build's leftovers do not stop the next one. Errors no retry can mend are not retried."""

from __future__ import annotations

import pytest

from chimein.data.dataset import DamagedDataset, build_dataset, check_version, load_published, publish_local
from chimein.paths import sample_data


@pytest.fixture
def published(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    ds, info = build_dataset(sample_data(), test_fraction=0.2, validation_fraction=0.2)
    publish_local(ds, info)
    return ds, info, tmp_path / "store" / "datasets" / info.version


def flipped(data: bytes) -> bytes:
    """The same length, one byte changed."""
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def arrow(path, split="train"):
    return next((path / split).glob("*.arrow"))


def test_every_file_is_recorded_at_build_and_a_whole_version_loads(published):
    ds, info, path = published
    check_version(path)
    assert (path / "files.json").is_file()
    assert load_published(info.location)["train"].num_rows == info.train


@pytest.mark.parametrize("damage, said", [
    (lambda f: f.unlink(), "is missing"),
    (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated?"),
    (lambda f: f.write_bytes(flipped(f.read_bytes())), "changed since it was built"),
])
def test_a_damaged_split_is_named_with_its_version_file_and_fix(published, damage, said):
    ds, info, path = published
    file = arrow(path)
    damage(file)
    with pytest.raises(DamagedDataset) as e:
        load_published(info.location)
    message = str(e.value)
    assert f"dataset {info.version}: {file}" in message and said in message
    assert f"delete {path} and publish it again" in message
    publish_local(ds, info)  # published again (as the flow does when its cache check fails): rebuilt
    check_version(path)
    assert load_published(info.location)["train"].num_rows == info.train


def test_a_half_written_version_and_a_killed_builds_leftovers_are_built_again(published):
    ds, info, path = published
    (path / "info.json").unlink()  # killed before the version was complete
    path.with_name(path.name + ".part").mkdir()  # and another build's leftovers
    with pytest.raises(DamagedDataset, match="info.json is missing"):
        check_version(path)
    publish_local(ds, info)
    check_version(path)


def test_the_flows_cache_check_passes_over_a_damaged_version(published):
    from tasks.data import dataset_exists

    _, info, path = published
    assert dataset_exists(info.location)
    arrow(path, "test").unlink()
    assert not dataset_exists(info.location)


def test_no_retry_for_what_a_retry_cannot_mend():
    from prefect.states import Failed

    from tasks.data import retry_io
    from tasks.model import retry_training

    damaged = DamagedDataset("dataset ds-1: … is missing")
    assert retry_io(None, None, Failed(data=damaged)) is False
    assert retry_training(None, None, Failed(data=damaged)) is False
    assert retry_training(None, None, Failed(data=FileNotFoundError("no dataset"))) is False
    assert retry_training(None, None, Failed(data=RuntimeError("killed worker"))) is True


@pytest.mark.parametrize("command", [["eval", "--baseline", "openai", "--no-track"],
                                     ["train", "--preset", "tiny-chatml", "--max-steps", "1"]])
def test_the_commands_refuse_a_damaged_version_in_one_line(published, command, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from chimein.cli import app

    _, info, path = published
    monkeypatch.chdir(tmp_path)
    arrow(path).unlink()
    option = "--data" if command[0] == "eval" else "--dataset"
    result = CliRunner().invoke(app, [*command, option, info.location])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert f"error: dataset {info.version}:" in message and "is missing" in message, result.output
    assert "Traceback" not in result.output
