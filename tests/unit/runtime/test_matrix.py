"""The Matrix bridge's own rules, without a homeserver (tests/integration/test_matrix.py runs it on
a real Synapse)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chimein.cli import app
from chimein.data.importers import strip_reply_fallback
from chimein.runtime.matrix import BridgeState, room_threshold, txn_id


def test_a_room_level_moves_the_threshold_towards_silence_or_speech():
    assert room_threshold("normal", 0.4) is None  # the assistant's own
    assert room_threshold("quiet", 0.4) == pytest.approx(0.7) and room_threshold("chatty", 0.4) == pytest.approx(0.2)
    for t in (0.05, 0.5, 0.95):
        assert room_threshold("chatty", t) < t < room_threshold("quiet", t) <= 1


def test_a_rich_reply_is_read_without_its_quoted_fallback():
    body = "> <@ann:hs> when is the match?\n> on sunday?\n\nat 3pm I think"
    assert strip_reply_fallback(body) == "at 3pm I think"
    assert strip_reply_fallback("no quote here") == "no quote here"
    assert strip_reply_fallback("> not a reply, a quote") == "> not a reply, a quote"  # no "> <@…>": kept


def test_the_reply_to_an_event_has_one_transaction_id():
    assert txn_id("$a") == txn_id("$a") != txn_id("$b")


def test_the_state_file_is_private_and_a_broken_one_is_named(tmp_path):
    path = tmp_path / "bot.json"
    state = BridgeState(user_id="@bot:hs", access_token="secret", handled=["$1"])
    state.save(path)
    assert path.stat().st_mode & 0o077 == 0  # the access token is readable by its owner only
    assert BridgeState.load(path) == state
    path.write_text("{not json")
    with pytest.raises(ValueError, match="move it away to start afresh"):
        BridgeState.load(path)


def test_the_bridge_takes_its_secret_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("CHIMEIN_MATRIX_PASSWORD", raising=False)
    monkeypatch.delenv("CHIMEIN_MATRIX_TOKEN", raising=False)
    out = CliRunner().invoke(app, ["bridge", "matrix", "--homeserver", "http://127.0.0.1:9", "--user", "@bot:hs",
                                   "--base", "tiny-chatml"])
    assert out.exit_code != 0 and "CHIMEIN_MATRIX_PASSWORD" in out.output
    monkeypatch.setenv("CHIMEIN_MATRIX_PASSWORD", "x")
    out = CliRunner().invoke(app, ["bridge", "matrix", "--homeserver", "http://127.0.0.1:9", "--user", "bot",
                                   "--base", "tiny-chatml"])
    assert out.exit_code != 0 and "@NAME:SERVER" in out.output
