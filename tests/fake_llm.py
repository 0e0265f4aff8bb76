"""Local stand-ins for the paid LLM APIs, at the HTTP layer: OpenAI chat completions and Replicate
predictions. Each reply is taken from a script (status codes, malformed text, delays) and then
falls back to a valid conversation made from the request's seed, so every request is recorded
and distinguishable."""

from __future__ import annotations

import json
import threading
import time
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
    status), a str (the text to return), or ("delay", seconds). Afterwards: valid conversations."""

    def __init__(self, kind: str, script=(), delay: float = 0.0):
        self.kind = kind
        self.script = list(script)
        self.delay = delay
        self.requests: list[dict] = []  # every request body received
        self.served: list[int] = []  # seeds of successful replies fully sent
        self.lock = threading.Lock()
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                with llm.lock:
                    llm.requests.append(body)
                    step = llm.script.pop(0) if llm.script else None
                seed = body.get("seed", body.get("input", {}).get("seed"))
                if isinstance(step, tuple):
                    time.sleep(step[1])
                    step = None
                time.sleep(llm.delay)
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self.server.server_address
        self.url = f"http://{host}:{port}"
        self.base_url = f"{self.url}/v1" if kind == "openai" else self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
