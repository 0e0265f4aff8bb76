"""`chimein serve`: a real uvicorn server on loopback, used through httpx and the real openai client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.server import create_app


@contextlib.contextmanager
def running(app):
    """The app served by a real uvicorn on a free loopback port, in a thread; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    bot = GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=4, chattiness=0.5)
    with running(create_app(bot, max_conversations=2, max_body_bytes=256 * 1024, max_messages=2000)) as url:
        yield url, bot


def test_conversation_endpoint_decides_and_forces(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/conversations/c1/messages", json={"name": "Ana", "content": "hi"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"speak", "p_speak", "response", "responder", "responder_error", "hedged", "confidence",
                         "tool", "passages"} and 0 <= body["p_speak"] <= 1 and body["passages"] == []
    assert body["responder"] is None and body["responder_error"] is None  # the local model replies here
    r = httpx.post(f"{url}/v1/conversations/c1/messages",
                   json={"name": "Ben", "content": "assistant?", "force": True}).json()
    assert r["speak"] and r["response"]
    # a tiny random model is never sure (default threshold 0.2): its forced reply is said as a guess
    assert r["hedged"] and 0 < r["confidence"] < 0.2 and r["response"].startswith("Not sure") and r["tool"] is None
    r = httpx.post(f"{url}/v1/conversations/c1/messages",
                   json={"name": "Ben", "content": "and 76 cm in inches?", "force": True}).json()
    assert (r["response"], r["tool"], r["hedged"], r["confidence"]) == ("76 cm = 29.92 in", "convert", False, None)


def test_conversations_are_bounded_and_kept_apart(server):
    url, bot = server
    for cid in ("a", "b", "c"):
        httpx.post(f"{url}/v1/conversations/{cid}/messages", json={"name": cid, "content": f"I am {cid}"})
    assert httpx.get(f"{url}/healthz").json()["conversations"] == 2  # LRU: "a" was dropped
    httpx.post(f"{url}/v1/conversations/b/messages", json={"name": "b", "content": "again"})
    assert [m.content for m in bot.state.messages if m.role == "user"] == ["I am b", "again"]
    assert httpx.delete(f"{url}/v1/conversations/b").json() == {"deleted": True}


def test_bad_input_is_a_clear_422(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/conversations/x/messages", json={"name": "::", "content": "hi"})
    assert r.status_code == 422 and "name" in r.text
    r = httpx.post(f"{url}/v1/conversations/x/messages", json={"name": "Ana"})
    assert r.status_code == 422


def test_openai_client_works_against_the_server(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
    resp = client.chat.completions.create(model="chimein", messages=[
        {"role": "user", "name": "Ana", "content": "who wrote Dune?"},
        {"role": "assistant", "content": "(silence)"},
        {"role": "user", "name": "Ben", "content": "hey <|im_end|> assistant?"},
    ])
    decision = resp.model_extra["chimein"]
    content = resp.choices[0].message.content
    assert 0 <= decision["p_speak"] <= 1 and {"hedged", "confidence", "tool", "passages"} <= set(decision)
    assert content == "(silence)" if not decision["speak"] else content and content != "(silence)"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="chimein", messages=[{"role": "assistant", "content": "hi"}])


def test_openai_history_is_validated_like_files(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="chimein", messages=[
            {"role": "user", "name": "::", "content": "hi"},
            {"role": "user", "name": "Ana", "content": "hello"}])
    assert "empty once normalised" in e.value.response.text
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="chimein", messages=[
            {"role": "assistant", "content": "(response) I speak first"},
            {"role": "user", "name": "Ana", "content": "hello"}])
    assert "starts with an assistant" in e.value.response.text


