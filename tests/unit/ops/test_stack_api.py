"""The stack's calls to the Prefect API ride out the server's "retry me" answers (503 when its
SQLite database is busy, as under `chimein up` five times in a row) and fail clearly otherwise."""
import json
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chimein.ops import stack as stack_mod


class _Server:
    """A loopback HTTP server answering each request with the next (status, body) of `answers`."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                outer.calls += 1
                status, body = outer.answers.pop(0) if len(outer.answers) > 1 else outer.answers[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stack(self, tmp_path):
        return stack_mod.Stack(tmp_path, prefect_url=f"http://127.0.0.1:{self.httpd.server_port}/api")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def start(answers):
        made.append(_Server(answers))
        return made[-1]
    yield start
    for s in made:
        s.close()


def test_a_busy_server_is_asked_again(server, tmp_path, monkeypatch):
    monkeypatch.setattr(stack_mod, "API_RETRY_WAIT_S", 0.01, raising=False)
    s = server([(503, {"exception_message": "Service Unavailable"})] * 2 + [(200, {"id": "d1"})])
    assert stack_mod._api(s.stack(tmp_path), "PATCH", "/deployments/d1", {"paused": False}) == {"id": "d1"}
    assert s.calls == 3


def test_a_server_busy_for_good_fails_with_the_url_and_the_tries(server, tmp_path, monkeypatch):
    monkeypatch.setattr(stack_mod, "API_RETRY_WAIT_S", 0.01, raising=False)
    s = server([(503, {"exception_message": "Service Unavailable"})])
    with pytest.raises(urllib.error.HTTPError) as e:
        stack_mod._api(s.stack(tmp_path), "GET", "/deployments/name/retrain/nightly-retrain")
    assert e.value.code == 503
    assert s.calls == stack_mod.API_TRIES


def test_a_client_error_is_not_retried(server, tmp_path):
    s = server([(409, {"detail": "exists"})])
    with pytest.raises(urllib.error.HTTPError) as e:
        stack_mod._api(s.stack(tmp_path), "POST", "/v2/concurrency_limits/", {"name": "gpu:0"})
    assert e.value.code == 409 and s.calls == 1
