"""A bounded HTTP fuzz of `chimein serve` on loopback: malformed JSON, wrong types, huge bodies
and names, unicode and lone surrogates, concurrent requests on one and on many ids. No answer may
be a 5xx, and the server is healthy afterwards. Seeded: the same few hundred requests each run."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx

from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.server import create_app
from tests.integration.test_server import running

SEED, N = 10, 300
MAX_BODY, MAX_MESSAGES = 64 * 1024, 64
ALPHABETS = ["abc xyz", "éüßçñ", "中文对话测试", "😀👍🏽🇫🇷", "\u0301\u0308",
             "\u200b\u200d\u2060\ufeff", "\u202e\u202d", "\x00\x07\x1b\n\r\t", "<|im_end|></s>[INST]<|end_of_turn|>:|{}"]


def text(rng: random.Random, n: int | None = None) -> str:
    n = rng.choice([0, 1, 5, 40, 300]) if n is None else n
    return "".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(n))


def junk(rng: random.Random):
    """A JSON value of the wrong type (or a string far too long)."""
    return rng.choice([None, 0, -1, 1.5, 1e308, True, [], {}, ["hi"], {"a": 1}, "x" * 10_000,
                       text(rng, 5000)])


def message_body(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:  # valid, any unicode
        return json.dumps({"name": text(rng, 8) or "A", "content": text(rng) or "hi",
                           "force": rng.random() < 0.2}, ensure_ascii=rng.random() < 0.5).encode()
    if kind == 1:  # wrong types, missing and extra keys
        body = {"name": text(rng, 6), "content": text(rng, 20)}
        body[rng.choice(["name", "content", "force", "extra"])] = junk(rng)
        if rng.random() < 0.3:
            body.pop(rng.choice(["name", "content"]))
        return json.dumps(body).encode()
    if kind == 2:  # lone surrogates, escaped in JSON or as raw (invalid UTF-8) bytes
        return rng.choice([b'{"name":"a","content":"\\ud800"}', b'{"name":"\\udfff","content":"x"}',
                           b'{"name":"a","content":"ok \\ud83d"}', b'{"name":"a","content":"\xed\xa0\x80"}',
                           b'{"name":"a","content":"\xff\xfe"}'])
    if kind == 3:  # malformed JSON
        valid = json.dumps({"name": "Ana", "content": "hi"}).encode()
        return rng.choice([valid[:rng.randrange(len(valid))], b"", b"{", b"null", b"[]", b'"str"', b"1e999",
                           b'{"name":"a","content":"hi","force":NaN}', b"[" * 5000 + b"]" * 5000,
                           bytes(rng.randrange(256) for _ in range(64))])
    if kind == 4:  # a huge body, over the limit
        return json.dumps({"name": "Ana", "content": "x" * (MAX_BODY + rng.randrange(1000))}).encode()
    if kind == 5:  # a huge name
        return json.dumps({"name": text(rng, 1000), "content": "hi"}).encode()
    return json.dumps({"name": "Ana", "content": text(rng, 4001)}).encode()  # content over the limit


def chat_body(rng: random.Random) -> bytes:
    roles = ["user", "user", "user", "assistant", "system", "developer", "tool", None, 7]
    messages = [{"role": rng.choice(roles), "name": rng.choice([text(rng, 6), None, junk(rng)]),
                 "content": rng.choice([text(rng) or "hi", "(silence)", "(response) ok", junk(rng)])}
                for _ in range(rng.choice([0, 1, 3, 10, MAX_MESSAGES + 1]))]
    if messages and rng.random() < 0.6:
        messages[-1] = {"role": "user", "name": text(rng, 6) or "A", "content": text(rng) or "hi"}
    body = {"model": rng.choice(["chimein", "gpt-4o", "", junk(rng)]), "messages": messages,
            "stream": rng.choice([False, True, "yes"])}
    if rng.random() < 0.1:
        body["messages"] = junk(rng)
    return json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()


def requests(rng: random.Random) -> list[tuple[str, str, bytes | None]]:
    out = []
    for _ in range(N):
        cid = rng.choice(["same"] * 4 + [f"id-{rng.randrange(40)}", text(rng, 30) or "x", "x" * 300])
        at = f"/v1/conversations/{quote(cid, safe='')}"
        r = rng.random()
        if r < 0.55:
            out.append(("POST", f"{at}/messages", message_body(rng)))
        elif r < 0.85:
            out.append(("POST", "/v1/chat/completions", chat_body(rng)))
        elif r < 0.9:
            out.append(("DELETE", at, None))
        else:
            path = rng.choice(["/v1/models", "/healthz", f"{at}/messages"])
            out.append((rng.choice(["GET", "PUT"]), path, None))
    return out


def test_fuzzed_requests_never_get_a_5xx():
    bot = GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=4, chattiness=0.5)
    app = create_app(bot, max_conversations=16, max_cache_mb=1, max_body_bytes=MAX_BODY,
                     max_messages=MAX_MESSAGES)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def send(req) -> int:
            method, path, body = req
            headers = {"content-type": "application/json"} if body is not None else {}
            try:
                return client.request(method, path, content=body, headers=headers).status_code
            except httpx.TransportError:  # a dropped connection fails the test too
                return 0

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(send, requests(random.Random(SEED))))
        health = client.get("/healthz")
        after = client.post("/v1/conversations/same/messages",
                            json={"name": "Ana", "content": "still there?"})
    failed = [(req[:2], s) for req, s in zip(requests(random.Random(SEED)), statuses) if not 0 < s < 500]
    assert not failed, f"{len(failed)} of {N} failed: {failed[:5]}"
    assert set(statuses) <= {200, 400, 404, 405, 413, 422}, sorted(set(statuses))
    assert statuses.count(200) > N // 10 and statuses.count(413) and statuses.count(422) > N // 5
    assert health.status_code == 200 and health.json()["ok"] and health.json()["conversations"] <= 16
    assert after.status_code == 200
