"""The knowledge index: a folder of Markdown and text files cut into passages under their
headings, indexed with bm25s and MiniLM + faiss (real engines, real embeddings), fused; the
answering passage is found for questions worded unlike it, in English and Chinese; bad files are
skipped with a reason and the rest kept; an up-to-date index is loaded, a changed file rebuilds it."""

from __future__ import annotations

import re

import pytest

from chimein.knowledge.index import INDEX_DIR, KnowledgeError, KnowledgeIndex, chunk, tokens

HANDBOOK = """# Riverside Rowing Club handbook

## Membership

Annual dues are 40 euros, payable each January to the treasurer, Inès Moreau.
Juniors under 18 pay half.

## The boathouse

The boathouse opens at 6:30 on weekdays and 8:00 on Sundays. The last boat must be back on its
rack by 20:00.

The key code changes every month; ask the captain in the group.

## Safety

Nobody rows alone when the river is above the yellow mark on the bridge pier.
Life jackets are in the blue locker by the door.
"""

EVENT = """Summer regatta logistics

Buses leave the station car park at 7:15 on Saturday 11 July. Lunch is a picnic: bring your own.
Parking at the regatta site costs 5 euros per car.
"""

OFFICE_ZH = """# 办公室常见问题

## 打印机

三楼的打印机需要刷工卡，彩色打印要先找行政部的王芳开权限。

## 会议室

大会议室最多坐十二个人，要提前一天在日历上预订。
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "handbook.md").write_text(HANDBOOK, encoding="utf-8")
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "regatta.txt").write_text(EVENT, encoding="utf-8")
    (tmp_path / "office.md").write_text(OFFICE_ZH, encoding="utf-8")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "old.txt").write_bytes("caf\xe9 menu".encode("latin-1"))
    (tmp_path / "empty.md").write_text("\n\n", encoding="utf-8")
    return tmp_path


def test_passages_keep_their_headings_and_cut_between_paragraphs():
    passages = chunk("handbook.md", HANDBOOK, max_words=25)
    assert [p.heading for p in passages] == [
        "Riverside Rowing Club handbook › Membership", "Riverside Rowing Club handbook › The boathouse",
        "Riverside Rowing Club handbook › The boathouse", "Riverside Rowing Club handbook › Safety"]
    assert passages[1].text.startswith("The boathouse opens at 6:30") and "key code" in passages[2].text
    assert passages[0].render().startswith("[handbook.md › Riverside Rowing Club handbook › Membership] Annual dues")
    assert tokens("打印机权限") == ["打印", "印机", "机权", "权限"] and tokens("What is the key code?") == ["key", "code"]


@pytest.mark.parametrize(("question", "source", "fact"), [
    ("how much is the membership fee?", "handbook.md", "40 euros"),            # dense: fee ≈ dues
    ("when can we take the boats out on sunday morning", "handbook.md", "8:00 on Sundays"),
    ("where are the lifejackets kept", "handbook.md", "blue locker"),
    ("what time is the bus to the regatta?", "events/regatta.txt", "7:15"),
    ("is parking free at the regatta", "events/regatta.txt", "5 euros per car"),
    ("彩色打印找谁开权限？", "office.md", "王芳"),
    ("大会议室能坐几个人", "office.md", "十二个人"),
])
def test_the_answering_passage_is_found_first(folder, question, source, fact):
    index, _ = KnowledgeIndex.open(folder)
    best = index.search(question, k=3)[0]
    assert best.passage.source == source and fact in best.passage.text, [h.passage.text[:40] for h in index.search(question)]


def test_bad_files_are_skipped_with_a_reason_and_the_rest_indexed(folder):
    _, report = KnowledgeIndex.open(folder)
    assert report.files == 3 and report.passages == 6 and report.rebuilt
    assert dict(report.skipped) == {"empty.md": "empty", "logo.png": "not Markdown or text (.md, .markdown, .txt)",
                                    "old.txt": "not UTF-8 (byte 3); save it as UTF-8"}


def test_an_up_to_date_index_is_loaded_and_a_changed_file_rebuilds_it(folder):
    first, _ = KnowledgeIndex.open(folder)
    again, report = KnowledgeIndex.open(folder)
    assert not report.rebuilt and again.passages == first.passages
    assert [h.passage for h in again.search("regatta bus")] == [h.passage for h in first.search("regatta bus")]
    (folder / "events" / "regatta.txt").write_text(EVENT.replace("7:15", "6:45"), encoding="utf-8")
    changed, report = KnowledgeIndex.open(folder)
    assert report.rebuilt and "6:45" in changed.search("what time is the bus to the regatta?")[0].passage.text
    assert (folder / INDEX_DIR / "manifest.json").exists()


def test_a_folder_without_passages_or_no_folder_is_a_clear_error(tmp_path):
    with pytest.raises(KnowledgeError, match="no such folder"):
        KnowledgeIndex.open(tmp_path / "missing")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(KnowledgeError, match="add Markdown"):
        KnowledgeIndex.open(tmp_path)


def test_the_build_command_reports_what_it_indexed_and_skipped(folder):
    from typer.testing import CliRunner

    from chimein.cli import app

    r = CliRunner().invoke(app, ["knowledge", "build", str(folder)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "3 files, 6 passages" in r.output and "regatta.txt" in r.output and "skipped (3)" in r.output
    assert "not UTF-8 (byte 3); save it as UTF-8" in r.output and f"built: {folder / INDEX_DIR}" in r.output
    r = CliRunner().invoke(app, ["knowledge", "build", str(folder)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "up to date" in r.output
    r = CliRunner().invoke(app, ["knowledge", "search", str(folder), "bus to the regatta?"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "[events/regatta.txt] Summer regatta logistics Buses leave" in r.output
    assert re.search(r"│ \d+ \(0\.\d\d\) +│", r.output), r.output  # the dense rank and its cosine similarity
    r = CliRunner().invoke(app, ["knowledge", "build", str(folder / "nope")], env={"COLUMNS": "300"})
    assert r.exit_code != 0 and "no such folder" in r.output


def test_chat_with_a_folder_that_cannot_be_indexed_is_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from chimein.cli import app

    (tmp_path / "scan.pdf").write_bytes(b"%PDF")
    r = CliRunner().invoke(app, ["chat", "--base", "tiny-chatml", "--knowledge", str(tmp_path)], input="/quit\n",
                           env={"COLUMNS": "300"})
    assert r.exit_code != 0 and "no passage to index: add Markdown (.md) or text (.txt) files" in r.output
