"""gs:// inputs: a bucket prefix mirrored once into a local cache directory, through gcsfs.

`local_dir(path)` returns a local directory as it is; for `gs://bucket/prefix` it lists every
object under the prefix with its generation, and returns `<cache dir>/gcs/<bucket>/<prefix>/<key>`
where key hashes that listing: the objects are downloaded into a temporary directory beside it
and renamed into place, so a mirror is complete or absent, and a re-run whose objects did not
change downloads nothing (an object rewritten in the bucket gets a new generation, so a new
mirror). The cache dir is fingerprint.cache_dir() ($D2C_CACHE_DIR, else $XDG_CACHE_HOME/d2c_jax).

The client is gcsfs (what etils/Orbax use for gs:// paths) with the machine's Google credentials;
with STORAGE_EMULATOR_HOST set, every request goes to that endpoint, unauthenticated, and the
gRPC bucket-type probe an emulator cannot answer is skipped. A missing bucket or prefix, a
refused request or an unreachable endpoint is one UserError naming the gs:// path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from d2c_jax.errors import UserError
from d2c_jax.fingerprint import cache_dir


def is_gcs(path: str | None) -> bool:
    return bool(path) and str(path).startswith("gs://")


def filesystem():
    """A gcsfs.GCSFileSystem for this environment (STORAGE_EMULATOR_HOST honoured)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        import gcsfs
        from gcsfs.core import GCSFileSystem
    except ImportError:
        raise UserError(None, "gs:// paths need gcsfs: pip install 'd2c_jax[gcs]'") from None
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # a traceback per failed retry; UserError says it once
    if emulator:  # the JSON API only: not gcsfs's default class, whose gRPC bucket probe an emulator cannot answer
        return GCSFileSystem(token="anon", endpoint_url=endpoint(), skip_instance_cache=True)
    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def endpoint() -> str:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    return (emulator if "://" in emulator else f"http://{emulator}") if emulator else "https://storage.googleapis.com"


def listing(fs, path: str) -> dict[str, dict]:
    """{relative name: gcsfs object info} of every object under the gs:// prefix `path` ({} when
    none); a refused request or an unreachable endpoint is one UserError naming `path`."""
    prefix = path[len("gs://"):].rstrip("/")
    try:
        found = fs.find(prefix, detail=True)
    except FileNotFoundError:
        found = {}
    except OSError:  # aiohttp's connection errors, after gcsfs's retries
        raise UserError(path, f"cannot reach the GCS endpoint {endpoint()}: check the network (or "
                        "STORAGE_EMULATOR_HOST)") from None
    except Exception as e:  # noqa: BLE001 - gcsfs raises HttpError for refusals
        raise UserError(path, f"cannot list it: {type(e).__name__}: {' '.join(str(e).split())[:200]}; check the "
                        "bucket name and that this machine's Google credentials may read it") from None
    return {name[len(prefix) + 1:]: info for name, info in found.items()
            if name.startswith(prefix + "/") and not name.endswith("/")}


def local_dir(path: str) -> str:
    """`path` itself when local; a gs:// prefix's complete local mirror (see the module docstring)."""
    if not is_gcs(path):
        return path
    fs = filesystem()
    prefix = path[len("gs://"):].rstrip("/")
    objects = {rel: str(info.get("generation", info.get("etag", ""))) + f":{info.get('size')}"
               for rel, info in listing(fs, path).items()}
    if not objects:
        raise UserError(path, "no such directory in the bucket (no objects under this prefix)")
    key = hashlib.sha256(json.dumps([path, sorted(objects.items())]).encode()).hexdigest()[:16]
    dest = os.path.join(cache_dir(), "gcs", *prefix.split("/"), key)
    if os.path.isdir(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=os.path.dirname(dest))
    try:
        for rel in sorted(objects):
            local = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(f"{prefix}/{rel}", local)
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(dest):  # another process mirrored the same listing first
            return dest
        raise UserError(path, f"cannot copy it to {os.path.dirname(dest)}: {type(e).__name__}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
