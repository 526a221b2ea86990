"""launch/search.py end to end on a tiny random Llama with real PEFT adapters: outputs, their
agreement with transformers + peft, resume after preemption, batch-size independence, flagfiles,
and one-line errors for bad flags and inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import pipeline  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from fixtures_search_inputs import NAMES, child_env, make_search_inputs, search_argv  # noqa: E402
from fixtures_search_inputs import read_metrics, read_partition  # noqa: E402
from fixtures_search_inputs import SEARCH as BASE_SEARCH  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "search.py")
SEARCH = {**BASE_SEARCH, "exchange_every": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("inputs"), tags=True)


def _argv(inputs, workdir, **over):
    return search_argv(inputs, workdir, **{**SEARCH, **over})


def _launch(args, single_device=True):
    # The in-process tests cover the 8-device mesh; this covers one device.
    env = child_env() if single_device else dict(os.environ)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "wd"
    proc = _launch(_argv(inputs, workdir, batch_size=4) + ["--noprogress"])
    assert proc.returncode == 0, proc.stderr
    return workdir, proc


def _hf_task_losses(base_model, adapter_dir, data_dir, tasks):
    """Reference: transformers + peft loss (response tokens, summed over examples / their count)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    return _peft_losses(PeftModel.from_pretrained(model, adapter_dir).eval(), base_model, data_dir, tasks)


