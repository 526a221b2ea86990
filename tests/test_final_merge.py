"""The final merge of a partition (tune.merged_clusters, what merged/ is written from) merges each
cluster over its own members gathered into one member bucket G (scoring.merge_members), and equals
the merge of the cluster's mask over all N slots (merge.merge_mask, vmapped over the K masks: the
definition), for every operator, at unit and at tuned weights; the dry run compiles it at the
shapes a run calls it with.

Twelve adapters of ranks 3 to 8 (one without a module, one without a layer: test_merge_vmap's),
K = 5 clusters of 5, 4, 2, 1 and 0 members: G = 8 < N = 12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2c_jax import dry_run, lora as lora_lib, merge, tune
from test_merge_vmap import L, RANKS
from test_merge_vmap import _adapter_set as adapter_set
from tolerances import U

N = 12
PARTITION = np.array([0, 1, 0, 2, 1, 0, 3, 1, 0, 2, 1, 0], np.int32)  # sizes 5, 4, 2, 1 and an empty cluster 4
K = 5
G = 8


def _adapters() -> lora_lib.AdapterSet:
    return adapter_set(RANKS + RANKS[:3] + RANKS[::-1][:4])


def _reference(prepared, weights_k):
    """merge_mask of each cluster's mask over all N slots, vmapped over the K clusters."""
    masks_kn = jnp.asarray(PARTITION[None, :] == np.arange(K)[:, None])
    if weights_k is None:
        return jax.jit(merge.merge_masks)(prepared, masks_kn)
    one = lambda w, m: merge.merge_mask(merge.with_weights(prepared, w), m)  # noqa: E731
    return jax.jit(jax.vmap(one))(jnp.asarray(weights_k), masks_kn)


def _member_sums(prepared, weights_k, k):
    """float64 sum over cluster k's members of |factor-wise term| per entry, of a and b."""
    p = prepared if weights_k is None else merge.with_weights(prepared, jnp.asarray(weights_k[k]))
    idx = np.flatnonzero(PARTITION == k)
    out = {}
    for mod, tv in p.task.items():
        out[mod] = {}
        for name, w in (("a", p.weight_a), ("b", p.weight_b)):
            x = np.asarray(tv[name], np.float64)[idx]
            w = np.asarray(w, np.float64)[idx]
            w = w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
            out[mod][name] = np.abs(w * x).sum(axis=0)
    return out


CASES = ([(m, None) for m in merge.METHODS]  # tuned weights enter every operator the same way (with_weights)
         + [(m, "adapter") for m in ("ties", "linear", "ties_delta", "core_ties")]
         + [(m, "layer") for m in ("dare_ties", "magnitude_prune", "knots_ties", "iso_c", "core_iso_cts")])


@pytest.mark.parametrize("method,weighted", CASES)
def test_each_cluster_merged_over_its_gathered_members_equals_its_mask_over_all_slots(method, weighted):
    """Factor-wise operators (every entry a sum or a mean of its members' weighted entries): the
    gathered and the masked merge add the same terms in other orders (masked-out slots add exact
    zeros), each within gamma_n of the sum of |terms| (n = N or G), plus the weight products and
    the division by the count: (N + G + 4) U times that sum, per entry. Update-space operators
    write the merge through a float32 SVD whose factors are unique only up to signs and rotations:
    their delta B @ A, within 2e-5 of its largest entry (the SVD's backward error, eps |delta|,
    with the core bases' as margin). The empty cluster merges to no update in both (the gathered
    merge skips it: zero factors)."""
    prepared = merge.prepare_merge(_adapters(), method, 0.5, seed=1)
    rng = np.random.default_rng(5)
    weights_k = None if weighted is None else rng.uniform(0.3, 2.0, (K, N) if weighted == "adapter" else (K, N, L)
                                                          ).astype(np.float32)
    assert tune.final_member_bucket(5, N) == G < N
    got = jax.tree.map(np.asarray, tune.merged_clusters(prepared, PARTITION, K, weights_k))
    want = jax.tree.map(np.asarray, _reference(prepared, weights_k))
    for k in range(K - 1):
        got_k, want_k = (jax.tree.map(lambda v: v[k], t) for t in (got, want))
        if method in merge.DELTA_METHODS:
            for mod, x in lora_lib.lora_delta(want_k).items():
                y = lora_lib.lora_delta(got_k)[mod]
                assert np.abs(y - x).max() <= 2e-5 * np.abs(x).max(), (method, k, mod)
            continue
        sums = _member_sums(prepared, weights_k, k)
        for mod in want_k:
            for name in "ab":
                x, y = want_k[mod][name], got_k[mod][name]
                bound = (N + G + 4) * U * sums[mod][name]
                assert np.all(np.abs(y.astype(np.float64) - x) <= bound), (method, k, mod, name)
    assert not any(leaf[K - 1].any() for leaf in jax.tree.leaves(got))
    assert not any(d.any() for d in lora_lib.lora_delta(jax.tree.map(lambda v: v[K - 1], want)).values())


