"""SIGKILL at many points of a real launch/search.py run, then the same command again: the run
always ends with the partition of an uninterrupted run, and no leftover of a killed write stays.

The child runs the real script under `fixtures_signals.LAUNCHER`, which counts its file-system
writes (open for writing, rename, mkdir, remove, ...) whose path contains a pattern, and SIGKILLs
itself at the n-th one: inside an Orbax checkpoint commit, just before our commit marker, inside
the writing of merged/ and of the other outputs. The kills are chained: each restart is killed
at the next point, so k points cost k + 1 launches. CI runs the fixed points below; set
D2C_KILL_POINTS=N to add N random ones (seeded by D2C_KILL_SEED).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import pipeline  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from fixtures_search_inputs import SEARCH, child_env, make_search_inputs, read_partition, search_argv  # noqa: E402
from fixtures_signals import signalled  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "search.py")

# (path pattern, n): the n-th write whose path contains the pattern, in the run that is killed.
FIXED_POINTS = [
    ("checkpoints/", 3),  # inside the first Orbax commit
    ("d2c_committed", 1),  # Orbax done, our marker not yet written: the step must not count
    ("merged", 4),  # inside merged/ (a cluster adapter half written)
    ("partition.json", 1),  # the last output, its temp file written
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted run (in-process)."""
    workdir = tmp_path_factory.mktemp("ref") / "wd"
    cfg = RunConfig.from_flat(**inputs, **{**SEARCH, "workdir": str(workdir), "progress": False})
    assert pipeline.run(cfg) == 0
    return read_partition(workdir)


def _launch(inputs, workdir, kill: tuple[str, int] | None):
    plan = None if kill is None else f"fs:{kill[0]}:{kill[1]}:SIGKILL"
    cmd, env = signalled([sys.executable, SCRIPT, *search_argv(inputs, workdir), "--noprogress"], child_env(), plan)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _points():
    points = list(FIXED_POINTS)
    extra = int(os.environ.get("D2C_KILL_POINTS", "0"))
    rng = random.Random(int(os.environ.get("D2C_KILL_SEED", "0")))
    patterns = ["checkpoints/", "d2c_committed", "merged", "metrics.jsonl", "objective.png", "partition.json"]
    points += [(rng.choice(patterns), rng.randint(1, 30)) for _ in range(extra)]
    return points


def test_sigkill_anywhere_then_restart_ends_with_the_uninterrupted_partition(inputs, reference, tmp_path):
    workdir = tmp_path / "wd"
    killed = 0
    for point in _points():
        proc = _launch(inputs, workdir, point)
        if proc.returncode == -signal.SIGKILL:
            killed += 1
            assert "Traceback" not in proc.stderr
        else:  # the point was not reached in this (resumed) run: it ran to the end
            assert proc.returncode == 0, proc.stderr
            assert (workdir / "partition.json").exists()
            os.remove(workdir / "partition.json")  # let the next point interrupt the outputs again
        assert "Traceback" not in proc.stderr, proc.stderr
    assert killed >= len(FIXED_POINTS) - 1
    proc = _launch(inputs, workdir, None)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = read_partition(workdir)
    assert doc["clusters"] == reference["clusters"]
    # the in-process reference runs on the 8 test devices (a mesh: batched, sharded programs), the
    # launched runs on one: a sum of positive float32 losses, LOSS_RTOL (tolerances.py)
    from tolerances import LOSS_RTOL

    assert doc["objective"] == pytest.approx(reference["objective"], rel=LOSS_RTOL)
    assert not [n for n in os.listdir(workdir) if ".tmp-" in n or ".old-" in n]
    assert sorted(os.listdir(workdir / "merged")) == ["cluster_0", "cluster_1"]
    steps = [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(steps) <= SEARCH.get("keep_checkpoints", 2) + 1
