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

from fixtures_processes import Started  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "benchmark.py")


def _bf16_argv(tmp_path):
    return [sys.executable, SCRIPT, "--tiny", "--iterations=2", "--dtype=bfloat16",
            f"--fixture_dir={tmp_path / 'fixture'}", f"--out_dir={tmp_path / 'runs'}"]


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """(tiny dir, bfloat16 dir, Started): the benchmark runs of the tests below, each in its own
    directories, started together when the first of them asks."""
    tiny, bf16 = tmp_path_factory.mktemp("tiny"), tmp_path_factory.mktemp("bf16")
    started = Started({
        "tiny": [sys.executable, SCRIPT, "--tiny", "--iterations=3", "--scaling", f"--fixture_dir={tiny / 'fixture'}",
                 f"--out_dir={tiny / 'runs'}", f"--output={tiny / 'bench.json'}"],
        # refused at its flags, before it builds a fixture: the run beside it owns that directory
        "bf16_refused": _bf16_argv(bf16),
        "bf16": _bf16_argv(bf16) + ["--columns=default", f"--output={bf16 / 'bench.json'}"],
    }, timeout=900, cwd=ROOT)
    yield tiny, bf16, started
    started.close()


def test_tiny_benchmark_runs_every_column_and_the_scaling_figure(benchmarks):
    tmp_path, _, started = benchmarks
    out = tmp_path / "bench.json"
    proc = started.result("tiny")
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


def test_bfloat16_columns_run_and_the_torch_loop_is_refused_in_bfloat16(benchmarks):
    """--dtype=bfloat16 (the accelerator figure's dtype) runs our columns in bfloat16; the torch
    loop is float32 only, so asking for it in bfloat16 ends with one line, before any work."""
    _, tmp_path, started = benchmarks
    refused = started.result("bf16_refused")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "the torch loop runs float32 only" in refused.stderr.strip().splitlines()[-1]
    out = tmp_path / "bench.json"
    proc = started.result("bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["exit"] == 0 and "--dtype=bfloat16" in row["command"] and row["evaluations"] > 0
    # The fixture's base weights were saved in bfloat16, as a user's bfloat16 checkpoint is.
    from safetensors import safe_open

    (weights,) = (tmp_path / "fixture").glob("*/base/model.safetensors")
    with safe_open(str(weights), framework="np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_llama3b_preset_has_llama_3_2_3b_parameter_count():
    """The accelerator figure's model: Llama-3.2-3B's shapes. Its safetensors index lists
    total_size 6425499648 bytes of bfloat16 weights, i.e. 3,212,749,824 parameters."""
    from experiments.benchmark import fixture as bf

    s = bf.llama3b_settings()
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab) == (
        3072, 28, 24, 8, 128, 8192, 128256)
    assert bf.param_count(s) * 2 == 6425499648
    assert s.weights_dtype == "bfloat16" and s.num_adapters == 40 and s.rank == 32