def _peft_ties_objective(base_model, adapters_dir, data_dir, clusters):
    """Reference objective of a partition: each cluster merged by PEFT's add_weighted_adapter
    (TIES, unit weights, density 0.5; a one-adapter cluster is that adapter), the loss of each
    task under its cluster's merge by transformers + peft, summed over the tasks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, os.path.join(adapters_dir, NAMES[0]), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(os.path.join(adapters_dir, name), adapter_name=name)
    total = 0.0
    for k, members in enumerate(clusters):
        name = members[0]
        if len(members) > 1:
            name = f"cluster_{k}"
            model.add_weighted_adapter(list(members), [1.0] * len(members), name, combination_type="ties",
                                       density=0.5)
        model.set_adapter(name)
        total += sum(_peft_losses(model.eval(), base_model, data_dir, members).values())
    return total


def _peft_losses(model, base_model, data_dir, tasks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    out = {}
    for task in tasks:
        total, count = 0.0, 0
        with open(os.path.join(data_dir, f"{task}.jsonl")) as f:
            for line in f:
                ex = json.loads(line)
                p = tok(ex["prompt"])["input_ids"]
                r = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([p + r])).logits[0, :-1].double()
                labels = torch.tensor([-100] * (len(p) - 1) + r)
                total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
                count += len(r)
        out[task] = total / count
    return out


def test_search_end_to_end_writes_every_output(inputs, finished):
    workdir, proc = finished
    doc = read_partition(workdir)
    assert doc["strategy"] == "d2c" and doc["num_clusters"] == 2 and doc["merge"] == "ties"
    assert doc["density"] == 0.5 and doc["seed"] == 1 and doc["iterations"] == 6 and doc["evaluations"] > 0
    assert sorted(t for c in doc["clusters"] for t in c) == NAMES and all(doc["clusters"])
    assert doc["objective"] == math.fsum(doc["task_losses"].values())  # the exactly rounded sum, as written
    assert "objective" in proc.stdout and "cluster" in proc.stdout  # the final table

    rows = read_metrics(workdir)
    assert [r["iteration"] for r in rows] == list(range(7))
    assert rows[-1]["best_objective"] == doc["objective"]  # the same fsum of the same cached losses
    for key in ("accepted", "mean_objective", "cache_hits", "evals_per_s", "evaluations"):
        assert key in rows[-1]
    for png in ("objective.png", "assignment.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["num_clusters"] == 2 and cfg["batch_size"] == 4
    assert os.listdir(workdir / "checkpoints") and not [n for n in os.listdir(workdir) if ".tmp-" in n]

    # merged/cluster_k is the merge of clusters[k]: transformers + peft reproduce the losses.
    for k, tasks in enumerate(doc["clusters"]):
        ref = _hf_task_losses(inputs["base_model"], str(workdir / "merged" / f"cluster_{k}"), inputs["data_dir"], tasks)
        for t in tasks:
            assert doc["task_losses"][t] == pytest.approx(ref[t], rel=LOSS_RTOL), (k, t)  # ours vs transformers + PEFT


def test_the_final_table_shows_the_random_start_and_the_all_in_one_merge(inputs, finished):
    """partition.json and the last table line put the found objective next to the random start's
    (chain 0's initial partition, = --strategy=random) and the all-in-one merge's, both recomputed
    here with PEFT's TIES merges and transformers."""
    from d2c_jax.strategies.baselines import random_baseline

    workdir, proc = finished
    doc = read_partition(workdir)
    start_n = random_baseline(len(NAMES), 2, SEARCH["seed"])
    start_clusters = [[NAMES[i] for i in range(len(NAMES)) if start_n[i] == k] for k in range(2)]
    ref_start = _peft_ties_objective(inputs["base_model"], inputs["adapters_dir"], inputs["data_dir"],
                                     start_clusters)
    ref_all = _peft_ties_objective(inputs["base_model"], inputs["adapters_dir"], inputs["data_dir"], [NAMES])
    # sums of positive losses, ours vs transformers + PEFT: LOSS_RTOL (tolerances.py)
    assert doc["random_start_objective"] == pytest.approx(ref_start, rel=LOSS_RTOL)
    assert doc["all_in_one_objective"] == pytest.approx(ref_all, rel=LOSS_RTOL)
    # The start's losses are in the search's cache; the all-in-one merge costs one evaluation per task.
    assert doc["reference_evaluations"] == len(NAMES)
    last = [line for line in proc.stdout.splitlines() if line.startswith("found ")][-1]
    found, start, merged_all = doc["objective"], doc["random_start_objective"], doc["all_in_one_objective"]
    assert f"found {found:.4f}" in last
    assert f"random start {start:.4f} ({found - start:+.4f}, {100 * (found - start) / start:+.1f} %)" in last
    assert f"all-in-one {merged_all:.4f} ({found - merged_all:+.4f}" in last


def test_rerunning_a_finished_run_reports_its_location_and_exits_0(inputs, finished):
    workdir, _ = finished
    before = (workdir / "partition.json").read_bytes()
    proc = _launch(_argv(inputs, workdir, batch_size=4))
    assert proc.returncode == 0 and proc.stdout.endswith(  # the run's summary table, then where it is
        f"\nalready finished: {workdir}/partition.json (use --overwrite to run again)\n")
    assert (workdir / "partition.json").read_bytes() == before
    proc = _launch(_argv(inputs, workdir, batch_size=4, num_clusters=3))  # other settings: refused
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: {workdir}: holds a finished run with --num_clusters=2 (not 3); use --overwrite to replace it or "
        "choose another --workdir"]


def _config(inputs, workdir, **over) -> RunConfig:
    return RunConfig.from_flat(**{**inputs, **SEARCH, "workdir": str(workdir), "progress": False, **over})


