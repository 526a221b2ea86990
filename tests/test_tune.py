"""Weight tuning (tune.py) on a tiny Llama with real PEFT adapters: the unit and tuned losses it
reports are the Scorer's losses (parity-tested against transformers + peft) of those merges on the
fitted / held-out examples; tuned weights are kept only where they beat unit ones on the held-out
part; several partitions tune at once exactly as each alone; launch/search.py --tune_weights and
--budget, and launch/merge.py --tune_on, write what they report."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import data, hf_io, lora, merge, tune  # noqa: E402
from d2c_jax.scoring import Scorer  # noqa: E402
from fixtures_processes import Started  # noqa: E402
from fixtures_search_inputs import NAMES, child_env, load_search_inputs, read_partition, search_argv  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTITION = np.array([0, 1, 0, 1, 1], np.int32)
SETTINGS = tune.TuneSettings(steps=6, learning_rate=0.2, holdout=0.3, patience=6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return load_search_inputs(tmp_path_factory.mktemp("tune"))


def _part(td, lo, hi):
    return dataclasses.replace(td, batch=jax.tree.map(lambda x: x[:, lo:hi], td.batch),
                               num_examples=np.full(td.num_tasks, hi - lo, np.int32))


def _cluster_losses(setup, prepared, weights_k, td, partition=PARTITION, k=2):
    """Reference: each task's Scorer loss under its cluster's merge, summed per cluster."""
    scorer = Scorer(setup["params"], setup["cfg"], prepared, td, batch_size=2)
    loras = tune.merged_clusters(prepared, partition, k, weights_k)
    out = np.zeros(k)
    for t, c in enumerate(partition):
        out[c] += scorer.loss_of_lora(jax.tree.map(lambda x: x[c], loras), t)
    return out


@pytest.mark.parametrize("method,granularity", [("ties", "adapter"), ("ties_delta", "layer")])
def test_reported_losses_are_the_scorer_losses_of_the_weighted_merges(setup, method, granularity):
    prepared = merge.prepare_merge(setup["aset"], method, 0.5)
    res = tune.tune_partition(setup["params"], setup["cfg"], prepared, setup["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity=granularity))
    assert (res.num_fit, res.num_heldout) == (2, 1)
    fit, held = _part(setup["td"], 0, 2), _part(setup["td"], 2, 3)
    # tune's loss program vs the Scorer's (per-cluster sums of positive losses): LOSS_RTOL
    np.testing.assert_allclose(res.unit_heldout_k, _cluster_losses(setup, prepared, None, held), rtol=LOSS_RTOL)
    np.testing.assert_allclose(res.unit_fit_k, _cluster_losses(setup, prepared, None, fit), rtol=LOSS_RTOL)
    np.testing.assert_allclose(res.tuned_heldout_k, _cluster_losses(setup, prepared, res.tuned, held), rtol=LOSS_RTOL)
    np.testing.assert_allclose(res.tuned_fit_k, _cluster_losses(setup, prepared, res.tuned, fit), rtol=LOSS_RTOL)
    assert res.weights.shape == ((2, 5) if granularity == "adapter" else (2, 5, setup["aset"].num_layers))
    for c in range(2):
        if res.kept_k[c]:
            assert res.tuned_heldout_k[c] < res.unit_heldout_k[c]
            np.testing.assert_array_equal(res.weights[c], res.tuned[c])
        else:
            assert np.all(res.weights[c] == 1.0)
    assert res.kept_k.any(), "6 Adam steps at lr 0.2 should beat unit weights on some held-out cluster"


@pytest.mark.parametrize("method,granularity", [("core_ties", "adapter"), ("core_iso_cts", "layer"),
                                                ("core_tsv", "factors")])
def test_core_space_operators_tune_and_report_the_scorer_losses(setup, method, granularity):
    """The core-space operators tune at every granularity through the same loop: finite weights,
    and the reported held-out losses are the Scorer's losses of the merges with those weights
    (for factors: of the unit-weight merge, the start)."""
    prepared = merge.prepare_merge(setup["aset"], method, 0.5)
    res = tune.tune_partition(setup["params"], setup["cfg"], prepared, setup["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity=granularity, steps=3))
    held = _part(setup["td"], 2, 3)
    np.testing.assert_allclose(res.unit_heldout_k, _cluster_losses(setup, prepared, None, held), rtol=1e-4)
    assert np.all(np.isfinite(res.tuned)) and np.all(np.isfinite(res.tuned_heldout_k))
    if granularity != "factors":
        np.testing.assert_allclose(res.tuned_heldout_k, _cluster_losses(setup, prepared, res.tuned, held),
                                   rtol=1e-4)
    else:
        assert res.lora is not None and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(res.lora))


@pytest.mark.parametrize("steps,patience", [(1, 1), (8, 2)])
def test_partitions_tuned_together_equal_each_alone(setup, steps, patience):
    """Partitions tuned together run one after another through the same compiled steps, so each
    gets bit for bit its result alone, on any machine and whatever its CPU's kernels (one Adam
    step, and several steps where each cluster stops on its own patience): the same weights,
    losses, choices and best steps, compared exactly."""
    prepared = merge.prepare_merge(setup["aset"], "ties", 0.5)
    other = np.array([1, 0, 0, 0, 1], np.int32)
    one = dataclasses.replace(SETTINGS, steps=steps, patience=patience)
    both = tune.tune_partitions(setup["params"], setup["cfg"], prepared, setup["td"], np.stack([PARTITION, other]),
                                2, one)
    for p, part in enumerate((PARTITION, other)):
        alone = tune.tune_partition(setup["params"], setup["cfg"], prepared, setup["td"], part, 2, one)
        for f in ("tuned", "weights", "unit_heldout_k", "unit_fit_k", "tuned_heldout_k", "tuned_fit_k", "kept_k",
                  "best_step_k"):
            np.testing.assert_array_equal(getattr(both.chain(p), f), getattr(alone, f), err_msg=f)
    totals = both.chain_totals()
    for p in range(2):
        c = both.chain(p)
        want = np.where(c.kept_k, c.tuned_fit_k + c.tuned_heldout_k, c.unit_fit_k + c.unit_heldout_k).sum()
        assert totals[p] == want  # the same numpy sum of the same K numbers


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def _launch_argv(script, args):
    return [sys.executable, os.path.join(ROOT, "launch", script), *args]


def _run(script, args):
    return _ok(subprocess.run(_launch_argv(script, args), capture_output=True, text=True, env=child_env(),
                              timeout=600))


@pytest.fixture(scope="module")
def launched(setup, tmp_path_factory):
    """(directory, Started): the launch-script runs of the tests below, started together when the
    first of them asks (each test then checks its own run's outputs, as if it had run it alone)."""
    root = tmp_path_factory.mktemp("launched")
    paths = setup["paths"]
    dirs = [os.path.join(paths["adapters_dir"], n) for n in NAMES]  # the data dir's tasks, all
    weights = search_argv(paths, root / "weights_wd", tune_weights=True, tune_during_search=True, tune_steps=4,
                          budget=50, budget_ranks="2,4", iterations=2, checkpoint_every=1)
    merge_common = [f"--adapters={','.join(dirs)}", f"--base_model={paths['base_model']}",
                    f"--tune_on={paths['data_dir']}", "--tune_steps=3", "--examples_per_task=3"]
    commands = {
        # K: the budget's
        "search_weights": _launch_argv("search.py", [a for a in weights if not a.startswith("--num_clusters=")]
                                       + ["--noprogress"]),
        "merge_weights": _launch_argv("merge.py", merge_common + [f"--output_dir={root / 'merged_weights'}",
                                                                  "--method=ties"]),
        "merge_one_adapter": _launch_argv("merge.py", [f"--adapters={dirs[0]}", f"--output_dir={root / 'x'}",
                                                       f"--tune_on={paths['data_dir']}"]),
        "search_factors": _launch_argv("search.py", search_argv(
            paths, root / "factors_wd", tune_weights=True, tune_granularity="factors", tune_steps=6,
            tune_learning_rate=0.05, merge="ties_delta", iterations=2) + ["--noprogress"]),
        "merge_factors": _launch_argv("merge.py", merge_common + [f"--output_dir={root / 'merged_factors'}",
                                                                  "--method=ties_delta", "--tune_granularity=factors"]),
    }
    started = Started(commands, env=child_env())
    yield root, started
    started.close()


def test_search_with_tuned_weights_and_budget_writes_what_it_reports(setup, launched):
    root, started = launched
    wd = root / "weights_wd"
    _ok(started.result("search_weights"))
    doc = read_partition(wd)
    totals = doc["tuning"]["chain_totals"]  # --tune_during_search: both chains tuned, the lowest kept
    assert len(totals) == 2 and doc["best_chain"] == int(np.argmin(totals))
    ways = doc["budget"]["ways"]
    # 50 % of 5 rank-4 adapters = 10 rank units: K = 4 at rank 2 (K < N), K = 2 at rank 4.
    assert [(w["num_clusters"], w["rank"]) for w in ways] == [(4, 2), (2, 4)]
    best = min(ways, key=lambda w: w["objective"])
    assert (doc["num_clusters"], doc["output_rank"]) == (best["num_clusters"], best["rank"])
    # the way's best chain by unit objective; tuning may pick another chain of that way
    # both exactly rounded sums (math.fsum) of the unbatched CPU scorer's losses, bit for bit the
    # same per (mask, task): 1e-6 (below one float32 rounding of a loss ~ 5) is a margin only
    assert doc["objective"] >= best["objective"] - 1e-6
    k, r = doc["num_clusters"], doc["output_rank"]
    weights = np.asarray(doc["tuning"]["weights"], np.float32)
    assert weights.shape == (k, 5)
    part = np.array([next(c for c, ts in enumerate(doc["clusters"]) if n in ts) for n in NAMES])
    prepared = merge.prepare_merge(setup["aset"], "ties", 0.5, rank=r)
    want = tune.merged_clusters(prepared, part, k, weights)
    for c in range(k):
        d = os.path.join(wd, "merged", f"cluster_{c}")
        with open(os.path.join(d, "adapter_config.json")) as f:
            assert json.load(f)["r"] == r
        got = lora.lora_delta(lora.effective_lora(lora.load_adapter_dirs([d], setup["cfg"]), 0))
        ref = lora.lora_delta(jax.tree.map(lambda x: np.asarray(x[c]), want))
        for m in ref:
            # the merge the search wrote vs this one (another program: member sums in another order,
            # gamma_5 = 3e-7 of sum |terms|, through the rank-r SVD's 1 / gap as in tolerances.SVD_RTOL):
            # 1e-5 relative, 1e-6 of the largest entry for the near-zero ones
            np.testing.assert_allclose(got[m], ref[m], rtol=1e-5, atol=1e-6 * np.abs(ref[m]).max())


def test_merge_cli_tune_on_writes_the_merge_with_the_kept_weights(launched):
    root, started = launched
    out = root / "merged_weights"
    proc = _ok(started.result("merge_weights"))
    assert "held-out loss" in proc.stdout and "weights kept" in proc.stdout
    assert (out / "adapter_model.safetensors").exists()
    bad = started.result("merge_one_adapter")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (root / "x").exists()


def _cluster_losses_of(setup, prepared, lora_k, td, partition=PARTITION):
    """Reference: each task's Scorer loss under its cluster's given adapter, summed per cluster."""
    scorer = Scorer(setup["params"], setup["cfg"], prepared, td, batch_size=2)
    out = np.zeros(int(partition.max()) + 1)
    for t, c in enumerate(partition):
        out[c] += scorer.loss_of_lora(jax.tree.map(lambda x: x[c], lora_k), t)
    return out


def test_factor_tuning_starts_from_the_merge_and_keeps_only_factors_that_win_held_out(setup):
    prepared = merge.prepare_merge(setup["aset"], "ties_delta", 0.5)
    res = tune.tune_partition(setup["params"], setup["cfg"], prepared, setup["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity="factors", learning_rate=0.05))
    fit, held = _part(setup["td"], 0, 2), _part(setup["td"], 2, 3)
    unit_k = tune.merged_clusters(prepared, PARTITION, 2)
    # tune's loss program vs the Scorer's (per-cluster sums of positive losses): LOSS_RTOL
    np.testing.assert_allclose(res.unit_heldout_k, _cluster_losses_of(setup, prepared, unit_k, held), rtol=LOSS_RTOL)
    np.testing.assert_allclose(res.unit_fit_k, _cluster_losses_of(setup, prepared, unit_k, fit), rtol=LOSS_RTOL)
    assert np.all(res.weights == 1.0)  # the merge weights stay the paper's; the factors move
    kept_held = np.where(res.kept_k, res.tuned_heldout_k, res.unit_heldout_k)
    np.testing.assert_allclose(_cluster_losses_of(setup, prepared, res.lora, held), kept_held, rtol=LOSS_RTOL)
    for c in range(2):
        same = [np.array_equal(np.asarray(x[c]), np.asarray(u[c]))
                for x, u in zip(jax.tree.leaves(res.lora), jax.tree.leaves(unit_k))]
        if res.kept_k[c]:
            assert res.tuned_heldout_k[c] < res.unit_heldout_k[c] and not all(same)
        else:
            assert all(same)  # not kept: exactly the unit-weight merge
    assert res.kept_k.any(), "6 Adam steps at lr 0.05 on the factors should win on some held-out cluster"


def test_search_with_tuned_factors_writes_the_adapters_whose_losses_it_reports(setup, launched, tmp_path):
    root, started = launched
    wd = root / "factors_wd"
    _ok(started.result("search_factors"))
    doc = read_partition(wd)
    k = doc["num_clusters"]
    tuning = doc["tuning"]
    assert tuning["granularity"] == "factors" and len(tuning["kept"]) == k
    part = np.array([next(c for c, ts in enumerate(doc["clusters"]) if n in ts) for n in NAMES], np.int32)
    written = [lora.effective_lora(lora.load_adapter_dirs([os.path.join(wd, "merged", f"cluster_{c}")],
                                                          setup["cfg"]), 0) for c in range(k)]
    lora_k = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *written)
    prepared = merge.prepare_merge(setup["aset"], "ties_delta", 0.5)
    held = _part(setup["td"], 2, 3)
    kept_held = np.where(tuning["kept"], tuning["tuned_heldout"], tuning["unit_heldout"])
    # the written adapters through the Scorer vs tune's losses in partition.json: LOSS_RTOL
    np.testing.assert_allclose(_cluster_losses_of(setup, prepared, lora_k, held, part), kept_held, rtol=LOSS_RTOL)
    # launch/evaluate.py --partition scores those written adapters (not a fresh unit-weight merge)
    out = tmp_path / "eval.json"
    _run("evaluate.py", [f"--{f}={setup['paths'][f]}" for f in ("base_model", "adapters_dir", "data_dir")]
         + [f"--partition={wd / 'partition.json'}", f"--output={out}", "--dtype=float32", "--examples_per_task=3",
            "--max_seq_len=64"])
    with open(out) as f:
        doc = json.load(f)
    assert doc["summary"]["adapters"] == str(wd / "merged")
    scorer = Scorer(setup["params"], setup["cfg"], prepared, setup["td"], batch_size=2)
    for t, name in enumerate(NAMES):
        want = scorer.loss_of_lora(jax.tree.map(lambda x: x[part[t]], lora_k), t)
        assert doc["tasks"][name]["loss"] == pytest.approx(want, rel=LOSS_RTOL)  # evaluate.py's program


def test_merge_cli_tune_on_factors_writes_the_kept_factors(launched):
    root, started = launched
    out = root / "merged_factors"
    proc = _ok(started.result("merge_factors"))
    assert "held-out loss" in proc.stdout and "factors kept" in proc.stdout
    assert (out / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- edge cases

EDGE_COUNTS = (4, 2, 3, 5, 3)  # examples per task: unequal, so the shorter tasks have dummy rows
EDGE_PARTITION = np.array([0, 1, 0, 1, 2], np.int32)  # cluster 2 has one member
EDGE_PATIENCE = 2
# Scripted held-out losses per step (columns: clusters), below / above any real unit loss:
#  cluster 0 improves at steps 1 and 3, not at 4 and 5, so it stops there (2 steps = the patience);
#    its lower loss at step 6 comes after it stopped and is ignored;
#  cluster 1 never improves in steps 1-2 and stops; its lower loss at step 3 (exactly the patience
#    steps after its best, step 0) is ignored: it keeps the unit weights;
#  cluster 2 improves at steps 1-4 and stops after step 6, when every cluster has stopped.
EDGE_HELD = np.array([[-1.0, 1e4, -1.0], [-0.5, 1e4, -2.0], [-2.0, -10.0, -3.0], [-1.5, 1e4, -4.0],
                      [-1.8, 1e4, 0.0], [-3.0, -20.0, 0.0], [-9.0, -30.0, -9.0], [-9.0, -30.0, -9.0]])


@pytest.fixture(scope="module")
def edge(setup, tmp_path_factory):
    """One tuning run on tasks with unequal numbers of examples and a one-member cluster, its
    training step's held-out losses replaced by EDGE_HELD (the weights it trains stay real)."""
    ddir = tmp_path_factory.mktemp("edge_data")
    words = ["one two three", "the quick fox", "hello world", "answer the question", "sort the words", "count"]
    for i, (name, count) in enumerate(zip(NAMES, EDGE_COUNTS)):
        with open(ddir / f"{name}.jsonl", "w") as f:
            for j in range(count):
                f.write(json.dumps({"prompt": f"{words[i]} {j}", "response": words[(i + 2 * j) % 6]}) + "\n")
    td = data.load_task_data(str(ddir), setup["aset"].names, hf_io.load_tokenizer(setup["paths"]["base_model"]),
                             examples_per_task=5, max_seq_len=64)
    prepared = merge.prepare_merge(setup["aset"], "ties", 0.5)
    thetas = []
    real_jit = jax.jit

    def spy_jit(fn, *args, **kwargs):
        jitted = real_jit(fn, *args, **kwargs)
        if getattr(fn, "__name__", "") != "train_step":
            return jitted

        def step(*a):
            theta, opt_state, fit_c, _ = jitted(*a)
            thetas.append(np.asarray(theta))
            return theta, opt_state, fit_c, EDGE_HELD[len(thetas) - 1]
        return step

    settings = dataclasses.replace(SETTINGS, steps=len(EDGE_HELD), patience=EDGE_PATIENCE, learning_rate=0.3)
    jax.jit = spy_jit
    try:
        res = tune.tune_partition(setup["params"], setup["cfg"], prepared, td, EDGE_PARTITION, 3, settings)
    finally:
        jax.jit = real_jit
    assert thetas, "tune's training step (train_step) was not seen"
    return dict(td=td, prepared=prepared, res=res, thetas=thetas, settings=settings)


def _rows(td, rows_t):
    """Task data made of the given rows of each task (all of them real examples)."""
    for t, rows in enumerate(rows_t):
        assert max(rows) < td.num_examples[t], "a dummy row"
    idx = np.asarray(rows_t)
    return dataclasses.replace(td, batch=jax.tree.map(lambda x: np.take_along_axis(
        np.asarray(x), idx.reshape(idx.shape + (1,) * (np.ndim(x) - 2)), axis=1), td.batch),
        num_examples=np.full(td.num_tasks, idx.shape[1], np.int32))


def _losses_by_cluster(setup, prepared, weights, td):
    """Reference: each task's Scorer loss under its EDGE_PARTITION cluster's (weighted) merge,
    summed per cluster."""
    return _cluster_losses(setup, prepared, weights, td, EDGE_PARTITION, 3)


def test_tasks_with_unequal_numbers_of_examples_fit_and_hold_out_only_real_examples(setup, edge):
    """The shortest task (2 examples) bounds both parts; every task's fitted and held-out examples
    are real ones (never the dummy rows of a shorter task), disjoint, and the reported unit and
    tuned losses (a one-member cluster at a tuned weight != 1 included) are the Scorer's on them."""
    res, td, prepared = edge["res"], edge["td"], edge["prepared"]
    np.testing.assert_array_equal(td.num_examples, EDGE_COUNTS)  # the real examples, not the padded rows
    assert res.num_heldout >= 1 and res.num_fit >= 1 and res.num_fit + res.num_heldout <= min(EDGE_COUNTS)
    fit = _rows(td, [list(range(res.num_fit))] * td.num_tasks)
    held = _rows(td, [list(range(res.num_fit, res.num_fit + res.num_heldout))] * td.num_tasks)
    # float32 losses summed in another order (vmapped padded vs the Scorer's packed examples):
    # ~1e-6 relative; 1e-4 as everywhere in this file.
    np.testing.assert_allclose(res.unit_fit_k, _losses_by_cluster(setup, prepared, None, fit), rtol=1e-4)
    np.testing.assert_allclose(res.unit_heldout_k, _losses_by_cluster(setup, prepared, None, held), rtol=1e-4)
    assert res.tuned[2][4] != 1.0  # the one-member cluster's own weight moved
    np.testing.assert_allclose(res.tuned_fit_k, _losses_by_cluster(setup, prepared, res.tuned, fit), rtol=1e-4)


def test_each_cluster_stops_exactly_patience_steps_after_its_last_improvement(edge):
    """On the scripted held-out losses: a cluster's best step is its last improvement before it
    went `patience` steps without one; what comes after is ignored (even a lower loss exactly
    `patience` steps after its best); the loop ends at the step where the last cluster stops;
    kept weights are those of the best step, unit weights where no step beat them."""
    res, thetas = edge["res"], edge["thetas"]
    assert res.best_step_k.tolist() == [3, 0, 4]
    assert res.steps == len(thetas) == 4 + EDGE_PATIENCE < edge["settings"].steps
    np.testing.assert_array_equal(res.tuned_heldout_k, [-2.0, res.unit_heldout_k[1], -4.0])
    assert res.kept_k.tolist() == [True, False, True]
    np.testing.assert_array_equal(res.tuned[0], thetas[2][0])
    np.testing.assert_array_equal(res.tuned[2], thetas[3][2])
    np.testing.assert_array_equal(res.weights[1], np.ones_like(res.weights[1]))


@pytest.mark.parametrize("method", ["ties", "ties_delta", "knots_ties"])
@pytest.mark.parametrize("granularity", ["adapter", "layer"])
def test_a_one_member_cluster_at_weight_w_is_its_adapter_scaled_by_w(setup, method, granularity):
    """A cluster of one adapter merged with weight w (per adapter, or per adapter and layer) is
    that adapter's delta (scaling * B @ A, as PEFT loads it: tests/test_lora_io.py) times w, for
    factor-wise and delta-space operators alike; a two-member cluster is left to the operator."""
    aset = setup["aset"]
    prepared = merge.prepare_merge(aset, method, 0.5)
    partition = np.array([0, 1, 2, 2, 3], np.int32)  # clusters 0, 1 and 3 have one member
    rng = np.random.default_rng(7)
    shape = (4, 5) if granularity == "adapter" else (4, 5, aset.num_layers)
    weights = rng.uniform(0.2, 3.0, shape).astype(np.float32)
    merged = jax.tree.map(np.asarray, tune.merged_clusters(prepared, partition, 4, weights))
    for c, i in ((0, 0), (1, 1), (3, 4)):
        w_l = np.broadcast_to(np.asarray(weights[c, i], np.float64), (aset.num_layers,))
        got = lora.lora_delta(jax.tree.map(lambda x: x[c], merged))
        want = lora.lora_delta(lora.effective_lora(aset, i))
        for m in want:
            ref = w_l[:, None, None] * np.asarray(want[m], np.float64)
            # float32 products of rank-4 factors: a few ulps of the largest entry
            np.testing.assert_allclose(got[m], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
