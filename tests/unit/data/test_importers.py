"""Chat exports → conversations (chimein.data.importers, `chimein import`): each format on small
exports written here, the rules they share, the errors that name the fix, and the CLI."""

from __future__ import annotations

import json
import zipfile
from collections import Counter

import pytest
from typer.testing import CliRunner

from chimein.cli import app
from chimein.conversation import MAX_MESSAGE_CHARS, load_conversations
from chimein.data.importers import REASONS, ChatImportError, import_chat
from chimein.evaluate.benchmark import load_eval_set

runner = CliRunner()


def turns(conversation) -> list[tuple]:
    return [(m.role, m.name, m.content) for m in conversation.messages]


def written_and_loaded(result, tmp_path):
    """Write the conversations as `chimein import` does and load them back strictly."""
    from chimein.data.importers import write_conversations

    out = tmp_path / "out.jsonl"
    write_conversations(result.conversations, out)
    loaded = load_conversations(out, strict=True)
    assert loaded.conversations == result.conversations
    return out


# --- matrix ----------------------------------------------------------------------------------

T0 = 1_700_000_000_000  # ms


def ev(i, sender, body=None, *, type="m.room.message", msgtype="m.text", relates=None, minutes=None, **extra):
    content = {} if body is None and msgtype is None else {"msgtype": msgtype, "body": body}
    if relates:
        content["m.relates_to"] = relates
    return {"type": type, "sender": sender, "event_id": f"$e{i}",
            "origin_server_ts": T0 + 60_000 * (i if minutes is None else minutes), "content": content} | extra


def member(user, name):
    return {"type": "m.room.member", "sender": user, "state_key": user, "origin_server_ts": T0,
            "content": {"membership": "join", "displayname": name}}


THREAD = {"rel_type": "m.thread", "event_id": "$e12"}
MATRIX_EVENTS = [
    member("@alice:x.org", "Alice"), member("@bob:x.org", "Bob Smith"), member("@chime:x.org", "Chime"),
    ev(1, "@alice:x.org", "who wrote Dune?"),
    ev(2, "@chime:x.org", "Frank Herbert."),
    ev(3, "@chime:x.org", "It came out in 1965.", msgtype="m.notice"),  # the assistant's notice: kept, merged
    ev(4, "@bob:x.org", "> <@alice:x.org> who wrote Dune?\n> (the book)\n\nthanks!",
       relates={"m.in_reply_to": {"event_id": "$e1"}}),
    ev(5, "@bob:x.org", "* thanks!!", relates={"rel_type": "m.replace", "event_id": "$e4"}),
    {"type": "m.room.redaction", "sender": "@bob:x.org", "redacts": "$e5", "origin_server_ts": T0 + 360_000,
     "content": {}},
    {"type": "m.reaction", "sender": "@alice:x.org", "origin_server_ts": T0 + 370_000,
     "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e2", "key": "👍"}}},
    ev(7, "@rss:x.org", "New post: …", msgtype="m.notice"),  # another bot
    ev(8, "@alice:x.org", "cat.png", msgtype="m.image"),
    ev(9, "@bob:x.org", "!help"),  # a command for another bot …
    ev(10, "@chime:x.org", "commands: …"),  # … and the assistant answering it: dropped with it
    ev(11, "@alice:x.org", "shrugs", msgtype="m.emote"),
    ev(12, "@alice:x.org", "thread: best sci-fi?"),  # a thread root: moves into its thread
    ev(13, "@bob:x.org", "Foundation", relates=THREAD),
    ev(14, "@chime:x.org", "Hyperion is a classic too.", relates=THREAD),
    ev(15, "@alice:x.org", "still here", minutes=15),
    {"type": "m.room.encrypted", "sender": "@bob:x.org", "origin_server_ts": T0 + 16 * 60_000,
     "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "…"}},
    ev(17, "@chime:x.org", "morning!", minutes=200),  # after a 3-hour gap: the assistant first
    ev(18, "@bob:x.org", "morning", minutes=201),
    ev(19, "@bob:x.org", None, msgtype=None, minutes=202, unsigned={"redacted_because": {}}),  # redacted
]


