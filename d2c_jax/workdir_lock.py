"""One run per workdir: an advisory `fcntl.flock` on `<workdir>/.d2c.lock`, held for the whole run.

A retried job whose first copy still runs would otherwise write the same checkpoints and outputs.
The lock file holds the holder's pid (for the message of the second run); the kernel releases the
lock when the holder exits in any way (SIGKILL included), so a stale lock file never blocks.
`flock` works on local file systems and on NFS (Linux emulates it with POSIX locks there).
The lock file is never opened through a symbolic link, nor written when it is a hard link or not
a regular file: a planted `.d2c.lock` pointing to a user's file would otherwise be truncated.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from d2c_jax.errors import UserError

LOCK_NAME = ".d2c.lock"


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the lock; a second holder gets a UserError at once."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            # Never through a link: a .d2c.lock pointing to a user's file would be truncated.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(self.path, "is a symbolic link, which d2c_jax never creates; refusing to open it "
                                "— remove it (the file it points to is not touched)") from None
            raise UserError(self.workdir, f"cannot create the lock file {LOCK_NAME}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise UserError(self.path, f"is {what}, which d2c_jax never creates; refusing to write it — remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise UserError(self.workdir, f"another run is using this --workdir ({who} holds {LOCK_NAME}); "
                            "wait for it to end or choose another --workdir") from None
        except OSError as e:
            os.close(fd)
            raise UserError(self.workdir, f"cannot lock {LOCK_NAME}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
