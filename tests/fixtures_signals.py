"""A launcher that runs a script under a Python audit hook which sends the process real signals at
chosen moments, for the signal and kill tests (no sleeps: each moment is hit deterministically).

A plan is a comma-separated list of `kind:pattern:n:SIGNAME`: at the n-th audit event of `kind`
("import": a module whose name contains the pattern; "fs": a file-system write, or the read of a
tokenizer.json, or an object written to a gs:// workdir, whose path contains it) the process sends itself SIGNAME (SIGINT, SIGTERM, SIGHUP,
SIGKILL), or, for SIGNAME = ENOSPC, that write fails as on a full disk (OSError ENOSPC raised by the
hook, so the operation never happens; Python-level writes only: not inside XLA or TensorStore).
This file holds no tests.
"""

from __future__ import annotations

import sys

LAUNCHER = r"""
import errno, os, runpy, signal, sys
plan = [(p.split(":", 1)[0], *p.split(":", 1)[1].rsplit(":", 2))  # event:pattern:n:SIGNAME (pattern may hold ":")
        for p in os.environ["D2C_TEST_SIGNALS"].split(",")]
counts = [0] * len(plan)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def paths_of(event, args):
    if event == "import":
        return [args[0]]
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)):
            return []
        path = os.fsdecode(path)
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
        return [path] if writing or path.endswith("tokenizer.json") else []
    if event == "d2c_jax.gcs_write":  # an object written to a gs:// workdir (gcs_workdir)
        return [args[0]]
    if event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp"):
        return [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    return []

def hook(event, args):
    for i, (kind, pattern, n, name) in enumerate(plan):
        if kind != ("import" if event == "import" else "fs"):
            continue
        if any(pattern in os.fsdecode(p) for p in paths_of(event, args) if not isinstance(p, int)):
            counts[i] += 1
            if counts[i] == int(n):
                if name == "ENOSPC":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(paths_of(event, args)[0]))
                os.kill(os.getpid(), getattr(signal, name))

sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def signalled(cmd: list[str], env: dict[str, str], plan: str | None) -> tuple[list[str], dict[str, str]]:
    """cmd ([python, script, args...]) and env run under the launcher with `plan` (None: unchanged)."""
    if not plan:
        return cmd, env
    return [sys.executable, "-c", LAUNCHER, *cmd[1:]], {**env, "D2C_TEST_SIGNALS": plan}
