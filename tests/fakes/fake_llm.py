"""Local stand-ins for the paid LLM APIs, at the HTTP layer: OpenAI chat completions and Replicate
predictions. Each reply is taken from a script (status codes, malformed text or bodies, delays) and
then falls back to a valid conversation made from the request's seed, so every request is recorded
and distinguishable: the seed is what identifies a request (`seen` counts them)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def conversation_text(seed: int) -> str:
    """A valid conversation in a code fence with prose around it, as models like to answer."""
    conv = [
        {"role": "user", "name": "Ana", "content": f"request {seed}: who painted the Mona Lisa?"},
        {"role": "assistant", "content": "Leonardo da Vinci."},
        {"role": "user", "name": "Ben", "content": "right, thanks"},
    ]
    return f"Sure! Here is the chat:\n```json\n{json.dumps(conv)}\n```\nHope this helps."


class FakeLLM:
    """script: a list of replies used in order, one per request; each is an int (an HTTP error
    status), a str (the text to return), ("delay", seconds), or ("body", text, content_type): a
    success status with that raw body, e.g. an HTML error page or broken JSON. Afterwards: valid
    conversations. Every reply waits `delay` seconds plus a seeded random share of `jitter`."""

    def __init__(self, kind: str, script=(), delay: float = 0.0, jitter: float = 0.0):
        self.kind = kind
        self.script = list(script)
        self.delay = delay
        self.jitter = jitter
        self.rng = random.Random(0)
        self.requests: list[dict] = []  # every request body received
        self.served: list[int] = []  # seeds of successful replies fully sent
        self.lock = threading.Lock()
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, code, obj):
                self._send(code, json.dumps(obj).encode(), "application/json")

            def _send(self, code, data, content_type):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers["Content-Length"])
                raw = self.rfile.read(length)
                if length and len(raw) < length:  # the client died before its body arrived: never received
                    return
                body = json.loads(raw or b"{}")
                with llm.lock:
                    llm.requests.append(body)
                    step = llm.script.pop(0) if llm.script else None
                    latency = llm.delay + llm.jitter * llm.rng.random()
                seed = body.get("seed", body.get("input", {}).get("seed"))
                if isinstance(step, tuple) and step[0] == "delay":
                    time.sleep(step[1])
                    step = None
                time.sleep(latency)
                if isinstance(step, tuple) and step[0] == "body":
                    return self._send(200 if llm.kind == "openai" else 201, step[1].encode(), step[2])
                if isinstance(step, int):
                    return self._json(step, {"error": {"message": f"scripted {step}"},
                                             "detail": f"scripted {step}", "status": step})
                text = step if isinstance(step, str) else conversation_text(seed)
                if llm.kind == "openai":
                    self._json(200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
                    })
                else:
                    pid = f"p{len(llm.requests)}"
                    self._json(201, {
                        "id": pid, "model": self.path.split("/")[3] + "/" + self.path.split("/")[4],
                        "version": "v1", "status": "succeeded", "input": body.get("input", {}),
                        "output": [text[i:i + 7] for i in range(0, len(text), 7)],  # streamed tokens
                        "logs": "", "error": None, "created_at": "2026-01-01T00:00:00Z",
                        "metrics": {"input_token_count": 80, "output_token_count": 40},
                        "urls": {"get": f"{llm.url}/v1/predictions/{pid}",
                                 "cancel": f"{llm.url}/v1/predictions/{pid}/cancel"},
                    })
                with llm.lock:
                    llm.served.append(seed)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client killed mid-request (the kill tests) is expected, not news

        self.server = Server(("127.0.0.1", 0), Handler)
        host, port = self.server.server_address
        self.url = f"http://{host}:{port}"
        self.base_url = f"{self.url}/v1" if kind == "openai" else self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def seen(self) -> Counter:
        """How many times each request (by seed) was received."""
        with self.lock:
            return Counter(b.get("seed", b.get("input", {}).get("seed")) for b in self.requests)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
