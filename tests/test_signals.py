"""SIGINT / SIGTERM at every stage of a real launch/search.py run: one line, the right exit status
(0 for SIGTERM, 130 for SIGINT), a checkpoint when the search had started, a second SIGINT
leaving at once, never a traceback or a crash (the rc 139 segfault of an early Ctrl-C).

The child runs the real script under `fixtures_signals.LAUNCHER`, which sends it a real signal at
the n-th audit event matching a pattern (an import, a file-system write), so each stage is hit
deterministically, without sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from fixtures_search_inputs import child_env, make_search_inputs, read_partition, search_argv  # noqa: E402
from fixtures_signals import signalled  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "search.py")



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("inputs"))


def _launch(inputs, workdir, plan: str | None):
    cmd, env = signalled([sys.executable, SCRIPT, *search_argv(inputs, workdir), "--noprogress"], child_env(), plan)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr
    return proc


def test_signals_at_every_stage(inputs, tmp_path):
    wd = tmp_path / "wd"
    ckpts = wd / "checkpoints"
    # Start-up (importing jax) and loading (the tokenizer): nothing to save, exit at once.
    proc = _launch(inputs, wd, "import:jax._src.interpreters:1:SIGINT")
    assert (proc.returncode, proc.stderr.splitlines()) == (130, ["stopped by SIGINT outside the search: nothing was saved"])
    proc = _launch(inputs, wd, "fs:tokenizer.json:1:SIGTERM")
    assert (proc.returncode, proc.stderr.splitlines()) == (0, ["stopped by SIGTERM outside the search: nothing was saved"])
    assert not wd.exists()

    # Inside a checkpoint commit (the second save): the iteration ends, a checkpoint, exit 130.
    proc = _launch(inputs, wd, "fs:checkpoints/:12:SIGINT")
    assert proc.returncode == 130, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT: checkpoint of iteration ") and last.endswith(
        f"saved in {ckpts}; re-run the same command to resume")
    step = int(last.split("iteration ")[1].split("/")[0])
    assert (ckpts / str(step) / "d2c_committed").exists()

    # Writing the outputs: the first SIGINT waits for them, a second one leaves at once.
    proc = _launch(inputs, wd, "fs:merged:2:SIGINT,fs:merged:4:SIGINT")
    assert proc.returncode == 130
    assert proc.stderr.splitlines()[-1] == (f"stopped by SIGINT a second time; leaving at once: the checkpoint of "
                                            f"iteration 6 in {ckpts} is kept; re-run the same command to resume")
    assert not (wd / "partition.json").exists()

    proc = _launch(inputs, wd, None)
    assert proc.returncode == 0, proc.stderr
    assert sorted(t for c in read_partition(wd)["clusters"] for t in c) == sorted(os.listdir(inputs["adapters_dir"]))
    assert not [n for n in os.listdir(wd) if ".tmp-" in n or ".old-" in n]
