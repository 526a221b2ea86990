"""Checkpoints: the state round-trips, resumed runs (SIGTERM, SIGKILL) end exactly like
uninterrupted ones, other runs' checkpoints are refused with one line naming what changed, and a
restart walks back over unusable (corrupt, uncommitted) steps to the newest usable one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from d2c_jax.checkpoint import COMMITTED, Checkpointer
from d2c_jax.fingerprint import run_fingerprint
from d2c_jax.signals import PreemptionFlag
from d2c_jax.errors import UserError
from d2c_jax.run_config import SearchSettings
from d2c_jax.search import run_search
from fixtures_search_fakes import FakeScorer, families

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
N, F = 12, 3
SETTINGS = SearchSettings(num_clusters=3, iterations=40, population=2, proposals=2, objective="global",
                          exchange_every=10, track_every=4, seed=5)
FP = {"files": {"base_model/model.safetensors": "b" * 64, "adapters/t0/adapter_model.safetensors": "a" * 64},
      "examples": {"t0": "d" * 64}, "settings": {"num_clusters": 3}}


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
    with Checkpointer(ck_dir, every=4, keep=2, fingerprint=FP, metrics_path=f"{ck_dir}.metrics.jsonl") as ck:
        first = run_search(_scorer(), SETTINGS, checkpointer=ck, should_stop=_StopAt(11))
    assert first.preempted and first.state.iteration == 11 and _steps(ck_dir)[-1] == 11
    assert len(_steps(ck_dir)) == 2  # keep=2

    with Checkpointer(ck_dir, every=4, keep=2, fingerprint=FP, metrics_path=f"{ck_dir}.metrics.jsonl") as ck:
        restored = ck.restore(N)
    np.testing.assert_array_equal(restored.partitions_pn, first.state.partitions_pn)
    assert restored.iteration == 11 and restored.metrics == json.loads(json.dumps(first.state.metrics))
    assert restored.cache._losses == first.state.cache._losses

    scorer = _scorer()
    with Checkpointer(ck_dir, every=4, keep=2, fingerprint=FP, metrics_path=f"{ck_dir}.metrics.jsonl") as ck:
        resumed = run_search(scorer, SETTINGS, checkpointer=ck)
    assert not resumed.preempted and (resumed.partition_n.tolist(), resumed.objective) == reference
    assert [r["iteration"] for r in resumed.state.metrics] == list(range(SETTINGS.iterations + 1))
    # The restored cache spares the evaluations already made.
    assert sum(scorer.calls) == sum(r["evaluations"] for r in resumed.state.metrics[12:])


def test_a_checkpoint_of_another_run_is_refused_naming_what_changed(tmp_path):
    with Checkpointer(tmp_path, every=2, keep=1, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        run_search(_scorer(), SearchSettings(num_clusters=3, iterations=4), checkpointer=ck)
    changes = [
        ({**FP, "files": {**FP["files"], "base_model/model.safetensors": "0" * 64}},
         r"base model file model.safetensors changed \(content hash\)"),
        ({**FP, "files": {**FP["files"], "adapters/t0/adapter_model.safetensors": "0" * 64}},
         r"adapter file t0/adapter_model.safetensors changed \(content hash\)"),
        ({**FP, "files": {**FP["files"], "tokenizer/tokenizer.json": "0" * 64}}, "tokenizer file tokenizer.json is new"),
        ({**FP, "examples": {"t0": "0" * 64}}, "the examples used for task t0 changed"),
        ({**FP, "settings": {"num_clusters": 4}}, r"--num_clusters changed \(3 in the checkpoint, 4 now\)"),
    ]
    for fp, words in changes:
        with pytest.raises(UserError, match=f"belongs to other inputs: {words}; use --overwrite") as e:
            Checkpointer(tmp_path, every=2, keep=1, fingerprint=fp, metrics_path=f"{tmp_path}.metrics.jsonl").restore(N)
        assert "\n" not in str(e.value)


def _truncate_state(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            if os.path.getsize(os.path.join(root, f)) > 16:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(5)


@pytest.mark.parametrize("damage", ["meta", "state", "uncommitted", "metadata_file"])
def test_a_restart_walks_back_to_the_newest_usable_checkpoint(tmp_path, reference, damage, capsys):
    ck_dir = tmp_path / "ck"
    with Checkpointer(ck_dir, every=4, keep=3, fingerprint=FP, metrics_path=f"{ck_dir}.metrics.jsonl") as ck:
        run_search(_scorer(), SETTINGS, checkpointer=ck, should_stop=_StopAt(12))
    assert _steps(ck_dir) == [4, 8, 12]
    newest = ck_dir / "12"
    if damage == "meta":
        (newest / "meta" / "metadata").write_text("{not json")
    elif damage == "state":
        _truncate_state(newest)
    elif damage == "uncommitted":  # a save cut after Orbax's rename, before our marker
        (newest / COMMITTED).unlink()
    else:  # an empty _CHECKPOINT_METADATA: Orbax still reads the step, so it is resumed
        (newest / "_CHECKPOINT_METADATA").write_text("")
    with Checkpointer(ck_dir, every=4, keep=3, fingerprint=FP, metrics_path=f"{ck_dir}.metrics.jsonl") as ck:
        resumed = run_search(_scorer(), SETTINGS, checkpointer=ck)
    assert (resumed.partition_n.tolist(), resumed.objective) == reference
    assert [r["iteration"] for r in resumed.state.metrics] == list(range(SETTINGS.iterations + 1))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if damage == "metadata_file":
        assert warnings == []
    else:
        assert len(warnings) == 1 and "skipping unusable checkpoint step 12" in warnings[0]
        assert warnings[0].endswith("resuming from step 8")


def _meta(step_dir):
    return json.loads((step_dir / "meta" / "metadata").read_text())


def test_checkpoints_do_not_grow_with_the_iterations_and_the_metrics_log_is_cut_to_the_resumed_step(tmp_path):
    ck_dir, log = tmp_path / "ck", tmp_path / "metrics.jsonl"
    settings = SearchSettings(num_clusters=3, iterations=60, seed=1, cache_size=30)
    with Checkpointer(ck_dir, every=10, keep=2, fingerprint=FP, metrics_path=log) as ck:
        first = run_search(_scorer(), settings, checkpointer=ck, should_stop=_StopAt(50))
    assert _steps(ck_dir) == [40, 50]
    # The rows live in the log; a step records only how many are its own.
    assert [_meta(ck_dir / str(s)).get("metrics_rows") for s in (40, 50)] == [41, 51]
    assert all("metrics" not in _meta(ck_dir / str(s)) for s in (40, 50))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == json.loads(json.dumps(first.state.metrics)) and len(rows) == 51
    # What a step stores does not grow: its metadata is the same few hundred bytes 10 iterations
    # on (the arrays are compressed by Orbax, so their bytes vary with content), and the loss
    # cache it holds stays within --cache_size.
    meta_bytes = [os.path.getsize(ck_dir / str(s) / "meta" / "metadata") for s in (40, 50)]
    assert meta_bytes[0] == meta_bytes[1] < 1024, meta_bytes
    with Checkpointer(ck_dir, every=10, keep=2, fingerprint=FP, metrics_path=log) as ck:
        assert len(ck.restore(N).cache.to_arrays()[1]) <= settings.cache_size
    # Rows beyond the newest committed step (an interrupted save) and a line cut by a kill are dropped.
    with open(log, "a") as fh:
        fh.write(json.dumps({**rows[-1], "iteration": 51}) + "\n" + '{"iteration": 5')
    (ck_dir / "50" / COMMITTED).unlink()
    with Checkpointer(ck_dir, every=10, keep=2, fingerprint=FP, metrics_path=log) as ck:
        resumed = run_search(_scorer(), settings, checkpointer=ck)
    full = run_search(_scorer(), settings)
    assert resumed.partition_n.tolist() == full.partition_n.tolist()
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in after] == list(range(61))
    assert after[:41] == rows[:41]


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    with Checkpointer(tmp_path, every=2, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        run_search(_scorer(), SearchSettings(num_clusters=3, iterations=4), checkpointer=ck)
    for step in _steps(tmp_path):
        (tmp_path / str(step) / "meta" / "metadata").write_text("{not json")
    with pytest.raises(UserError, match=r"no usable checkpoint \(step 4, 2: .*\); use --overwrite") as e:
        Checkpointer(tmp_path, every=2, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl").restore(N)
    assert "\n" not in str(e.value)


def test_committed_steps_carry_the_marker_and_ordinary_modes(tmp_path):
    with Checkpointer(tmp_path, every=2, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        run_search(_scorer(), SearchSettings(num_clusters=3, iterations=4), checkpointer=ck)
    umask = os.umask(0)
    os.umask(umask)
    for step in _steps(tmp_path):
        assert (tmp_path / str(step) / COMMITTED).read_text() == f"{step}\n"
        for root, _, files in os.walk(tmp_path / str(step)):
            for f in files:
                assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o666 & ~umask


def test_fingerprint_is_the_content_of_each_input(tmp_path, monkeypatch):
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    base, ad = tmp_path / "base", tmp_path / "ad" / "t0"
    for d in (base, ad):
        d.mkdir(parents=True)
    (base / "config.json").write_text('{"a": 1}')
    (base / "model.safetensors").write_bytes(b"w" * 100)
    (base / "tokenizer.json").write_text("{}")
    (base / "README.md").write_text("not an input")
    (ad / "adapter_config.json").write_text('{"r": 4}')
    (ad / "adapter_model.safetensors").write_bytes(b"x" * 10)
    examples = {"t0": [("p", "r")]}

    def fp(settings={"k": 1}, ex=examples):
        return run_fingerprint(str(base), {"t0": str(ad)}, ex, settings)

    ref = fp()
    assert sorted(ref["files"]) == ["adapters/t0/adapter_config.json", "adapters/t0/adapter_model.safetensors",
                                   "base_model/config.json", "base_model/model.safetensors", "tokenizer/tokenizer.json"]
    assert ref["files"]["base_model/model.safetensors"] == hashlib.sha256(b"w" * 100).hexdigest()
    assert fp() == ref and fp({"k": 2})["settings"] != ref["settings"]
    assert fp(ex={"t0": [("p", "r2")]})["examples"] != ref["examples"]
    (base / "README.md").write_text("changed")
    assert fp() == ref
    # Same size, new content (an adapter retrained in place): the hash sees it, through the cache.
    for path, key in [(base / "model.safetensors", "base_model/model.safetensors"),
                      (ad / "adapter_model.safetensors", "adapters/t0/adapter_model.safetensors"),
                      (base / "tokenizer.json", "tokenizer/tokenizer.json")]:
        old = path.read_bytes()
        path.write_bytes(b"y" * len(old))
        assert fp()["files"][key] == hashlib.sha256(b"y" * len(old)).hexdigest() != ref["files"][key]
        path.write_bytes(old)
    assert fp() == ref
    cache = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert cache[str(base / "model.safetensors")][-1] == ref["files"]["base_model/model.safetensors"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_flag_turns_a_signal_into_a_flag(sig):
    previous = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag()
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
        assert flag() and flag.signum == sig
    assert signal.getsignal(sig) == previous


_WORKER = textwrap.dedent("""
    import json, sys
    from fixtures_search_fakes import FakeScorer, families
    from test_checkpoint import SETTINGS, FP, N, F
    from d2c_jax.checkpoint import Checkpointer
    from d2c_jax.search import run_search
    from d2c_jax.signals import PreemptionFlag
    ck_dir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with PreemptionFlag() as flag, Checkpointer(ck_dir, every=3, keep=2, fingerprint=FP, metrics_path=f"{ck_dir}.metrics.jsonl") as ck:
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


