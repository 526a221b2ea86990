"""Checkpoints: the state round-trips, resumed runs (SIGTERM, SIGKILL) end exactly like
uninterrupted ones, other runs' and corrupt checkpoints are refused with one clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from d2c_jax.checkpoint import Checkpointer, PreemptionFlag, fingerprint
from d2c_jax.errors import UserError
from d2c_jax.run_config import SearchSettings
from d2c_jax.search import run_search
from fixtures_search_fakes import FakeScorer, families

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
N, F = 12, 3
SETTINGS = SearchSettings(num_clusters=3, iterations=40, population=2, proposals=2, objective="global",
                          exchange_every=10, track_every=4, seed=5)
FP = {"base_model": "b" * 64, "adapters": "a" * 64, "data": "d" * 64, "settings": {"num_clusters": 3}}


def _scorer(**kw):
    return FakeScorer(families(N, F), **kw)


@pytest.fixture(scope="module")
def reference():
    r = run_search(_scorer(), SETTINGS)
    return r.partition_n.tolist(), r.objective


def _steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


class _StopAt:
    def __init__(self, at):
        self.calls, self.at = 0, at

    def __call__(self):
        self.calls += 1
        return self.calls == self.at


def test_state_round_trips_and_resume_after_stop_equals_uninterrupted(tmp_path, reference):
    ck_dir = tmp_path / "ck"
    with Checkpointer(ck_dir, every=4, keep=2, fingerprint=FP) as ck:
        first = run_search(_scorer(), SETTINGS, checkpointer=ck, should_stop=_StopAt(11))
    assert first.preempted and first.state.iteration == 11 and _steps(ck_dir)[-1] == 11
    assert len(_steps(ck_dir)) == 2  # keep=2

    with Checkpointer(ck_dir, every=4, keep=2, fingerprint=FP) as ck:
        restored = ck.restore(N)
    np.testing.assert_array_equal(restored.partitions_pn, first.state.partitions_pn)
    assert restored.iteration == 11 and restored.metrics == json.loads(json.dumps(first.state.metrics))
    assert restored.cache._losses == first.state.cache._losses

    scorer = _scorer()
    with Checkpointer(ck_dir, every=4, keep=2, fingerprint=FP) as ck:
        resumed = run_search(scorer, SETTINGS, checkpointer=ck)
    assert not resumed.preempted and (resumed.partition_n.tolist(), resumed.objective) == reference
    assert [r["iteration"] for r in resumed.state.metrics] == list(range(SETTINGS.iterations + 1))
    # The restored cache spares the evaluations already made.
    assert sum(scorer.calls) == sum(r["evaluations"] for r in resumed.state.metrics[12:])


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    with Checkpointer(tmp_path, every=2, keep=1, fingerprint=FP) as ck:
        run_search(_scorer(), SearchSettings(num_clusters=3, iterations=4), checkpointer=ck)
    for key, words in [("base_model", "base model"), ("adapters", "adapters"), ("data", "task data")]:
        with pytest.raises(UserError, match=f"made with a different {words}; use --overwrite"):
            Checkpointer(tmp_path, every=2, keep=1, fingerprint={**FP, key: "0" * 64}).restore(N)
    other = {**FP, "settings": {"num_clusters": 4}}
    with pytest.raises(UserError, match=r"different --num_clusters \(3 in the checkpoint, 4 now\)"):
        Checkpointer(tmp_path, every=2, keep=1, fingerprint=other).restore(N)


@pytest.mark.parametrize("damage", ["meta", "state"])
def test_a_corrupt_checkpoint_is_a_clear_user_error(tmp_path, damage):
    with Checkpointer(tmp_path, every=2, keep=1, fingerprint=FP) as ck:
        run_search(_scorer(), SearchSettings(num_clusters=3, iterations=4), checkpointer=ck)
    step_dir = tmp_path / "4"
    if damage == "meta":
        (step_dir / "meta" / "metadata").write_text("{not json")
    else:
        shutil.rmtree(step_dir / "state" / "d")
        for root, _, files in os.walk(step_dir / "state"):
            for f in files:
                if not f.endswith(".txt"):
                    with open(os.path.join(root, f), "wb") as fh:
                        fh.write(b"\0garbage")
    with pytest.raises(UserError, match="cannot read the checkpoint.*corrupt.*--overwrite") as e:
        Checkpointer(tmp_path, every=2, keep=1, fingerprint=FP).restore(N)
    assert str(step_dir) in str(e.value) and "\n" not in str(e.value)


def test_fingerprint_changes_with_each_input(tmp_path):
    base, ad, data = tmp_path / "base", tmp_path / "ad" / "t0", tmp_path / "data"
    for d in (base, ad, data):
        d.mkdir(parents=True)
    (base / "config.json").write_text('{"a": 1}')
    (ad / "adapter_config.json").write_text('{"r": 4}')
    (ad / "adapter_model.safetensors").write_bytes(b"x" * 10)
    (data / "t0.jsonl").write_text('{"prompt": "p", "response": "r"}\n')

    def fp(settings={"k": 1}):
        return fingerprint(base, [ad], [data / "t0.jsonl"], settings)

    ref = fp()
    assert fp() == ref and fp({"k": 2})["settings"] != ref["settings"]
    for path, text, key in [(base / "config.json", '{"a": 2}', "base_model"),
                            (ad / "adapter_config.json", '{"r": 8}', "adapters"),
                            (data / "t0.jsonl", '{"prompt": "q", "response": "r"}\n', "data")]:
        old = path.read_text()
        path.write_text(text)
        assert fp()[key] != ref[key]
        path.write_text(old)
    assert fp() == ref


def test_preemption_flag_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionFlag() as flag:
        assert not flag()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert flag()
    assert signal.getsignal(signal.SIGTERM) == previous


_WORKER = textwrap.dedent("""
    import json, sys
    from fixtures_search_fakes import FakeScorer, families
    from test_checkpoint import SETTINGS, FP, N, F
    from d2c_jax.checkpoint import Checkpointer, PreemptionFlag
    from d2c_jax.search import run_search
    ck_dir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with PreemptionFlag() as flag, Checkpointer(ck_dir, every=3, keep=2, fingerprint=FP) as ck:
        print("start", ck.latest_step(), flush=True)
        r = run_search(FakeScorer(families(N, F), delay=delay), SETTINGS, checkpointer=ck, should_stop=flag)
    if r.preempted:
        print("preempted at", r.state.iteration, flush=True)
        sys.exit(0)
    with open(out, "w") as f:
        json.dump({"partition": r.partition_n.tolist(), "objective": r.objective}, f)
""")


def _start_worker(tmp_path, delay):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, str(script), str(tmp_path / "ck"), str(tmp_path / "out.json"), str(delay)]
    return cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())


def _worker_env() -> dict[str, str]:
    """The worker imports the test modules: the tests directory goes on its path."""
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


def _wait_for_step(proc, ck_dir, min_step, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= min_step for s in _steps(ck_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"worker ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared")


def test_sigterm_then_sigkill_then_resume_ends_like_the_uninterrupted_run(tmp_path, reference):
    ck_dir = tmp_path / "ck"
    # SIGTERM: checkpoint at the end of the current iteration, exit 0.
    cmd, proc = _start_worker(tmp_path, delay=0.01)
    _wait_for_step(proc, ck_dir, 3)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped_at = int(out.split("preempted at")[1])
    assert _steps(ck_dir)[-1] == stopped_at < SETTINGS.iterations

    # SIGKILL after a later checkpoint: no chance to save anything more.
    cmd, proc = _start_worker(tmp_path, delay=0.01)
    _wait_for_step(proc, ck_dir, stopped_at + 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out.json").exists()

    done = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True, timeout=120, env=_worker_env())
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[1]) >= stopped_at + 3  # resumed, not restarted
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["partition"], result["objective"]) == reference