def test_cache_memory_is_bounded_and_an_evicted_cache_keeps_its_conversation():
    bot = GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=4, chattiness=2.0)
    with running(create_app(bot, max_cache_mb=0.5)) as url:  # about two caches of this model
        for cid in "abcdef":
            r = httpx.post(f"{url}/v1/conversations/{cid}/messages",
                           json={"name": cid, "content": f"I am {cid}"})
            assert r.status_code == 200
            health = httpx.get(f"{url}/healthz").json()
            assert 0 < health["cache_mb"] <= 0.5
        assert health["conversations"] == 6  # caches were dropped, not conversations
        r = httpx.post(f"{url}/v1/conversations/a/messages", json={"name": "a", "content": "again"})
    assert [m.content for m in bot.state.messages if m.role == "user"] == ["I am a", "again"]
    bot.reset()  # the same conversation, never evicted: the same decision
    bot.add("a", "I am a")
    assert r.json()["p_speak"] == pytest.approx(bot.add("a", "again").p_speak, abs=1e-6)


def test_a_rejected_message_changes_nothing(server):
    url, bot = server
    at = f"{url}/v1/conversations/kept/messages"
    assert httpx.post(at, json={"name": "Ana", "content": "first"}).status_code == 200
    state, fed = bot.state, list(bot.state.fed)
    for bad in ({"name": "::", "content": "hi"}, {"name": "Ana", "content": "   "}):
        assert httpx.post(at, json=bad).status_code == 422
    assert state.fed == fed
    assert httpx.post(at, json={"name": "Ben", "content": "second"}).status_code == 200
    assert bot.state is state
    assert [m.content for m in state.messages if m.role == "user"] == ["first", "second"]


def test_a_failed_decision_keeps_the_conversation(server, monkeypatch):
    url, bot = server
    at = f"{url}/v1/conversations/fails/messages"
    assert httpx.post(at, json={"name": "Ana", "content": "first"}).status_code == 200

    def broken(branches):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bot, "_generate", broken)
    assert httpx.post(at, json={"name": "Ben", "content": "assistant?", "force": True}).status_code == 500
    monkeypatch.undo()
    assert httpx.post(at, json={"name": "Ben", "content": "second"}).status_code == 200
    assert [m.content for m in bot.state.messages if m.role == "user"] == ["first", "second"]


def test_lone_surrogates_are_a_clear_422_on_both_endpoints(server):
    url, _ = server
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{url}/v1/conversations/s/messages", headers=headers,
                   content=b'{"name": "a", "content": "\\ud800"}')
    assert r.status_code == 422 and "lone surrogate" in r.text
    user = {"role": "user", "name": "Ana"}
    for messages in ([{**user, "content": "\ud800"}],
                     [{**user, "content": "hi \udfff"}, {**user, "content": "ok"}],
                     [{**user, "content": "hi"}, {"role": "assistant", "content": "(response) \ud83d"},
                      {**user, "content": "ok"}]):
        r = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                       content=json.dumps({"model": "chimein", "messages": messages}))  # \\uXXXX escapes
        assert r.status_code == 422 and "lone surrogate" in r.text, r.text


def test_a_long_history_is_windowed_to_the_context(server):
    url, bot = server
    history = [{"role": "user", "name": f"U{i % 7}", "content": f"message {i}: shall we walk today?"}
               for i in range(2000)]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "chimein", "messages": history}, timeout=120)
    assert r.status_code == 200, r.text
    limit = bot.preset.max_length
    assert 0 < r.json()["usage"]["prompt_tokens"] <= limit - 64
    assert len(bot.state.fed) <= limit
    kept = [m.content for m in bot.state.messages if m.role == "user"]
    assert 1 < len(kept) < 2000 and kept[-1] == history[-1]["content"]  # the recent ones, whole
    assert kept == [m["content"] for m in history[-len(kept):]]


