"""The tuning controls (tune.py): a fresh LoRA trained from PEFT's initialisation under the same loop
as tuned factors (what the fine-tune alone earns), and one tuned scale per cluster (task
arithmetic with a tuned scale). Their reported losses are the Scorer's (parity-tested against
transformers + peft) of what they keep; the fresh start is PEFT's own initialisation; the tuned
scale's merge is c times the members' summed updates (float64 numpy); the loop trains c on the
unit merge, which equals weighting every member by c for every operator; a second tuning call of
the same shapes compiles nothing."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from d2c_jax import merge, tune  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.scoring import Scorer  # noqa: E402
from fixtures_search_inputs import load_search_inputs  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

PARTITION = np.array([0, 1, 0, 1, 1], np.int32)
SETTINGS = tune.TuneSettings(steps=6, holdout=0.3, patience=6)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return load_search_inputs(tmp_path_factory.mktemp("controls"))


def _held(td):
    """The held-out part tune.split_examples makes of 3 examples at holdout 0.3: the last one."""
    return dataclasses.replace(td, batch=jax.tree.map(lambda x: x[:, 2:3], td.batch),
                               num_examples=np.ones(td.num_tasks, np.int32))


def _per_cluster(inputs, prepared, lora_of_cluster, td, partition=PARTITION, scorer=None):
    """Reference: each task's Scorer loss under lora_of_cluster(c) (None: the base model), summed
    per cluster (`scorer`: one built for these inputs, reused across calls)."""
    scorer = scorer or Scorer(inputs["params"], inputs["cfg"], prepared, td, batch_size=2)
    out = np.zeros(int(partition.max()) + 1)
    for t, c in enumerate(partition):
        out[c] += scorer.loss_of_lora(lora_of_cluster(c), t)
    return out


def test_a_fresh_lora_is_initialised_as_peft_initialises_one(inputs):
    """PEFT's LoraLayer.reset_lora_parameters: A kaiming_uniform_(a=sqrt(5)), B zeros."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inputs["paths"]["base_model"])
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    a_peft = np.stack([m.lora_A["default"].weight.detach().numpy() for n, m in pm.named_modules()
                       if n.endswith("q_proj") and hasattr(m, "lora_A")])
    b_peft = np.stack([m.lora_B["default"].weight.detach().numpy() for n, m in pm.named_modules()
                       if n.endswith("q_proj") and hasattr(m, "lora_A")])
    d_in = a_peft.shape[-1]
    shapes = {"q_proj": {"a": jax.ShapeDtypeStruct((2,) + a_peft.shape, np.float32),
                         "b": jax.ShapeDtypeStruct((2,) + b_peft.shape, np.float32)}}
    ours = tune.fresh_lora(shapes, seed=0)["q_proj"]
    a_ours, b_ours = np.asarray(ours["a"]), np.asarray(ours["b"])
    bound = math.sqrt(6.0 / ((1 + 5.0) * d_in))  # kaiming_uniform's gain sqrt(2 / (1 + a^2)) * sqrt(3 / fan_in)
    assert np.all(b_peft == 0) and np.all(b_ours == 0)
    for a in (a_peft, a_ours):  # the same uniform law: within the bound, filling it, mean ~0
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size)  # 4 standard errors of a U(-b, b) mean
    # Same variance (b^2 / 3) within sampling error (relative standard error sqrt(0.8 / size)).
    for a in (a_peft, a_ours):
        assert abs(a.var() / (bound ** 2 / 3) - 1) < 4 * math.sqrt(0.8 / a.size)


def test_a_fresh_lora_starts_at_the_base_model_and_reports_the_losses_of_what_it_keeps(inputs):
    prepared = merge.prepare_merge(inputs["aset"], "ties_delta", 0.5)
    res = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity="factors", start="fresh", learning_rate=0.05))
    held = _held(inputs["td"])
    # The start (B = 0) is the base model: tune's loss program vs the Scorer's, LOSS_RTOL.
    np.testing.assert_allclose(res.unit_heldout_k, _per_cluster(inputs, prepared, lambda c: None, held),
                               rtol=LOSS_RTOL)
    kept = np.where(res.kept_k, res.tuned_heldout_k, res.unit_heldout_k)
    np.testing.assert_allclose(
        _per_cluster(inputs, prepared, lambda c: jax.tree.map(lambda x: x[c], res.lora), held), kept, rtol=LOSS_RTOL)
    assert res.kept_k.any(), "6 Adam steps at lr 0.05 from B = 0 should beat the base model on some cluster"
    for c in range(2):
        b_zero = all(not np.any(np.asarray(ab["b"][c])) for ab in res.lora.values())
        assert b_zero != bool(res.kept_k[c])  # not kept: the start itself


