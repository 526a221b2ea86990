"""cli.start() silences the two lines of library noise every run printed: transformers' "PyTorch
was not found" (where torch is absent, simulated here) and jax's "Unable to initialize backend".
cli.parser: --help / --helpfull, unknown flags, flagfile placeholders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fixtures_processes import run_together
from fixtures_search_inputs import child_env

_CHILD = r"""
import importlib.util, logging, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "torch" else real(name, *a, **k)  # torch absent
if sys.argv[1] == "start":
    from d2c_jax import cli
    cli.start()
logging.basicConfig(level=logging.INFO)
import transformers  # noqa: F401
import jax
jax.devices()
print("done")
"""


def _stderrs(*modes: str) -> list[str]:
    env = child_env(JAX_PLATFORMS="")  # let jax probe its backends, as a user's run does
    procs = run_together([[sys.executable, "-c", _CHILD, mode] for mode in modes], env=env)
    for proc in procs:
        assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    return [proc.stderr for proc in procs]


def test_start_silences_library_noise():
    noisy, quiet = _stderrs("plain", "start")
    assert "PyTorch was not found" in noisy  # the simulation reproduces the noise
    assert "PyTorch was not found" not in quiet and "Unable to initialize backend" not in quiet, quiet


# Flag handling of every launch script (d2c_jax/cli.py: parser, describe, placeholders, help_text).


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _search(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "search.py"), *args], capture_output=True,
                          text=True, env=child_env(), cwd=ROOT, timeout=300)


def _searches(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """launch/search.py once per argument list, side by side."""
    return run_together([[sys.executable, os.path.join(ROOT, "launch", "search.py"), *args] for args in argvs],
                         env=child_env(), cwd=ROOT)


def test_help_exits_0_with_the_basic_flags_first_by_group():
    proc, *aliases = _searches(["--help"], ["-h"], ["--helpshort"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    heads = [out.index(f"\n{g}:\n") for g in ("inputs", "search", "merge", "outputs", "run control", "advanced")]
    assert heads == sorted(heads)  # the groups in this order, advanced last
    inputs, search, advanced = out[heads[0]:heads[1]], out[heads[1]:heads[2]], out[heads[5]:]
    assert "--flagfile=FILE" in inputs and "--base_model" in inputs and "--num_clusters=5" in search
    assert "--speculate" in advanced and "--speculate" not in out[:heads[5]]
    assert out.startswith("Clusters N LoRA adapters")
    assert "absl" not in out.split("\n--helpfull")[0]  # no general flags in the short help
    for alias in aliases:  # -h, --helpshort
        assert alias.stdout == out


def test_helpfull_has_the_general_flags_but_no_test_framework_flags():
    proc = _search("--helpfull")
    assert proc.returncode == 0, proc.stderr
    assert "--verbosity" in proc.stdout and "--num_clusters=5" in proc.stdout
    for name in ("chex", "test_tmpdir", "test_srcdir", "test_random_seed", "xml_output_file"):
        assert name not in proc.stdout, name


def test_unknown_flag_gets_the_closest_name():
    proc, other = _searches(["--num_cluster=4"], ["--noprogres"])
    assert (proc.returncode, proc.stderr.splitlines()) == (
        1, ["error: unknown flag --num_cluster (did you mean --num_clusters?)"])
    assert other.stderr.splitlines() == ["error: unknown flag --noprogres (did you mean --noprogress?)"]


def test_flagfile_placeholders_are_named_all_in_one_line(tmp_path):
    llama = os.path.join(ROOT, "configs", "llama.flags")
    proc = _search(f"--flagfile={llama}", f"--workdir={tmp_path / 'w'}", "--data_dir=/data/mine")
    assert (proc.returncode, proc.stderr.splitlines()) == (1, [
        f"error: {llama}: placeholder path(s) still to edit: --adapters_dir=/path/to/adapters/llama, "
        "--base_model=/path/to/Llama-3.2-3B-Instruct (edit the file, or give these flags on the command line)"])
    assert not (tmp_path / "w").exists()


SCRIPTS = ["evaluate", "merge", "make_suite", "report", "benchmark"]


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """Every other launch script's --help, the scripts run side by side once for the module."""
    procs = run_together([[sys.executable, os.path.join(ROOT, "launch", f"{s}.py"), "--help"] for s in SCRIPTS],
                          env=child_env(), cwd=ROOT)
    return dict(zip(SCRIPTS, procs))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_launch_script_answers_help_with_exit_0(script, helps):
    path = os.path.join(ROOT, "launch", f"{script}.py")
    proc = helps[script]
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    with open(path, encoding="utf-8") as f:
        first = f.read().split('"""')[1].splitlines()[0]
    assert proc.stdout.startswith(first) and "\n  --" in proc.stdout
