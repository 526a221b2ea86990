"""gs:// work directories: the run works in a local staging directory; the bucket holds the run.

A search run with `--workdir=gs://bucket/path` does everything on local disk exactly as for a
local workdir (Orbax checkpoints with our commit marker, fallback, metrics log, atomic outputs),
in `<cache dir>/gcs-workdirs/<bucket>/<path>/run`, and this module keeps the bucket the source of
truth:

  lock   `<path>/.d2c.lock` is an object created with the does-not-exist precondition
         (ifGenerationMatch=0) holding {host, pid, heartbeat}; the holder rewrites it every
         HEARTBEAT_S seconds with ifGenerationMatch=<its generation>. A lock whose holder is gone
         (on this host: its pid is not running; elsewhere: no heartbeat for STALE_S seconds) is
         taken over, with one warning line, by a write conditional on the stale generation (of
         two runs taking it over, one wins). A lock taken over from a live run makes that run stop
         at its next push with one line.
  pull   after locking: the staging directory is made equal to the bucket's objects, leaving out a
         checkpoint step without its `d2c_committed` object, temp objects and the lock.
  push   after the workdir is prepared, after each committed checkpoint and after the outputs: every
         changed local file is uploaded as a temp object (`.<name>.tmp-<id>`) and then copied onto
         its name with ifGenerationMatch = the generation this run last saw there (0: absent), so
         a reader never sees half an object and a write by another run is refused instead of
         overwritten; objects gone locally are deleted under the same precondition. Markers go
         last when written and first when deleted (a step's `d2c_committed`, then
         `partition.json`), so an interrupted push leaves a bucket in which an uncommitted step
         never counts and an unfinished run never looks finished.

Only process 0 locks and pushes; every process pulls into its own staging directory (each host's
Orbax restore reads its own copy). gcsfs is the client (`storage.filesystem`: STORAGE_EMULATOR_HOST
honoured); the conditional copy and delete go through gcsfs's own JSON-API call.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Iterator

from d2c_jax import storage
from d2c_jax.atomic_io import is_leftover, remove_path, write_bytes_atomic
from d2c_jax.errors import UserError
from d2c_jax.fingerprint import cache_dir

LOCK_OBJECT = ".d2c.lock"  # the same name as the local lock file (workdir_lock.LOCK_NAME)
COMMITTED = "d2c_committed"  # checkpoint.COMMITTED
FINISHED = "partition.json"  # pipeline.PARTITION
HEARTBEAT_S = 30.0
STALE_S = 600.0  # 20 missed heartbeats


def split(url: str) -> tuple[str, str]:
    """('bucket', 'path') of gs://bucket/path (path without slashes at its ends)."""
    bucket, _, prefix = url[len("gs://"):].strip("/").partition("/")
    if not bucket or not prefix:
        raise UserError(url, "a gs:// work directory needs a bucket and a path in it: gs://BUCKET/PATH")
    if any(part in ("", ".", "..") for part in prefix.split("/")):  # the staging path must stay in the cache
        raise UserError(url, "a gs:// work directory path may not hold empty, '.' or '..' components")
    return bucket, prefix


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def _step(rel: str) -> str | None:
    """'checkpoints/[sub/]S' for a file of checkpoint step S, else None."""
    parts = rel.split("/")
    if parts[0] != "checkpoints":
        return None
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            return "/".join(parts[:i + 1])
    return None


def _kept(rel: str, names: set[str]) -> bool:
    """Whether a file (relative name) belongs to the run: not the lock, not a temp or Orbax's
    temporary step, not a file of a step without its commit marker among `names`."""
    if rel == LOCK_OBJECT or any(is_leftover(p) or "orbax-checkpoint-tmp" in p for p in rel.split("/")):
        return False
    step = _step(rel)
    return step is None or f"{step}/{COMMITTED}" in names


def _order(rel: str) -> int:
    """Upload order (deletes: reversed): files, then step markers, then partition.json."""
    return 2 if rel == FINISHED else 1 if rel.endswith("/" + COMMITTED) else 0