def test_preempted_run_resumes_to_the_same_partition_whatever_the_batch_size(inputs, finished, tmp_path, monkeypatch, capsys):
    """A preempted run resumes to the uninterrupted run's partition, also with changed resource
    flags (the engine-level equality of every row: tests/test_loss_cache.py)."""
    from d2c_jax.signals import PreemptionFlag

    reference = read_partition(finished[0])
    calls = []

    def preempt_at_third(self):
        calls.append(1)
        return len(calls) == 3

    monkeypatch.setattr(PreemptionFlag, "__call__", preempt_at_third)
    cfg = _config(inputs, tmp_path / "wd", batch_size=16)  # 8-device mesh here, one device there
    assert pipeline.run(cfg) == 0
    assert "preempted" in capsys.readouterr().out
    assert not (tmp_path / "wd" / "partition.json").exists() and not (tmp_path / "wd" / "merged").exists()
    monkeypatch.undo()

    # The same command resumes, also with a smaller --cache_size (a resource flag, not a setting
    # of the result: 4 entries, fewer than one iteration's requests, so pairs are scored again).
    assert pipeline.run(dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, cache_size=4))) == 0
    doc = read_partition(tmp_path / "wd")
    rows = read_metrics(tmp_path / "wd")
    assert [r["iteration"] for r in rows] == list(range(7))
    assert rows[-1]["cache_size"] <= 4
    assert doc["clusters"] == reference["clusters"]
    # an 8-device mesh (batched, sharded reductions) here vs one device there: LOSS_RTOL of a sum of losses
    assert doc["objective"] == pytest.approx(reference["objective"], rel=LOSS_RTOL)

    # --overwrite replaces the finished run; a changed setting is a fresh run, not a resume.
    # (--noall_in_one_reference: the all-in-one merge is not scored.)
    capsys.readouterr()
    cfg2 = _config(inputs, tmp_path / "wd", batch_size=16, strategy="kmeans", overwrite=True,
                   all_in_one_reference=False)
    assert pipeline.run(cfg2) == 0
    doc2 = read_partition(tmp_path / "wd")
    assert doc2["strategy"] == "kmeans" and doc2["iterations"] == 0
    assert doc2["all_in_one_objective"] is None and "all-in-one" not in capsys.readouterr().out
    # as above: the mesh's batched programs vs the reference's one device
    assert doc2["random_start_objective"] == pytest.approx(reference["random_start_objective"], rel=LOSS_RTOL)
    assert sorted(os.listdir(tmp_path / "wd" / "merged")) == ["cluster_0", "cluster_1"]


def test_a_checkpoint_of_other_settings_is_refused(inputs, tmp_path, monkeypatch):
    from d2c_jax.signals import PreemptionFlag

    monkeypatch.setattr(PreemptionFlag, "__call__", lambda self: True)
    assert pipeline.run(_config(inputs, tmp_path, iterations=4)) == 0
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"other inputs: --num_clusters changed \(2 in the checkpoint, 3 now\); "
                       "use --overwrite"):
        pipeline.run(_config(inputs, tmp_path, iterations=4, num_clusters=3))
    # the reading of Algorithm 1 and the start change the result too
    with pytest.raises(UserError, match=r"--proposal changed \('paper' in the checkpoint, 'task_uniform' now\)"):
        pipeline.run(_config(inputs, tmp_path, iterations=4, proposal="task_uniform"))
    with pytest.raises(UserError, match=r"--start changed \('random' in the checkpoint, 'round_robin' now\)"):
        pipeline.run(_config(inputs, tmp_path, iterations=4, start="round_robin"))


def test_bad_inputs_fail_with_one_clear_message_and_write_nothing(inputs, tmp_path):
    wd = tmp_path / "wd"
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in NAMES[:-1]:
        (partial / f"{name}.jsonl").write_text((open(os.path.join(inputs["data_dir"], f"{name}.jsonl"))).read())
    cases = [
        (dict(num_clusters=5), r"--num_clusters=5 must be between 1 and 4"),
        (dict(adapters_dir=str(empty)), "no adapter sub-directories"),
        (dict(data_dir=str(partial)), "no search examples for adapter task\\(s\\) task_4"),
        (dict(base_model=str(tmp_path / "nope")), "nope"),
    ]
    for over, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            pipeline.run(_config(inputs, wd, **over))
        assert not wd.exists()
    with pytest.raises(UserError, match="--num_clusters=0: must be >= 1"):
        _config(inputs, wd, num_clusters=0)
    with pytest.raises(UserError, match="--population=0"):
        _config(inputs, wd, population=0)
    with pytest.raises(UserError, match=r"--proposal=uniform: must be one of \('paper', 'task_uniform'\)"):
        _config(inputs, wd, proposal="uniform")


