"""HTTP API for chat integrations.

    chimein serve --adapter local:NAME --port 8000

POST /v1/conversations/{id}/messages {"name", "content", "force"?} → {"speak", "p_speak", "response",
    "hedged", "confidence", "tool", "responder", "responder_error"}
DELETE /v1/conversations/{id}
POST /v1/chat/completions — OpenAI-style: the whole conversation in `messages` (user messages
    carry `name`); the reply's content is the assistant's response, or "(silence)"; the decision
    is also in `chimein: {speak, p_speak, hedged, confidence, tool, …, ignored_system_messages}`. Existing OpenAI clients work
    unchanged, streaming included (`stream: true`: server-sent `chat.completion.chunk`s, the first
    one carrying `chimein`; the reply is computed before the first chunk, it is short). System
    (and developer) messages are not shown to the model — it was trained without them — and are
    counted in `chimein.ignored_system_messages`. `usage`: the tokens the decision read
    (after windowing) and the tokens generated for the reply (0 when silent).
GET /v1/models — the one model served, "chimein" (any `model` name in a request is accepted)
GET /healthz → {"ok", "model", "conversations", "cache_mb"}, without waiting for the model

Conversations are kept per id: their messages and the KV cache of what was fed (a new message
costs its own tokens), each windowed by the assistant to its context budget, as is the history
of a chat completion. Limits (arguments of `create_app`): at most `max_conversations` (the least
recently used is dropped), and `max_cache_mb` of caches together (beyond it the least recently
used conversations lose their cache but keep their messages: their next message feeds them
again); request bodies up to `max_body_bytes` (413 beyond) and chat completions up to
`max_messages` messages (422). A rejected message (422) changes nothing.

One model serves all, from one thread: the messages that arrive while it works wait, and are
then decided together — batched over their own caches in shared forward passes, the replies of
those that speak generated together (`GroupChatAssistant.add_many`), up to `max_batch` at a time
(1: one request at a time). Messages to the same conversation are decided in the order they
arrived, one per batch (chimein.runtime.batcher); the conversations are kept by a
ConversationStore (chimein.runtime.store).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from chimein.conversation import InvalidConversation, parse_conversation
from chimein.formatting import SILENCE
from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.batcher import Batcher
from chimein.runtime.state import ConversationState
from chimein.runtime.store import ConversationStore

MODEL_ID = "chimein"
LONE_SURROGATE = ("not Unicode text: it has a lone surrogate (e.g. \\ud800); fix the encoding where "
                  "the text was made (a UTF-16 pair split in two, or a surrogate escaped alone)")


class MessageIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    content: str = Field(min_length=1, max_length=4000)
    force: bool = False


class DecisionOut(BaseModel):
    speak: bool
    p_speak: float
    response: str | None
    responder: str | None = None  # who wrote the reply when not the local model
    responder_error: str | None = None  # why the responder did not (the local model replied)
    hedged: bool = False  # the reply was a guess: said as one, or withdrawn (silence) when unaddressed
    confidence: float | None = None  # the local model's confidence in its reply (runtime.honesty)
    tool: str | None = None  # the tool whose exact answer is the reply
    passages: list[str] = []  # where the passages retrieved from the group's documents come from


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with `usage` and no choices, as OpenAI sends


class ChatRequest(BaseModel):
    model: str = MODEL_ID
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class BodyLimit:
    """413 for a request body over `max_bytes`, by its Content-Length or, when it has none
    (chunked), as it arrives; the body is read here, before any JSON is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. a disconnect while a stream is sent
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        detail = (f"request body over {self.max_bytes} bytes; send fewer or shorter messages (a "
                  "history longer than the model's context is windowed anyway)")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