def write_matrix(tmp_path, events=MATRIX_EVENTS, form="element"):
    path = tmp_path / ("room.jsonl" if form == "jsonl" else "room.json")
    if form == "element":
        path.write_text(json.dumps({"room_name": "books", "messages": events}))
    elif form == "list":
        path.write_text(json.dumps(events))
    else:
        path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def test_matrix_threads_assistant_and_skips(tmp_path):
    r = import_chat("matrix", write_matrix(tmp_path), "@chime:x.org")
    assert r.assistant == "Chime (@chime:x.org)"
    assert [turns(c) for c in r.conversations] == [
        [("user", "Alice", "who wrote Dune?"),
         ("assistant", None, "Frank Herbert.\nIt came out in 1965."),
         ("user", "Bob Smith", "thanks!"),
         ("user", "Alice", "*shrugs*"),
         ("user", "Alice", "still here")],
        [("user", "Bob Smith", "morning")],
        [("user", "Alice", "thread: best sci-fi?"),  # the thread: root and replies
         ("user", "Bob Smith", "Foundation"),
         ("assistant", None, "Hyperion is a classic too.")],
    ]
    assert r.skipped == Counter({"edit": 1, "deleted": 2, "system": 4, "bot": 1, "media": 1, "command": 1,
                                 "reply_to_skipped": 1, "encrypted": 1, "assistant_first": 1})
    assert set(r.skipped) <= set(REASONS)
    assert (r.messages, r.assistant_turns) == (7, 2)
    assert r.speakers["Chime (@chime:x.org)"] == 5 and r.speakers["Bob Smith (@bob:x.org)"] == 5
    written_and_loaded(r, tmp_path)


@pytest.mark.parametrize("form", ["list", "jsonl"])
def test_matrix_event_lists_and_json_lines(tmp_path, form):
    element = import_chat("matrix", write_matrix(tmp_path), "Chime")
    other = import_chat("matrix", write_matrix(tmp_path, form=form), "chime")  # display name, any case
    assert other.conversations == element.conversations and other.skipped == element.skipped


# --- slack -----------------------------------------------------------------------------------

SLACK_USERS = [
    {"id": "U1", "name": "alice", "profile": {"display_name": "Alice", "real_name": "Alice A"}},
    {"id": "U2", "name": "bob", "real_name": "Bob B", "profile": {"display_name": "", "real_name": "Bob B"}},
    {"id": "U3", "name": "chimebot", "is_bot": True, "profile": {"display_name": "", "real_name": "Chime"}},
]


def slack_msg(ts, user, text, **extra):
    return {"type": "message", "user": user, "text": text, "ts": f"{ts}.000100"} | extra


T = 1_700_000_000  # s
SLACK_DAYS = {
    "general/2023-11-14.json": [
        slack_msg(T, "U2", "", subtype="channel_join"),
        slack_msg(T + 60, "U1", "hey <@U2>, seen <#C2|random>? <https://x.org|the list> &amp; more"),
        slack_msg(T + 120, "U2", "yes"),
        slack_msg(T + 130, "U3", "I can help with that.", bot_id="B3"),  # the assistant, a bot user
        slack_msg(T + 180, "U1", "who directed Alien?", thread_ts=f"{T + 180}.000100", reply_count=2),
        slack_msg(T + 200, "U3", "Ridley Scott.", bot_id="B3", thread_ts=f"{T + 180}.000100"),
        {"type": "message", "subtype": "bot_message", "bot_id": "B9", "username": "giphy", "text": "(gif)",
         "ts": f"{T + 240}.000100"},
        slack_msg(T + 250, "U2", "/giphy cats"),
        slack_msg(T + 260, "U1", "", subtype="file_share", files=[{"name": "a.png"}]),
        {"type": "message", "subtype": "message_changed", "ts": f"{T + 270}.000100",
         "message": {"text": "yes!"}},
        slack_msg(T + 280, "U1", "is going home", subtype="me_message"),
    ],
    "general/2023-11-15.json": [
        slack_msg(T + 86_400, "U2", "1979, right?", thread_ts=f"{T + 180}.000100"),  # the thread, next day
        slack_msg(T + 86_460, "U2", "good morning"),
    ],
    "random/2023-11-14.json": [slack_msg(T + 30, "U1", "random thought")],
}