def test_the_dry_run_compiles_the_final_merge_at_the_shapes_a_run_calls_it_with(monkeypatch):
    """A partition whose largest cluster has N - K + 1 members (the largest a partition into K
    non-empty clusters can have) calls the final merge with exactly the abstract arguments the dry
    run compiles: the same shapes, dtypes and bucket, at unit and at tuned weights."""
    prepared = merge.prepare_merge(_adapters(), "ties", 0.5)
    calls = []
    monkeypatch.setattr(tune, "_merge_members", lambda *args: calls.append(args))
    largest = np.array([0] * (N - K + 1) + list(range(1, K)), np.int32)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), prepared)
    device = jax.devices()[0]
    for w in (None, np.ones((K, N), np.float32), np.ones((K, N, L), np.float32)):
        tune.merged_clusters(prepared, largest, K, w)
        exe = dry_run.final_merge_executable(shapes, N, K, device, None if w is None else w.shape)
        spec = lambda x: (tuple(x.shape), np.dtype(x.dtype))  # noqa: E731
        assert jax.tree.map(spec, calls[-1]) == jax.tree.map(spec, exe.args)
    assert calls[-1][1].shape == (K, tune.final_member_bucket(N - K + 1, N))


@pytest.mark.parametrize("method,weighted", [("ties", None), ("ties", "adapter"), ("ties_delta", "layer")])
def test_on_a_mesh_the_final_merge_uses_the_scorers_split_inputs_and_equals_the_one_device_merge(method, weighted,
                                                                                                 monkeypatch):
    """A run on a mesh merges where its Scorer placed the prepared inputs (padded to the adapter
    slots, split over "model": no device holds them whole) and every host reads replicated
    results; they equal the one-device merge (checked against the definition above) within the
    same per-entry bound, twice (each side within it of the exact sum); update-space operators
    within the SVD bound above. The dry run compiles the call the run makes."""
    from types import SimpleNamespace

    from d2c_jax import scoring, sharding

    prepared = merge.prepare_merge(_adapters(), method, 0.5, seed=1)
    mesh = sharding.make_mesh(num_candidate_shards=2, devices=jax.devices()[:8])
    placed = sharding.shard_prepared(scoring.pad_axis0(prepared, scoring.slots(N)), mesh)
    assert placed.num_adapters == scoring.slots(N) > N
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed.task))
    rng = np.random.default_rng(7)
    weights_k = None if weighted is None else rng.uniform(0.3, 2.0, (K, N) if weighted == "adapter" else (K, N, L)
                                                          ).astype(np.float32)
    got = tune.merged_clusters(placed, PARTITION, K, weights_k, mesh)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(got))
    got = jax.tree.map(np.asarray, got)
    want = jax.tree.map(np.asarray, tune.merged_clusters(prepared, PARTITION, K, weights_k))
    for k in range(K - 1):
        got_k, want_k = (jax.tree.map(lambda v: v[k], t) for t in (got, want))
        if method in merge.DELTA_METHODS:
            for mod, x in lora_lib.lora_delta(want_k).items():
                assert np.abs(lora_lib.lora_delta(got_k)[mod] - x).max() <= 2e-5 * np.abs(x).max(), (k, mod)
            continue
        sums = _member_sums(prepared, weights_k, k)
        for mod in want_k:
            for name in "ab":
                bound = 2 * (N + G + 4) * U * sums[mod][name]
                assert np.all(np.abs(got_k[mod][name].astype(np.float64) - want_k[mod][name]) <= bound), (k, mod)

    calls = []
    monkeypatch.setattr(tune, "merge_members_on", lambda m: lambda *args: calls.append(args))
    largest = np.array([0] * (N - K + 1) + list(range(1, K)), np.int32)
    tune.merged_clusters(placed, largest, K, weights_k, mesh)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)
    exe = dry_run.final_merge_executable(prepared, N, K, None, None if weights_k is None else weights_k.shape,
                                         SimpleNamespace(mesh=mesh, placed_prepared=shapes))
    spec = lambda x: (tuple(x.shape), np.dtype(x.dtype), x.sharding)  # noqa: E731
    assert jax.tree.map(spec, calls[-1]) == jax.tree.map(spec, exe.args)
