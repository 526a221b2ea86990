"""The suite build survives an interruption: its trainings continue from their checkpoints and
end with bit-identical weights; Ctrl-C leaves no half-written directory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from d2c_jax.suite import build, resume
from d2c_jax.suite.build import settings_hash
from test_suite import TINY

# Smaller still than test_suite's suite: one layer, few steps (the checkpoints are what is tested).
TINY = {**TINY, "num_layers": 1, "pretrain_steps": 12, "adapter_steps": 8, "train_examples": 16, "eval_examples": 4}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(root):
    from safetensors.numpy import load_file

    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            if fn.endswith(".safetensors"):
                out.update({f"{os.path.relpath(dirpath, root)}/{k}": v
                            for k, v in load_file(os.path.join(dirpath, fn)).items()})
    return out


def test_stopped_trainings_continue_to_bit_identical_weights(tmp_path):
    """One build straight through; another stopped in the pre-training, then in the adapter
    training, each time continued from its checkpoint: every weight equal bit for bit (same
    process, so the same XLA settings for both)."""
    s = build.make_settings(**TINY)
    build.build_into(str(tmp_path / "straight"), "base", s, log=lambda m: None)
    stage = str(tmp_path / "stage")
    calls = {"n": 0}

    def stop_after(n):
        def stop():
            calls["n"] += 1
            return calls["n"] == n
        return stop

    logs = []
    with pytest.raises(resume.Stopped):  # step 5 of 12 of the pre-training
        build.build_into(str(tmp_path / "a"), "base", s, log=logs.append, stage=stage, stop=stop_after(5))
    assert "pre-training: checkpoint of step 5/12 saved in " + stage in logs
    calls["n"] = 0
    with pytest.raises(resume.Stopped):  # resumed at 5; stopped at step 3 of 8 of the adapters
        build.build_into(str(tmp_path / "b"), "base", s, log=logs.append, stage=stage, stop=stop_after(12 - 5 + 3))
    assert "pre-training: continuing from the checkpoint of step 5/12" in logs
    assert "adapter training: checkpoint of step 3/8 saved in " + stage in logs
    build.build_into(str(tmp_path / "c"), "base", s, log=logs.append, stage=stage)
    assert "adapter training: continuing from the checkpoint of step 3/8" in logs
    want, got = _weights(tmp_path / "straight"), _weights(tmp_path / "c")
    assert sorted(want) == sorted(got) and len(want) > 10
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(want[k].view(np.uint8), got[k].view(np.uint8)), k


_CHILD = """
import sys
from d2c_jax import cli
cli.start()
from d2c_jax.errors import run_cli
from d2c_jax.suite import ensure_suite
sys.exit(run_cli(lambda: ensure_suite(sys.argv[1], log=lambda m: print(m, flush=True), **eval(sys.argv[2])) and 0))
"""


def test_ctrl_c_during_the_build_keeps_checkpoints_and_leaves_nothing_half_written(tmp_path):
    root = tmp_path / "suites" / "tiny"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    cmd = [sys.executable, "-c", _CHILD, str(root), repr(TINY)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    for line in proc.stdout:  # Ctrl-C (the whole process group, as a terminal does) once training runs
        if "pretrain step" in line or "adapter step" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "re-run the same command to continue from them" in out
    stage = resume.stage_dir(str(root), settings_hash(build.make_settings(**TINY)))
    assert sorted(os.listdir(root.parent)) == [os.path.basename(stage)]  # no suite, no temp dir
    assert "pretrain.npz" in os.listdir(stage)
    logs = []
    build.ensure_suite(root, log=logs.append, **TINY)  # the same call again
    assert any("continuing from the checkpoint" in m for m in logs), logs
    assert sorted(os.listdir(root.parent)) == ["tiny"]  # the stage removed once the suite is in place


def test_quality_line_is_a_short_sentence():
    summary = {"tasks_where_own_beats_zero_shot": 12, "num_tasks": 12, "own_adapter_loss": 0.6731,
               "zero_shot_loss": 1.8485, "other_family_loss": 2.713}
    line = build.quality_sentence(summary)
    assert line == "own adapter beats zero-shot on 12 of 12 tasks; held-out loss 0.67 vs 1.85"
