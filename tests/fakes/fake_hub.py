"""A local stand-in for the Hugging Face Hub's HTTP API: enough of it for from_pretrained,
push_to_hub (create repo, preupload, commit, tags) and loading a dataset back by revision.

Repos live in memory as a list of commits (each a full snapshot {path: bytes}); branches and tags
point at commits. Every request is recorded, so tests can check what crossed the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


class Repo:
    def __init__(self, files: dict[str, bytes] | None = None, private: bool = False):
        self.commits: list[tuple[str, dict[str, bytes]]] = []
        self.refs: dict[str, str] = {}
        self.tags: set[str] = set()
        self.private = private
        self.commit(files or {}, "initial commit")

    def commit(self, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}:{message}".encode()).hexdigest()
        self.commits.append((sha, files))
        self.refs["main"] = sha
        return sha

    def snapshot(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(rev, rev)
        return next(((s, f) for s, f in self.commits if s == sha), None)


class FakeHub:
    def __init__(self, repos: dict[str, Path] | None = None, token: str | None = None):
        # repos given as directories are models; datasets are created by pushes
        self.repos: dict[tuple[str, str], Repo] = {
            ("model", rid): Repo({p.relative_to(root).as_posix(): p.read_bytes()
                                  for p in root.rglob("*") if p.is_file()})
            for rid, root in (repos or {}).items()
        }
        self.token = token
        self.lfs: dict[str, bytes] = {}  # sha256 → content, uploaded by PUT before the commit
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _send(h, code: int, data: bytes | str | dict | list = b"", headers: dict | None = None,
              body: bool = True):
        if isinstance(data, (dict, list)):
            data = json.dumps(data)
            headers = {"Content-Type": "application/json", **(headers or {})}
        if isinstance(data, str):
            data = data.encode()
        h.send_response(code)
        for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _handle(self, h, method: str):
        url = urlparse(h.path)
        path, query = unquote(url.path), parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append((method, path))
            self.auth_headers.append(h.headers.get("Authorization"))
            try:
                self._route(h, method, path, query, raw)
            except Exception as e:  # a bug in the fake must show up, not hang the client
                self._send(h, 500, {"error": f"fake hub: {e!r}"})

    def _find(self, kind: str, repo_id: str):
        return self.repos.get((kind, repo_id))

    def _route(self, h, method, path, query, raw):
        body = method != "HEAD"
        if path == "/api/whoami-v2":
            return self._send(h, 200, {"name": "tester", "type": "user", "orgs": [],
                                       "auth": {"accessToken": {"role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            req = json.loads(raw)
            kind = req.get("type") or "model"
            rid = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if (kind, rid) in self.repos:
                return self._send(h, 409, {"error": "You already created this repo"},
                                  {"X-Error-Code": "RepoExists"})
            private = req.get("visibility", "private" if req.get("private") else "public") != "public"
            self.repos[(kind, rid)] = Repo(private=private)
            return self._send(h, 200, {"url": f"{self.url}/{'datasets/' if kind == 'dataset' else ''}{rid}"})
        m = re.match(r"^/(datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if m and method == "POST":  # git-lfs "basic" transfer: the client PUTs each object to href
            req = json.loads(raw)
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        **({} if o["oid"] in self.lfs else
                           {"actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}})}
                       for o in req["objects"]]
            return self._send(h, 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        if path.startswith("/lfs-upload/") and method == "PUT":
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(raw).hexdigest() != oid:
                return self._send(h, 400, {"error": "fake hub: content does not match its oid"})
            self.lfs[oid] = raw
            return self._send(h, 200, b"")
        if path == "/api/validate-yaml":
            return self._send(h, 200, {"errors": [], "warnings": []})

        m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(.*))?$", path)
        if m:
            kind, rid, rest = m[1][:-1], m[2], m[3] or ""
            repo = self._find(kind, rid)
            if repo is None:
                return self._send(h, 404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound"}, body)
            return self._api(h, method, kind, rid, repo, rest, query, raw, body)

        m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            kind = "dataset" if m[1] else "model"
            repo = self._find(kind, m[2])
            snap = repo.snapshot(m[3]) if repo else None
            if snap is None:
                return self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
            sha, files = snap
            if m[4] not in files:
                return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound",
                                                "X-Repo-Commit": sha}, body)
            data = files[m[4]]
            return self._send(h, 200, data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                             "X-Repo-Commit": sha}, body)
        return self._send(h, 404, {"error": f"fake hub: no route {method} {path}"}, None, body)

    def _api(self, h, method, kind, rid, repo, rest, query, raw, body):
        if rest == "" or rest.startswith("revision/"):
            snap = repo.snapshot(rest.removeprefix("revision/") or "main")
            if snap is None:
                return self._send(h, 404, {"error": "Revision not found"},
                                  {"X-Error-Code": "RevisionNotFound"}, body)
            sha, files = snap
            return self._send(h, 200, {
                "id": rid, "sha": sha, "private": repo.private, "disabled": False, "gated": False,
                "lastModified": "2026-11-25T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": f, "size": len(d)} for f, d in sorted(files.items())],
            }, None, body)
        if rest.startswith("preupload/"):
            req = json.loads(raw)
            lfs = (".parquet", ".arrow", ".safetensors", ".bin")
            return self._send(h, 200, {"files": [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if f["path"].endswith(lfs) else "regular"} for f in req["files"]]})
        if rest.startswith("commit/"):
            snap = repo.snapshot(rest.removeprefix("commit/"))
            files = dict(snap[1]) if snap else {}
            summary = ""
            for line in raw.splitlines():
                op = json.loads(line)
                v = op["value"]
                if op["key"] == "header":
                    summary = v.get("summary", "")
                elif op["key"] == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                elif op["key"] == "lfsFile":
                    if v["oid"] not in self.lfs:
                        return self._send(h, 400, {"error": f"fake hub: LFS object of {v['path']} "
                                                            "was never uploaded"})
                    files[v["path"]] = self.lfs[v["oid"]]
                elif op["key"] == "deletedFile":
                    files.pop(v["path"], None)
                elif op["key"] == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
                else:
                    return self._send(h, 400, {"error": f"fake hub: unsupported {op['key']}"})
            sha = repo.commit(files, summary)
            prefix = "datasets/" if kind == "dataset" else ""
            return self._send(h, 200, {"commitOid": sha,
                                       "commitUrl": f"{self.url}/{prefix}{rid}/commit/{sha}",
                                       "pullRequestUrl": None})
        if rest.startswith("tag/"):
            req = json.loads(raw or b"{}")
            snap = repo.snapshot(rest.removeprefix("tag/"))
            repo.refs[req["tag"]] = snap[0]
            repo.tags.add(req["tag"])
            return self._send(h, 200, {})
        if rest.startswith("refs"):
            return self._send(h, 200, {"branches": [{"name": "main", "ref": "refs/heads/main",
                                                     "targetCommit": repo.refs["main"]}],
                                       "tags": [{"name": t, "ref": f"refs/tags/{t}",
                                                 "targetCommit": repo.refs[t]} for t in repo.tags],
                                       "converts": []})
        if rest.startswith("tree/") or rest.startswith("paths-info/"):
            op, _, tail = rest.partition("/")
            rev, _, sub = tail.partition("/")
            snap = repo.snapshot(rev)
            if snap is None:
                return self._send(h, 404, {"error": "Revision not found"},
                                  {"X-Error-Code": "RevisionNotFound"}, body)
            sha, files = snap
            if op == "paths-info":
                form = parse_qs(raw.decode()) if raw and not raw.startswith(b"{") else {}
                wanted = form.get("paths") or (json.loads(raw).get("paths", []) if raw.startswith(b"{") else [])
                entries = [self._entry(p, files) for p in wanted]
                return self._send(h, 200, [e for e in entries if e])
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            prefix = sub.strip("/")
            if prefix and not any(p.startswith(prefix + "/") for p in files):
                return self._send(h, 404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound"}, body)
            out, dirs = [], set()
            for p in sorted(files):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rel = p[len(prefix) + 1:] if prefix else p
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(([prefix] if prefix else []) + parts[:i])
                    if d not in dirs and (recursive or i == 1):
                        dirs.add(d)
                        out.append({"type": "directory", "path": d, "oid": sha})
                if recursive or len(parts) == 1:
                    out.append(self._entry(p, files))
            return self._send(h, 200, out, None, body)
        return self._send(h, 404, {"error": f"fake hub: no api route {rest}"}, None, body)

    @staticmethod
    def _entry(p: str, files: dict[str, bytes]) -> dict | None:
        if p in files:
            return {"type": "file", "path": p, "size": len(files[p]),
                    "oid": hashlib.sha1(files[p]).hexdigest()}
        if any(f.startswith(p.rstrip("/") + "/") for f in files):
            return {"type": "directory", "path": p, "oid": "0" * 40}
        return None