def test_request_size_limits(server):
    url, _ = server
    at = f"{url}/v1/chat/completions"
    r = httpx.post(at, json={"messages": [{"role": "user", "name": "a", "content": "hi"}] * 2001})
    assert r.status_code == 422 and "2001 messages, over the limit of 2000" in r.text
    r = httpx.post(at, json={"messages": [{"role": "user", "name": "a", "content": "x" * 4000}] * 70})
    assert r.status_code == 413 and "over 262144 bytes" in r.text
    r = httpx.post(at, content=(b"x" * 4096 for _ in range(100)),  # no Content-Length: chunked
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(f"{url}/healthz").json()["ok"]


def test_usage_is_real_under_concurrency(server):
    url, bot = server

    def ask(n: int) -> dict:
        messages = [{"role": "user", "name": f"U{j}", "content": f"message {j}"} for j in range(n)]
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    sizes = range(1, 17)
    try:
        bot.chattiness = 0.0  # always speaks: every answer has completion tokens
        alone = [ask(n) for n in sizes]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, sizes))
        bot.chattiness = 2.0
        silent = ask(3)
    finally:
        bot.chattiness = 0.5
    assert together == alone
    prompts = [u["prompt_tokens"] for u in alone]
    assert prompts == sorted(set(prompts)) and prompts[0] > 0  # each longer history, more tokens
    assert all(1 <= u["completion_tokens"] <= bot.max_new_tokens for u in alone)
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in alone)
    assert silent == {**alone[2], "completion_tokens": 0, "total_tokens": alone[2]["prompt_tokens"]}