def write_slack(tmp_path, zipped=False):
    files = {"users.json": SLACK_USERS, "channels.json": [{"id": "C1", "name": "general"},
                                                          {"id": "C2", "name": "random"}]} | SLACK_DAYS
    if zipped:
        path = tmp_path / "export.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, data in files.items():
                z.writestr(f"Acme Slack export/{name}", json.dumps(data))
        return path
    for name, data in files.items():
        (tmp_path / "export" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "export" / name).write_text(json.dumps(data))
    return tmp_path / "export"


GENERAL = [
    [("user", "Alice", "hey @Bob B, seen #random? the list & more"),
     ("user", "Bob B", "yes"),
     ("assistant", None, "I can help with that."),
     ("user", "Alice", "*is going home*")],
    [("user", "Bob B", "good morning")],  # a day later: a new conversation
    [("user", "Alice", "who directed Alien?"), ("assistant", None, "Ridley Scott."),
     ("user", "Bob B", "1979, right?")],
]


@pytest.mark.parametrize("zipped", [False, True])
def test_slack_channels_threads_mentions(tmp_path, zipped):
    r = import_chat("slack", write_slack(tmp_path, zipped), "chimebot")
    assert r.assistant == "Chime (U3)"
    assert [turns(c) for c in r.conversations] == GENERAL + [[("user", "Alice", "random thought")]]
    assert r.skipped == Counter({"system": 1, "bot": 1, "command": 1, "media": 1, "edit": 1})
    written_and_loaded(r, tmp_path)


def test_slack_one_channel(tmp_path):
    export = write_slack(tmp_path)
    assert [turns(c) for c in import_chat("slack", export, "U3", channel="#general").conversations] == GENERAL
    with pytest.raises(ChatImportError, match="no channel 'music'.*its channels: general, random"):
        import_chat("slack", export, "U3", channel="music")
    with pytest.raises(ChatImportError, match=r"'U3' never speaks in .*export \(channel random\)"):
        import_chat("slack", export, "U3", channel="random")
    with pytest.raises(ChatImportError, match="--channel picks a channel of a Slack export"):
        import_chat("discord", export, "U3", channel="general")


# --- discord ---------------------------------------------------------------------------------

def dmsg(i, author, content, type="Default", **extra):
    return {"id": str(i), "type": type, "timestamp": f"2024-03-01T10:{i:02d}:00.000+00:00",
            "content": content, "author": author, "attachments": [], "embeds": [], "reactions": []} | extra


ANN = {"id": "11", "name": "ann", "discriminator": "0000", "nickname": "Ann", "isBot": False}
BEN = {"id": "12", "name": "ben", "discriminator": "0000", "nickname": "ben", "isBot": False}
CHIME = {"id": "99", "name": "chime", "discriminator": "4321", "nickname": "Chime", "isBot": True}
MEE6 = {"id": "98", "name": "MEE6", "discriminator": "4876", "nickname": "MEE6", "isBot": True}


def write_discord(path, messages, channel="general"):
    path.write_text(json.dumps({"guild": {"id": "1", "name": "Club"}, "channel": {"id": "2", "name": channel},
                                "messages": messages, "messageCount": len(messages)}))
    return path


