"""A directory built once, atomically, and reused while its manifest says it is complete.

The built-in suite (`suite/build.py`) and the benchmark fixture (`experiments/benchmark`) are both
expensive, deterministic functions of their settings. `ensure_dir` returns at once when the
directory already holds a complete build (`is_complete`, usually a manifest check); otherwise it
builds into a temp dir beside the target (`atomic_io.write_dir_atomic`) and swaps it in, so a
directory holding the manifest always holds a complete build. A build that a concurrent process
installed meanwhile is kept. An existing target is replaced only when it is ours (empty, holding
our manifest, or only our top-level parts): never a user's unrelated directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Collection

from d2c_jax.atomic_io import write_dir_atomic
from d2c_jax.errors import UserError


def read_manifest(root: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The JSON object in `root/name`, or None when there is none or it is unreadable."""
    try:
        with open(os.path.join(str(root), name), encoding="utf-8") as f:
            out = json.load(f)
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def write_manifest(root: str, name: str, doc: dict[str, Any]) -> None:
    """Writes the manifest (last, inside the temp build dir: the swap makes it appear atomically)."""
    with open(os.path.join(root, name), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")


def file_hashes(root: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file below `root`, sorted by path."""
    files = {}
    for dirpath, _, fnames in os.walk(root):
        for fn in fnames:
            full = os.path.join(dirpath, fn)
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            files[rel] = {"bytes": os.path.getsize(full), "sha256": h.hexdigest()}
    return dict(sorted(files.items()))


def files_present(root: str | os.PathLike, files: Any) -> bool:
    """True when every file of a `file_hashes` listing is there at its recorded size (cheap: no
    re-hashing)."""
    if not isinstance(files, dict):
        return False
    for rel, info in files.items():
        try:
            if os.path.getsize(os.path.join(str(root), rel)) != info["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def replaceable(root: str, manifest: str, parts: Collection[str]) -> bool:
    if not os.path.isdir(root) or os.path.islink(root):
        return False
    entries = set(os.listdir(root))
    return not entries or manifest in entries or entries <= set(parts)


def ensure_dir(root: str | os.PathLike, build: Callable[[str], None], *, manifest: str,
               parts: Collection[str], is_complete: Callable[[str], bool], what: str,
               force: bool = False) -> bool:
    """Makes `root` hold a complete build; returns True when it built one (False: cache hit).

    `build(tmp)` writes everything, the manifest last; `parts` are the top-level names a build
    holds (a leftover of only those may be replaced); `force` rebuilds a complete one too.
    """
    root = os.path.abspath(str(root))
    if not force and is_complete(root):
        return False
    if os.path.lexists(root) and not replaceable(root, manifest, parts):
        raise UserError(root, f"exists and is not a d2c_jax {what} (no {manifest}); refusing to overwrite it "
                        "— choose another directory")
    write_dir_atomic(root, build, what=what, keep_existing=is_complete)
    return True
