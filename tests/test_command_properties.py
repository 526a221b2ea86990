"""A property test of whole commands: random sequences of real launch/search.py, merge.py and
evaluate.py runs (subprocesses, on the tiny search inputs), interrupted by SIGKILL / SIGTERM /
SIGINT / SIGHUP (after a random delay, or at the n-th file-system write matching a pattern),
failed by a full disk (ENOSPC at the n-th write), re-run with the same flags or with a flag that
changes the output (with or without --overwrite), between which a user plants files, directories
and symbolic links in and beside the work and output directories, and later removes the ones in
the way. All against one work area, which starts empty or as a copy of a finished run. After
every command:

- the exit status follows the contract: 0 only with the complete output written (or the search's
  checkpoint, when a signal stopped it: "stopped by ..." on stdout), 1 with exactly one `error:`
  line (the last on stderr), 128 + the signal with exactly one "stopped by" line, killed by the
  signal only when it was sent (SIGKILL; another one only before the script started, silently);
  never a traceback;
- nothing the user planted (nor the inputs) changed: content, mode and mtime of every file, the
  target of every link and what it points to;
- after a success, no temporary (`.NAME.tmp-*`, `.NAME.old-*`) of that command's outputs is left;
- a success's outputs equal those of an uninterrupted run of the same command and flags
  (partition.json but its timings, the search's tracked metrics, the merged adapters byte for
  byte, the evaluation JSON), each reference computed once per test session, when first needed.

At the end of a sequence the user removes what is in the way and re-runs the search (with
--overwrite if it is refused as a finished run of other flags); it must succeed, as above.

Subprocesses cost seconds each (a jax import), so CI runs one fixed sequence that visits every
kind of step (FIXED: about 45 s of CPU); D2C_PROPERTY_EXAMPLES=N adds N random sequences of up to
6 steps (fixed seed; D2C_PROPERTY_SEED changes it), about 20 s of CPU each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax.atomic_io import is_leftover, leftovers_of  # noqa: E402
from fixtures_search_inputs import child_env, make_search_inputs, search_argv  # noqa: E402
from fixtures_signals import signalled  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = int(os.environ.get("D2C_PROPERTY_EXAMPLES", "0"))  # random sequences besides FIXED
SEED = int(os.environ.get("D2C_PROPERTY_SEED", "0"))

# Flags that change the outputs: each variant's uninterrupted run is its reference.
SEARCH_VARIANTS = {"a": {"seed": 1}, "b": {"seed": 2}}
MERGE_VARIANTS = {"a": {"density": 0.5}, "b": {"density": 0.3}}
MERGED_TASKS = ("task_0", "task_1")
# Where a fault lands: the n-th file-system write whose path holds the pattern.
PATTERNS = {"search": ("checkpoints/", "d2c_committed", "config.json", "merged", "metrics.jsonl", "partition.json"),
            "merge": (".merged.tmp-", "merged"),
            "evaluate": ("ev.md", "ev.png", "ev.json")}
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP")
# What a user plants, relative to the work area: (kind, path, whether it is in a command's way).
# "wd/" plants go into an existing workdir only (a user's directory is not a workdir to take).
PLANTS = {
    "wd_notes": ("file", "wd/notes.txt", False),  # the user's file inside the workdir
    "beside_wd": ("file", "wd.txt", False),
    "beside_merged": ("dir", "merged.bak", False),
    "merged_dir": ("dir", "merged", True),  # a user's directory at merge's --output_dir
    "merged_link": ("link_dir", "merged", True),  # a link where merge's output goes
    "ev_json": ("file", "ev.json", True),  # a user's file at evaluate's --output
    "ev_md": ("file", "ev.md", True),  # a user's file where evaluate writes its table
    "ev_png_link": ("link_file", "ev.png", True),  # a link where evaluate writes its chart
    "lock_link": ("link_file", "wd/.d2c.lock", True),  # a link where the workdir lock goes
    "partition_link": ("link_file", "wd/partition.json", True),  # a link where the search's last output goes
}

when = st.one_of(st.tuples(st.just("after"), st.sampled_from((1.0, 2.0, 4.0, 6.0))),
                 st.tuples(st.just("at"), st.integers(0, 5), st.integers(1, 12)))
fault = st.one_of(st.none(), st.tuples(st.just("signal"), st.sampled_from(SIGNALS), when),
                  st.tuples(st.just("enospc"), st.integers(0, 5), st.integers(1, 6)))
search_step = st.tuples(st.just("search"), st.sampled_from(sorted(SEARCH_VARIANTS)), st.booleans(), fault)
plant_step = st.tuples(st.just("plant"), st.sampled_from(sorted(PLANTS)))
step = st.one_of(  # the search (the command with the most state) and the user's files most often
    search_step, search_step, search_step,
    st.tuples(st.just("merge"), st.sampled_from(sorted(MERGE_VARIANTS)), st.booleans(), fault),
    st.tuples(st.just("evaluate"), fault),
    plant_step, plant_step,
    st.tuples(st.just("unplant"),),
)

# The sequence CI runs: a link at the lock, a SIGINT inside the second checkpoint, a user's file
# in the workdir, a full disk inside merge's write, a user's table where evaluate writes its own, the
# resumed search, evaluate refused, a merge with another density (--overwrite), a SIGHUP early in
# a search with another seed; then the final search (already finished: its outputs checked again).
FIXED = [
    ("plant", "lock_link"),
    ("search", "a", False, None),
    ("unplant",),
    ("search", "a", False, ("signal", "SIGINT", ("at", 0, 12))),
    ("plant", "wd_notes"),
    ("merge", "a", False, ("enospc", 0, 2)),
    ("plant", "ev_md"),
    ("search", "a", False, None),
    ("evaluate", None),
    ("merge", "b", True, None),
    ("search", "b", False, ("signal", "SIGHUP", ("after", 1.0))),
]


class Area(dict):
    """The shared state of the test session (short repr: hypothesis prints it with each failure)."""

    def __repr__(self):
        return f"Area({self['root']})"


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """The inputs (shared, never to change), a hash cache, and the lazily computed references."""
    root = tmp_path_factory.mktemp("cmdprops")
    inputs = make_search_inputs(root / "inputs")
    env = child_env(D2C_CACHE_DIR=str(root / "hash_cache"), JAX_PLATFORMS="cpu")
    return Area(root=str(root), inputs=inputs, env=env, refs={}, input_state=_state(inputs.values()))


# ----------------------------------------------------------------------------- commands


def _argv(area, top, cmd, variant=None, overwrite=False):
    inputs = area["inputs"]
    if cmd == "search":
        args = search_argv(inputs, os.path.join(top, "wd"), **SEARCH_VARIANTS[variant]) + ["--noprogress"]
    elif cmd == "merge":
        args = [f"--adapters={','.join(os.path.join(inputs['adapters_dir'], t) for t in MERGED_TASKS)}",
                f"--output_dir={os.path.join(top, 'merged')}", f"--density={MERGE_VARIANTS[variant]['density']}"]
    else:
        args = [f"--workdir={os.path.join(top, 'wd')}", f"--output={os.path.join(top, 'ev.json')}", "--metrics=loss",
                "--compare=", "--noprogress"]
    return [sys.executable, os.path.join(ROOT, "launch", f"{cmd}.py"), *args] + (["--overwrite"] if overwrite else [])


def _run(area, argv, fault=None, cmd="search"):
    """(returncode, stdout, stderr, the signal sent or None)."""
    plan, sent, delay = None, None, None
    if fault and fault[0] == "signal":
        sent = fault[1]
        if fault[2][0] == "at":
            patterns = PATTERNS[cmd]
            plan = f"fs:{patterns[fault[2][1] % len(patterns)]}:{fault[2][2]}:{sent}"
        else:
            delay = fault[2][1]
    elif fault:  # a full disk at the n-th write
        patterns = PATTERNS[cmd]
        plan = f"fs:{patterns[fault[1] % len(patterns)]}:{fault[2]}:ENOSPC"
    argv, env = signalled(argv, area["env"], plan)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if delay is not None:
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(getattr(signal, sent))
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err, sent


def _check_contract(rc, out, err, sent, what):
    """The exit status and the one line; returns whether the command says it wrote its complete
    output (rc 0 and not stopped at a checkpoint)."""
    lines = err.splitlines()
    assert "Traceback" not in err and "Fatal Python error" not in err, (what, err)
    errors = [ln for ln in lines if ln.startswith("error:")]
    stops = [ln for ln in lines if ln.startswith("stopped by")]
    checkpoint = [ln for ln in out.splitlines() if ln.startswith("stopped by")]
    signum = getattr(signal, sent) if sent else None
    if rc == 1:
        assert len(errors) == 1 and lines[-1] == errors[0] and not stops, (what, err)
        return False
    if checkpoint:  # the search stopped at a checkpoint: 0 (SIGTERM, SIGHUP) or 130 (SIGINT)
        assert sent in ("SIGTERM", "SIGHUP", "SIGINT") and rc == (130 if sent == "SIGINT" else 0), (what, rc, out)
        assert checkpoint[-1].startswith(f"stopped by {sent}") and "re-run the same command" in checkpoint[-1], out
        assert not errors and not stops, (what, err)
        return False
    if sent is not None and sent != "SIGKILL" and rc == 128 + signum:
        assert len(stops) == 1 and lines[-1] == stops[0] and stops[0].startswith(f"stopped by {sent}"), (what, err)
        return False
    if rc == -signal.SIGKILL:
        assert sent == "SIGKILL", (what, err)
        return False
    if sent is not None and rc == -signum and not out.strip() and not err.strip():
        return False  # before the script's first line installed its handlers: the interpreter's start-up
    assert rc == 0 and not errors and not stops, (what, rc, out, err)
    return True


# ----------------------------------------------------------------------------- outputs and references


def _tree_bytes(path):
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files}


def _search_outputs(wd):
    with open(os.path.join(wd, "partition.json")) as f:
        doc = json.load(f)
    for key in ("seconds", "phase_seconds", "compile"):  # timings and compilation-cache counts
        doc.pop(key, None)
    keep = ("iteration", "accepted", "moves", "tracked", "best_objective", "mean_objective", "objectives")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [{k: r.get(k) for k in keep} for r in map(json.loads, f.read().splitlines())]
    return {"partition": doc, "metrics": rows, "merged": _tree_bytes(os.path.join(wd, "merged")),
            "files": sorted(n for n in os.listdir(wd) if n in ("partition.json", "metrics.jsonl", "merged",
                                                                "objective.png", "assignment.png", "config.json",
                                                                "checkpoints"))}


def _eval_output(path, wd):
    with open(path) as f:
        return json.loads(f.read().replace(os.path.abspath(wd), "<run>"))


def _reference(area, cmd, variant):
    """The outputs of an uninterrupted run (computed once per session)."""
    key = (cmd, variant)
    if key not in area["refs"]:
        top = tempfile.mkdtemp(prefix=f"ref_{cmd}_{variant}_", dir=area["root"])
        if cmd == "evaluate":  # on the reference run of that search variant
            _reference(area, "search", variant)
            top = area["refs"][("search_top", variant)]
        rc, out, err, _ = _run(area, _argv(area, top, cmd, variant))
        assert rc == 0, (cmd, variant, out, err)
        if cmd == "search":
            area["refs"][("search_top", variant)] = top
            area["refs"][key] = _search_outputs(os.path.join(top, "wd"))
        elif cmd == "merge":
            area["refs"][key] = _tree_bytes(os.path.join(top, "merged"))
        else:
            area["refs"][key] = _eval_output(os.path.join(top, "ev.json"), os.path.join(top, "wd"))
    return area["refs"][key]


def _search_variant_of(wd):
    seed = json.load(open(os.path.join(wd, "partition.json")))["seed"]
    return next(v for v, flags in SEARCH_VARIANTS.items() if flags["seed"] == seed)


def _check_complete(area, top, cmd, variant):
    """A success: the outputs equal the uninterrupted run's, and no temporary of them is left."""
    wd = os.path.join(top, "wd")
    if cmd == "search":
        assert _search_outputs(wd) == _reference(area, "search", variant)
        assert not [os.path.join(r, n) for r, ds, fs in os.walk(wd) for n in ds + fs if is_leftover(n)]
        assert not leftovers_of(wd)
    elif cmd == "merge":
        merged = os.path.join(top, "merged")
        assert _tree_bytes(merged) == _reference(area, "merge", variant)
        assert not leftovers_of(merged) and not [n for n in os.listdir(merged) if is_leftover(n)]
    else:
        ev = os.path.join(top, "ev.json")
        assert _eval_output(ev, wd) == _reference(area, "evaluate", _search_variant_of(wd))
        assert not [p for name in ("ev.json", "ev.md", "ev.png") for p in leftovers_of(os.path.join(top, name))]