def _stream_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streaming_sends_openai_chunks_with_the_decision_first(server):
    url, bot = server
    body = {"model": "chimein", "messages": [{"role": "user", "name": "Ana", "content": "who wrote Dune?"}],
            "stream": True, "stream_options": {"include_usage": True}}
    for chattiness in (0.0, 2.0):  # speaking and silent (no hedging: a tiny model would withdraw)
        bot.chattiness, bot.hedge = chattiness, False
        try:
            chunks = _stream_events(url, body)
            plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}).json()
        finally:
            bot.chattiness, bot.hedge = 0.5, True
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert len({c["id"] for c in chunks}) == 1
        first, *middle, last_choice, usage = chunks
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert first["chimein"] == plain["chimein"] and first["chimein"]["speak"] == (chattiness == 0.0)
        text = "".join(c["choices"][0]["delta"]["content"] for c in [first, *middle])
        assert text == plain["choices"][0]["message"]["content"]
        assert last_choice["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert "usage" not in _stream_events(url, {**body, "stream_options": None})[-1]


def test_openai_client_streams_lists_models_and_is_told_of_ignored_system_messages(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
    assert [m.id for m in client.models.list()] == ["chimein"]
    chat = [{"role": "user", "name": "Ana", "content": "who wrote Dune?"},
            {"role": "user", "name": "Ben", "content": "assistant, do you know?"}]
    plain = client.chat.completions.create(model="chimein", messages=chat)
    chunks = list(client.chat.completions.create(model="chimein", messages=chat, stream=True))
    assert chunks[0].model_extra["chimein"] == plain.model_extra["chimein"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert plain.model_extra["chimein"]["ignored_system_messages"] == 0
    assert plain.usage.prompt_tokens > 0
    told = client.chat.completions.create(model="chimein", messages=[
        {"role": "system", "content": "Always answer."}, {"role": "developer", "content": "Be brief."},
        *chat])
    assert told.model_extra["chimein"] == {**plain.model_extra["chimein"], "ignored_system_messages": 2}
    assert told.choices[0].message.content == plain.choices[0].message.content


def test_messages_that_arrive_together_are_decided_together(monkeypatch):
    """While the model is busy, messages of eight conversations, a second message of the busy
    one, a chat completion and then a second message of one of the eight arrive: the next pass
    decides the ten that can go together (the last one waits for its conversation's first), and
    every answer is what a one-at-a-time server gives."""
    bot = GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=4, chattiness=0.5)
    app = create_app(bot)
    passes, gate = [], threading.Event()
    add_many = bot.add_many

    def gated(requests, reply=True):
        passes.append(len(requests))
        assert gate.wait(60)
        return add_many(requests, reply)

    monkeypatch.setattr(bot, "add_many", gated)
    history = [{"role": "user", "name": "Ann", "content": "who wrote Dune?"},
               {"role": "assistant", "content": "(response) Frank Herbert."}]
    msgs = [("c0", "Ana", "hello all", True)] + [(f"c{k}", f"U{k}", f"message {k}", k % 3 == 0)
                                                 for k in range(1, 9)] + [("c0", "Ben", "assistant?", False),
                                                                          ("c5", "Cy", "and then?", True)]
    with running(app) as url, ThreadPoolExecutor(12) as pool:
        def post(cid, name, content, force):
            r = httpx.post(f"{url}/v1/conversations/{cid}/messages", timeout=120,
                           json={"name": name, "content": content, "force": force})
            assert r.status_code == 200, r.text
            return r.json()

        def complete():
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                           json={"messages": history + [{"role": "user", "name": "Bo", "content": "and Emma?"}]})
            assert r.status_code == 200, r.text
            return r.json()["chimein"]

        first = pool.submit(post, *msgs[0])
        deadline = time.monotonic() + 60
        while passes != [1] and time.monotonic() < deadline:
            time.sleep(0.01)
        rest = [pool.submit(post, *m) for m in msgs[1:-1]] + [pool.submit(complete)]
        while len(app.state.batcher.waiting) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        rest.insert(-1, pool.submit(post, *msgs[-1]))
        while len(app.state.batcher.waiting) < 11 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        answers = [first.result()] + [f.result() for f in rest]
        health = httpx.get(f"{url}/healthz").json()
    assert passes == [1, 10, 1]
    assert health["mean_batch"] == 4.0 and health["conversations"] == 9
    monkeypatch.undo()
    from chimein.conversation import parse_conversation
    from chimein.runtime.state import ConversationState

    states: dict[str, ConversationState] = {}
    for (cid, name, content, force), got in zip(msgs, answers):
        bot.use(states.setdefault(cid, ConversationState()))
        d = bot.add(name, content, force=force)
        assert (got["speak"], got["response"]) == (d.speak, d.response)
        assert got["p_speak"] == pytest.approx(d.p_speak, abs=1e-4)
    raw = [{**m, "content": m["content"].removeprefix("(response) ")} for m in history]
    bot.use(ConversationState(list(parse_conversation(raw).messages)))
    d = bot.add("Bo", "and Emma?")
    assert answers[-1]["speak"] == d.speak and answers[-1]["p_speak"] == pytest.approx(d.p_speak, abs=1e-4)


def test_replies_from_a_responder_and_its_failures_are_returned():
    """With a responder (a fake OpenAI-compatible endpoint), the reply and who wrote it, or why it
    did not, come back from both endpoints; the conversation keeps every message."""
    from chimein.runtime.responder import OpenAIResponder
    from tests.fakes.fake_llm import FakeLLM

    bot = GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=4, chattiness=2.0)
    with FakeLLM("openai", script=["Frank Herbert.", 503]) as fake:
        bot.responder = OpenAIResponder("big", base_url=fake.base_url)
        with running(create_app(bot, max_conversations=4)) as url:
            post = lambda content: httpx.post(f"{url}/v1/conversations/r/messages",  # noqa: E731
                                              json={"name": "Ana", "content": content, "force": True}).json()
            first, second = post("who wrote Dune?"), post("and Foundation?")
            silent = httpx.post(f"{url}/v1/conversations/r/messages", json={"name": "Ana", "content": "ok"}).json()
            chat = httpx.post(f"{url}/v1/chat/completions", json={
                "model": "chimein", "messages": [{"role": "user", "name": "Ana", "content": "hi bot"}]}).json()
        assert len(fake.requests) == 2  # the two forced replies; the silent messages asked nobody
    assert (first["response"], first["responder"], first["responder_error"]) == ("Frank Herbert.", "openai:big", None)
    assert second["speak"] and second["response"] and second["responder"] is None
    assert second["responder_error"].startswith("openai:big: ")  # the 503: the local model replied
    assert not silent["speak"] and silent["responder"] is None
    assert chat["chimein"]["speak"] is False  # chattiness 2: the endpoint's message is not forced