def test_one_tuned_scale_per_cluster_weights_every_member_alike(inputs):
    prepared = merge.prepare_merge(inputs["aset"], "core_ta", 0.5)
    res = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity="scale"))
    assert res.weights.shape == (2, 5)
    assert np.all(res.weights == res.weights[:, :1]) and np.all(res.tuned == res.tuned[:, :1])
    held = _held(inputs["td"])
    # The merge tuning evaluates: the unit merge of each cluster's mask over all N slots with its B
    # scaled by c. (Merging at weights c, or over the gathered members as merged/ is written,
    # tests/test_final_merge.py, is the same update in exact arithmetic, but core_ta here truncates
    # at rank R, where rounding moves the kept directions by eps ||M|| / gap: not a loss-level
    # comparison.)
    masks_kn = PARTITION[None, :] == np.arange(2)[:, None]
    loras = tune.scaled(jax.jit(merge.merge_masks)(prepared, masks_kn), jnp.asarray(res.tuned[:, 0]))
    np.testing.assert_allclose(res.tuned_heldout_k,
                               _per_cluster(inputs, prepared, lambda c: jax.tree.map(lambda x: x[c], loras), held),
                               rtol=LOSS_RTOL)
    assert res.kept_k.any(), "the scale search should find a better held-out scale for some cluster"


def _fit(td):
    """The fitted part tune.split_examples makes of 3 examples at holdout 0.3: the first two."""
    return dataclasses.replace(td, batch=jax.tree.map(lambda x: x[:, :2], td.batch),
                               num_examples=np.full(td.num_tasks, 2, np.int32))


def test_the_scale_search_finds_the_minimiser_of_a_dense_grid_and_keeps_it_only_where_it_wins_held_out(inputs):
    """Each cluster's c against a dense log grid (spacing H_REF) of the fit loss of c times the unit
    merge, each point summed from plain Scorer loss calls, over the range the search covers
    (1 / (2 n) .. 2, n the cluster's members). The search's last spacing is 4 h0 / 49 (h0 its coarse
    spacing, two refinements of 6 points inside the best value's neighbours), < H_REF / 2 here, so
    its c is nearer the minimiser than the dense argmin's two neighbours (each >= H_REF / 2 away):
    in the basin its loss is at most the larger of theirs (plus LOSS_RTOL: two float32 loss
    programs). The guard: kept exactly where c beats c = 1 on the held-out example, else c = 1.
    This partition has interior minima and both outcomes of the guard (checked below)."""
    part = np.array([0, 1, 2, 0, 1], np.int32)
    prepared = merge.prepare_merge(inputs["aset"], "core_ta", 0.5)
    res = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], part, 3,
                              dataclasses.replace(SETTINGS, granularity="scale"))
    unit = tune.merged_clusters(prepared, part, 3)

    splits = {"fit": _fit(inputs["td"]), "held": _held(inputs["td"])}
    scorers = {k: Scorer(inputs["params"], inputs["cfg"], prepared, td, batch_size=2) for k, td in splits.items()}

    @functools.lru_cache(maxsize=None)
    def losses(c, split):  # every cluster's at once: clusters of the same size share their grid points
        lora = tune.scaled(unit, jnp.full((3,), c, jnp.float32))
        return _per_cluster(inputs, prepared, lambda cl: jax.tree.map(lambda x: x[cl], lora), splits[split], part,
                            scorers[split])

    def loss(c, k, split):  # the reference: cluster k's summed task losses with c times its unit merge
        return losses(float(c), split)[k]

    fit, held = "fit", "held"
    H_REF = 0.05
    interior, decided = 0, set()
    for k in range(3):
        n = int(np.sum(part == k))
        lo, hi = math.log(1 / (2 * n)), math.log(2.0)
        h0 = (hi - lo) / 16
        assert 4 * h0 / 49 < H_REF / 2
        grid = np.exp(np.linspace(lo, hi, int(math.ceil((hi - lo) / H_REF)) + 1))
        ref = np.array([loss(c, k, fit) for c in grid])
        j = int(np.argmin(ref))
        interior += 0 < j < len(grid) - 1
        neighbours = ref[max(j - 1, 0):j + 2]
        c = float(res.tuned[k, 0])
        got = loss(c, k, fit)
        np.testing.assert_allclose(res.tuned_fit_k[k], got, rtol=LOSS_RTOL)
        assert got <= neighbours.max() * (1 + LOSS_RTOL), (k, c, grid[j], got, ref[j])
        # The guard, against the reference's held-out losses (undecided only within rounding).
        c_held, unit_held = loss(c, k, held), loss(1.0, k, held)
        np.testing.assert_allclose([res.tuned_heldout_k[k], res.unit_heldout_k[k]], [c_held, unit_held],
                                   rtol=LOSS_RTOL)
        if abs(c_held - unit_held) > LOSS_RTOL * unit_held:
            assert bool(res.kept_k[k]) == (c_held < unit_held)
            decided.add(bool(res.kept_k[k]))
        assert np.all(res.weights[k] == (c if res.kept_k[k] else 1.0))
    assert interior >= 2 and decided == {True, False}, (interior, decided)  # what this test covers


