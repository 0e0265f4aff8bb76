"""HTTP API for chat integrations.

    chimein serve --adapter local:NAME --port 8000

POST /v1/conversations/{id}/messages {"name", "content", "force"?} → {"speak", "p_speak", "response"}
DELETE /v1/conversations/{id}
POST /v1/chat/completions — OpenAI-style: the whole conversation in `messages` (user messages
    carry `name`); the reply's content is the assistant's response, or "(silence)"; the decision
    is also in `chimein: {speak, p_speak}`. Existing OpenAI clients work unchanged.

Conversations are kept per id with their KV cache (a new message costs its own tokens), at most
`max_conversations` of them (the least recently used is dropped), each windowed by the assistant
to its context budget. One model serves all: requests are serialised.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Literal

from pydantic import BaseModel, Field

from chimein.assistant import GroupChatAssistant, _State
from chimein.conversation import InvalidConversation, parse_conversation


class MessageIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    content: str = Field(min_length=1, max_length=4000)
    force: bool = False


class DecisionOut(BaseModel):
    speak: bool
    p_speak: float
    response: str | None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(BaseModel):
    model: str = "chimein"
    messages: list[ChatMessage] = Field(min_length=1)


def create_app(bot: GroupChatAssistant, max_conversations: int = 256):
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="chimein", description="A group-chat assistant that knows when to chime in.")
    lock = threading.Lock()  # one model, one cache in use at a time
    conversations: OrderedDict[str, _State] = OrderedDict()

    def run(state: _State, name: str, content: str, force: bool):
        bot.state = state
        try:
            return bot.add(name, content, force=force)
        except InvalidConversation as e:  # validated before anything is added
            raise HTTPException(422, e.problem) from None

    @app.post("/v1/conversations/{cid}/messages", response_model=DecisionOut)
    def post_message(cid: str, msg: MessageIn) -> DecisionOut:
        with lock:
            state = conversations.pop(cid, None) or _State()
            d = run(state, msg.name, msg.content, msg.force)
            conversations[cid] = bot.state
            while len(conversations) > max_conversations:
                conversations.popitem(last=False)
        return DecisionOut(speak=d.speak, p_speak=d.p_speak, response=d.response)

    @app.delete("/v1/conversations/{cid}")
    def delete_conversation(cid: str) -> dict:
        with lock:
            return {"deleted": conversations.pop(cid, None) is not None}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict:
        last = req.messages[-1]
        if last.role != "user":
            raise HTTPException(422, "the last message must be a user message (the one to react to)")
        # the history goes through the same validation as files: names normalised, limits checked
        raw = [{"role": "user", "name": m.name or "user", "content": m.content} if m.role == "user"
               else {"role": "assistant", "content": m.content.strip().removeprefix("(response)")}
               for m in req.messages[:-1]
               if m.role == "user" or (m.role == "assistant" and m.content.strip() not in ("", "(silence)"))]
        try:
            history = list(parse_conversation(raw).messages) if raw else []
        except InvalidConversation as e:
            raise HTTPException(422, f"messages: {e.problem}") from None
        with lock:
            d = run(_State(messages=history), last.name or "user", last.content, False)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()), "model": req.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": d.response if d.speak else "(silence)"}}],
            "usage": {"prompt_tokens": len(bot.state.fed), "completion_tokens": 0,
                      "total_tokens": len(bot.state.fed)},
            "chimein": {"speak": d.speak, "p_speak": d.p_speak},
        }

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True, "model": bot.preset.name, "conversations": len(conversations)}

    return app