def test_discord_replies_keep_their_place_and_skips(tmp_path):
    path = write_discord(tmp_path / "club.json", [
        dmsg(1, BEN, "", type="GuildMemberJoin"),
        dmsg(2, ANN, "how far is the moon?"),
        dmsg(3, CHIME, "About 384,400 km."),
        dmsg(4, BEN, "ok", type="Reply", reference={"messageId": "2"}),
        dmsg(5, MEE6, "GG ben, you just advanced to level 2!"),
        dmsg(6, BEN, "", attachments=[{"id": "7", "fileName": "moon.jpg"}]),
        dmsg(7, ANN, "", type="ChannelPinnedMessage"),
        dmsg(8, ANN, "look", attachments=[{"id": "8", "fileName": "x.jpg"}]),  # text kept
        dmsg(9, CHIME, "Pong!", type="ChatInputCommand"),
        dmsg(10, CHIME, "Pong!", type="20"),  # the same, from an exporter without a name for it
    ])
    r = import_chat("discord", path, "chime#4321")
    assert [turns(c) for c in r.conversations] == [[
        ("user", "Ann", "how far is the moon?"), ("assistant", None, "About 384,400 km."),
        ("user", "ben", "ok"), ("user", "Ann", "look")]]
    assert r.skipped == Counter({"system": 2, "bot": 1, "media": 1, "command": 2})
    written_and_loaded(r, tmp_path)


def test_discord_folder_of_channel_and_thread_files(tmp_path):
    (tmp_path / "dce").mkdir()
    write_discord(tmp_path / "dce" / "general.json", [dmsg(1, ANN, "hi all")])
    write_discord(tmp_path / "dce" / "general - thread.json", [dmsg(2, BEN, "in a thread"),
                                                               dmsg(3, CHIME, "hello thread")])
    r = import_chat("discord", tmp_path / "dce", "99")
    assert [turns(c) for c in r.conversations] == [
        [("user", "ben", "in a thread"), ("assistant", None, "hello thread")], [("user", "Ann", "hi all")]]


# --- irc -------------------------------------------------------------------------------------

IRC_LOGS = {
    "bracketed": """[23:50:01] <alice> anyone know the boiling point of ethanol?
[23:51:12] -!- bob [~b@host] has joined #chem
[23:52:00] <@chimebot> 78.37 °C at sea level.
[23:52:30] <chimebot> (at 1 atm)
[23:58:00] * bob waves
[00:02:00] <+bob> thanks chimebot
[00:03:00] *** Joins: carol (~c@host)
[02:30:00] <carol> late night
""",
    "irssi": """--- Log opened Mon Jan 02 23:40:00 2023
23:50 <alice> anyone know the boiling point of ethanol?
23:51 -!- bob [~b@host] has joined #chem
23:52 <@chimebot> 78.37 °C at sea level.
23:52 < chimebot> (at 1 atm)
23:58  * bob waves
--- Day changed Tue Jan 03 2023
00:02 <+bob> thanks chimebot
00:03 -!- carol [~c@host] has joined #chem
02:30 <carol> late night
this line is noise
""",
    "weechat": ("2023-01-02 23:50:01\talice\tanyone know the boiling point of ethanol?\n"
                "2023-01-02 23:51:12\t-->\tbob (~b@host) has joined #chem\n"
                "2023-01-02 23:52:00\t@chimebot\t78.37 °C at sea level.\n"
                "2023-01-02 23:52:30\tchimebot\t(at 1 atm)\n"
                "2023-01-02 23:58:00\t *\tbob waves\n"
                "2023-01-03 00:02:00\t+bob\tthanks chimebot\n"
                "2023-01-03 00:03:00\t<--\tdave (~d@host) has quit (Ping timeout)\n"
                "2023-01-03 02:30:00\tcarol\tlate night\n"),
    "hexchat": ("**** BEGIN LOGGING AT Mon Jan  2 23:40:00 2023\n"
                "Jan 02 23:50:01 <alice>\tanyone know the boiling point of ethanol?\n"
                "Jan 02 23:51:12 -->\tbob (~b@host) has joined #chem\n"
                "Jan 02 23:52:00 <@chimebot>\t78.37 °C at sea level.\n"
                "Jan 02 23:52:30 <chimebot>\t(at 1 atm)\n"
                "Jan 02 23:58:00 *\tbob waves\n"
                "Jan 03 00:02:00 <+bob>\tthanks chimebot\n"
                "Jan 03 02:30:00 <carol>\tlate night\n"),
}
IRC_SKIPPED = {  # log-opened and day-changed lines, joins and quits; irssi's log has a line of noise
    "bracketed": {"system": 2}, "irssi": {"system": 4, "unparsed": 1}, "weechat": {"system": 2},
    "hexchat": {"system": 2},
}


