"""Child processes started side by side: each pays its own jax import and compilations, which use
one core; started together they share the machine's cores instead of queueing one after another.

`run_together(argvs, **popen_kwargs)` runs several commands at once and returns their
CompletedProcess in order; `Started` starts named commands now (e.g. in a module fixture) and
hands each one's CompletedProcess back when a test asks for it, so in-process tests run while
they do. Neither changes what a child does or what the tests assert about its output.
"""

from __future__ import annotations

import subprocess
from typing import Mapping, Sequence

TIMEOUT = 600


def _start(argv: Sequence[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """The process's CompletedProcess, once it ended (killed if it runs past `timeout`)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} ran past {timeout} s\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def run_together(argvs: Sequence[Sequence[str]], **kwargs) -> list[subprocess.CompletedProcess]:
    """Each command's CompletedProcess (in order), the commands started at once."""
    procs = [_start(argv, **kwargs) for argv in argvs]
    try:
        return [_finish(p) for p in procs]
    finally:
        _kill(procs)


class Started:
    """Named commands started at construction; `result(name)` waits for one (once, at most
    `timeout` seconds from then) and returns its CompletedProcess; `close()` kills what still
    runs (a fixture's teardown)."""

    def __init__(self, commands: Mapping[str, Sequence[str]], timeout: float = TIMEOUT, **kwargs):
        self._procs = {name: _start(argv, **kwargs) for name, argv in commands.items()}
        self._done: dict[str, subprocess.CompletedProcess] = {}
        self._timeout = timeout

    def result(self, name: str) -> subprocess.CompletedProcess:
        if name not in self._done:
            self._done[name] = _finish(self._procs[name], self._timeout)
        return self._done[name]

    def close(self) -> None:
        _kill(self._procs.values())