# ----------------------------------------------------------------------------- the user's files


def _state(paths):
    """Content, mode and mtime of every path under `paths`; links by their target (and what it
    points to, through the link)."""
    out = {}
    for top in paths:
        stack = [top]
        while stack:
            p = stack.pop()
            st_ = os.lstat(p) if os.path.lexists(p) else None
            if st_ is None:
                out[p] = None
            elif os.path.islink(p):
                out[p] = ("link", os.readlink(p), st_.st_mtime_ns)
            elif os.path.isdir(p):
                names = sorted(os.listdir(p))
                out[p] = ("dir", names, st_.st_mode)
                stack += [os.path.join(p, n) for n in names]
            else:
                out[p] = ("file", hashlib.sha256(open(p, "rb").read()).hexdigest(), st_.st_mode, st_.st_mtime_ns)
    return out


def _assert_unchanged(before, after, what):
    changed = {p: (before.get(p), after.get(p)) for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert not changed, (what, changed)


def _plant(top, users, name):
    """Plants the user's thing `name`; returns the paths that must never change (or [] when the
    user would not put it there: something is already in that place, or the workdir is not one)."""
    kind, rel, _ = PLANTS[name]
    path = os.path.join(top, rel)
    wd = os.path.join(top, "wd")
    if os.path.lexists(path):
        return []
    if name == "lock_link":  # into a directory the user makes for the run, before any run
        if os.path.lexists(wd):
            return []
        os.makedirs(wd)
    elif rel.startswith("wd/") and not os.path.isdir(wd):
        return []
    if kind == "file":
        with open(path, "w") as f:
            f.write(f"the user's {name}\n")
        return [path]
    if kind == "dir":
        os.makedirs(path)
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write("the user's notes\n")
        return [path]
    target = os.path.join(users, f"target_{name}")
    if kind == "link_dir":
        os.makedirs(target)
        with open(os.path.join(target, "notes.txt"), "w") as f:
            f.write("the user's notes\n")
    else:
        with open(target, "w") as f:
            f.write("the user's precious file\n")
    os.symlink(target, path)
    return [path, target]


def _unplant(top, planted):
    """The user removes the oldest of their things that is in a command's way."""
    for name, paths in planted.items():
        if PLANTS[name][2]:
            path = paths[0]
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            del planted[name]
            return


# ----------------------------------------------------------------------------- the property


def _check_sequence(area, steps, start="empty"):
    """`start`: "empty", or "finished": the workdir begins as a copy of the finished reference run
    of the first search variant (`cp -r RUN wd`, as a user may; so that evaluate has a run)."""
    top = tempfile.mkdtemp(prefix="seq_", dir=area["root"])
    users = tempfile.mkdtemp(prefix="user_", dir=area["root"])
    if start == "finished":
        _reference(area, "search", "a")
        shutil.copytree(os.path.join(area["refs"][("search_top", "a")], "wd"), os.path.join(top, "wd"), symlinks=True)
    planted: dict[str, list[str]] = {}
    last_search = "a"
    for op in steps:
        kind = op[0]
        if kind == "plant" and op[1] not in planted:
            paths = _plant(top, users, op[1])
            if paths:
                planted[op[1]] = paths
            continue
        if kind == "unplant":
            _unplant(top, planted)
            continue
        if kind not in ("search", "merge", "evaluate"):
            continue
        variant, overwrite, flt = (op[1], op[2], op[3]) if kind != "evaluate" else (None, False, op[1])
        last_search = variant if kind == "search" else last_search
        before = _state([p for ps in planted.values() for p in ps])
        t0 = time.monotonic()
        rc, out, err, sent = _run(area, _argv(area, top, kind, variant, overwrite), flt, kind)
        complete = _check_contract(rc, out, err, sent, op)
        _assert_unchanged(before, _state([p for ps in planted.values() for p in ps]), op)
        if complete:
            _check_complete(area, top, kind, variant)
        print(f"{op}: rc {rc} in {time.monotonic() - t0:.1f} s: {(err.strip().splitlines() or [''])[-1][:120]}")
    # The user clears the way and re-runs the search the workdir holds (else the last one tried):
    # it ends with an uninterrupted run's outputs.
    while any(PLANTS[n][2] for n in planted):
        _unplant(top, planted)
    if os.path.isfile(os.path.join(top, "wd", "partition.json")):
        last_search = _search_variant_of(os.path.join(top, "wd"))
    before = _state([p for ps in planted.values() for p in ps])
    rc, out, err, _ = _run(area, _argv(area, top, "search", last_search))
    if rc == 1 and "holds a finished run" in err:
        rc, out, err, _ = _run(area, _argv(area, top, "search", last_search, overwrite=True))
    assert _check_contract(rc, out, err, None, "final search"), (rc, err)
    _check_complete(area, top, "search", last_search)
    _assert_unchanged(before, _state([p for ps in planted.values() for p in ps]), "final search")
    _assert_unchanged(area["input_state"], _state(area["inputs"].values()), "the inputs")


@seed(SEED)
@settings(max_examples=max(EXAMPLES, 1), deadline=None, database=None,
          phases=(Phase.explicit, Phase.generate) if EXAMPLES else (Phase.explicit,),
          suppress_health_check=list(HealthCheck))
@example(FIXED, "empty")
@given(st.lists(step, min_size=2, max_size=6), st.sampled_from(("empty", "finished")))
def test_random_commands_signals_and_faults_keep_every_invariant(area, steps, start):
    _check_sequence(area, steps, start)