def test_a_fresh_start_needs_factor_tuning():
    with pytest.raises(UserError, match="--tune_start=fresh: trains a new LoRA, so it needs --tune_granularity=factors"):
        tune.TuneSettings(granularity="adapter", start="fresh")


def _updates(lora_k, c):
    """float64 {module: [L, d_out, d_in]} updates b a of cluster c's adapter (scaling 1)."""
    return {m: np.einsum("lor,lri->loi", np.asarray(ab["b"][c], np.float64), np.asarray(ab["a"][c], np.float64))
            for m, ab in lora_k.items()}


# A merge made of float32 SVD factors (backward stable) reproduces an update M to a few ulps of
# ||M||: eps32 = 1.2e-7 times a dimension factor of at most ~64 (d <= 64 here) gives 7.7e-6 ->
# 1e-5 of the largest |entry| of the reference, per layer and module.
MERGE_ATOL = 1e-5


def test_one_tuned_scale_merges_c_times_the_sum_of_the_members_updates(inputs):
    """Task arithmetic with one tuned scale: cluster k's merge is c_k sum_{i in k} s_i B_i A_i,
    against float64 numpy of that sum (core_ta at an output rank of the largest cluster's n R keeps
    the whole sum), and the held-out loss tuning reports is the Scorer's of that merge."""
    aset = inputs["aset"]
    rank = int(np.bincount(PARTITION).max()) * aset.rank  # no truncation: the exact sum
    prepared = merge.prepare_merge(aset, "core_ta", 0.5, rank=rank)
    res = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity="scale", learning_rate=0.2))
    c_k = res.tuned[:, 0]
    assert res.kept_k.any() and not np.allclose(c_k, 1.0)
    loras = tune.merged_clusters(prepared, PARTITION, 2, res.tuned)
    for c in range(2):
        got = _updates(loras, c)
        for m in aset.a:
            want = c_k[c] * sum(aset.scaling[i] * np.einsum("lor,lri->loi", aset.b[m][i].astype(np.float64),
                                                             aset.a[m][i].astype(np.float64))
                                for i in np.flatnonzero(PARTITION == c))
            np.testing.assert_allclose(got[m], want, rtol=0, atol=MERGE_ATOL * np.abs(want).max(), err_msg=m)
    np.testing.assert_allclose(res.tuned_heldout_k,
                               _per_cluster(inputs, prepared, lambda c: jax.tree.map(lambda x: x[c], loras),
                                            _held(inputs["td"])), rtol=LOSS_RTOL)