def test_only_interrupted_saves_mean_no_checkpoint(tmp_path, capsys):
    with Checkpointer(tmp_path, every=2, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        run_search(_scorer(), SearchSettings(num_clusters=3, iterations=2), checkpointer=ck)
    steps = _steps(tmp_path)
    for step in steps:
        (tmp_path / str(step) / COMMITTED).unlink()
    with Checkpointer(tmp_path, every=2, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        assert ck.restore(N) is None
    assert _steps(tmp_path) == []
    listed = ", ".join(str(s) for s in reversed(steps))
    assert f"skipping unusable checkpoint step {listed} (not committed: its save was interrupted); starting afresh" \
        in capsys.readouterr().err


_OPENED: list[str] | None = None  # files opened while recording (a process-wide audit hook)


def _record_opens(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], str):
        _OPENED.append(os.path.abspath(args[0]))


def test_every_input_file_a_run_reads_is_in_the_fingerprint(tmp_path, monkeypatch):
    """Every input kind, from real files: a sharded base checkpoint (model-0000x-of-0000y
    .safetensors + the index json), config.json, the tokenizer files, each adapter's config and
    weights, the examples used. A changed byte (same size: a shard or an adapter re-saved in place)
    in any file that loading the inputs opens, or in any weight file (read natively), changes the
    fingerprint and `mismatch` names that file; so does a changed example that is used, and an
    example past --examples_per_task does not."""
    global _OPENED
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from d2c_jax import pipeline
    from d2c_jax.fingerprint import mismatch
    from d2c_jax.inputs import load_inputs
    from d2c_jax.run_config import RunConfig
    from fixtures_adapters import make_peft_adapters
    from fixtures_models import make_tiny_model

    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    base = make_tiny_model(tmp_path / "base", "llama", max_shard_size="40KB")
    make_peft_adapters(base, tmp_path / "ad", ["t0", "t1"], r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    (tmp_path / "data").mkdir()
    for n in ("t0", "t1"):
        (tmp_path / "data" / f"{n}.jsonl").write_text(
            "".join(json.dumps({"prompt": f"one two {n} {j}", "response": f"three {j}"}) + "\n" for j in range(3)))
    cfg = RunConfig.from_flat(base_model=base, adapters_dir=str(tmp_path / "ad"), data_dir=str(tmp_path / "data"),
                              workdir=str(tmp_path / "wd"), examples_per_task=2, max_seq_len=64, dtype="float32")

    def fingerprint():
        inputs = load_inputs(cfg.base_model, cfg.adapters_dir, cfg.data_dir, examples_per_task=2, max_seq_len=64,
                             dtype="float32")
        return pipeline._fingerprint(cfg, inputs), inputs

    sys.addaudithook(_record_opens)
    _OPENED = []
    try:
        ref, inputs = fingerprint()
        inputs.params  # the base weights, read on first use
        opened = set(_OPENED)
    finally:
        _OPENED = None
    shards = sorted(f for f in os.listdir(base) if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.isfile(os.path.join(base, "model.safetensors.index.json"))
    inputs_dirs = [base, str(tmp_path / "ad" / "t0"), str(tmp_path / "ad" / "t1")]
    files = sorted({p for p in opened if os.path.dirname(p) in inputs_dirs}
                   | {os.path.join(d, f) for d in inputs_dirs for f in os.listdir(d) if f.endswith(".safetensors")})
    names = {os.path.relpath(p, tmp_path) for p in files}
    assert {f"base/{s}" for s in shards} | {"base/model.safetensors.index.json", "base/config.json",
                                            "base/tokenizer.json", "base/tokenizer_config.json",
                                            "ad/t0/adapter_config.json", "ad/t0/adapter_model.safetensors"} <= names
    for path in files:
        old = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(old[:len(old) // 2] + bytes([old[len(old) // 2] ^ 1]) + old[len(old) // 2 + 1:])
        try:  # hashed as they are (a changed file may not load any more)
            why = mismatch(ref, pipeline._fingerprint(cfg, inputs))
            assert why is not None and os.path.basename(path) in why, (path, why)
        finally:
            with open(path, "wb") as f:
                f.write(old)
    assert fingerprint()[0] == ref
    data_file = tmp_path / "data" / "t1.jsonl"
    lines = data_file.read_text().splitlines(keepends=True)
    data_file.write_text("".join(lines[:2]) + lines[2].replace("three", "four"))  # past --examples_per_task=2
    assert fingerprint()[0] == ref
    data_file.write_text(lines[0] + lines[1].replace("three", "four") + lines[2])
    assert mismatch(ref, fingerprint()[0]) == "the examples used for task t1 changed"
