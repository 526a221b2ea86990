"""launch/benchmark.py --tiny runs every column end to end and prints the table (no timing
assertions: the machine is shared)."""

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


def test_tiny_benchmark_runs_every_column_and_the_scaling_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--iterations=3", "--scaling",
                           f"--fixture_dir={tmp_path / 'fixture'}", f"--out_dir={tmp_path / 'runs'}",
                           f"--output={out}"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["column"], r["iterations"]) for r in rows] == [("torch", 3), ("default", 3), ("best", 3)]
    for r in rows:
        assert r["exit"] == 0 and r["evaluations"] > 0 and r["peak_rss_mb"] > 0 and r["mfu"] > 0
    torch_row, default, best = rows
    # The torch loop: 2 evaluations per iteration, then one per task of the final partition.
    assert torch_row["evaluations"] == 2 * 3 + 6
    # The same search (same seed, same rule) in both d2c_jax columns; the warm one compiles nothing.
    assert default["partition"] == best["partition"]
    assert best["compile"]["compilations"] == 0 < default["compile"]["compilations"]
    assert "| T " in proc.stdout and "matmul peak" in proc.stdout
    assert result["scaling"]["num_adapters"] == [6, 12] and result["scaling"]["ratio"] > 0

    # The replay of the default run's cache counts the same evaluations the run made.
    replay = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "benchmark", "replay_counts.py"),
                             f"--workdir={tmp_path / 'runs' / 'default-T3'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert replay.returncode == 0, replay.stderr[-3000:]
    this_run = next(line for line in replay.stdout.splitlines() if line.startswith("| this run"))
    assert this_run.split("|")[2].strip() == str(default["evaluations"])
