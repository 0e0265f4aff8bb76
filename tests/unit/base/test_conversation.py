"""Conversation format: validation rules, lenient/strict JSON Lines loading, name normalisation."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter

import pytest

from chimein.conversation import (
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    Conversation,
    ConversationFileError,
    InvalidConversation,
    Message,
    Rejection,
    load_conversations,
    normalize_name,
    parse_conversation,
)
from tests.conftest import FIXTURES

MIXED = FIXTURES / "mixed.jsonl"

# Line numbers (1-based) of the valid conversations in mixed.jsonl; line 9 is blank.
VALID_LINES = [1, 5, 10, 16, 21]
BLANK_LINE = 9

# line -> (kind, a piece of the problem text that identifies the rule that fired)
EXPECTED_REJECTIONS = {
    2: ("invalid_json", "invalid JSON"),
    3: ("not_a_list", "expected a JSON array of messages, got dict"),
    4: ("empty_conversation", "conversation has no messages"),
    6: ("not_an_object", "message 1: expected an object, got str"),
    7: ("missing_key", "message 1: missing key 'role'"),
    8: ("unknown_role", "message 1: unknown role 'system'"),
    11: ("unknown_key", "message 2: unexpected key(s) 'name'"),
    12: ("missing_key", "message 2: missing key 'content'"),
    13: ("wrong_type", "'content' must be a string, got int"),
    14: ("empty_content", "message 1: empty content"),
    15: ("message_too_long", f"content is {MAX_MESSAGE_CHARS + 1} characters"),
    17: ("missing_name", "user message without a 'name'"),
    18: ("missing_name", "name '::' is empty once normalised"),
    19: ("starts_with_assistant", "conversation starts with an assistant message"),
    20: ("consecutive_assistant", "message 3: two assistant messages in a row"),
}


def _file_lines() -> list[str]:
    """The lines of mixed.jsonl exactly as stored (without the newline)."""
    return MIXED.read_text(encoding="utf-8").split("\n")


def _user(name: str, content: str) -> dict:
    return {"role": "user", "name": name, "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


# --------------------------------------------------------------------------- the data file itself


def test_mixed_fixture_is_what_the_tests_assume():
    lines = _file_lines()
    assert lines[-1] == ""  # trailing newline, nothing after it
    assert len(lines) - 1 == 21
    assert lines[BLANK_LINE - 1] == ""
    # The over-long line really is over the limit (it is generated, not typed).
    long_content = json.loads(lines[15 - 1])[0]["content"]
    assert len(long_content.strip()) == MAX_MESSAGE_CHARS + 1
    # Every line is accounted for: valid, blank or expected to be rejected.
    numbered = set(VALID_LINES) | {BLANK_LINE} | set(EXPECTED_REJECTIONS)
    assert numbered == set(range(1, 22))


# --------------------------------------------------------------------------- lenient loading


def test_lenient_load_keeps_valid_conversations_with_their_line_numbers():
    report = load_conversations(MIXED)
    assert len(report.conversations) == len(VALID_LINES) == 5
    assert report.lines == VALID_LINES
    assert all(isinstance(c, Conversation) for c in report.conversations)
    # Kept conversations are the parsed lines, in file order.
    lines = _file_lines()
    for conv, lineno in zip(report.conversations, report.lines):
        assert conv == parse_conversation(json.loads(lines[lineno - 1]))
    first = report.conversations[0]
    assert first.messages == (
        Message(role="user", content="who wrote the Da Vinci Code?", name="Alice"),
        Message(role="assistant", content="Dan Brown."),
    )


def test_lenient_load_rejects_every_bad_line_once():
    report = load_conversations(MIXED)
    assert len(report.rejected) == len(EXPECTED_REJECTIONS) == 15
    assert [r.line for r in report.rejected] == sorted(EXPECTED_REJECTIONS)
    assert report.rejected_by_kind == Counter(
        {
            "invalid_json": 1,
            "not_a_list": 1,
            "empty_conversation": 1,
            "not_an_object": 1,
            "missing_key": 2,  # missing 'role' and missing 'content'
            "unknown_role": 1,
            "unknown_key": 1,
            "wrong_type": 1,
            "empty_content": 1,
            "message_too_long": 1,
            "missing_name": 2,  # no name at all, and a name that normalises to nothing
            "starts_with_assistant": 1,
            "consecutive_assistant": 1,
        }
    )


def test_blank_line_is_skipped_not_rejected():
    report = load_conversations(MIXED)
    assert BLANK_LINE not in report.lines
    assert BLANK_LINE not in {r.line for r in report.rejected}
    # Every non-blank line is either kept or rejected, never both, never neither.
    kept, rejected = set(report.lines), {r.line for r in report.rejected}
    assert not kept & rejected
    assert kept | rejected == set(range(1, 22)) - {BLANK_LINE}


@pytest.mark.parametrize("lineno", sorted(EXPECTED_REJECTIONS))
def test_lenient_rejection_details(lineno):
    report = load_conversations(MIXED)
    by_line = {r.line: r for r in report.rejected}
    rejection = by_line[lineno]
    kind, problem_part = EXPECTED_REJECTIONS[lineno]
    assert isinstance(rejection, Rejection)
    assert rejection.kind == kind
    assert problem_part in rejection.problem
    assert rejection.source == str(MIXED)
    # Nothing lost: the raw text is exactly the line as stored.
    assert rejection.raw == _file_lines()[lineno - 1]
    assert str(rejection) == f"{MIXED}:{lineno}: {rejection.problem}"


def test_whitespace_only_line_is_skipped(tmp_path):
    path = tmp_path / "ws.jsonl"
    path.write_text(
        json.dumps([_user("Ann", "hi")]) + "\n   \t \n\n" + json.dumps([_user("Ben", "yo")]) + "\n",
        encoding="utf-8",
    )
    report = load_conversations(path)
    assert report.lines == [1, 4]
    assert report.rejected == []


def test_rejection_raw_keeps_surrounding_whitespace(tmp_path):
    path = tmp_path / "padded.jsonl"
    padded = '  \t[{"role": "user", "name": "Ann", "content": 5}]   '
    path.write_text(padded + "\n" + "  []\t\n", encoding="utf-8")
    report = load_conversations(path)
    assert [(r.line, r.kind, r.raw) for r in report.rejected] == [
        (1, "wrong_type", padded),
        (2, "empty_conversation", "  []\t"),
    ]


def test_last_line_without_newline_is_loaded(tmp_path):
    path = tmp_path / "nonl.jsonl"
    bad = '[{"role": "robot", "content": "beep"}]'
    path.write_text(json.dumps([_user("Ann", "hi")]) + "\n" + bad, encoding="utf-8")
    report = load_conversations(path)
    assert report.lines == [1]
    assert [(r.line, r.kind, r.raw) for r in report.rejected] == [(2, "unknown_role", bad)]


def test_max_message_chars_is_passed_through(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps([_user("Ann", "x" * 11)]) + "\n", encoding="utf-8")
    assert load_conversations(path).lines == [1]
    report = load_conversations(path, max_message_chars=10)
    assert report.lines == []
    assert report.rejected_by_kind == Counter({"message_too_long": 1})
    assert "over the limit of 10" in report.rejected[0].problem


# --------------------------------------------------------------------------- strict loading


def test_strict_load_stops_at_first_bad_line():
    with pytest.raises(ConversationFileError) as excinfo:
        load_conversations(MIXED, strict=True)
    message = str(excinfo.value)
    assert f"{MIXED}:2:" in message  # line 1 is valid, line 2 is the first bad one
    assert "invalid JSON" in message
    assert f"{MIXED}:3:" not in message


def test_strict_load_reports_problem_of_later_bad_line(tmp_path):
    path = tmp_path / "later.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps([_user("Ann", "hi"), _assistant("hello")]),
                "",
                json.dumps([_user("Ben", "yo")]),
                json.dumps([{"role": "system", "content": "be nice"}]),
                "[]",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(ConversationFileError) as excinfo:
        load_conversations(path, strict=True)
    message = str(excinfo.value)
    assert f"{path}:4:" in message
    assert "unknown role 'system'" in message
    assert "no messages" not in message  # stopped at the first bad line


def test_strict_load_of_clean_file_matches_lenient(tmp_path):
    path = tmp_path / "clean.jsonl"
    convs = [
        [_user("Ann", "hi"), _assistant("hello")],
        [_user("Ben", "anyone?")],
    ]
    path.write_text("\n".join(json.dumps(c) for c in convs) + "\n", encoding="utf-8")
    strict = load_conversations(path, strict=True)
    lenient = load_conversations(path)
    assert strict.lines == lenient.lines == [1, 2]
    assert strict.conversations == lenient.conversations
    assert strict.rejected == [] and lenient.rejected == []


# --------------------------------------------------------------------------- missing file


@pytest.mark.parametrize("strict", [False, True])
def test_missing_file_raises_file_not_found_naming_the_path(tmp_path, strict):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_conversations(path, strict=strict)
    assert str(path) in str(excinfo.value)


def test_directory_is_not_a_conversation_file(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_conversations(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


# --------------------------------------------------------------------------- parse_conversation


def test_parse_strips_content_whitespace():
    conv = parse_conversation(
        [_user("Alice", "  who wrote it?\n\t"), _assistant("\n Dan Brown.  ")]
    )
    assert [m.content for m in conv.messages] == ["who wrote it?", "Dan Brown."]
    # Inner whitespace is kept as is.
    conv = parse_conversation([_user("Alice", " a  b\nc ")])
    assert conv.messages[0].content == "a  b\nc"


def test_parse_normalises_names_and_leaves_assistant_unnamed():
    conv = parse_conversation(
        [_user("  Bob:\n", "hi"), _assistant("hello"), _user("Ａｌｉｃｅ", "hey")]
    )
    assert [m.name for m in conv.messages] == ["Bob", None, "Alice"]
    assert [m.role for m in conv.messages] == ["user", "assistant", "user"]


def test_n_user_and_n_speak():
    conv = parse_conversation(
        [
            _user("A", "1"),
            _user("B", "2"),
            _assistant("3"),
            _user("A", "4"),
            _assistant("5"),
            _user("C", "6"),
        ]
    )
    assert conv.n_user == 4
    assert conv.n_speak == 2
    silent = parse_conversation([_user("A", "just chatting")])
    assert (silent.n_user, silent.n_speak) == (1, 0)


def test_to_json_round_trips():
    raw = [
        _user("  Alice\t", "  who wrote the Da Vinci Code? "),
        _assistant("Dan Brown."),
        _user("Bob", "thanks"),
    ]
    conv = parse_conversation(raw)
    out = conv.to_json()
    assert out == [
        {"role": "user", "name": "Alice", "content": "who wrote the Da Vinci Code?"},
        {"role": "assistant", "content": "Dan Brown."},
        {"role": "user", "name": "Bob", "content": "thanks"},
    ]
    assert "name" not in out[1]
    # Through actual JSON text, as it would be written to a file.
    again = parse_conversation(json.loads(json.dumps(out)))
    assert again == conv
    assert again.to_json() == out


def test_passages_round_trip_and_are_left_out_when_there_are_none():
    raw = [{**_user("Ana", "dues?"), "passages": [" [club.md › Fees] Dues are 40 euros. "]}, _user("Ben", "ok")]
    conv = parse_conversation(raw)
    assert conv.messages[0].passages == ("[club.md › Fees] Dues are 40 euros.",)
    assert conv.to_json()[0]["passages"] == ["[club.md › Fees] Dues are 40 euros."]
    assert "passages" not in conv.to_json()[1]
    assert parse_conversation(json.loads(json.dumps(conv.to_json()))) == conv


def test_to_json_round_trips_every_valid_line_of_mixed():
    for conv in load_conversations(MIXED).conversations:
        assert parse_conversation(json.loads(json.dumps(conv.to_json()))) == conv


def test_message_length_limit_is_inclusive_and_measured_after_strip():
    ok = parse_conversation([_user("A", "  " + "x" * MAX_MESSAGE_CHARS + "  ")])
    assert len(ok.messages[0].content) == MAX_MESSAGE_CHARS
    with pytest.raises(InvalidConversation) as excinfo:
        parse_conversation([_user("A", "x" * (MAX_MESSAGE_CHARS + 1))])
    assert excinfo.value.kind == "message_too_long"


@pytest.mark.parametrize(
    "obj, kind, problem_part",
    [
        ("hello", "not_a_list", "got str"),
        (None, "not_a_list", "got NoneType"),
        ([], "empty_conversation", "no messages"),
        ([_user("A", "hi"), 3], "not_an_object", "message 2: expected an object, got int"),
        ([{"role": None, "content": "hi"}], "missing_key", "missing key 'role'"),
        ([{"role": "tool", "content": "hi"}], "unknown_role", "unknown role 'tool'"),
        ([{**_user("A", "hi"), "extra": 1}], "unknown_key", "'extra'"),
        ([_user("A", "hi"), {**_assistant("x"), "name": "Bot"}], "unknown_key", "'name'"),
        ([{"role": "user", "name": "A"}], "missing_key", "missing key 'content'"),
        ([{"role": "user", "name": "A", "content": ["hi"]}], "wrong_type", "got list"),
        ([{"role": "user", "name": 7, "content": "hi"}], "wrong_type", "'name' must be a string"),
        ([_user("A", "\n \t")], "empty_content", "empty content"),
        ([{"role": "user", "name": None, "content": "hi"}], "missing_name", "without a 'name'"),
        ([_user(" <|> ", "hi")], "missing_name", "empty once normalised"),
        ([_assistant("hi")], "starts_with_assistant", "starts with an assistant"),
        ([{**_user("A", "hi"), "passages": "doc"}], "wrong_type", "'passages' must be a list of strings"),
        ([{**_user("A", "hi"), "passages": ["a", 2]}], "wrong_type", "'passages' must be a list of strings"),
        ([{**_user("A", "hi"), "passages": ["a", " "]}], "empty_content", "passage 2 is empty"),
        ([{**_user("A", "hi"), "passages": ["p"] * 5}], "too_many_passages", "5 passages, over the limit of 4"),
        ([{**_user("A", "hi"), "passages": ["p" * 1501]}], "message_too_long", "passage 1 is 1501 characters"),
        ([_user("A", "hi"), {**_assistant("x"), "passages": ["p"]}], "unknown_key", "'passages'"),
        (
            [_user("A", "hi"), _assistant("a"), _assistant("b")],
            "consecutive_assistant",
            "message 3: two assistant messages in a row",
        ),
    ],
)
def test_parse_rejections(obj, kind, problem_part):
    with pytest.raises(InvalidConversation) as excinfo:
        parse_conversation(obj)
    assert excinfo.value.kind == kind
    assert problem_part in excinfo.value.problem
    assert str(excinfo.value) == excinfo.value.problem
    assert isinstance(excinfo.value, ValueError)


def test_parse_reports_the_first_problem():
    # Message 1 is fine, message 2 has an unknown role, message 3 is empty: report message 2.
    with pytest.raises(InvalidConversation) as excinfo:
        parse_conversation([_user("A", "hi"), {"role": "bot", "content": "x"}, _user("B", " ")])
    assert excinfo.value.kind == "unknown_role"
    assert excinfo.value.problem.startswith("message 2:")


# --------------------------------------------------------------------------- normalize_name


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  Bob  ", "Bob"),
        ("Bob", "Bob"),
        ("Mary\nJane", "Mary Jane"),
        ("Mary\tJane", "Mary Jane"),
        ("Mary \r\n\t Jane", "Mary Jane"),
        ("Dr: Who", "Dr Who"),
        ("Alice:", "Alice"),
        ("::", ""),
        ("\x00Bob\x07\x7f", "Bob"),
        ("\x1bBob\u200b", "Bob"),
        ("Ａｌｉｃｅ", "Alice"),  # fullwidth letters fold to ASCII
        ("Bob：", "Bob"),  # fullwidth colon folds to ':' and is then dropped
        ("<|im_end|>", "im_end"),
        ("[INST]", "INST"),
        ("{user}", "user"),
        ("＜｜im_end｜＞", "im_end"),  # fullwidth brackets fold first, then are dropped
        ("ﬁona", "fiona"),  # ligature folds
        ("Zoë", "Zoë"),
    ],
)
def test_normalize_name(raw, expected):
    assert normalize_name(raw) == expected


def test_normalize_name_leaves_no_control_or_separator_characters():
    out = normalize_name("A\x00\x01\x1f\x7f\x85\u2028\u2029B\u00a0C")
    assert not any(unicodedata.category(c)[0] == "C" for c in out)
    assert not any(c in "\n\r\t\u2028\u2029\u00a0" for c in out)
    assert out == "A B C"


def test_normalize_name_is_bounded():
    assert normalize_name("A" * 100) == "A" * MAX_NAME_CHARS
    assert MAX_NAME_CHARS == 32
    # Truncation does not leave a trailing space behind.
    out = normalize_name("a" * 31 + " bcdef")
    assert out == "a" * 31
    # Bounded after collapsing whitespace, so spaces don't eat the budget.
    out = normalize_name("  ".join(["ab"] * 20))
    assert len(out) == MAX_NAME_CHARS
    assert out.startswith("ab ab ab")


def test_normalize_name_is_idempotent():
    for raw in ["  Bob  ", "Ａｌｉｃｅ", "<|im_end|>", "x\ny:z", "A" * 100, "a" * 31 + " b"]:
        once = normalize_name(raw)
        assert normalize_name(once) == once


# --------------------------------------------------------------------------- suspected module bugs


def test_lenient_load_survives_deeply_nested_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(
        json.dumps([_user("Ann", "hi")]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n",
        encoding="utf-8",
    )
    report = load_conversations(path)
    assert report.lines == [1]
    assert [r.line for r in report.rejected] == [2]


def test_lenient_load_survives_invalid_utf8_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    good = json.dumps([_user("Ann", "hi")]).encode()
    path.write_bytes(good + b"\n" + b'[{"role": "user", "name": "B", "content": "\xff\xfe"}]\n' + good + b"\n")
    report = load_conversations(path)
    assert report.lines == [1, 3]
    assert [r.line for r in report.rejected] == [2]


def test_bom_and_crlf_files_load(tmp_path):
    path = tmp_path / "windows.jsonl"
    good = json.dumps([_user("Ann", "hi")])
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\r\n" + b"[]\r\n" + good.encode() + b"\r\n")
    report = load_conversations(path)
    assert report.lines == [1, 3]
    assert [(r.line, r.kind, r.raw) for r in report.rejected] == [(2, "empty_conversation", "[]")]


def test_invalid_utf8_is_reported_as_such(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'[{"role": "user", "name": "B", "content": "\xff"}]\n')
    (rejection,) = load_conversations(path).rejected
    assert rejection.kind == "invalid_utf8" and "not UTF-8" in rejection.problem
    with pytest.raises(ConversationFileError, match=r"bytes\.jsonl:1: not UTF-8"):
        load_conversations(path, strict=True)


def test_lone_surrogate_is_rejected_naming_the_problem():
    with pytest.raises(InvalidConversation) as excinfo:
        parse_conversation([_user("Ann", "hi"), _assistant("ok \ud800 then")])
    assert excinfo.value.kind == "invalid_text"
    assert "message 2" in excinfo.value.problem and "lone surrogate (U+D800)" in excinfo.value.problem
    assert "fix the encoding" in excinfo.value.problem
    # a surrogate *pair* is ordinary text once JSON decodes it
    assert parse_conversation(json.loads('[{"role": "user", "name": "A", "content": "\\ud83d\\ude00"}]'))


def test_lenient_load_reports_a_lone_surrogate_and_keeps_the_rest(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    good = json.dumps([_user("Ann", "hi")])
    path.write_text(good + "\n" + '[{"role": "user", "name": "B", "content": "a \\udc80 b"}]\n' + good + "\n",
                    encoding="utf-8")
    report = load_conversations(path)
    assert report.lines == [1, 3]
    assert [(r.line, r.kind) for r in report.rejected] == [(2, "invalid_text")]
    assert "U+DC80" in report.rejected[0].problem
    with pytest.raises(ConversationFileError, match=r"surrogate\.jsonl:2: .*lone surrogate"):
        load_conversations(path, strict=True)