class GcsWorkdir:
    """One gs:// work directory: its staging directory, lock, pull and push (module docstring)."""

    def __init__(self, url: str):
        self.bucket, self.prefix = split(url)
        self.url = f"gs://{self.bucket}/{self.prefix}"
        self.root = os.path.join(cache_dir(), "gcs-workdirs", self.bucket, *self.prefix.split("/"))
        self.staging = os.path.join(self.root, "run")
        self.fs = storage.filesystem()
        self._seen: dict[str, tuple[str, str]] = {}  # rel -> (md5, generation) of what the bucket holds
        self._lock_generation: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.found = 0  # objects under the path at the last probe, our temp objects left out
        self._views = [self.staging]  # local directories that stand for the gs:// path
        self._digests: dict[str, tuple[tuple[int, int], str]] = {}  # path -> ((size, mtime), md5)

    # ------------------------------------------------------------------ names

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def shown(self, text: str) -> str:
        """`text` (a path, a message) with the staging directory named as the user's gs:// path."""
        for local in sorted(self._views, key=len, reverse=True):
            text = text.replace(local + os.sep, self.url + "/").replace(local, self.url)
        return text

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        """UserErrors about staging paths name the gs:// path instead."""
        try:
            yield
        except UserError as e:
            path = None if e.path is None else self.shown(e.path)
            if (path, self.shown(e.message)) != (e.path, e.message):
                raise UserError(path, self.shown(e.message)) from None
            raise

    # ------------------------------------------------------------------ requests

    def _list(self) -> dict[str, dict[str, Any]]:
        try:
            self.fs.info(self.bucket)
        except FileNotFoundError:
            raise UserError(self.url, f"no such bucket: gs://{self.bucket} (create it, e.g. `gcloud storage "
                            f"buckets create gs://{self.bucket}`, or check the name)") from None
        except OSError:
            raise UserError(self.url, f"cannot reach the GCS endpoint {storage.endpoint()}: check the network "
                            "(or STORAGE_EMULATOR_HOST)") from None
        except Exception as e:  # noqa: BLE001 - gcsfs raises HttpError for refusals
            raise UserError(self.url, f"cannot read the bucket: {type(e).__name__}: {' '.join(str(e).split())[:200]}; "
                            "check that this machine's Google credentials may use it") from None
        self.fs.invalidate_cache()
        return storage.listing(self.fs, self.url)

    def _write(self, rel: str, data: bytes, if_generation: str) -> str:
        """Writes `data` to object rel atomically (a temp object copied onto it) if its generation
        is still `if_generation` ('0': absent); the new generation. FileExistsError: it was not."""
        sys.audit("d2c_jax.gcs_write", f"gs://{self.bucket}/{self._key(rel)}")  # for tests that stop a run here
        head, _, name = rel.rpartition("/")
        tmp = f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}" if head else f".{name}.tmp-{uuid.uuid4().hex[:12]}"
        self.fs.pipe_file(f"{self.bucket}/{self._key(tmp)}", data, mode="create")
        try:
            out = self.fs.call("POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", self.bucket, self._key(tmp), self.bucket,
                               self._key(rel), json_out=True, ifGenerationMatch=if_generation,
                               headers={"Content-Type": "application/json"})
            while not out.get("done"):
                out = self.fs.call("POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", self.bucket, self._key(tmp), self.bucket,
                                   self._key(rel), json_out=True, ifGenerationMatch=if_generation,
                                   rewriteToken=out["rewriteToken"], headers={"Content-Type": "application/json"})
        finally:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self._key(tmp))
        return str(out["resource"]["generation"])

    def _delete(self, rel: str, if_generation: str) -> None:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self._key(rel), ifGenerationMatch=if_generation)
        except FileNotFoundError:
            pass

    def _failed(self, rel: str, e: BaseException) -> UserError:
        if isinstance(e, FileExistsError):
            return UserError(f"{self.url}/{rel}", "changed in the bucket while this run held the lock: another "
                             "run writes to this --workdir; stop it, then re-run this command to resume")
        if isinstance(e, UserError):
            return e
        return UserError(f"{self.url}/{rel}", f"cannot write it: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}; re-run the same command to resume from the last "
                         "checkpoint in the bucket")

    # ------------------------------------------------------------------ lock

    def _lock_body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}).encode()

    def acquire(self) -> None:
        """Creates the lock object (or takes over a stale one) and starts its heartbeat."""
        self._list()  # the bucket exists and is reachable: one line otherwise
        try:
            self._lock_generation = self._write(LOCK_OBJECT, self._lock_body(), "0")
        except FileExistsError:
            self._lock_generation = self._take_over()
        except Exception as e:  # noqa: BLE001 - refused or unreachable
            raise self._failed(LOCK_OBJECT, e) from None
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="d2c-gcs-lock", daemon=True)
        self._heartbeat.start()

    def _take_over(self) -> str:
        lock = f"{self.url}/{LOCK_OBJECT}"
        try:
            info = self.fs.info(f"{self.bucket}/{self._key(LOCK_OBJECT)}")
            holder = json.loads(self.fs.cat_file(f"{self.bucket}/{self._key(LOCK_OBJECT)}"))
        except FileNotFoundError:  # released meanwhile
            holder, info = {}, {"generation": "0"}
        except (ValueError, TypeError):
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        same_host = holder.get("host") == socket.gethostname()
        gone = same_host and isinstance(holder.get("pid"), int) and not _running(holder["pid"])
        who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "an unknown holder"
        if info["generation"] != "0" and not gone and age < STALE_S:
            raise UserError(self.url, f"another run is using this --workdir ({who} holds {LOCK_OBJECT}, last "
                            f"heartbeat {max(age, 0):.0f} s ago); wait for it to end or choose another --workdir")
        try:
            generation = self._write(LOCK_OBJECT, self._lock_body(), str(info["generation"]))
        except FileExistsError:
            raise UserError(self.url, "another run took over this --workdir's stale lock at the same time; "
                            "wait for it to end or choose another --workdir") from None
        if info["generation"] != "0":
            why = "is not running" if gone else f"sent no heartbeat for {age:.0f} s (over {STALE_S:.0f} s)"
            print(f"warning: {lock}: taking over the lock of {who}, which {why}", file=sys.stderr, flush=True)
        return generation

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._lock_generation = self._write(LOCK_OBJECT, self._lock_body(), self._lock_generation)
            except FileExistsError:
                self._lost = "another run took over its lock"
                return
            except Exception:  # noqa: BLE001 - a missed heartbeat; the next one may pass
                continue

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock object if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._lock_generation is not None and self._lost is None:
            with contextlib.suppress(Exception):
                self._delete(LOCK_OBJECT, self._lock_generation)
        self._lock_generation = None

    # ------------------------------------------------------------------ pull / push

    def _local(self) -> dict[str, str]:
        """{relative name: path} of the run's files in the staging directory."""
        out = {}
        for root, dirs, names in os.walk(self.staging):
            dirs[:] = [d for d in dirs if not is_leftover(d)]
            for name in names:
                path = os.path.join(root, name)
                out[os.path.relpath(path, self.staging).replace(os.sep, "/")] = path
        names = set(out)
        return {rel: path for rel, path in out.items() if _kept(rel, names) and not os.path.islink(path)}

    def pull(self) -> None:
        """Makes the staging directory hold the bucket's committed state (module docstring)."""
        objects = self._list()
        self._seen = {rel: (info.get("md5Hash", ""), str(info["generation"])) for rel, info in objects.items()
                      if rel != LOCK_OBJECT}
        wanted = {rel for rel in objects if _kept(rel, set(objects))}
        for root, dirs, names in os.walk(self.staging):  # everything else goes: leftovers included
            for name in dirs + names:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.staging).replace(os.sep, "/")
                if rel != LOCK_OBJECT and rel not in wanted and not any(w.startswith(rel + "/") for w in wanted):
                    remove_path(path)
        try:
            for rel in sorted(wanted):
                path = os.path.join(self.staging, *rel.split("/"))
                if os.path.isfile(path) and _md5(path) == self._seen[rel][0]:
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_bytes_atomic(path, self.fs.cat_file(f"{self.bucket}/{self._key(rel)}"))
        except OSError as e:
            raise UserError(self.url, f"cannot copy it to {self.staging}: {type(e).__name__}: {e}") from None
        for root, dirs, names in os.walk(self.staging, topdown=False):  # directories of removed steps
            if root != self.staging and not dirs and not names:
                os.rmdir(root)

    def push(self) -> None:
        """Makes the bucket hold the staging directory's committed state (module docstring)."""
        if self._lost is not None:
            raise UserError(self.url, f"{self._lost} (no heartbeat reached the bucket for {STALE_S:.0f} s); this run "
                            "stops without writing more: re-run the command once the other run has ended")
        local = self._local()
        digests = {rel: self._digest(path) for rel, path in local.items()}
        uploads = sorted((rel for rel in local if self._seen.get(rel, ("",))[0] != digests[rel]), key=_order)
        deletes = sorted((rel for rel in self._seen if rel not in local), key=_order, reverse=True)
        for rel in [r for r in deletes if _order(r)]:  # markers first: nothing looks committed meanwhile
            self._remove(rel)
        for rel in uploads:
            try:
                with open(local[rel], "rb") as f:
                    generation = self._write(rel, f.read(), self._seen.get(rel, ("", "0"))[1])
            except Exception as e:  # noqa: BLE001
                raise self._failed(rel, e) from None
            self._seen[rel] = (digests[rel], generation)
        for rel in [r for r in deletes if not _order(r)]:
            self._remove(rel)

    def _digest(self, path: str) -> str:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        if self._digests.get(path, (None,))[0] != key:
            self._digests[path] = (key, _md5(path))
        return self._digests[path][1]

    def _remove(self, rel: str) -> None:
        try:
            self._delete(rel, self._seen[rel][1])
        except Exception as e:  # noqa: BLE001
            raise self._failed(rel, e) from None
        del self._seen[rel]

    @contextlib.contextmanager
    def probe(self, names: tuple[str, ...]) -> Iterator[str]:
        """A fresh local directory holding the bucket's objects `names` (those present), for the
        checks made before the lock is taken; removed afterwards."""
        objects = self._list()
        self.found = sum(not any(is_leftover(p) for p in rel.split("/")) for rel in objects)  # our temps: nothing
        os.makedirs(self.root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".probe.tmp-", dir=self.root)
        self._views.append(tmp)
        try:
            for name in names:
                if name in objects:
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(self.fs.cat_file(f"{self.bucket}/{self._key(name)}"))
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._views.remove(tmp)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