def test_flag_errors_and_flagfiles(tmp_path):
    proc = _launch(["--flagfile=" + os.path.join(ROOT, "configs", "llama.flags"), "--no_such_flag=1"])
    assert proc.returncode == 1 and proc.stderr.splitlines() == ["error: unknown flag --no_such_flag (see --helpshort)"]
    proc = _launch(["--num_clusters=3"])
    assert proc.returncode == 1 and "--workdir must have a value other than None" in proc.stderr
    proc = _launch([f"--workdir={tmp_path / 'w0'}"])  # no model paths and no --suite
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines == ["error: --base_model=None: must be set (or use --suite)"]
    assert not (tmp_path / "w0").exists()
    proc = _launch(["--flagfile=" + os.path.join(ROOT, "configs", "qwen.flags"), f"--workdir={tmp_path / 'w'}"])
    lines = proc.stderr.strip().splitlines()
    qwen = os.path.join(ROOT, "configs", "qwen.flags")  # every placeholder still to edit, in one line
    assert proc.returncode == 1 and lines == [
        f"error: {qwen}: placeholder path(s) still to edit: --adapters_dir=/path/to/adapters/qwen, "
        "--base_model=/path/to/Qwen2.5-1.5B-Instruct, --data_dir=/path/to/data (edit the file, or give these flags "
        "on the command line)"]

    # Every flagfile parses into the paper's settings.
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('s', {SCRIPT!r}); m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "for f in sys.argv[1:]:\n"
        "    m.flags.FLAGS.unparse_flags(); m.flags.FLAGS(['x', '--flagfile=' + f])\n"
        "    print(json.dumps(m.config_from_flags(m.flags.FLAGS).to_dict()))\n"
    )
    files = [os.path.join(ROOT, "configs", f"{m}.flags") for m in ("llama", "qwen", "stablelm")]
    out = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfgs = [json.loads(x) for x in out.stdout.splitlines()]
    expect = dict(num_clusters=5, iterations=200, examples_per_task=10, merge="ties", density=0.5,
                  strategy="d2c", objective="local", population=1, proposals=1, proposal="paper", start="random",
                  chat_template=True, dtype="bfloat16")
    for cfg, model in zip(cfgs, ("Llama-3.2-3B-Instruct", "Qwen2.5-1.5B-Instruct", "stablelm-2-1_6b-chat")):
        assert {k: cfg[k] for k in expect} == expect
        assert cfg["base_model"] == f"/path/to/{model}"
        # The engine's settings are the fast defaults (issue 9): batch size from device memory,
        # the objective tracked only at the end.
        assert (cfg["batch_size"], cfg["track_every"]) == ("auto", 0)


def test_a_second_run_compiles_nothing_and_reports_evaluations_per_iteration(inputs, tmp_path):
    """Persistent compilation cache: the same command in a new workdir finds every executable
    in --compilation_cache (counted from JAX's monitoring events, in partition.json)."""
    cache = tmp_path / "xla"
    runs = []
    for name in ("first", "second"):
        proc = _launch(_argv(inputs, tmp_path / name, compilation_cache=cache) + ["--noprogress"])
        assert proc.returncode == 0, proc.stderr
        runs.append(read_partition(tmp_path / name))
    assert runs[0]["compile"]["compilations"] > 0 and runs[0]["compile"]["cache_hits"] == 0
    assert runs[1]["compile"]["compilations"] == 0 and runs[1]["compile"]["cache_hits"] > 0
    assert runs[0]["clusters"] == runs[1]["clusters"]
    doc = runs[1]
    assert doc["evaluations_per_iteration"] == round(doc["evaluations"] / SEARCH["iterations"], 3)  # as written
    assert "per iteration" in proc.stdout
