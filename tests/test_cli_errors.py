"""launch/make_suite.py and launch/report.py: bad flags and inputs end with exit status 1, exactly
one `error: <path>: <message>` line on stderr, no traceback and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fixtures_search_inputs import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], capture_output=True,
                          text=True, env=child_env(), cwd=cwd, timeout=300)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_make_suite_errors(tmp_path):
    line = _one_error(_run("make_suite.py", cwd=tmp_path))
    assert line == "error: --output_dir is required (or give --preset=demo|full|warm_start)"
    out = tmp_path / "suite"
    line = _one_error(_run("make_suite.py", f"--output_dir={out}", "--families=99", cwd=tmp_path))
    assert line.startswith("error: suite settings: families=99; must be in [1, ")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not a suite")
    line = _one_error(_run("make_suite.py", f"--output_dir={other}", "--families=2", "--languages=2", cwd=tmp_path))
    assert line.startswith(f"error: {other}: exists and is not a d2c_jax suite")
    assert sorted(os.listdir(tmp_path)) == ["mine"] and os.listdir(other) == ["notes.txt"]


@pytest.mark.parametrize("args,expected", [
    (["--suite={missing}"], "error: {missing}: neither a suite directory nor a preset name"),
    (["--suite={empty}"], "error: {empty}: not a suite directory: no base/, adapters/, data/"),
    (["--suite={empty}", "--cluster_counts=2,x"], "error: --cluster_counts=2,x: must be integers"),
])
def test_report_errors(tmp_path, args, expected):
    names = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty")}
    os.mkdir(names["empty"])
    out = tmp_path / "out"
    line = _one_error(_run("report.py", *[a.format(**names) for a in args], f"--output_dir={out}",
                           f"--suite_root={tmp_path / 'suites'}", cwd=tmp_path))
    assert line.startswith(expected.format(**names)), line
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no output dir, no suite root
