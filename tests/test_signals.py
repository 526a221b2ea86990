"""SIGINT / SIGTERM / SIGHUP at every stage of a real launch/search.py run: one line, the right exit
status (after a checkpoint: 0 for SIGTERM and SIGHUP, 130 for SIGINT; with nothing saved: 128 +
the signal number), a checkpoint when the search had started, a second SIGINT leaving at once,
never a traceback or a crash (the rc 139 segfault of an early Ctrl-C). merge.py and evaluate.py
end non-zero when a signal stops them before their output is complete.

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
    assert (proc.returncode, proc.stderr.splitlines()) == (130, ["stopped by SIGINT: nothing was saved"])
    proc = _launch(inputs, wd, "fs:tokenizer.json:1:SIGTERM")  # nothing saved: non-zero (128 + 15)
    assert (proc.returncode, proc.stderr.splitlines()) == (143, ["stopped by SIGTERM: nothing was saved"])
    proc = _launch(inputs, wd, "fs:tokenizer.json:1:SIGHUP")  # a closed terminal: as SIGTERM (128 + 1)
    assert (proc.returncode, proc.stderr.splitlines()) == (129, ["stopped by SIGHUP: nothing was saved"])
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


def _run_signalled(script, args, plan):
    cmd, env = signalled([sys.executable, os.path.join(ROOT, "launch", script), *args], child_env(), plan)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_merge_stopped_before_its_output_is_complete_exits_non_zero(inputs, tmp_path, sig, code):
    """One contract for every command: non-zero unless the complete output was written; a temp
    the killed write left is removed by the next run into the same place."""
    out = tmp_path / "merged"
    args = [f"--adapters={inputs['adapters_dir']}/task_0,{inputs['adapters_dir']}/task_1", f"--output_dir={out}"]
    proc = _run_signalled("merge.py", args, f"fs:.merged.tmp-:2:{sig}")  # inside the write of the output
    assert (proc.returncode, proc.stderr.splitlines()) == (code, [f"stopped by {sig}: nothing was saved"])
    assert not out.exists()
    proc = _run_signalled("merge.py", args, None)
    assert (proc.returncode, proc.stdout) == (0, f"wrote {out}\n"), proc.stderr
    assert os.listdir(tmp_path) == ["merged"]  # the killed write's temp is gone


def test_evaluate_stopped_before_its_output_is_written_exits_non_zero(inputs, tmp_path):
    out = tmp_path / "eval.json"
    args = [f"--base_model={inputs['base_model']}", f"--adapters_dir={inputs['adapters_dir']}",
            f"--data_dir={inputs['data_dir']}", f"--output={out}", "--dtype=float32"]
    proc = _run_signalled("evaluate.py", args, "fs:tokenizer.json:1:SIGTERM")
    assert (proc.returncode, proc.stderr.splitlines()) == (143, ["stopped by SIGTERM: nothing was saved"])
    assert os.listdir(tmp_path) == []


def test_sighup_in_the_search_saves_a_checkpoint_and_exits_0(inputs, tmp_path):
    """A closed terminal or ssh session (SIGHUP) is a SIGTERM: checkpoint, exit 0, resumable."""
    wd = tmp_path / "wd"
    proc = _launch(inputs, wd, "fs:checkpoints/:12:SIGHUP")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGHUP: checkpoint of iteration "), last
    step = int(last.split("iteration ")[1].split("/")[0])
    assert (wd / "checkpoints" / str(step) / "d2c_committed").exists()


@pytest.mark.parametrize("script, args", [
    ("make_suite.py", ["--output_dir={tmp}/suite", "--families=2", "--languages=2"]),
    ("report.py", ["--suite={tmp}/suite", "--output_dir={tmp}/report"]),
    ("benchmark.py", ["--tiny", "--out_dir={tmp}/bench", "--fixture_dir={tmp}/fixture"]),
])
def test_every_other_command_stopped_early_exits_non_zero_and_writes_nothing(tmp_path, script, args):
    proc = _run_signalled(script, [a.format(tmp=tmp_path) for a in args], "import:jax._src.interpreters:1:SIGTERM")
    assert (proc.returncode, proc.stderr.splitlines()) == (143, ["stopped by SIGTERM: nothing was saved"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_a_command_imports_its_flags_library_ends_it_with_one_line(tmp_path, sig, code):
    """The signal handling is installed before anything else is imported: a Ctrl-C in the first
    tenths of a second is the same one line as later, never a KeyboardInterrupt traceback."""
    for script in ("search.py", "merge.py", "evaluate.py", "add.py", "make_suite.py", "report.py", "benchmark.py"):
        proc = _run_signalled(script, [f"--output_dir={tmp_path}/out"], f"import:absl.flags:1:{sig}")
        assert (proc.returncode, proc.stderr.splitlines()) == (code, [f"stopped by {sig}: nothing was saved"]), script
    assert os.listdir(tmp_path) == []


LATE_SIGNAL = r"""
import os, signal, sys
from d2c_jax import signals
signals.install()


class Late:
    def __init__(self, signum, kill, pid):
        self.args, self.kill = (pid, signum), kill

    def __del__(self):  # runs in the interpreter's teardown, after its signal handling is gone
        self.kill(*self.args)


late = Late(getattr(signal, sys.argv[1]), os.kill, os.getpid())
print("error: x: the command's one line", file=sys.stderr)
sys.exit(1)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_in_the_teardown_keeps_the_decided_exit_status(sig):
    """A signal after the command ended (its status decided, its line printed) used to kill the
    process silently in the interpreter's teardown (the default action restored): its status
    lost. The property test of whole commands hit this with a signal sent after a delay."""
    proc = subprocess.run([sys.executable, "-c", LATE_SIGNAL, sig], capture_output=True, text=True,
                          env=child_env(), timeout=60)
    assert (proc.returncode, proc.stderr) == (1, "error: x: the command's one line\n")
