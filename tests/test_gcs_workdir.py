"""--workdir=gs://bucket/path against a real GCS JSON API on this machine (gcp-storage-emulator,
started here), behind `fixtures_gcs.preconditions_enforced`: a proxy that enforces the generation
preconditions the emulator accepts and ignores, and logs every request (the request layer).

The reference for a run is the same run in a local workdir; for the lock, GCS's documented
semantics of ifGenerationMatch (0: the object must not exist; g: its generation must be g).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gcsfs")

from d2c_jax import gcs_workdir, pipeline, storage  # noqa: E402
from d2c_jax.errors import UserError, run_cli  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from fixtures_gcs import gcs_emulator, preconditions_enforced  # noqa: E402
from fixtures_search_inputs import SEARCH, make_search_inputs, read_partition  # noqa: E402

# Three iterations, a checkpoint after each (keep 2: old steps are deleted from the bucket too).
SETTINGS = {**SEARCH, "iterations": 3, "checkpoint_every": 1, "progress": False, "all_in_one_reference": False}


@pytest.fixture(scope="module")
def gcs():
    """(proxy URL, request log): the emulator behind the precondition-enforcing proxy."""
    with gcs_emulator() as url, preconditions_enforced(url) as proxied:
        yield proxied


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def env(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs[0])
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    return storage.filesystem()


def _objects(fs, prefix):
    fs.invalidate_cache()
    try:
        return {k[len(prefix) + 1:]: v for k, v in fs.find(prefix, detail=True).items()}
    except FileNotFoundError:
        return {}


def _shape(rel):
    """A file's name with Orbax's random data-file id left out."""
    head, _, name = rel.rpartition("/")
    return f"{head}/*" if head.endswith("/d") else rel


def _run(inputs, workdir, capsys, **over):
    rc = run_cli(lambda: pipeline.run(RunConfig.from_flat(**{**SETTINGS, **over}, workdir=str(workdir), **inputs)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_search_in_a_gs_workdir_equals_the_local_run_and_its_rerun_reports_it(inputs, env, gcs, tmp_path, capsys):
    rc, _, err = _run(inputs, tmp_path / "local", capsys)
    assert rc == 0, err
    url = "gs://bkt/runs/first"
    del gcs[1][:]
    rc, out, err = _run(inputs, url, capsys)
    assert rc == 0, err
    assert f"outputs in {url}" in out
    objects = _objects(env, "bkt/runs/first")
    local = read_partition(tmp_path / "local")
    doc = json.loads(env.cat_file("bkt/runs/first/partition.json"))
    for key in ("clusters", "objective", "task_losses", "random_start_objective"):
        assert doc[key] == local[key], key
    expected = {os.path.relpath(os.path.join(r, n), tmp_path / "local").replace(os.sep, "/")
                for r, _, ns in os.walk(tmp_path / "local") for n in ns}
    # every file of the local run (Orbax names its data files by random ids); the lock object released
    assert set(map(_shape, objects)) == set(map(_shape, expected - {".d2c.lock"}))
    staging = gcs_workdir.GcsWorkdir(url).staging
    for rel in objects:  # each object is the whole file the run wrote (in its staging directory)
        with open(os.path.join(staging, rel), "rb") as f:
            assert env.cat_file(f"bkt/runs/first/{rel}") == f.read(), rel
    # The request layer: every object written under its final name was copied there from a temp
    # object with a generation precondition; nothing was uploaded straight to a final name.
    copies = [p for m, p in gcs[1] if "/rewriteTo/" in p]
    uploads = [p for m, p in gcs[1] if m == "POST" and p.startswith("/upload/")]
    assert len(copies) >= len(objects) and all("ifGenerationMatch=" in p for p in copies)
    assert uploads and all("ifGenerationMatch=0" in p for p in uploads)  # temp objects: created, never replaced
    assert ".tmp-" in json.dumps([p for p in copies]) and not [k for k in objects if ".tmp-" in k]

    rc, out, err = _run(inputs, url, capsys)
    assert rc == 0, err
    assert out.strip().endswith(f"already finished: {url}/partition.json (use --overwrite to run again)")
    assert pipeline.show(url) == 0  # launch/search.py --workdir=gs://... --show
    assert capsys.readouterr().out.strip().endswith(f"outputs in {url}")

    # --overwrite: the finished run's objects are replaced (partition.json removed first, written last)
    del gcs[1][:]
    rc, out, err = _run(inputs, url, capsys, overwrite=True)
    assert rc == 0, err
    # (method, object written or deleted), the lock's own writes left out
    writes = [(m, p.split("?")[0].split("/rewriteTo/")[-1].rsplit("/o/", 1)[-1]) for m, p in gcs[1]
              if "/rewriteTo/" in p or m == "DELETE"]
    writes = [(m, name) for m, name in writes if "d2c.lock" not in name and ".tmp-" not in name]
    assert writes[0][0] == "DELETE" and writes[0][1].replace("%2F", "/") == "runs/first/partition.json"
    assert writes[-1][0] == "POST" and writes[-1][1].endswith("partition.json")
    assert [w for w in writes[1:-1] if w[1].endswith("partition.json")] == []


def test_a_run_resumes_from_the_bucket_alone_and_skips_an_uncommitted_step(inputs, env, tmp_path, capsys):
    url, prefix = "gs://bkt/runs/resume", "bkt/runs/resume"
    rc, _, err = _run(inputs, url, capsys)
    assert rc == 0, err
    env.rm_file(f"{prefix}/partition.json")  # as if the run had stopped after its last checkpoint
    steps = sorted(int(k.split("/")[1]) for k in _objects(env, prefix) if k.endswith("/d2c_committed"))
    assert steps[-1] == 3
    env.rm_file(f"{prefix}/checkpoints/3/d2c_committed")  # a push cut before the newest step's marker
    staging = gcs_workdir.GcsWorkdir(url).staging
    import shutil

    shutil.rmtree(staging)  # a fresh machine: nothing but the bucket
    rc, out, err = _run(inputs, url, capsys)
    assert rc == 0, err
    assert f"resumed from iteration {steps[-2]} of 3 (checkpoint {url}/checkpoints/{steps[-2]})" in out
    rc, _, err = _run(inputs, tmp_path / "local", capsys)
    assert rc == 0, err
    doc = json.loads(env.cat_file(f"{prefix}/partition.json"))
    assert doc["clusters"] == read_partition(tmp_path / "local")["clusters"]
    objects = _objects(env, prefix)  # step 3 saved again, with its marker; no step without one
    steps = {k.split("/")[1] for k in objects if k.startswith("checkpoints/") and k.split("/")[1].isdigit()}
    assert steps and all(f"checkpoints/{s}/d2c_committed" in objects for s in steps)


def test_a_corrupt_newest_step_in_the_bucket_falls_back_to_the_previous_one(inputs, env, tmp_path, capsys):
    url, prefix = "gs://bkt/runs/fallback", "bkt/runs/fallback"
    rc, _, err = _run(inputs, url, capsys)
    assert rc == 0, err
    env.rm_file(f"{prefix}/partition.json")  # stopped after its last checkpoint
    env.pipe_file(f"{prefix}/checkpoints/3/meta/metadata", b"{not json")  # committed, but unreadable
    import shutil

    shutil.rmtree(gcs_workdir.GcsWorkdir(url).staging)  # a fresh machine
    rc, out, err = _run(inputs, url, capsys)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: {url}/checkpoints: skipping unusable checkpoint step 3 (") and warnings[0].endswith(
        "resuming from step 2"), warnings
    assert f"resumed from iteration 2 of 3 (checkpoint {url}/checkpoints/2)" in out
    rc, _, err = _run(inputs, tmp_path / "local", capsys)
    assert rc == 0, err
    assert json.loads(env.cat_file(f"{prefix}/partition.json"))["clusters"] == read_partition(tmp_path / "local")[
        "clusters"]
    assert json.loads(env.cat_file(f"{prefix}/checkpoints/3/meta/metadata"))["iteration"] == 3  # saved anew


def _lock_object(fs, prefix, **holder):
    fs.pipe_file(f"{prefix}/.d2c.lock", json.dumps(holder).encode())


def test_a_lock_held_by_a_live_run_is_refused_and_nothing_is_written(inputs, env, capsys):
    prefix = "bkt/runs/held"
    _lock_object(env, prefix, host="other-host", pid=4242, heartbeat=time.time())
    before = _objects(env, prefix)
    rc, out, err = _run(inputs, f"gs://{prefix}", capsys)
    assert rc == 1
    assert err.splitlines()[-1].startswith(f"error: gs://{prefix}: another run is using this --workdir (process 4242 "
                                           "on other-host holds .d2c.lock, last heartbeat ")
    assert _objects(env, prefix).keys() == before.keys()
    assert _objects(env, prefix)[".d2c.lock"]["generation"] == before[".d2c.lock"]["generation"]


@pytest.mark.parametrize("holder, why", [
    (dict(host="other-host", pid=4242, heartbeat=0.0), "which sent no heartbeat for"),
    (dict(host=socket.gethostname(), pid=2 ** 22 + 7, heartbeat=None), "which is not running"),
])
def test_a_stale_lock_is_taken_over_with_one_warning(inputs, env, capsys, holder, why):
    prefix = "bkt/runs/stale-" + why.split()[-1]
    if holder["heartbeat"] is None:
        holder["heartbeat"] = time.time()  # fresh, but its process is gone
    _lock_object(env, prefix, **holder)
    rc, out, err = _run(inputs, f"gs://{prefix}", capsys, iterations=1)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: gs://{prefix}/.d2c.lock: taking over the lock of process {holder['pid']} on {holder['host']}, "
        f"{why}")
    assert ".d2c.lock" not in _objects(env, prefix)


def test_temp_objects_of_a_killed_writer_are_removed_not_taken_for_a_users(inputs, env, capsys):
    prefix = "bkt/runs/temps"
    env.pipe_file(f"{prefix}/.d2c.lock.tmp-0123456789ab", b"{}")  # killed between the temp and its copy
    rc, _, err = _run(inputs, f"gs://{prefix}", capsys, iterations=1)
    assert rc == 0, err
    objects = _objects(env, prefix)
    assert "partition.json" in objects and not [k for k in objects if ".tmp-" in k]


def test_of_two_runs_taking_the_lock_at_once_one_wins(env):
    url = "gs://bkt/runs/race"
    results = []

    def take():
        w = gcs_workdir.GcsWorkdir(url)
        try:
            w.acquire()
            results.append(w)
        except UserError as e:
            results.append(e)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, gcs_workdir.GcsWorkdir)]
    assert len(winners) == 1, results
    assert all("another run is using this --workdir" in str(r) for r in results if isinstance(r, UserError))
    winners[0].release()
    assert ".d2c.lock" not in _objects(env, "bkt/runs/race")


def test_a_run_whose_lock_was_taken_over_stops_at_its_next_push(env, monkeypatch):
    monkeypatch.setattr(gcs_workdir, "HEARTBEAT_S", 0.05)
    w = gcs_workdir.GcsWorkdir("gs://bkt/runs/lost")
    w.acquire()
    env.pipe_file("bkt/runs/lost/.d2c.lock", b'{"host": "h2", "pid": 1, "heartbeat": 0}')  # another run's takeover
    deadline = time.time() + 30
    while w._lost is None and time.time() < deadline:
        time.sleep(0.05)
    os.makedirs(w.staging, exist_ok=True)
    with pytest.raises(UserError, match="another run took over its lock"):
        w.push()
    w.release()
    assert json.loads(env.cat_file("bkt/runs/lost/.d2c.lock"))["host"] == "h2"  # not deleted: not ours


def test_an_object_changed_by_another_writer_is_refused_not_overwritten(env, tmp_path):
    w = gcs_workdir.GcsWorkdir("gs://bkt/runs/clobber")
    w.acquire()
    try:
        w.pull()
        os.makedirs(w.staging, exist_ok=True)
        (tmp_path / "x").write_text("")
        with open(os.path.join(w.staging, "metrics.jsonl"), "w") as f:
            f.write('{"iteration": 1}\n')
        w.push()
        env.pipe_file("bkt/runs/clobber/metrics.jsonl", b"someone else\n")
        with open(os.path.join(w.staging, "metrics.jsonl"), "a") as f:
            f.write('{"iteration": 2}\n')
        with pytest.raises(UserError, match="changed in the bucket while this run held the lock"):
            w.push()
        assert env.cat_file("bkt/runs/clobber/metrics.jsonl") == b"someone else\n"
    finally:
        w.release()