@pytest.mark.parametrize("form", IRC_LOGS)
def test_irc_log_forms(tmp_path, form):
    path = tmp_path / "chem.log"
    path.write_text(IRC_LOGS[form])
    r = import_chat("irc", path, "chimebot")
    assert [turns(c) for c in r.conversations] == [
        [("user", "alice", "anyone know the boiling point of ethanol?"),
         ("assistant", None, "78.37 °C at sea level.\n(at 1 atm)"),
         ("user", "bob", "*waves*"), ("user", "bob", "thanks chimebot")],  # past midnight: one chat
        [("user", "carol", "late night")],  # after 2.5 hours: a new one
    ]
    assert r.skipped == Counter(IRC_SKIPPED[form])
    written_and_loaded(r, tmp_path)


def test_irc_hexchat_lines_cross_the_new_year(tmp_path):
    path = tmp_path / "hexchat.log"
    path.write_text("**** BEGIN LOGGING AT Sun Dec 31 23:00:00 2023\n"
                    "Dec 31 23:59:00 <ana>\tnearly\nJan 01 00:01:00 <bot>\thappy new year\n")
    (conversation,) = import_chat("irc", path, "bot").conversations  # two minutes apart, not a year back
    assert [m.content for m in conversation.messages] == ["nearly", "happy new year"]


# --- whatsapp --------------------------------------------------------------------------------

WHATSAPP = {
    "android": """12/31/23, 11:50 PM - Messages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them. Tap to learn more.
12/31/23, 11:50 PM - Ana created group "Trip: Rome"
12/31/23, 11:51 PM - Ana added Chime
12/31/23, 11:52 PM - Ana: what's the tallest building
in Rome?
12/31/23, 11:53 PM - Chime: St. Peter's Basilica, 136 m.
12/31/23, 11:55 PM - Ben: <Media omitted>
12/31/23, 11:56 PM - Ben: This message was deleted
1/1/24, 12:05 AM - Ben: happy new year! <This message was edited>
""",
    "ios": """[31/12/2023, 23:50:00] Trip: \u200eMessages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them.
[31/12/2023, 23:50:00] \u200eAna created group "Trip: Rome"
[31/12/2023, 23:51:00] \u200eAna added Chime
[31/12/2023, 23:52:00] Ana: what's the tallest building
in Rome?
[31/12/2023, 23:53:00] Chime: St. Peter's Basilica, 136 m.
\u200e[31/12/2023, 23:55:00] Ben: \u200eimage omitted
[31/12/2023, 23:56:00] Ben: \u200eThis message was deleted.
[01/01/2024, 00:05:00] Ben: happy new year!
""",
}


@pytest.mark.parametrize("form", WHATSAPP)
def test_whatsapp_export_forms(tmp_path, form):
    path = tmp_path / "WhatsApp Chat with Trip.txt"
    path.write_text(WHATSAPP[form])
    r = import_chat("whatsapp", path, "chime")
    assert [turns(c) for c in r.conversations] == [[  # day or month first read right: 13 minutes apart
        ("user", "Ana", "what's the tallest building\nin Rome?"),
        ("assistant", None, "St. Peter's Basilica, 136 m."),
        ("user", "Ben", "happy new year!")]]
    assert r.skipped == Counter({"system": 3, "media": 1, "deleted": 1})
    written_and_loaded(r, tmp_path)
    assert len(import_chat("whatsapp", path, "chime", gap_minutes=5).conversations) == 2
    with zipfile.ZipFile(tmp_path / "chat.zip", "w") as z:  # as iOS shares it, with the media
        z.writestr("_chat.txt", WHATSAPP[form])
        z.writestr("00000012-PHOTO.jpg", b"\xff\xd8")
    assert import_chat("whatsapp", tmp_path / "chat.zip", "chime").conversations == r.conversations
    with pytest.raises(ChatImportError, match="use `chimein import whatsapp`"):
        import_chat("irc", tmp_path / "chat.zip", "chime")


