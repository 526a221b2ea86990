"""launch/add.py: new adapters placed into a finished run by their examples, --remove, versions.

The run: a search over four of the five fixture tasks (K = 2, local objective); task_4 arrives.
References are transformers + peft: PEFT's add_weighted_adapter (TIES, density 0.5) of each
cluster with the new adapter, and HF's loss of the new task under it. Tolerance rel 1e-5: our
float32 forward against torch's float32 forward (test_launch_search's bound for the same losses).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fixtures_search_inputs import NAMES, child_env, make_search_inputs, read_partition, search_argv
from test_launch_search import _hf_task_losses, _peft_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "launch", "search.py")
ADD = os.path.join(ROOT, "launch", "add.py")
RUN_TASKS, NEW = NAMES[:4], NAMES[4]
FLAGS = dict(num_clusters=2, iterations=4, population=1, proposals=1, objective="local", examples_per_task=3,
             max_seq_len=64, dtype="float32", checkpoint_every=2, track_every=0, seed=1)


def _launch(script, args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=child_env(),
                          timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    full = make_search_inputs(root)
    # The run's own directories hold four of the five tasks.
    run_ad, run_data = root / "run_adapters", root / "run_data"
    run_ad.mkdir()
    run_data.mkdir()
    for t in RUN_TASKS:
        shutil.copytree(os.path.join(full["adapters_dir"], t), run_ad / t)
        shutil.copy(os.path.join(full["data_dir"], f"{t}.jsonl"), run_data)
    return {**full, "run_adapters": str(run_ad), "run_data": str(run_data)}


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """A finished search over RUN_TASKS (version 0), never modified: tests work on copies."""
    workdir = tmp_path_factory.mktemp("run") / "wd"
    run_inputs = {"base_model": inputs["base_model"], "adapters_dir": inputs["run_adapters"],
                  "data_dir": inputs["run_data"]}
    # A cache of its own (no other test's executables in it): the add finds there only what the search compiled.
    cache = tmp_path_factory.mktemp("xla")
    proc = _launch(SEARCH, search_argv(run_inputs, workdir, **FLAGS, compilation_cache=cache)
                   + ["--noprogress", "--noall_in_one_reference"])
    assert proc.returncode == 0, proc.stderr
    return workdir


@pytest.fixture(scope="module")
def added(inputs, finished, tmp_path_factory):
    """The finished run with task_4 added by launch/add.py (version 1)."""
    workdir = tmp_path_factory.mktemp("added") / "wd"
    shutil.copytree(finished, workdir)
    proc = _launch(ADD, [f"--workdir={workdir}", f"--adapters={os.path.join(inputs['adapters_dir'], NEW)}",
                         f"--data_dir={inputs['data_dir']}"])
    assert proc.returncode == 0, proc.stderr
    return workdir, proc


def _tree(path):
    """Every file under path with its bytes (what a refused command must leave as it was)."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def _peft_new_task_losses(inputs, clusters):
    """Reference: per cluster, PEFT's TIES merge of the cluster's adapters and the new one; HF's
    loss of the new task under it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inputs["base_model"], dtype=torch.float32)
    ad = inputs["adapters_dir"]
    model = PeftModel.from_pretrained(model, os.path.join(ad, NAMES[0]), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(os.path.join(ad, name), adapter_name=name)
    out = []
    for k, members in enumerate(clusters):
        model.add_weighted_adapter(list(members) + [NEW], [1.0] * (len(members) + 1), f"with_{k}",
                                   combination_type="ties", density=0.5)
        model.set_adapter(f"with_{k}")
        out.append(_peft_losses(model.eval(), inputs["base_model"], inputs["data_dir"], [NEW])[NEW])
    return out


def test_the_new_adapter_joins_the_cluster_where_peft_says_its_task_loss_is_lowest(inputs, finished, added):
    workdir, proc = added
    before, doc = read_partition(finished), read_partition(workdir)
    ch = doc["change"]
    (placed,) = ch["added"]
    ref = _peft_new_task_losses(inputs, before["clusters"])
    np.testing.assert_allclose(placed["changes"], ref, rtol=1e-5)
    chosen = int(np.argmin(ref))
    assert NEW in doc["clusters"][placed["cluster"]]
    assert sorted(doc["clusters"][placed["cluster"]]) == sorted(before["clusters"][chosen] + [NEW])
    # Cost: K candidates + the chosen cluster's other tasks under its new merge, nothing more.
    assert ch["evaluations"] == before["num_clusters"] + len(before["clusters"][chosen])
    assert doc["version"] == 1 and ch["from_version"] == 0 and doc["num_clusters"] == before["num_clusters"]
    assert doc["objective"] == pytest.approx(sum(doc["task_losses"].values()), rel=1e-9)
    assert proc.stdout.strip().splitlines()[-2].startswith("version 1: objective ")


def test_the_placement_runs_the_executables_the_search_compiled(added):
    """The add, in a new process, uses the run's compilation cache (config.json) and compiles no
    scorer executable: the search over 4 tasks and the add that makes them 5 have the same padded
    adapter and task axes (scoring.slots: 8), so every merge and loss the placement runs is a cache
    hit (counted from JAX's monitoring events around the placement)."""
    workdir, _ = added
    (placed,) = read_partition(workdir)["change"]["added"]
    assert placed["compile"]["compilations"] == 0 and placed["compile"]["cache_hits"] > 0, placed["compile"]


def test_merged_adapters_are_the_new_clusters_and_unchanged_ones_are_kept_as_they_were(inputs, finished, added):
    workdir, _ = added
    before, doc = read_partition(finished), read_partition(workdir)
    for k, tasks in enumerate(doc["clusters"]):
        cluster_dir = workdir / "merged" / f"cluster_{k}"
        ref = _hf_task_losses(inputs["base_model"], str(cluster_dir), inputs["data_dir"], tasks)
        for t in tasks:
            assert doc["task_losses"][t] == pytest.approx(ref[t], rel=1e-5), (k, t)
        if NEW not in tasks:  # unchanged cluster: the previous version's files, byte for byte
            was = before["clusters"].index(tasks)
            assert _tree(cluster_dir) == _tree(finished / "merged" / f"cluster_{was}")
    # The previous version is kept whole.
    assert _tree(workdir / "versions" / "0" / "merged") == _tree(finished / "merged")
    assert read_partition(workdir / "versions" / "0") == before
    assert read_partition(workdir / "versions" / "1") == doc
    assert not (workdir / "adding").exists()


# Tuning settings of the tuned runs: 8 steps at learning rates under which the changed cluster's tuned
# weights (factors) beat the unit ones on the held-out examples here (at the defaults 0.05 / 1e-3 they
# never do in 8 steps, and the unit merge would be written).
TUNED = {"adapter": 0.5, "factors": 0.01}


@pytest.fixture(scope="module", params=sorted(TUNED))
def tuned_added(request, inputs, tmp_path_factory):
    """A run with tuned merges (--tune_weights, granularity request.param), then task_4 added."""
    granularity = request.param
    workdir = tmp_path_factory.mktemp(f"tuned_{granularity}") / "wd"
    run_inputs = {"base_model": inputs["base_model"], "adapters_dir": inputs["run_adapters"],
                  "data_dir": inputs["run_data"]}
    proc = _launch(SEARCH, search_argv(run_inputs, workdir, **FLAGS, tune_weights=True, tune_steps=8,
                                       tune_granularity=granularity, tune_learning_rate=TUNED[granularity])
                   + ["--noprogress", "--noall_in_one_reference"])
    assert proc.returncode == 0, proc.stderr
    before = read_partition(workdir)
    proc = _launch(ADD, [f"--workdir={workdir}", f"--adapters={os.path.join(inputs['adapters_dir'], NEW)}",
                         f"--data_dir={inputs['data_dir']}"])
    assert proc.returncode == 0, proc.stderr
    return granularity, workdir, before, read_partition(workdir), proc


def test_a_tuned_runs_changed_cluster_is_tuned_again_alone_with_the_runs_settings(inputs, tuned_added):
    """The changed cluster's written adapter is tune.tune_partition's kept merge (weights) or kept
    factors of that cluster alone (its adapters and its tasks' search examples, K = 1) with the run's
    settings (the flags the search was given: granularity, 8 steps, learning rate, defaults
    otherwise), not the unit-weight merge; the other cluster keeps its files."""
    import jax

    from d2c_jax import data, hf_io, lora, merge, tune
    from d2c_jax.models.config import load_config

    granularity, workdir, before, doc, proc = tuned_added
    (placed,) = doc["change"]["added"]
    k = placed["cluster"]
    members = doc["clusters"][k]
    assert members[-1] == NEW and doc["tuning"]["retuned"] == [k]
    assert f"tuning cluster {k} ({len(members)} tasks) with the run's settings" in proc.stdout
    base = inputs["base_model"]
    cfg = load_config(base)
    params = hf_io.load_params(base, cfg, "float32")
    tok = hf_io.load_tokenizer(base)
    aset = lora.load_adapter_dirs([os.path.join(inputs["run_adapters"], t) for t in members[:-1]]
                                  + [os.path.join(inputs["adapters_dir"], NEW)], cfg)
    prepared = merge.prepare_merge(aset, "ties", 0.5, seed=FLAGS["seed"])
    kw = dict(split="search", examples_per_task=3, max_seq_len=64, extra_ok=True)
    td = data.concat_task_data([data.load_task_data(inputs["run_data"], members[:-1], tok, **kw),
                                data.load_task_data(inputs["data_dir"], [NEW], tok, **kw)], tok.pad_token_id or 0)
    part = np.zeros(len(members), np.int32)
    settings = tune.TuneSettings(granularity=granularity, steps=8, learning_rate=TUNED[granularity])
    res = tune.tune_partition(params, cfg, prepared, td, part, 1, settings,
                              example_chunk=doc["tuning"]["example_chunk"])
    assert res.kept_k[0]  # the tuned weights beat the unit ones on the held-out examples: they are written
    assert doc["tuning"]["weights"][k] == [float(res.weights[0][members.index(t)]) if t in members else 1.0
                                           for t in doc["task_losses"]]
    assert doc["tuning"]["granularity"] == granularity
    want = jax.tree.map(lambda x: np.asarray(x[0]), res.lora if granularity == "factors"
                        else tune.merged_clusters(prepared, part, 1, res.weights))
    unit = jax.tree.map(lambda x: np.asarray(x[0]), tune.merged_clusters(prepared, part, 1))
    d = str(workdir / "merged" / f"cluster_{k}")
    got = lora.lora_delta(lora.effective_lora(lora.load_adapter_dirs([d], cfg), 0))
    want_d, unit_d = lora.lora_delta(want), lora.lora_delta(unit)
    for m in want_d:
        # the same function on the same inputs in another process, the factors written as float32
        # and read back unchanged: equal, not close
        np.testing.assert_array_equal(got[m], want_d[m])
        assert np.abs(want_d[m] - unit_d[m]).max() > 1e-3 * np.abs(unit_d[m]).max()  # not the unit merge
    other = 1 - k
    was = before["clusters"].index(doc["clusters"][other])
    assert _tree(workdir / "merged" / f"cluster_{other}") == _tree(
        workdir / "versions" / "0" / "merged" / f"cluster_{was}")
    assert doc["tuning"]["weights"][other] == [
        before["tuning"]["weights"][was][list(before["task_losses"]).index(t)] if t in before["task_losses"] else 1.0
        for t in doc["task_losses"]]


def test_a_tuned_runs_settings_come_from_its_config_then_its_last_version(tmp_path):
    import dataclasses

    from d2c_jax import add_run, tune
    from d2c_jax.errors import UserError

    run = add_run.Run(str(tmp_path), {"tuning": {"kept": [True]}}, ("a",), {}, {})
    with pytest.raises(UserError, match="tuning settings cannot be read") as e:
        add_run.tune_settings(run)  # no config.json
    assert e.value.path == str(tmp_path / "config.json")
    assert add_run.search_flags(run) == {}  # flags with defaults: none read, no error
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(UserError, match="tuning settings cannot be read: not a JSON object"):
        add_run.tune_settings(run)
    (tmp_path / "config.json").write_text(json.dumps({"tune_steps": 7}))
    with pytest.raises(UserError, match="tuning settings cannot be read: no flag 'tune_granularity'"):
        add_run.tune_settings(run)
    (tmp_path / "config.json").write_text(json.dumps({"tune_granularity": "layer", "tune_steps": 7,
                                                      "tune_learning_rate": None, "tune_holdout": 0.25}))
    assert add_run.tune_settings(run) == tune.TuneSettings(granularity="layer", steps=7, holdout=0.25)
    written = dataclasses.asdict(tune.TuneSettings(steps=3, learning_rate=0.5))
    assert add_run.tune_settings(dataclasses.replace(run, doc={"tuning": {"settings": written}})) == \
        tune.TuneSettings(steps=3, learning_rate=0.5)
    assert add_run.tune_settings(dataclasses.replace(run, doc={})) is None  # unit-weight merges


def test_rerunning_after_success_says_so_and_exits_0(inputs, added):
    workdir, _ = added
    snapshot = _tree(workdir)
    proc = _launch(ADD, [f"--workdir={workdir}", f"--adapters={os.path.join(inputs['adapters_dir'], NEW)}",
                         f"--data_dir={inputs['data_dir']}"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("already done: ") and "version 1" in proc.stdout
    assert {k: v for k, v in _tree(workdir).items() if k != ".d2c.lock"} == \
        {k: v for k, v in snapshot.items() if k != ".d2c.lock"}


def _refused(workdir, *args):
    snapshot = _tree(workdir)
    proc = _launch(ADD, [f"--workdir={workdir}", *args])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert _tree(workdir) == snapshot  # nothing written, not even a lock file or a version copy
    return lines[0]


def test_incompatible_or_duplicate_adapters_are_refused_with_one_line_before_anything_is_written(
        inputs, finished, tmp_path):
    from fixtures_adapters import make_peft_adapters

    workdir = tmp_path / "wd"
    shutil.copytree(finished, workdir)
    data = inputs["data_dir"]
    line = _refused(workdir, f"--adapters={os.path.join(inputs['adapters_dir'], NAMES[0])}", f"--data_dir={data}")
    assert f"task '{NAMES[0]}' is already in the run" in line

    bad = tmp_path / "bad"
    for kind, kw in (("rank", dict(r=8, alpha=16)), ("modules", dict(r=4, alpha=8, target_modules=["gate_proj"]))):
        d = make_peft_adapters(inputs["base_model"], bad / kind, [NEW], **kw)[0]
        line = _refused(workdir, f"--adapters={d}", f"--data_dir={data}")
        assert line.startswith(f"error: {os.path.join(d, 'adapter_config.json')}: "), line
        assert ("rank r=8 is larger than the run's adapters' rank 4" in line if kind == "rank"
                else "adapts gate_proj, which the run's adapters do not" in line), line

    other_base = bad / "base" / NEW
    shutil.copytree(os.path.join(inputs["adapters_dir"], NEW), other_base)
    cfg = json.loads((other_base / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/models/SomeOtherModel"
    (other_base / "adapter_config.json").write_text(json.dumps(cfg))
    line = _refused(workdir, f"--adapters={other_base}", f"--data_dir={data}")
    assert "adapters of different base models cannot be merged" in line

    line = _refused(workdir, "--remove=no_such_task")
    assert "--remove=no_such_task: no such task in the run" in line


def test_a_crash_before_publishing_leaves_the_previous_version_and_the_same_command_finishes_it(
        inputs, finished, added, tmp_path, monkeypatch):
    from d2c_jax import add_run

    workdir = tmp_path / "wd"
    shutil.copytree(finished, workdir)
    top = {k: v for k, v in _tree(workdir).items()}
    cfg = add_run.AddConfig(workdir=str(workdir), adapters=(os.path.join(inputs["adapters_dir"], NEW),),
                            data_dir=inputs["data_dir"])

    def crash(*_):
        raise RuntimeError("killed")

    monkeypatch.setattr(add_run, "publish", crash)
    with pytest.raises(RuntimeError):
        add_run.add(cfg)
    after = _tree(workdir)
    for name in ("partition.json", "assignment.png") + tuple(k for k in top if k.startswith("merged/")):
        assert after[name] == top[name], name  # the previous version is still the run's outputs
    monkeypatch.undo()
    assert add_run.add(cfg) == 0
    doc, reference = read_partition(workdir), read_partition(added[0])
    assert doc["clusters"] == reference["clusters"] and doc["task_losses"] == reference["task_losses"]


def test_remove_merges_the_cluster_again_without_the_task(inputs, added, tmp_path):
    src, _ = added
    workdir = tmp_path / "wd"
    shutil.copytree(src, workdir)
    before = read_partition(workdir)
    k_new = next(k for k, c in enumerate(before["clusters"]) if NEW in c)
    proc = _launch(ADD, [f"--workdir={workdir}", f"--remove={NEW}"])
    assert proc.returncode == 0, proc.stderr
    doc = read_partition(workdir)
    assert NEW not in doc["task_losses"] and doc["version"] == 2 and doc["change"]["removed"] == NEW
    rest = [t for t in before["clusters"][k_new] if t != NEW]
    assert rest in doc["clusters"]
    assert doc["change"]["evaluations"] == len(rest)
    k = doc["clusters"].index(rest)
    ref = _hf_task_losses(inputs["base_model"], str(workdir / "merged" / f"cluster_{k}"), inputs["data_dir"], rest)
    for t in rest:
        assert doc["task_losses"][t] == pytest.approx(ref[t], rel=1e-5), t
    assert read_partition(workdir / "versions" / "1") == before


def test_an_interrupted_placement_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
        inputs, finished, tmp_path, monkeypatch):
    from d2c_jax import add_run, online

    base = tmp_path / "base"
    shutil.copytree(finished, base)
    assert add_run.add(add_run.AddConfig(workdir=str(base), remove=RUN_TASKS[3])) == 0  # version 1: 3 tasks
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    new = tuple(os.path.join(inputs["adapters_dir"], t) for t in (RUN_TASKS[3], NEW))

    def cfg(workdir):
        return add_run.AddConfig(workdir=str(workdir), adapters=new, data_dir=inputs["data_dir"])

    assert add_run.add(cfg(reference)) == 0
    real, calls = online.place, []

    def place(*args, **kw):
        calls.append(args[3])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kw)

    monkeypatch.setattr(online, "place", place)
    top = _tree(base)
    with pytest.raises(RuntimeError):
        add_run.add(cfg(base))
    assert {k: v for k, v in _tree(base).items() if not k.startswith(("adding/", "versions/", ".d2c"))} == \
        {k: v for k, v in top.items() if not k.startswith(("versions/", ".d2c"))}
    state = json.loads((base / "adding" / "state.json").read_text())
    assert [p["task"] for p in state["placements"]] == [RUN_TASKS[3]]
    calls.clear()
    assert add_run.add(cfg(base)) == 0
    assert len(calls) == 1  # only the second adapter was placed on resuming
    doc, want = read_partition(base), read_partition(reference)
    for key in ("clusters", "task_losses", "objective"):
        assert doc[key] == want[key], key
    assert doc["change"]["evaluations"] == want["change"]["evaluations"]


# ----------------------------------------------------------------------------- placement rule (no model)

A, B, T_NEW = (0, 1), (2, 3), 4


def _scripted(members, t):
    """The new task 4 fits cluster A best, but joining A hurts A's own tasks badly."""
    if t == T_NEW:
        return 0.5 if 0 in members else 0.8 if 2 in members else 0.3
    hurt = T_NEW in members
    return (3.0 if hurt else 1.0) if t in A else (1.05 if hurt else 1.0)


def _run_partition():
    from d2c_jax import online

    partition_n = np.array([0, 0, 1, 1, -1], np.int32)
    return partition_n, online.seeded_cache(partition_n, np.array([1.0, 1.0, 1.0, 1.0, np.nan]))


@pytest.mark.parametrize("objective, cluster, changes, evaluations", [
    ("local", 0, [0.5, 0.8], 2 + 2),  # K candidates, then A's two other tasks under the new merge
    ("global", 1, [0.5 + 2 * (3.0 - 1.0), 0.8 + 2 * (1.05 - 1.0)], 4 + 2),  # N + K, all in one call
])
def test_placement_takes_the_lowest_change_of_the_objective_at_the_stated_cost(objective, cluster, changes,
                                                                               evaluations):
    from fixtures_search_fakes import TableScorer

    from d2c_jax import online

    scorer = TableScorer(5, _scripted)
    partition_n, cache = _run_partition()
    out, placement = online.place(scorer, cache, partition_n, T_NEW, objective=objective, max_clusters=2)
    assert placement.cluster == cluster and out.tolist() == [0, 0, 1, 1, cluster] and not placement.opened
    np.testing.assert_allclose(placement.changes, changes, rtol=1e-6)  # float32 losses summed in float64
    assert placement.evaluations == evaluations == sum(scorer.calls)
    assert len(scorer.calls) == (2 if objective == "local" else 1)


def test_weighted_placement_counts_each_tasks_loss_change_times_its_weight():
    """Weights 1 / (own-adapter loss): A's tasks (own loss 4) count a quarter, task 4 (own loss 0.25)
    four times; by hand: A: 4 * 0.5 + 2 * (3.0 - 1.0) / 4 = 3.0, B: 4 * 0.8 + 2 * (1.05 - 1.0) = 3.3."""
    from fixtures_search_fakes import TableScorer

    from d2c_jax import online

    partition_n, cache = _run_partition()
    w = 1.0 / np.array([4.0, 4.0, 1.0, 1.0, 0.25])
    out, placement = online.place(TableScorer(5, _scripted), cache, partition_n, T_NEW, objective="global",
                                  weights_n=w)
    np.testing.assert_allclose(placement.changes, [3.0, 3.3], rtol=1e-6)  # float32 losses, float64 sums
    assert placement.cluster == 0 and out.tolist() == [0, 0, 1, 1, 0]


def test_a_new_cluster_is_a_candidate_only_while_there_is_room():
    from fixtures_search_fakes import TableScorer

    from d2c_jax import online

    partition_n, cache = _run_partition()
    out, placement = online.place(TableScorer(5, _scripted), cache, partition_n, T_NEW, max_clusters=3)
    assert placement.opened and placement.cluster == 2 and placement.candidates == (0, 1, 2)
    assert placement.changes[2] == pytest.approx(0.3) and placement.evaluations == 3
    out, removed = online.remove(TableScorer(5, _scripted), cache, out, T_NEW)
    assert out.tolist() == [0, 0, 1, 1, -1] and removed == 0  # an emptied cluster disappears


def test_refinement_starts_from_the_given_partition_and_never_ends_worse():
    from fixtures_search_fakes import FakeScorer

    from d2c_jax import online
    from d2c_jax.search import LossCache

    families = [0, 0, 0, 1, 1, 1, 2, 2, 2, -1]
    scorer = FakeScorer(families)
    start = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, -1], np.int32)  # every cluster mixes the families
    losses, _ = online.task_losses(scorer, LossCache(10), start)
    for seed in range(3):
        out, out_losses, result = online.refine(scorer, start, losses, 40, seed=seed)
        assert out[-1] == -1 and result.objective <= np.nansum(losses)
        assert result.state.metrics[0]["evaluations"] == 0  # row 0: the warm start, losses already known
        np.testing.assert_allclose(np.nansum(out_losses), result.objective)
        assert result.objective < np.nansum(losses)  # 40 iterations find an improving move here


def test_sigterm_during_refinement_saves_a_checkpoint_and_the_same_command_resumes_it(
        inputs, finished, tmp_path, monkeypatch, capsys):
    import signal

    from d2c_jax import add_run, online

    def cfg(workdir):
        return add_run.AddConfig(workdir=str(workdir), adapters=(os.path.join(inputs["adapters_dir"], NEW),),
                                 data_dir=inputs["data_dir"], refine_iterations=6, progress=False)

    reference, workdir = tmp_path / "reference", tmp_path / "wd"
    shutil.copytree(finished, reference)
    shutil.copytree(finished, workdir)
    assert add_run.add(cfg(reference)) == 0
    real = online.refine

    def refine_after_sigterm(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the refinement's first iteration
        return real(*args, **kw)

    monkeypatch.setattr(online, "refine", refine_after_sigterm)
    top = read_partition(workdir)
    assert add_run.add(cfg(workdir)) == 0  # SIGTERM: exit 0, like a preempted search
    assert "stopped by SIGTERM" in capsys.readouterr().out
    assert read_partition(workdir) == top and os.listdir(workdir / "adding" / "checkpoints")
    monkeypatch.setattr(online, "refine", real)
    assert add_run.add(cfg(workdir)) == 0
    doc, want = read_partition(workdir), read_partition(reference)
    for key in ("clusters", "task_losses", "objective"):
        assert doc[key] == want[key], key
    assert not (workdir / "adding").exists()


def test_a_budget_mode_run_may_open_as_many_clusters_as_its_budget_holds():
    from d2c_jax import add_run
    from d2c_jax.lora import AdapterSet

    n, layers, rank, d_in, d_out = 6, 2, 4, 8, 16
    aset = AdapterSet(names=tuple(f"t{i}" for i in range(n)),
                      a={"q_proj": np.ones((n, layers, rank, d_in), np.float32)},
                      b={"q_proj": np.ones((n, layers, d_out, rank), np.float32)},
                      scaling=np.ones(n), ranks=np.full(n, rank), paths=("",) * n)
    unit = 4 * layers * (d_in + d_out)  # bytes of one rank of one adapter (float32 factors)
    doc = {"num_clusters": 2, "clusters": [], "task_losses": {}, "output_rank": 2}
    for budget, want in (({"percent": 50.0, "mb": None}, 5),  # 12 of 24 ranks: 6 at rank 2, at most N - 1
                         ({"percent": None, "mb": 4 * 2 * unit / 1e6}, 4),  # 8 ranks: 4 at rank 2
                         ({"percent": 10.0, "mb": None}, 2)):  # 2.4 ranks hold 1: the run's K stays
        run = add_run.Run("/nowhere", {**doc, "budget": budget}, (), {}, {})
        assert run.cluster_limit(aset) == want, budget
    assert add_run.Run("/nowhere", doc, (), {}, {}).cluster_limit(aset) == 2  # no budget: the run's K
