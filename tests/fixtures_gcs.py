"""A real GCS JSON API on 127.0.0.1 for tests: gcp-storage-emulator, started and stopped here.

`gcs_emulator()` starts `gcp-storage-emulator` (in memory, one bucket `bkt`) on a free port and
yields its URL, for STORAGE_EMULATOR_HOST; `upload(fs, local_dir, "bkt/prefix")` copies a
directory tree into it through gcsfs; `preconditions_enforced(url)` puts a proxy in front of
it that enforces generation preconditions (the emulator ignores them).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

BUCKET = "bkt"


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                             f"--default-bucket={BUCKET}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator exited at start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def upload(fs, local_dir: str, prefix: str) -> None:
    """Every file under local_dir to gs://prefix/<relative path>."""
    for root, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            fs.pipe_file(f"{prefix}/{os.path.relpath(full, local_dir)}", open(full, "rb").read())


@contextlib.contextmanager
def preconditions_enforced(emulator_url: str) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A proxy in front of the emulator that enforces GCS's ifGenerationMatch, which
    gcp-storage-emulator accepts and ignores: (its URL, the log of (method, path?query) it saw).

    Requests are handled one at a time, so the check (the target's generation read from the
    emulator, 0 when absent) and the forwarded request are atomic, as on GCS; a mismatch answers
    412 like GCS. The target is the object named by the URL (a rewrite's destination, a compose's
    or a delete's object) or, for an upload, by its `name` (query or multipart metadata)."""
    import http.server
    import json
    import re
    import threading
    import urllib.error
    import urllib.parse
    import urllib.request

    log: list[tuple[str, str]] = []
    serial = threading.Lock()

    def generation(bucket: str, name: str) -> str:
        url = f"{emulator_url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        try:
            with urllib.request.urlopen(url) as r:
                return str(json.load(r)["generation"])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return "0"
            raise

    def target(path: str, query: dict, body: bytes) -> tuple[str, str] | None:
        m = re.match(r"^/upload/storage/v1/b/([^/]+)/o$", path)
        if m:
            if "name" in query:
                return m.group(1), query["name"][0]
            meta = re.search(rb"\{.*?\}", body, re.S)
            return m.group(1), json.loads(meta.group(0))["name"]
        m = re.match(r"^/storage/v1/b/[^/]+/o/.+/rewriteTo/b/([^/]+)/o/(.+)$", path) or re.match(
            r"^/storage/v1/b/([^/]+)/o/(.+?)(?:/compose)?$", path)
        return (m.group(1), urllib.parse.unquote(m.group(2))) if m else None

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parsed = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parsed.query)
            with serial:
                log.append((self.command, self.path))
                want = query.get("ifGenerationMatch", [None])[0]
                where = target(parsed.path, query, body) if want is not None else None
                if where is not None and generation(*where) != want:
                    return self._answer(412, {}, json.dumps({"error": {"code": 412, "message":
                                                                       "conditionNotMet"}}).encode())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(emulator_url + self.path, data=body if body else None,
                                             headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(req) as r:
                        return self._answer(r.status, r.headers, r.read())
                except urllib.error.HTTPError as e:
                    return self._answer(e.code, e.headers, e.read())

        def _answer(self, status, headers, data):
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    self.send_header(k, v)
            if not any(k.lower() == "content-type" for k in headers):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
