"""A property test of the output rules: random sequences of writes (a merge's --output_dir, with
or without --overwrite), writes SIGKILLed at a random moment, a user's files, links and live
concurrent writers, all against one directory. After every step:

- nothing of the user's changed (files, directories, the targets of links);
- a live writer's temp is never removed;
- a write that succeeded left the exact output (with our marker) and no dead temp of that target;
- a refused write changed nothing but our own dead temps;
- an output is refused exactly when it is an input, a link, or exists non-empty and not ours (or
  ours without --overwrite).

The killed writes are real: a child process runs `atomic_io.write_dir_atomic` and SIGKILLs itself
after its k-th file (so the kill lands before, inside or after the temp is filled). Bounded: at
most 25 sequences of 8 steps, a few seconds in all.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2c_jax.atomic_io import MARKER, leftovers_of, write_dir_atomic
from d2c_jax.errors import UserError
from d2c_jax.output_guard import claim_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("a", "b")

KILLED_WRITE = r"""
import os, signal, sys
from d2c_jax.atomic_io import write_dir_atomic
out, content, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
def write(tmp):
    for i in range(3):
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(os.path.join(tmp, f"part{i}"), "w") as f:
            f.write(content)
write_dir_atomic(out, write, owner="merge")
os.kill(os.getpid(), signal.SIGKILL)  # kill_after = 3: after the rename, before exiting
"""

step = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.text("xyz", min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("killed_write"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("user_file"), st.sampled_from(NAMES)),
    st.tuples(st.just("user_dir"), st.sampled_from(NAMES)),
    st.tuples(st.just("user_link"), st.sampled_from(NAMES)),
    st.tuples(st.just("live_writer"), st.sampled_from(NAMES)),
    st.tuples(st.just("write_into_input"), st.booleans()),
)


def _snapshot(paths):
    """Content of every user path (following links: what they point to must not change)."""
    out = {}
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                for f in files:
                    out[os.path.join(root, f)] = open(os.path.join(root, f), "rb").read()
            out[p] = sorted(os.listdir(p))
        else:
            out[p] = open(p, "rb").read() if os.path.exists(p) else None
    return out


def _ours(path):
    return os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(os.path.join(path, MARKER))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=8))
def test_random_commands_kills_and_user_files_never_touch_what_is_not_ours(steps):
    top = tempfile.mkdtemp(prefix="d2c_props_")
    live_fds = []
    try:
        work, inputs, users = os.path.join(top, "work"), os.path.join(top, "input"), os.path.join(top, "user")
        for d in (work, inputs, users):
            os.makedirs(d)
        with open(os.path.join(inputs, "adapter_config.json"), "w") as f:
            f.write("input")
        user_paths = [inputs]  # never to change
        live = []
        for op in steps:
            before = _snapshot(user_paths)
            kind, args = op[0], op[1:]
            if kind == "write":
                name, content, overwrite = args
                out = os.path.join(work, name)
                existed = os.path.lexists(out) and not (os.path.isdir(out) and not os.path.islink(out)
                                                         and not os.listdir(out))
                expect_ok = not existed or (_ours(out) and overwrite)
                try:
                    claim_dir(out, what="merged adapter", flag="--output_dir", command="merge", inputs=[inputs],
                              overwrite=overwrite)

                    def fill(tmp, content=content):
                        with open(os.path.join(tmp, "part0"), "w") as f:
                            f.write(content)

                    write_dir_atomic(out, fill, what="adapter", owner="merge")
                    ok = True
                except UserError:
                    ok = False
                assert ok == expect_ok, (op, existed, _ours(out))
                if ok:
                    assert open(os.path.join(out, "part0")).read() == content
                    assert _ours(out)
                    assert all(p in live for p in leftovers_of(out))  # only live writers' temps remain
            elif kind == "killed_write":
                name, kill_after = args
                out = os.path.join(work, name)
                if os.path.lexists(out) and not _ours(out):
                    continue  # the command's claim (checked above) refuses it before writing
                proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, out, "k", str(kill_after)],
                                      env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, timeout=60)
                assert proc.returncode == -signal.SIGKILL, proc.stderr
            elif kind in ("user_file", "user_dir", "user_link"):
                out = os.path.join(work, args[0])
                if os.path.lexists(out):
                    continue  # the user puts files only where nothing is
                if kind == "user_file":
                    with open(out, "w") as f:
                        f.write("mine")
                elif kind == "user_dir":
                    os.makedirs(out)
                    with open(os.path.join(out, "notes.txt"), "w") as f:
                        f.write("mine")
                else:
                    target = os.path.join(users, f"target_{args[0]}")
                    os.makedirs(target, exist_ok=True)
                    with open(os.path.join(target, "notes.txt"), "w") as f:
                        f.write("mine")
                    os.symlink(target, out)
                    user_paths.append(target)
                user_paths.append(out)
                before = _snapshot(user_paths)
            elif kind == "live_writer":
                tmp = tempfile.mkdtemp(prefix=f".{args[0]}.tmp-", dir=work)
                fd = os.open(tmp, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                live_fds.append(fd)
                live.append(tmp)
            elif kind == "write_into_input":
                out = inputs if args[0] else os.path.join(inputs, "merged")
                try:
                    claim_dir(out, what="merged adapter", flag="--output_dir", command="merge", inputs=[inputs],
                              overwrite=True)
                    raise AssertionError("an output in an input was accepted")
                except UserError as e:
                    assert "it would be destroyed" in e.message
            assert _snapshot(user_paths) == before, op
            assert all(os.path.isdir(t) for t in live), op
    finally:
        for fd in live_fds:
            os.close(fd)
        shutil.rmtree(top, ignore_errors=True)