# --- rules every format shares ---------------------------------------------------------------

def irc(tmp_path, lines: list[str]):
    path = tmp_path / "chat.log"
    path.write_text("\n".join(f"[10:{i:02d}] <{nick}> {text}" for i, (nick, text) in enumerate(lines)))
    return path


def test_long_histories_split_at_max_messages(tmp_path):
    path = irc(tmp_path, [("ann", f"message {i}") for i in range(5)] + [("bot", "replying to 4")])
    r = import_chat("irc", path, "bot", max_messages=2)
    assert [[m.content for m in c.messages] for c in r.conversations] == [
        ["message 0", "message 1"], ["message 2", "message 3"], ["message 4", "replying to 4"]]


def test_commands_dropped_or_kept(tmp_path):
    path = irc(tmp_path, [("ann", "!weather Paris"), ("bot", "12 °C"), ("ben", "/giphy cats"),
                          ("ann", ".NET is fine"), ("ben", "/r/python says so"), ("ann", "!")])
    r = import_chat("irc", path, "bot")
    assert [m.content for m in r.conversations[0].messages] == [".NET is fine", "/r/python says so", "!"]
    assert r.skipped == Counter({"command": 2, "reply_to_skipped": 1})
    kept = import_chat("irc", path, "bot", keep_commands=True)
    first = kept.conversations[0].messages[:3]
    assert [m.content for m in first] == ["!weather Paris", "12 °C", "/giphy cats"]
    assert not kept.skipped


def test_long_messages_truncated_and_assistant_only_conversations_dropped(tmp_path):
    path = irc(tmp_path, [("bot", "hello?"), ("ann", "x" * (MAX_MESSAGE_CHARS + 50)), ("bot", "y" * 3000),
                          ("bot", "z" * 3000)])
    r = import_chat("irc", path, "bot")
    (conv,) = r.conversations
    assert [len(m.content) for m in conv.messages] == [MAX_MESSAGE_CHARS, MAX_MESSAGE_CHARS]
    assert conv.messages[0].content.endswith("…") and r.truncated == 2
    assert r.skipped == Counter({"assistant_first": 1})
    written_and_loaded(r, tmp_path)
    only_bot = import_chat("irc", irc(tmp_path, [("ann", "hi"), ("bot", "hi"), ("bot", "anyone?")]), "bot",
                           max_messages=1)
    assert len(only_bot.conversations) == 1
    path.write_text("[10:00] <ann> hi\n[12:00] <bot> still there?\n")
    r = import_chat("irc", path, "bot")
    assert r.skipped == Counter({"assistant_first": 1, "no_user_message": 1}) and len(r.conversations) == 1


def test_any_account_can_be_the_assistant_but_it_must_speak(tmp_path):
    r = import_chat("irc", irc(tmp_path, [("ann", "hi"), ("ben", "hi"), ("bot", "hey")]), "ben")
    assert r.assistant_turns == 1 and r.messages == 2  # ben is the assistant here
    silent = tmp_path / "silent.log"
    silent.write_text("[10:00] <ann> hi\n[10:01] <ben> hello\n")
    with pytest.raises(ChatImportError, match="never speaks"):
        import_chat("irc", silent, "bot")


def test_unknown_assistant_lists_top_speakers(tmp_path):
    path = irc(tmp_path, [("ann", "a"), ("ben", "b"), ("ann", "c")] + [(f"n{i}", "x") for i in range(12)])
    with pytest.raises(ChatImportError) as e:
        import_chat("irc", path, "chimebot")
    message = str(e.value)
    assert "'chimebot' never speaks" in message and "top speakers (messages): ann (2), ben (1)" in message
    assert message.count("(1)") == 9  # ten speakers listed, not fifteen


