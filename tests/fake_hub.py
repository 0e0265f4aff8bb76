"""A local stand-in for the Hugging Face Hub's HTTP API: enough of it for from_pretrained.

Serves directories as repos (`/{repo}/resolve/{rev}/{file}`, `/api/models/{repo}...`) on a free
loopback port and records every request, so tests exercise the real Hub download code path.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _send(self, code, data=b"", headers=None, body=True):
                self.send_response(code)
                for k, v in {"Content-Length": str(len(data)), "X-Repo-Commit": COMMIT,
                             **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _serve(self, body):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                for repo, root in hub.repos.items():
                    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
                    if path.startswith(f"/{repo}/resolve/"):
                        name = path[len(f"/{repo}/resolve/"):].split("/", 1)[1]
                        f = root / name
                        if name in files:
                            data = f.read_bytes()
                            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                            return self._send(200, data, {"ETag": etag}, body)
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                    if path.startswith(f"/api/models/{repo}"):
                        if "/tree/" in path:
                            info = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                     "oid": COMMIT} for f in files]
                        else:
                            info = {"id": repo, "sha": COMMIT,
                                    "siblings": [{"rfilename": f} for f in files]}
                        data = json.dumps(info).encode()
                        return self._send(200, data, {"Content-Type": "application/json"}, body)
                self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
