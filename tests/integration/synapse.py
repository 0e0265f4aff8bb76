"""A real Matrix homeserver for the tests: Synapse (from PyPI) on loopback, with SQLite, a
registration shared secret and relaxed rate limits, started and stopped by the test.

    with Synapse(tmp_path) as hs:
        ann = hs.register("ann")                       # a logged-in user: Account(user_id, token)
        room = hs.api(ann, "POST", "/createRoom", {"preset": "public_chat"})["room_id"]
        hs.restart()                                   # same port, same database
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

SECRET = "chimein-tests-only"
# relaxed for the tests, but not off: a test that wants 429s sets a user's own limit
# (`limit_messages`) through the admin API
RELAXED = {"per_second": 1000, "burst_count": 1000}


@dataclass(frozen=True)
class Account:
    user_id: str
    token: str
    password: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Synapse:
    def __init__(self, root: Path, server_name: str = "localhost"):
        self.root, self.server_name = Path(root) / "synapse", server_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "homeserver.log"

    def __enter__(self) -> Synapse:
        self.configure()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def configure(self) -> None:
        """A config of Synapse's own generation (keys, secrets), then bound to loopback only, with
        no federation, no key servers, SQLite and relaxed rate limits."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "homeserver.yaml"
        subprocess.run([sys.executable, "-m", "synapse.app.homeserver", "--server-name", self.server_name,
                        "--config-path", str(config), "--generate-config", "--report-stats=no",
                        "--data-directory", str(self.root)], check=True, capture_output=True, timeout=60)
        conf = yaml.safe_load(config.read_text())
        conf.update(
            listeners=[{"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                        "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]}],
            database={"name": "sqlite3", "args": {"database": str(self.root / "homeserver.db")}},
            registration_shared_secret=SECRET, enable_registration=False, trusted_key_servers=[],
            suppress_key_server_warning=True, report_stats=False, presence={"enabled": False},
            url_preview_enabled=False, enable_metrics=False, federation_domain_whitelist=[],
            **{k: RELAXED for k in ("rc_message", "rc_registration", "rc_admin_redaction",
                                    "rc_3pid_validation")},
            rc_login={k: RELAXED for k in ("address", "account", "failed_attempts")},
            rc_joins={"local": RELAXED, "remote": RELAXED},
            rc_invites={"per_room": RELAXED, "per_user": RELAXED, "per_issuer": RELAXED},
            rc_presence={"per_user": RELAXED},
        )
        conf.pop("log_config", None)
        log_config = self.root / "log.yaml"
        log_config.write_text(yaml.safe_dump({
            "version": 1, "formatters": {"f": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
            "handlers": {"file": {"class": "logging.FileHandler", "filename": str(self.log), "formatter": "f"}},
            "root": {"level": "WARNING", "handlers": ["file"]}, "disable_existing_loggers": False}))
        conf["log_config"] = str(log_config)
        config.write_text(yaml.safe_dump(conf))
        self.config = config

    def start(self, timeout: float = 60) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNAPSE_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config)],
                                     cwd=self.root, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "stderr.log", "ab"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Synapse exited with {self.proc.returncode}: "
                                   + (self.root / "stderr.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Synapse did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def request(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None

    def api(self, who: Account, method: str, path: str, body: dict | None = None) -> dict:
        """The client-server API (/_matrix/client/v3) as `who`."""
        return self.request(method, f"/_matrix/client/v3{path}", body, who.token)

    def register(self, localpart: str, admin: bool = False, displayname: str | None = None) -> Account:
        """A user registered with the shared secret (Synapse's admin API), logged in."""
        nonce = self.request("GET", "/_synapse/admin/v1/register")["nonce"]
        password = uuid.uuid4().hex
        mac = hmac.new(SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        out = self.request("POST", "/_synapse/admin/v1/register",
                           {"nonce": nonce, "username": localpart, "password": password, "admin": admin,
                            "displayname": displayname or localpart.capitalize(), "mac": mac.hexdigest()})
        return Account(out["user_id"], out["access_token"], password)

    def limit_messages(self, admin: Account, user_id: str, per_second: int, burst: int) -> None:
        """A user's own message rate limit (Synapse admin API): 429s with retry-after beyond it."""
        self.request("POST", f"/_synapse/admin/v1/users/{user_id}/override_ratelimit",
                     {"messages_per_second": per_second, "burst_count": burst}, admin.token)

    def send(self, who: Account, room: str, content: dict, event_type: str = "m.room.message") -> str:
        txn = uuid.uuid4().hex
        return self.api(who, "PUT", f"/rooms/{room}/send/{event_type}/{txn}", content)["event_id"]

    def messages(self, who: Account, room: str, limit: int = 200) -> list[dict]:
        """The room's message events, oldest first."""
        out = self.api(who, "GET", f"/rooms/{room}/messages?dir=b&limit={limit}")
        return [e for e in reversed(out["chunk"]) if e["type"] == "m.room.message"]
