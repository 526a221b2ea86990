"""What a user does with a finished search run: evaluate it with nothing but its directory
(launch/evaluate.py --workdir / --partition), and see its summary again (launch/search.py --show).

The run is the tiny launch fixture (5 tasks, two families by tags). Its data has no held-out
files, so the evaluation scores the search examples: the references' summed losses must then
equal the objectives the search itself reported in partition.json (the gain line), computed by
the search's own code path, which is what this file checks them against.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fixtures_search_inputs import child_env, make_search_inputs, read_partition, search_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "launch", "evaluate.py")
SEARCH = os.path.join(REPO, "launch", "search.py")
# float32 losses of the same examples, batched differently by the search (packed requests) and by
# the evaluation: sums of a few hundred float32 terms agree to ~1e-6 relative; 1e-5 is the bound.
RTOL = 1e-5


def _run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=child_env(),
                          cwd=REPO, timeout=300)


def _search_argv(inputs, workdir):
    # --start=round_robin: the evaluation's "random start" must be the run's own start, which is
    # then another partition than --start=random's (checked below).
    return [*search_argv(inputs, workdir), "--start=round_robin"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    inputs = make_search_inputs(root, tags=True)
    workdir = root / "run"
    proc = _run(SEARCH, *_search_argv(inputs, workdir), "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"inputs": inputs, "workdir": workdir, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def evaluated(run):
    proc = _run(EVALUATE, f"--workdir={run['workdir']}", "--metrics=loss", "--max_seq_len=48", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run["workdir"] / "evaluation.json") as f:
        return proc, json.load(f)


def test_workdir_alone_gives_paths_and_settings_and_flags_override_with_a_note(run, evaluated):
    proc, doc = evaluated
    summary = doc["summary"]
    part = read_partition(run["workdir"])
    # From the run: float32 (the evaluation's own default is bfloat16), its merge and seed.
    assert summary["dtype"] == part["dtype"] == "float32"
    assert summary["mode"] == "partition" and summary["merge"] == part["merge"]
    assert summary["max_seq_len"] == 48  # the flag wins ...
    assert "note: --max_seq_len=48 overrides the run's 64" in proc.stderr  # ... and says so
    assert summary["adapters"] == str(run["workdir"] / "merged")


def test_references_equal_the_objectives_the_search_reported(run, evaluated):
    _, doc = evaluated
    part = read_partition(run["workdir"])
    methods = doc["comparison"]["methods"]
    assert sorted(methods) == ["all_in_one", "merged", "random_start", "single_task", "zero_shot"]

    def total(method):
        return sum(e["loss"] for e in methods[method]["tasks"].values())

    # The examples fit in 48 tokens, so the override changes nothing here.
    np.testing.assert_allclose(total("merged"), part["objective"], rtol=RTOL)
    np.testing.assert_allclose(total("all_in_one"), part["all_in_one_objective"], rtol=RTOL)
    np.testing.assert_allclose(total("random_start"), part["random_start_objective"], rtol=RTOL)
    from d2c_jax.strategies.baselines import random_baseline

    dealt, drawn = (random_baseline(5, 2, part["seed"], start) for start in ("round_robin", "random"))
    assert len({tuple(x) for x in (dealt, drawn, 1 - drawn)}) == 3  # the two starts are other partitions
    assert doc["tasks"] == methods["merged"]["tasks"]  # the pinned layout: the run's adapters


def test_tables_per_family_and_gap_closed(evaluated, run):
    _, doc = evaluated
    groups = doc["comparison"]["groups"]
    assert list(groups) == ["overall", "a", "b"]  # the fixture's tags: families a and b
    assert groups["a"]["tasks"] == ["task_0", "task_2", "task_4"]
    methods = doc["comparison"]["methods"]
    for name, g in groups.items():
        rows = {r["method"]: r for r in g["rows"]}
        mean = {m: float(np.mean([methods[m]["tasks"][t]["loss"] for t in g["tasks"]], dtype=np.float64))
                for m in methods}
        for m, row in rows.items():
            np.testing.assert_allclose(row["loss"], mean[m], rtol=1e-12)
            want = (mean[m] - mean["all_in_one"]) / (mean["single_task"] - mean["all_in_one"])
            np.testing.assert_allclose(row["gap_closed"], want, rtol=1e-12)
        assert rows["single_task"]["gap_closed"] == 1.0 and rows["all_in_one"]["gap_closed"] == 0.0
    md = (run["workdir"] / "evaluation.md").read_text()
    assert "## overall (5 tasks)" in md and "## a (3 tasks)" in md and "| merged (the run) |" in md
    assert (run["workdir"] / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scored(run, tmp_path_factory):
    """The run evaluated with generation metrics, on a copy of its data whose tasks.json names chrF
    (character n-grams: the tiny random model's output shares some with every reference, so every
    single-task score is positive; its exact-match and ROUGE-L scores are 0)."""
    data = tmp_path_factory.mktemp("scored") / "data"
    shutil.copytree(run["inputs"]["data_dir"], data)
    doc = json.loads((data / "tasks.json").read_text())
    (data / "tasks.json").write_text(json.dumps({t: {**e, "metric": "chrf"} for t, e in doc.items()}))
    out = data.parent / "evaluation.json"
    proc = _run(EVALUATE, f"--workdir={run['workdir']}", f"--data_dir={data}", "--metrics=loss,generation",
                f"--output={out}", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_s_score_is_the_mean_ratio_of_merged_to_single_task_scores_and_printed(scored):
    """K-Merge's S-score: mean over tasks of score(merged) / score(single-task), recomputed here by
    plain arithmetic from the per-task scores the evaluation wrote, for every method and group."""
    proc, doc = scored
    methods, groups = doc["comparison"]["methods"], doc["comparison"]["groups"]

    def want(method, tasks):
        single = [methods["single_task"]["tasks"][t]["chrf"] for t in tasks]
        mine = [methods[method]["tasks"][t]["chrf"] for t in tasks]
        assert all(s > 0 for s in single)
        return sum(m / s for m, s in zip(mine, single)) / len(tasks)

    # float64 means of <= 5 ratios summed in another order: ~1e-16 relative; 1e-12 is the bound.
    for g in groups.values():
        for row in g["rows"]:
            assert row["s_score"] == pytest.approx(want(row["method"], g["tasks"]), rel=1e-12, abs=0)
    s = want("merged", list(doc["tasks"]))
    assert doc["summary"]["s_score"] == pytest.approx(s, rel=1e-12, abs=0)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("partition: ") and f", S-score {s:.3f} over 5 tasks" in last
    assert "S-score" in proc.stdout.splitlines()[1]  # a column of every table


def test_without_scores_there_is_no_s_score(evaluated):
    proc, doc = evaluated  # --metrics=loss
    assert doc["summary"]["s_score"] is None and "S-score" not in proc.stdout


def test_partition_alone_is_the_same_run(run):
    """--partition=RUN/partition.json alone resolves to what --workdir=RUN does (no weights read)."""
    from d2c_jax.evaluation import EvalConfig, resolve

    by_workdir, _ = resolve(EvalConfig(workdir=str(run["workdir"])))
    by_partition, notes = resolve(EvalConfig(partition=str(run["workdir"] / "partition.json")))
    assert notes == [] and dataclasses.replace(by_partition, workdir=by_workdir.workdir) == by_workdir
    assert by_workdir.base_model == run["inputs"]["base_model"] and by_workdir.dtype == "float32"
    assert by_workdir.compare == ("zero_shot", "single_task", "all_in_one", "random_start")
    assert by_workdir.output == str(run["workdir"] / "evaluation.json")


def test_the_run_pinned_chat_template_date_is_the_evaluations(run, tmp_path):
    """A template that writes the date sees the search's pinned day, whatever day the evaluation
    runs (a flag still overrides it)."""
    from d2c_jax.evaluation import EvalConfig, resolve

    wd = tmp_path / "wd"
    shutil.copytree(run["workdir"], wd, ignore=shutil.ignore_patterns("checkpoints", "evaluation*"))
    doc = json.loads((wd / "partition.json").read_text())
    (wd / "partition.json").write_text(json.dumps({**doc, "chat_template_date": "2026-01-31"}))
    assert resolve(EvalConfig(workdir=str(wd)))[0].chat_template_date == "2026-01-31"
    assert resolve(EvalConfig(workdir=str(wd), chat_template_date="2026-02-01"))[0].chat_template_date == "2026-02-01"


def test_unfinished_run_is_one_error_line(tmp_path):
    (tmp_path / "wd").mkdir()
    proc = _run(EVALUATE, f"--workdir={tmp_path / 'wd'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'wd'}: holds no partition.json: the search has not finished (re-run its command to "
        "resume it)"]
    assert os.listdir(tmp_path / "wd") == []


def _summary(stdout):
    """The summary table through the gain line and the outputs' line, as the search prints it."""
    lines = stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("cluster  size"))
    last = next(i for i, line in enumerate(lines) if line.startswith("outputs in "))
    return lines[first:last + 1]


