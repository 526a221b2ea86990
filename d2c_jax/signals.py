"""SIGTERM, SIGINT and SIGHUP: stop at a safe point with a checkpoint; never a traceback, never a crash.

`install()` is the first thing a launch script does (before jax is imported). From then on a
signal never raises KeyboardInterrupt inside library code. That was the cause of the rc 139
segfault on an early Ctrl-C: the KeyboardInterrupt surfaced at an arbitrary bytecode (inside
jaxlib's extension import, an XLA gc callback, a compile), the script printed "error:
interrupted" and the interpreter tore down its modules while XLA's and Orbax's threads still
used them. Now:

- inside a `PreemptionFlag` region (the search loop with its checkpoint commits, the writing of
  the outputs) the first signal only sets the flag; the engine polls it at the end of the
  iteration, saves a checkpoint and the run exits (0 for SIGTERM and SIGHUP: the state is saved
  and a re-run resumes; 130 for SIGINT);
- outside such a region (start-up, loading, compiling the baseline; any moment of merge,
  evaluate, make_suite, report and benchmark) the process prints one line and leaves with
  os._exit, skipping the interpreter teardown: 128 + the signal number (143 SIGTERM, 129 SIGHUP,
  130 SIGINT) unless the note says a checkpoint is kept (then 0 for SIGTERM / SIGHUP, as above).
  So every command ends non-zero unless its complete output (or the search's checkpoint) was
  written; SIGHUP (a closed terminal or ssh session) is a SIGTERM;
- a second SIGINT always leaves at once (130). Every file is written atomically and a checkpoint
  counts only once committed, so an exit at any instant corrupts nothing; the next run removes
  the temp files.

The C-level signal handler writes each signal number to a pipe (`signal.set_wakeup_fd`); a
watchdog thread reads it and decides. So a signal is acted on at once even while the main thread
waits in XLA for seconds (a Python handler would only run when that call returns).
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGHUP: 0, signal.SIGINT: 130}  # after the state was saved

_lock = threading.RLock()  # reentrant: a Python-level handler may run while the main thread holds it
_depth = 0  # nesting of PreemptionFlag regions
_received: int | None = None  # the first signal received inside a region
_installed = False
_note = "nothing was saved"  # what is kept if the process leaves now (set by the pipeline)
_saved = False  # whether _note names a saved state (a checkpoint) a re-run resumes from


def exit_code(signum: int | None) -> int:
    """After the state was saved: 0 for SIGTERM / SIGHUP (a preemption: the scheduler may
    restart), 130 for SIGINT, 0 for none."""
    return EXIT_CODES.get(signum, 0) if signum is not None else 0


def unsaved_exit_code(signum: int) -> int:
    """When the signal ends the process before its output or state was saved: 128 + signum."""
    return 128 + int(signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name


def set_note(text: str, saved: bool = True) -> None:
    """What the one-line message says is kept when a signal ends the process outside a region;
    `saved`: the text names a saved state (a checkpoint), so SIGTERM / SIGHUP then exit 0."""
    global _note, _saved
    _note, _saved = text, saved


def received() -> int | None:
    """The signal that asked the run to stop (None if none)."""
    return _received


def _exit_now(signum: int, why: str) -> None:
    # os.write, not print: the main thread may hold sys.stderr's lock.
    os.write(2, f"stopped by {name(signum)}{why}: {_note}\n".encode())
    os._exit(exit_code(signum) if _saved else unsaved_exit_code(signum))


def _on_signal(signum: int) -> None:
    global _received
    with _lock:
        if _depth == 0:
            _exit_now(signum, "")
        if _received == signal.SIGINT and signum == signal.SIGINT:
            _exit_now(signum, " a second time; leaving at once")
        if _received is None:
            _received = signum


def _watch(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        for signum in data:
            _on_signal(signum)


def _python_handler(signum: int, frame: Any) -> None:
    """The watchdog acts on the wakeup byte; a Python-level handler must exist for it to be sent."""


def _ignore_at_exit() -> None:
    """The last exit handler (registered first): the exit status is decided and its line printed.
    Past this point the interpreter's teardown would restore the default actions (the process
    killed by the signal, silently, its status lost); ignored signals it leaves alone."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def install() -> None:
    """Routes SIGTERM, SIGINT and SIGHUP through the watchdog for the rest of the process (main thread)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for s in SIGNALS:
        signal.signal(s, _python_handler)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="d2c-signals", daemon=True).start()
    atexit.register(_ignore_at_exit)
    _installed = True


class PreemptionFlag:
    """A region where SIGTERM / SIGINT / SIGHUP only set a flag; calling the object says whether one came.

    Used around the search loop (the engine polls it after each iteration and checkpoints) and
    around the writing of outputs. Without `install()` (library use, tests) the region installs
    plain Python handlers for its duration and restores the previous ones after.
    """

    def __init__(self):
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    @property
    def requested(self) -> bool:
        return _received is not None

    @property
    def signum(self) -> int | None:
        return _received

    def _handle(self, signum: int, frame: Any) -> None:
        _on_signal(signum)

    def __enter__(self) -> PreemptionFlag:
        global _depth, _received
        with _lock:
            if _depth == 0:
                _received = None
            _depth += 1
        if not _installed and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _depth
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        with _lock:
            _depth -= 1

