"""launch/benchmark.py --tiny runs end to end and prints the reference and d2c_jax columns side by
side, the strategy table and the JSON figures (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "benchmark.py")


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    # --noisolate: the columns share one process (saves two interpreter + library start-ups).
    proc = run_benchmark("--tiny", "--noisolate", f"--fixture_dir={tmp / 'fixture'}", f"--output={out}")
    return proc, out, tmp


def test_tiny_benchmark_prints_reference_and_d2c_jax_columns(tiny_run):
    proc, _, _ = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if "reference (torch+PEFT)" in line)
    assert "d2c_jax paper" in header and "d2c_jax P=2 M=2" in header
    for row in ("evaluations / s", "speed-up, evaluations / s", "projected 200 iterations", "peak RSS (MB)",
                "loss-cache hit rate", "first-call compile (s)"):
        assert any(line.startswith(row) for line in proc.stdout.splitlines()), row
    for strategy in ("random", "kmeans", "svd_kmeans", "d2c paper", "d2c P=2 M=2 local", "d2c P=2 M=1 global"):
        assert any(line.startswith(strategy) for line in proc.stdout.splitlines()), strategy


def test_tiny_benchmark_json_has_every_column_and_strategy(tiny_run):
    proc, out, _ = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["column"] for c in result["columns"]] == ["reference", "d2c_jax paper", "d2c_jax P=2 M=2"]
    for c in result["columns"]:
        assert c["evaluations"] > 0 and c["seconds"] > 0 and c["peak_rss_mb"] > 0
    assert len(result["strategies"]) == 6
    # Same proposals and the same losses (float32 both sides): the same accept/reject decisions.
    assert result["parity"]["decisions_agree"] == result["parity"]["decisions_compared"] > 0


def test_fixture_is_cached_and_bad_settings_fail_with_one_line(tiny_run):
    _, _, tmp = tiny_run
    (tag,) = [d for d in os.listdir(tmp / "fixture") if not d.startswith(".")]
    assert os.path.isfile(tmp / "fixture" / tag / "manifest.json")
    assert len(os.listdir(tmp / "fixture" / tag / "adapters")) == 6
    proc = run_benchmark("--tiny", "--noisolate", f"--fixture_dir={tmp / 'fixture'}", "--num_clusters=0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --num_clusters=0: must be >= 1"
