"""A real GCS JSON API on 127.0.0.1 for tests: gcp-storage-emulator, started and stopped here.

`gcs_emulator()` starts `gcp-storage-emulator` (in memory, one bucket `bkt`) on a free port and
yields its URL, for STORAGE_EMULATOR_HOST; `upload(fs, local_dir, "bkt/prefix")` copies a
directory tree into it through gcsfs.
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
