"""SIGKILL at many points of a real launch/search.py run, then the same command again: the run
always ends with the partition of an uninterrupted run, and no leftover of a killed write stays.

The child runs the real script under `fixtures_signals.LAUNCHER`, which counts its file-system
writes (open for writing, rename, mkdir, remove, ...) whose path contains a pattern, and SIGKILLs
itself at the n-th one: inside an Orbax checkpoint commit, just before our commit marker, inside
the writing of merged/ and of the other outputs. The kills are chained: each restart is killed
at the next point, so k points cost k + 1 launches. CI runs the fixed points below; set
D2C_KILL_POINTS=N to add N random ones (seeded by D2C_KILL_SEED).

The same test runs with --workdir=gs://bkt/... against gcp-storage-emulator (started here, behind
the proxy that enforces generation preconditions, `fixtures_gcs`), with kill points inside the
pushes to the bucket as well, and the local staging directory deleted after every other kill (a
fresh machine: the bucket alone must hold the run).
"""

from __future__ import annotations

import json
import os
import random
import shutil
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
from tolerances import LOSS_RTOL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "search.py")

# (path pattern, n): the n-th write whose path contains the pattern, in the run that is killed.
FIXED_POINTS = [
    ("checkpoints/", 3),  # inside the first Orbax commit
    ("d2c_committed", 1),  # Orbax done, our marker not yet written: the step must not count
    ("merged", 4),  # inside merged/ (a cluster adapter half written)
    ("partition.json", 1),  # the last output, its temp file written
]
GCS_POINTS = [
    ("gs://", 5),  # inside the first push of a checkpoint step, its marker not yet in the bucket
    ("partition.json", 3),  # written locally, not yet in the bucket
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


class _Local:
    """The run's workdir on local disk."""

    def __init__(self, tmp_path):
        self.workdir, self.env = tmp_path / "wd", {}

    def files(self):
        return {os.path.relpath(os.path.join(r, n), self.workdir).replace(os.sep, "/")
                for r, _, ns in os.walk(self.workdir) for n in ns}

    def read(self, rel):
        return (self.workdir / rel).read_bytes()

    def remove(self, rel):
        os.remove(self.workdir / rel)

    def after_kill(self, i):
        pass


class _Bucket(_Local):
    """The run's workdir in the emulator's bucket (gs://bkt/wd), staged under D2C_CACHE_DIR."""

    def __init__(self, tmp_path, url, monkeypatch):
        from d2c_jax import storage

        self.workdir = "gs://bkt/wd"
        self.env = {"STORAGE_EMULATOR_HOST": url, "D2C_CACHE_DIR": str(tmp_path / "cache")}
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        self.fs = storage.filesystem()

    def files(self):
        self.fs.invalidate_cache()
        return {k[len("bkt/wd/"):] for k in self.fs.find("bkt/wd")}

    def read(self, rel):
        return self.fs.cat_file(f"bkt/wd/{rel}")

    def remove(self, rel):
        self.fs.rm_file(f"bkt/wd/{rel}")

    def after_kill(self, i):
        if i % 2:  # a fresh machine: the staging directory is gone, the bucket holds the run
            shutil.rmtree(os.path.join(self.env["D2C_CACHE_DIR"], "gcs-workdirs"), ignore_errors=True)


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield _Local(tmp_path)
        return
    pytest.importorskip("gcsfs")
    from fixtures_gcs import gcs_emulator, preconditions_enforced

    with gcs_emulator() as url, preconditions_enforced(url) as (proxy, _):
        yield _Bucket(tmp_path, proxy, monkeypatch)


def _launch(inputs, where, kill: tuple[str, int] | None):
    plan = None if kill is None else f"fs:{kill[0]}:{kill[1]}:SIGKILL"
    cmd, env = signalled([sys.executable, SCRIPT, *search_argv(inputs, where.workdir), "--noprogress"],
                         child_env(**where.env), plan)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _points(gcs: bool):
    points = list(FIXED_POINTS) + (GCS_POINTS if gcs else [])
    extra = int(os.environ.get("D2C_KILL_POINTS", "0"))
    rng = random.Random(int(os.environ.get("D2C_KILL_SEED", "0")))
    patterns = ["checkpoints/", "d2c_committed", "merged", "metrics.jsonl", "objective.png", "partition.json"]
    points += [(rng.choice(patterns), rng.randint(1, 30)) for _ in range(extra)]
    return points


def test_sigkill_anywhere_then_restart_ends_with_the_uninterrupted_partition(inputs, reference, where):
    killed = 0
    points = _points(isinstance(where, _Bucket))
    for i, point in enumerate(points):
        proc = _launch(inputs, where, point)
        if proc.returncode == -signal.SIGKILL:
            killed += 1
            where.after_kill(killed)
        else:  # the point was not reached in this (resumed) run: it ran to the end
            assert proc.returncode == 0, proc.stderr
            assert "partition.json" in where.files()
            where.remove("partition.json")  # let the next point interrupt the outputs again
        assert "Traceback" not in proc.stderr, proc.stderr
    assert killed >= len(points) - 1
    proc = _launch(inputs, where, None)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads(where.read("partition.json"))
    assert doc["clusters"] == reference["clusters"]
    # the in-process reference runs on the 8 test devices (a mesh: batched, sharded programs), the
    # launched runs on one: a sum of positive float32 losses, LOSS_RTOL (tolerances.py)
    assert doc["objective"] == pytest.approx(reference["objective"], rel=LOSS_RTOL)
    files = where.files()
    assert not [n for n in files if ".tmp-" in n or ".old-" in n or n == ".d2c.lock" and isinstance(where, _Bucket)]
    assert {n.split("/")[1] for n in files if n.startswith("merged/")} == {"cluster_0", "cluster_1"}
    steps = {n.split("/")[1] for n in files if n.startswith("checkpoints/") and n.split("/")[1].isdigit()}
    assert len(steps) <= SEARCH.get("keep_checkpoints", 2) + 1
    assert all(f"checkpoints/{s}/d2c_committed" in files for s in steps) or not isinstance(where, _Bucket)