def test_run_seconds_are_reported_per_phase(run):
    part = read_partition(run["workdir"])
    phases = part["phase_seconds"]
    assert list(phases) == ["load", "search", "references"] and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= part["seconds"] + 4 * 0.0005  # each of the four rounded to 3 decimals
    assert f"{part['seconds']:.1f} s (load {phases['load']:.1f} s, search {phases['search']:.1f} s" in run["stdout"]


def test_show_and_a_rerun_reprint_the_summary(run):
    table = _summary(run["stdout"])
    assert table[-2].startswith("found ") and "random start" in table[-2]
    proc = _run(SEARCH, f"--workdir={run['workdir']}", "--show")
    assert proc.returncode == 0 and proc.stdout.splitlines() == table, proc.stderr
    proc = _run(SEARCH, *_search_argv(run["inputs"], run["workdir"]), "--noprogress")
    assert proc.returncode == 0 and _summary(proc.stdout) == table
    assert proc.stdout.splitlines()[-1].startswith("already finished: ")
    proc = _run(SEARCH, f"--workdir={run['workdir'] / 'missing'}", "--show")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {run['workdir'] / 'missing'}: holds no finished run (partition.json)"]


def test_a_resumed_run_says_from_which_checkpoint(run, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(run["workdir"], workdir)
    os.remove(workdir / "partition.json")  # unfinished again: its last checkpoint remains
    proc = _run(SEARCH, *_search_argv(run["inputs"], workdir), "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = f"resumed from iteration 6 of 6 (checkpoint {workdir / 'checkpoints' / '6'})"
    assert want in proc.stdout.splitlines()
    assert read_partition(workdir)["clusters"] == read_partition(run["workdir"])["clusters"]