def create_app(bot: GroupChatAssistant, max_conversations: int = 256, max_cache_mb: float = 2048,
               max_body_bytes: int = 2 * 2**20, max_messages: int = 4096, max_batch: int = 16):
    from fastapi import FastAPI, HTTPException, Path
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response, StreamingResponse

    app = FastAPI(title="chimein", description="A group-chat assistant that knows when to chime in.")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError) -> Response:
        """FastAPI's answer, but with the input echoed as ASCII JSON: a lone surrogate cannot be
        UTF-8, and FastAPI's own answer fails on it (a 500). That error is also named."""
        errors = [{**e, "msg": LONE_SURROGATE} if e["type"] == "string_unicode" else e
                  for e in exc.errors()]
        return Response(json.dumps({"detail": jsonable_encoder(errors)}), 422, media_type="application/json")

    store = ConversationStore(max_conversations, max_cache_mb)
    batcher = app.state.batcher = Batcher(bot, store.before, store.after, max_batch=max_batch)
    created = int(time.time())

    def check(name: str, content: str) -> None:
        """Validate a new message before anything is touched: a rejected one changes nothing."""
        try:
            parse_conversation([{"role": "user", "name": name, "content": content}])
        except InvalidConversation as e:
            raise HTTPException(422, e.problem) from None

    @app.post("/v1/conversations/{cid}/messages", response_model=DecisionOut)
    def post_message(msg: MessageIn, cid: str = Path(min_length=1, max_length=256)) -> DecisionOut:
        check(msg.name, msg.content)
        d = batcher.submit(cid, msg.name, msg.content, msg.force)
        return DecisionOut(speak=d.speak, p_speak=d.p_speak, response=d.response, responder=d.responder,
                           responder_error=d.responder_error, hedged=d.hedged, confidence=d.confidence,
                           tool=d.tool, passages=d.passages)

    @app.delete("/v1/conversations/{cid}")
    def delete_conversation(cid: str = Path(min_length=1, max_length=256)) -> dict:
        return {"deleted": store.delete(cid)}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        if len(req.messages) > max_messages:
            raise HTTPException(422, f"messages: {len(req.messages)} messages, over the limit of "
                                     f"{max_messages}; send the most recent ones (a history longer "
                                     "than the model's context is windowed anyway)")
        last = req.messages[-1]
        if last.role != "user":
            raise HTTPException(422, "the last message must be a user message (the one to react to)")
        name = last.name or "user"
        check(name, last.content)
        # the history goes through the same validation as files: names normalised, limits checked
        raw = [{"role": "user", "name": m.name or "user", "content": m.content} if m.role == "user"
               else {"role": "assistant", "content": m.content.strip().removeprefix("(response)")}
               for m in req.messages[:-1]
               if m.role == "user" or (m.role == "assistant" and m.content.strip() not in ("", SILENCE))]
        try:
            history = list(parse_conversation(raw).messages) if raw else []
        except InvalidConversation as e:
            raise HTTPException(422, f"messages: {e.problem}") from None
        # windowed by the assistant like a conversation
        d = batcher.submit(None, name, last.content, False, state=ConversationState(messages=history))
        content = d.response if d.speak else SILENCE
        usage = {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                 "total_tokens": d.prompt_tokens + d.completion_tokens}
        chimein = {"speak": d.speak, "p_speak": d.p_speak, "responder": d.responder,
                   "responder_error": d.responder_error, "hedged": d.hedged, "confidence": d.confidence,
                   "tool": d.tool, "passages": d.passages,
                   "ignored_system_messages": sum(m.role in ("system", "developer") for m in req.messages)}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": req.model}
        if not req.stream:
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": usage, "chimein": chimein}

        def chunk(choices: list[dict], **extra) -> str:
            body = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def events():
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                        chimein=chimein)
            yield chunk([{"index": 0, "delta": {"content": content}, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": created,
                                            "owned_by": "chimein"}]}

    @app.get("/healthz")
    def healthz() -> dict:
        sizes = batcher.sizes
        return {"ok": True, "model": bot.preset.name, "conversations": len(store),
                "cache_mb": round(store.cache_bytes / 2**20, 3), "max_batch": max_batch,
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None}

    return app
