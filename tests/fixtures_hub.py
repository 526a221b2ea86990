"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests without a network.

`FakeHub` serves, over HTTP, the part of the Hub API that huggingface_hub's download and upload
functions call: repo info at a revision, the recursive file tree, file HEAD/GET under
/resolve/, repo creation, README metadata validation, preupload and NDJSON commits (every file "regular", base64 inline).
Errors carry the Hub's X-Error-Code header (RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound), so huggingface_hub raises its own typed errors. Point a client at it with
HF_ENDPOINT=hub.url (`hub.env()` gives the variables, with telemetry and Xet off). The cache
such a client fills is huggingface_hub's own layout, not ours.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import threading
import urllib.parse
from typing import Mapping

FILE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
API_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree|preupload|commit)/(?P<rev>[^/]+)"
                       r"(?:/(?P<path>.*))?$")


class FakeRepo:
    def __init__(self, private: bool, gated: bool):
        self.private, self.gated = private, gated
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def commit(self, files: Mapping[str, bytes], branch: str = "main", *, replace: bool = False) -> str:
        parent = {} if replace or branch not in self.refs else dict(self.commits[self.refs[branch]])
        parent.update(files)
        sha = hashlib.sha1(json.dumps([self.refs.get(branch), sorted((k, hashlib.sha1(v).hexdigest())
                                                                     for k, v in parent.items())]).encode()).hexdigest()
        self.commits[sha] = parent
        self.refs[branch] = sha
        return sha

    def at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(rev, rev)
        return (sha, self.commits[sha]) if sha in self.commits else None


class FakeHub:
    """The stand-in server; a context manager (started on enter, stopped on exit)."""

    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.cards: list[dict] = []  # the YAML headers of the READMEs validated
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self, cache: str | os.PathLike, **extra: str) -> dict[str, str]:
        """Environment variables for a client of this stand-in with its Hub cache at `cache`."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_CACHE": os.fspath(cache), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "0", **extra}

    # ------------------------------------------------------------------ repos

    def add_repo(self, repo: str, files: Mapping[str, bytes] | None = None, *, private: bool = False,
                 gated: bool = False) -> str | None:
        """Creates `repo` with one commit of `files` (none: empty); returns that commit."""
        self.repos[repo] = FakeRepo(private, gated)
        return self.repos[repo].commit(files) if files else None

    def add_dir(self, repo: str, directory: str | os.PathLike, prefix: str = "", **kw) -> str:
        """Creates (or commits to) `repo` with every file under `directory`, under `prefix`."""
        files = {}
        for root, _, names in os.walk(directory):
            for n in names:
                full = os.path.join(root, n)
                files[prefix + os.path.relpath(full, directory).replace(os.sep, "/")] = open(full, "rb").read()
        if repo not in self.repos:
            return self.add_repo(repo, files, **kw)
        return self.repos[repo].commit(files)

    def files(self, repo: str, rev: str = "main") -> dict[str, bytes]:
        return self.repos[repo].at(rev)[1]

    # ------------------------------------------------------------------ HTTP

    def _reply(self, h, status: int, body: bytes = b"", *, headers: Mapping[str, str] | None = None,
               head: bool = False, content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, head: bool = False) -> None:
        self._reply(h, status, json.dumps({"error": code}).encode(), headers={"X-Error-Code": code}, head=head)

    def _handle(self, h, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path)
        self.requests.append((method, path))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        authorised = bool(h.headers.get("Authorization"))
        if method == "POST" and path == "/api/repos/create":
            doc = json.loads(body)
            repo = f"{doc['organization']}/{doc['name']}" if doc.get("organization") else doc["name"]
            if not authorised:
                return self._error(h, 401, "Unauthorized")
            if repo in self.repos:
                return self._reply(h, 409, json.dumps({"error": "You already created this model repo",
                                                       "url": f"{self.url}/{repo}"}).encode())
            self.add_repo(repo, private=doc.get("visibility", "public") == "private"
                          or bool(doc.get("private")))
            return self._reply(h, 200, json.dumps({"url": f"{self.url}/{repo}", "name": repo}).encode())
        if method == "POST" and path == "/api/validate-yaml":  # a README's YAML header, as the Hub checks it
            return self._validate_yaml(h, json.loads(body)["content"])
        m = API_ROUTE.match(path) or FILE_ROUTE.match(path)
        if m is None:
            return self._error(h, 404, "NotFound", head=method == "HEAD")
        repo = self.repos.get(m["repo"])
        if repo is None or (repo.private and not authorised):
            return self._error(h, 404 if repo is None else 401, "RepoNotFound", head=method == "HEAD")
        what = m.groupdict().get("what")
        if what in ("preupload", "commit") and not authorised:
            return self._error(h, 401, "Unauthorized")
        if what == "commit":
            return self._commit(h, repo, m["repo"], m["rev"], body)
        at = repo.at(m["rev"])
        if at is None:
            if what == "preupload":  # an empty repo: everything is new
                files = json.loads(body)["files"]
                return self._reply(h, 200, json.dumps({"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}).encode())
            return self._error(h, 404, "RevisionNotFound", head=method == "HEAD")
        sha, files = at
        if what == "revision":
            doc = {"id": m["repo"], "modelId": m["repo"], "sha": sha, "private": repo.private,
                   "gated": "auto" if repo.gated else False,
                   "siblings": [{"rfilename": p} for p in sorted(files)]}
            return self._reply(h, 200, json.dumps(doc).encode())
        if what == "tree":
            prefix = (m["path"] or "").strip("/")
            entries = [{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": p}
                       for p, data in sorted(files.items()) if not prefix or p.startswith(prefix + "/")]
            return self._reply(h, 200, json.dumps(entries).encode())
        if what == "preupload":
            files_in = json.loads(body)["files"]
            return self._reply(h, 200, json.dumps({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files_in]}).encode())
        # /resolve/: a file
        if repo.gated and not authorised:
            return self._error(h, 403, "GatedRepo", head=method == "HEAD")
        data = files.get(m["path"])
        if data is None:
            return self._error(h, 404, "EntryNotFound", head=method == "HEAD")
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        self._reply(h, 200, data, headers={"X-Repo-Commit": sha, "ETag": etag}, head=method == "HEAD",
                    content_type="application/octet-stream")

    def _validate_yaml(self, h, content: str) -> None:
        import yaml

        head = content.split("---\n")[1] if content.startswith("---\n") else ""
        try:
            meta = yaml.safe_load(head)
        except yaml.YAMLError as e:
            meta = str(e)
        if not isinstance(meta, dict):
            return self._reply(h, 400, json.dumps({"errors": [{"message": f"bad metadata: {meta!r}"}]}).encode(),
                               headers={"X-Error-Code": "BadRequest"})
        self.cards.append(meta)
        self._reply(h, 200, b"{}")

    def _commit(self, h, repo: FakeRepo, repo_id: str, rev: str, body: bytes) -> None:
        files: dict[str, bytes] = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] not in ("header",):
                return self._reply(h, 400, json.dumps({"error": f"unsupported {item['key']}"}).encode())
        sha = repo.commit(files, urllib.parse.unquote(rev))
        self._reply(h, 200, json.dumps({"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None}).encode())