# Iso-CTS cuts inside the merge (its common subspace, each member's top directions), not only at
# the output rank, so the two sides below differ there by eps ||M|| / gap, unbounded as a gap
# closes (seen: 7e-3 relative on one machine): it is scale-equivariant in exact arithmetic only.
EQUIVARIANT_IN_FLOAT = [m for m in merge.METHODS if m != "core_iso_cts"]


@pytest.mark.parametrize("method", EQUIVARIANT_IN_FLOAT)
def test_a_weight_shared_by_every_member_scales_the_merge(inputs, method):
    """Why the scale loop trains c on the unit merge (tune.scaled) instead of merging at weights c:
    the two are the same update for every operator. At an output rank that truncates nothing (the
    largest cluster's n R): a truncation at nearly equal singular values would turn rounding into
    a different kept direction (an error of eps ||M|| / gap, unbounded as the gap closes)."""
    rank = int(np.bincount(PARTITION).max()) * inputs["aset"].rank
    prepared = merge.prepare_merge(inputs["aset"], method, 0.5, rank=rank)
    c_k = np.array([0.37, 2.5], np.float32)
    weighted = tune.merged_clusters(prepared, PARTITION, 2, np.repeat(c_k[:, None], len(PARTITION), axis=1))
    scaled = tune.scaled(tune.merged_clusters(prepared, PARTITION, 2), jnp.asarray(c_k))
    for c in range(2):
        want, got = _updates(weighted, c), _updates(scaled, c)
        for m in want:
            np.testing.assert_allclose(got[m], want[m], rtol=0, atol=MERGE_ATOL * np.abs(want[m]).max(), err_msg=m)


def test_a_second_tuning_call_of_the_same_shapes_compiles_nothing_and_gives_the_same_result(inputs):
    """The step functions are built once per config and shapes (tune.step_functions' cache), so a
    second call reuses the executables of the first: no backend compilation, the same result."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":  # jax's event of every XLA compilation
            compiles.append(event)

    prepared = merge.prepare_merge(inputs["aset"], "ties", 0.5)
    settings = dataclasses.replace(SETTINGS, granularity="adapter", steps=3, learning_rate=0.2)
    args = (inputs["params"], inputs["cfg"], prepared, inputs["td"], PARTITION, 2, settings)
    first = tune.tune_partition(*args)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        second = tune.tune_partition(*args)
        assert compiles == [], f"{len(compiles)} compilations in the second call"
        tune.tune_partition(*args[:6], dataclasses.replace(settings, learning_rate=0.1))
        assert compiles, "another learning rate is another optimiser step: compiled anew (the counter works)"
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    for f in ("tuned", "weights", "unit_heldout_k", "tuned_heldout_k", "tuned_fit_k", "kept_k", "best_step_k"):
        np.testing.assert_array_equal(getattr(second, f), getattr(first, f), err_msg=f)


def test_a_partition_tuned_in_the_steps_of_more_clusters_gets_its_own_result(inputs):
    """The report tunes K = 1 in the compiled steps of its K: the extra clusters are empty (no
    task, no loss: never kept), and the used cluster gets what tuning with K = 1 gives (the same
    losses to the loss program's rounding, LOSS_RTOL; the same best step and choice)."""
    prepared = merge.prepare_merge(inputs["aset"], "ties_delta", 0.5)
    settings = dataclasses.replace(SETTINGS, granularity="factors", steps=3, learning_rate=0.05)
    one = np.zeros(len(PARTITION), np.int32)
    alone = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], one, 1, settings)
    wider = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], one, 2, settings)
    for f in ("unit_heldout_k", "tuned_heldout_k", "unit_fit_k", "tuned_fit_k"):
        np.testing.assert_allclose(getattr(wider, f)[:1], getattr(alone, f), rtol=LOSS_RTOL, err_msg=f)
    np.testing.assert_array_equal(wider.kept_k, [alone.kept_k[0], False])
    np.testing.assert_array_equal(wider.best_step_k, [alone.best_step_k[0], 0])
    assert alone.kept_k[0], "3 Adam steps at lr 0.05 should beat the unit merge held out"
    assert wider.unit_heldout_k[1] == 0 and wider.tuned_heldout_k[1] == 0  # the empty cluster: no loss
