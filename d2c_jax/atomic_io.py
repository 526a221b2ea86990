"""Atomic outputs: every file or directory we write appears whole or not at all.

Each writer builds its output in a temp name beside the target (same filesystem) and renames it
over the target, so a crash, a SIGKILL or a full disk never leaves a half-written partition.json,
report or PEFT adapter where a user (or a resumed run) would read it. Every file is fsynced before
its rename and the parent directory after it, so a power cut cannot leave a renamed but empty
file either. Outputs get the ordinary permissions (0666 / 0777 less the umask), whatever the
writer made. Failures (a full disk included) become a UserError naming the target; leftovers of a
writer killed midway (`is_leftover`) are removed by the next run (`remove_leftovers`): a writer
holds an `flock` on its temp while it writes, so only the temps of dead writers are removed.
A directory output may carry an owner marker (`MARKER`, see `output_guard`), written inside the
temp directory so that it appears together with the output.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from typing import Any, Callable

from d2c_jax.errors import UserError


_WHAT_TO_DO = {
    errno.ENOSPC: "free some disk space, then re-run the same command",
    errno.EDQUOT: "free some disk quota, then re-run the same command",
    errno.EACCES: "make the directory writable or choose another path",
    errno.EPERM: "make the directory writable or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOTDIR: "a component of the path is a file; remove it or choose another path",
    errno.EEXIST: "a component of the path is a file; remove it or choose another path",
    errno.EISDIR: "a directory is in the way; remove it or choose another path",
}


def save_error(path: str, what: str, e: OSError) -> UserError:
    """The one line for an OS error of a write: the path, the error, and what to do about it."""
    hint = _WHAT_TO_DO.get(e.errno or 0)
    return UserError(path, f"cannot write{' ' + what if what else ''}: {e}" + (f" — {hint}" if hint else ""))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()

MARKER = ".d2c_output"  # {"written_by": "d2c_jax", "command": ...} in an output directory of ours


def is_leftover(name: str) -> bool:
    """Whether a directory entry is the temp or moved-aside name of an interrupted atomic write."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def _lock(fd: int) -> None:
    """Marks a temp as live (its writer holds this until the rename); a no-op where flock is
    unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def _is_live(path: str) -> bool:
    """Whether a live writer holds the temp at `path` (its flock); never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def leftovers_of(path: str) -> list[str]:
    """The temp and moved-aside names beside `path` that an atomic write of `path` creates."""
    parent, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    prefixes = (f".{base}.tmp-", f".{base}.old-")
    return [os.path.join(parent, n) for n in sorted(names) if n.startswith(prefixes)]


def remove_leftovers(path: str) -> None:
    """Removes what a killed atomic write of `path` left beside it (not a live writer's temp)."""
    for leftover in leftovers_of(path):
        if not _is_live(leftover):
            try:
                remove_path(leftover)
            except FileNotFoundError:
                pass  # removed meanwhile by another process


def nofollow(path: str, flags: int) -> int:
    """An `opener` for open(): never through a symbolic link (ELOOP instead)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (directories: so that the renames inside are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_tree(root: str) -> None:
    """fsync every file and directory under root (root last) and give them the usual modes."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o666 & ~_UMASK)
            fsync_path(path)
        os.chmod(dirpath, 0o777 & ~_UMASK)
        fsync_path(dirpath)


def remove_path(path: str) -> None:
    """Removes a file, link or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes into a temp file beside `path`, then renames it over `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    remove_leftovers(path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    except OSError as e:
        raise save_error(path, "", e) from None
    try:
        _lock(fd)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
        fsync_path(parent)
    except OSError as e:
        remove_path(tmp)
        raise save_error(path, "", e) from None
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_dir_atomic(out_dir: str, write_fn: Callable[[str], None], what: str = "output",
                     keep_existing: Callable[[str], bool] | None = None, owner: str | None = None) -> None:
    """Calls write_fn(tmp_dir) on a temp dir beside out_dir, then swaps it in for out_dir.

    An existing out_dir is moved aside first and removed only after the new one is in place, so
    at every moment out_dir is either the old complete directory or the new one.

    `keep_existing` tolerates a concurrent writer: when the final swap fails and
    keep_existing(out_dir) is true (out_dir now holds an equally good result of someone else),
    ours is dropped (with the old directory moved aside, if any) and this returns normally.
    `owner` (a command name): write the MARKER that makes the output recognisably ours.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    remove_leftovers(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise save_error(out_dir, f"the {what} directory", e) from None
    try:
        _lock(fd)
        write_fn(tmp)
        if owner is not None:
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                json.dump({"written_by": "d2c_jax", "command": owner}, f)
                f.write("\n")
        finish_tree(tmp)
        old = None
        if os.path.lexists(out_dir):
            if not os.path.isdir(out_dir) or os.path.islink(out_dir):
                raise UserError(out_dir, "exists and is not a directory")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if keep_existing is None or not keep_existing(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else's result is in place: keep it
        fsync_path(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(out_dir, f"the {what}", e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