def test_ambiguous_assistant_asks_for_the_id(tmp_path):
    events = [member("@sam:a.org", "Sam"), member("@sam:b.org", "Sam"),
              ev(1, "@sam:a.org", "hi"), ev(2, "@sam:b.org", "hello")]
    with pytest.raises(ChatImportError, match="names several accounts.*pass the id"):
        import_chat("matrix", write_matrix(tmp_path, events), "Sam")
    assert import_chat("matrix", write_matrix(tmp_path, events), "@sam:b.org").assistant_turns == 1


def text_file(name, text: str | bytes):
    def make(folder):
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    return make


def discord_file(folder):
    return write_discord(folder / "c.json", [dmsg(1, ANN, "hi")])


@pytest.mark.parametrize("fmt, make, says", [
    ("slack", discord_file,
     "looks like DiscordChatExporter JSON, not a Slack export: use `chimein import discord`"),
    ("discord", write_slack,
     "looks like a Slack export, not DiscordChatExporter JSON: use `chimein import slack`"),
    ("matrix", discord_file, "use `chimein import discord`"),
    ("discord", write_matrix, "looks like a Matrix room export, not DiscordChatExporter JSON"),
    ("irc", text_file("w.txt", WHATSAPP["android"]), "use `chimein import whatsapp`"),
    ("whatsapp", text_file("i.log", IRC_LOGS["irssi"]), "use `chimein import irc`"),
    ("irc", text_file("n.txt", "just some notes\n"),
     "not an IRC log (no line is a message); expected a text log with lines like `[12:34] <nick> message`"),
    ("matrix", text_file("c.jsonl", '[{"role": "user", "name": "a", "content": "hi"}]\n'),
     "already in chimein's conversation format"),
    ("whatsapp", text_file("b.txt", b"\xff\xfe1/1/24, 10:00 - A: hi"), "not UTF-8 text"),
    ("discord", lambda p: write_slack(p, zipped=True), "use `chimein import slack`"),
    ("irc", lambda p: write_slack(p, zipped=True), "use `chimein import slack`"),
    ("matrix", lambda p: p / "missing.json", "no such file or folder"),
    ("telegram", write_matrix, "unknown format 'telegram'; one of: matrix, slack, discord, irc, whatsapp"),
])
def test_wrong_format_errors_name_the_fix(tmp_path, fmt, make, says):
    with pytest.raises(ChatImportError) as e:
        import_chat(fmt, make(tmp_path), "anyone")
    assert says in str(e.value)


# --- the command, and `chimein eval --data` ---------------------------------------------------

def test_cli_writes_a_file_validate_and_eval_accept(tmp_path, monkeypatch):
    export = write_slack(tmp_path, zipped=True)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["import", "slack", str(export), "--assistant", "chimebot"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "export.jsonl"  # FILE's stem, in the current folder
    assert "conversations written" in r.output and "skipped" in r.output
    assert "command" in r.output and REASONS["media"][:30] in r.output.replace("\n", " ")
    assert len(load_conversations(out, strict=True).conversations) == 4
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0
    eval_set = load_eval_set(str(out))  # what `chimein eval --data FILE` reads
    assert len(eval_set.conversations) == 4 and eval_set.rejected == 0 and eval_set.prefix == "file"

    again = runner.invoke(app, ["import", "slack", str(export), "--assistant", "chimebot"])
    assert again.exit_code == 1 and "exists; pass --force" in again.output
    forced = runner.invoke(app, ["import", "slack", str(export), "--assistant", "chimebot", "--force",
                                 "--channel", "general"])
    assert forced.exit_code == 0, forced.output
    assert len(load_conversations(out).conversations) == 3


def test_cli_errors_exit_1_with_the_problem(tmp_path):
    path = irc(tmp_path, [("ann", "hi")])
    r = runner.invoke(app, ["import", "irc", str(path), "--assistant", "bot",
                            "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "never speaks" in r.output and not (tmp_path / "o.jsonl").exists()
    r = runner.invoke(app, ["import", "discord", str(path), "--assistant", "bot",
                            "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "use `chimein import irc`" in r.output.replace("\n", "")
    r = runner.invoke(app, ["import", "irc", str(path), "--assistant", "ann", "--out", str(path), "--force"])
    assert r.exit_code == 1 and "is the export itself" in r.output
