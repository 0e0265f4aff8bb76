"""The `chimein` command: preprocess, validate, presets, assets — run as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from typer.testing import CliRunner

from chimein.cli import app
from chimein.paths import sample_data
from tests.conftest import FIXTURES

MIXED = FIXTURES / "mixed.jsonl"
runner = CliRunner()


def test_preprocess_keeps_valid_reports_rejected(tmp_path):
    out = tmp_path / "pp"
    r = runner.invoke(app, ["preprocess", "--preset", "tiny-chatml", "--data", str(MIXED),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["conversations"], summary["rejected"], summary["truncated"]) == (5, 15, 0)
    assert summary["rejected_by_kind"]["missing_key"] == 2
    assert summary["speak"] + summary["silence"] == summary["user_turns"]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    lines = MIXED.read_text(encoding="utf-8").split("\n")
    assert [r["raw"] for r in rejected] == [lines[r["line"] - 1] for r in rejected]  # nothing lost
    ds = load_from_disk(str(out / "dataset"))
    assert len(ds) == 5
    assert set(ds.column_names) >= {"input_ids", "assistant_masks"}
    assert all(len(i) == len(m) and 0 < sum(m) < len(m)
               for i, m in zip(ds["input_ids"], ds["assistant_masks"]))
    assert sum(map(sum, ds["assistant_masks"])) == summary["labelled_tokens"]
    examples = (out / "examples.txt").read_text()
    assert examples.count("⟦") >= 3 and "<|im_start|>user" in examples
    assert "rejected" in r.output and "15" in r.output


def test_preprocess_truncates_and_counts(tmp_path):
    out = tmp_path / "pp"
    r = runner.invoke(app, ["preprocess", "--preset", "tiny-llama-2", "--data", str(sample_data()),
                            "--out", str(out), "--max-length", "160"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["truncated"] > 0
    assert s["conversations"] + s["rejected_by_kind"].get("too_long", 0) == 30
    ds = load_from_disk(str(out / "dataset"))
    assert max(map(len, ds["input_ids"])) <= 160 and sum(ds["truncated"]) == s["truncated"]


def test_preprocess_strict_names_file_and_line(tmp_path):
    r = runner.invoke(app, ["preprocess", "--preset", "tiny-chatml", "--data", str(MIXED),
                            "--out", str(tmp_path / "pp"), "--strict"])
    assert r.exit_code == 1
    assert f"{MIXED}:2: invalid JSON" in r.output.replace("\n", "")
    assert not (tmp_path / "pp").exists()


def test_preprocess_names_rejected_lines(tmp_path):
    out = tmp_path / "pp"
    r = runner.invoke(app, ["preprocess", "--preset", "tiny-chatml", "--data", str(MIXED),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [x["line"] for x in rejected] == sorted(x["line"] for x in rejected)
    assert {x["line"]: x["kind"] for x in rejected}[8] == "unknown_role"
    for x in rejected:  # the table names every line with its reason
        assert f"│ {x['line']:<4} │ {x['problem'][:20]}" in r.output


def write_lines(path: Path, *conversations: list) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    return path


SHORT = [{"role": "user", "name": "Ann", "content": "hi"}, {"role": "assistant", "content": "hello"}]
LONG = [{"role": "user", "name": "Ann", "content": "word " * 200}]


def test_preprocess_too_long_is_named_and_strict_stops_on_it(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", SHORT, LONG)
    args = ["preprocess", "--preset", "tiny-chatml", "--data", str(data), "--max-length", "64"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "lenient")])
    assert r.exit_code == 0, r.output
    assert "│ 2    │ the first exchange alone is" in r.output
    (x,) = [json.loads(line) for line in (tmp_path / "lenient" / "rejected.jsonl").read_text().splitlines()]
    assert (x["line"], x["kind"]) == (2, "too_long")

    r = runner.invoke(app, args + ["--out", str(tmp_path / "strict"), "--strict"])
    assert r.exit_code == 1
    message = " ".join(r.output.split())
    assert f"{data}:2: the first exchange alone is" in message
    assert "raise --max-length (now 64)" in message and "drop --strict" in message
    assert "validate" not in message  # it calls such lines valid
    assert not (tmp_path / "strict").exists()


def test_preprocess_all_too_long_names_the_fix_not_validate(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", LONG, LONG)
    r = runner.invoke(app, ["preprocess", "--preset", "tiny-chatml", "--data", str(data),
                            "--out", str(tmp_path / "pp"), "--max-length", "64"])
    assert r.exit_code == 1
    message = " ".join(r.output.split())
    assert "no usable conversation" in message and "raise --max-length (now 64)" in message
    assert "validate" not in message
    assert "│ 1 │ the first exchange alone is" in message and "│ 2 │ the first exchange" in message


def test_preprocess_unknown_preset_lists_presets(tmp_path):
    r = runner.invoke(app, ["preprocess", "--preset", "gpt-5", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "tiny-chatml" in r.output


def test_preprocess_with_nothing_usable_fails_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "a list"}\n')
    r = runner.invoke(app, ["preprocess", "--preset", "tiny-chatml", "--data", str(bad),
                            "--out", str(tmp_path / "pp")])
    assert r.exit_code == 1 and "no usable conversation" in r.output


def test_validate_lists_rejections_and_exits_3():
    r = runner.invoke(app, ["validate", str(MIXED)])
    assert r.exit_code == 3  # documented: some lines rejected, the valid ones usable
    assert "5 valid conversations" in r.output and "15 rejected" in r.output
    assert "unknown role 'system'" in r.output
    assert "3 some lines rejected" in " ".join(runner.invoke(app, ["validate", "--help"]).output.split())


def test_validate_strict_stops_with_3_and_nothing_usable_is_1(tmp_path):
    r = runner.invoke(app, ["validate", "--strict", str(MIXED)])
    assert r.exit_code == 3 and f"{MIXED}:2: invalid JSON" in r.output.replace("\n", "")
    bad = write_lines(tmp_path / "bad.jsonl", {"not": "a list"})
    assert runner.invoke(app, ["validate", str(bad)]).exit_code == 1
    assert runner.invoke(app, ["validate", str(tmp_path / "missing.jsonl")]).exit_code == 1


def test_validate_sample_is_clean():
    r = runner.invoke(app, ["validate", str(sample_data())])
    assert r.exit_code == 0 and "0 rejected" in r.output


def test_presets_lists_all():
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0
    for name in ("zephyr-7b-beta", "llama-2-7b-chat", "openchat-3.5-0106", "smollm2-135m-instr"):
        assert name in r.output


@pytest.mark.parametrize("args", [["assets", "no-such-asset"]])
def test_assets_rejects_unknown_names(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "unknown asset" in r.output and "tiny-chatml" in r.output


def test_assets_reports_cached():
    r = runner.invoke(app, ["assets", "tiny-chatml"])
    assert r.exit_code == 0 and "cached" in r.output


def test_eval_refuses_a_grounded_folder_laid_out_wrong_before_loading_a_model(tmp_path):
    (tmp_path / "club.jsonl").write_text('[{"role": "user", "name": "A", "content": "hi"}]\n')
    r = runner.invoke(app, ["eval", "--adapter", "local:nope", "--grounded", str(tmp_path), "--no-track"])
    assert r.exit_code == 1
    said = " ".join(r.output.split())
    assert said.startswith("error: --grounded") and "club.jsonl: no folder club/ beside it; put the organisation" in said


def test_generate_mixes_in_grounded_chats_on_request(tmp_path):
    out = tmp_path / "c.jsonl"
    r = runner.invoke(app, ["generate", "--count", "10", "--grounded", "0.2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sum(any("passages" in m for m in c) for c in lines) == 2
    r = runner.invoke(app, ["generate", "--count", "2", "--grounded", "0.9", "--out", str(tmp_path / "d.jsonl")])
    assert r.exit_code == 1 and "grounded" in r.output
