"""Baseline strategies: random, k-means on weights, mttl's SVD model-based clustering, all-in-one;
the population's exchange and best chain at every population size, NaN objectives included."""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.search import initial_state
from d2c_jax.run_config import SearchSettings
from d2c_jax.strategies import baselines, d2c, population

N, K, L, R, D_IN, D_OUT = 12, 3, 2, 4, 16, 16


def _adapters(seed=0, noise=0.3):
    """Adapters near one of K family centroids (family of adapter i: i % K), modules q and v."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for module in ("v_proj", "q_proj"):
        ca = rng.normal(size=(K, L, R, D_IN))
        cb = rng.normal(size=(K, L, D_OUT, R))
        fam = np.arange(N) % K
        a[module] = (ca[fam] + noise * rng.normal(size=(N, L, R, D_IN))).astype(np.float32)
        b[module] = (cb[fam] + noise * rng.normal(size=(N, L, D_OUT, R))).astype(np.float32)
    return a, b


def _groups(partition):
    return {tuple(np.flatnonzero(partition == k)) for k in range(partition.max() + 1)}


FAMILIES = _groups(np.arange(N) % K)


def test_flatten_concatenates_a_then_b_per_module_in_name_order():
    a, b = _adapters()
    x = baselines.flatten_adapters(a, b)
    expected = np.concatenate([a["q_proj"][3].ravel(), b["q_proj"][3].ravel(), a["v_proj"][3].ravel(), b["v_proj"][3].ravel()])
    assert x.shape == (N, 2 * L * R * (D_IN + D_OUT)) and x.dtype == np.float32
    np.testing.assert_array_equal(x[3], expected)


@pytest.mark.parametrize("strategy", ["kmeans", "svd_kmeans"])
def test_weight_clustering_recovers_families_deterministically(strategy):
    a, b = _adapters()
    p1 = baselines.baseline_partition(strategy, N, K, 0, a, b)
    assert p1.dtype == np.int32 and _groups(p1) == FAMILIES
    np.testing.assert_array_equal(p1, baselines.baseline_partition(strategy, N, K, 0, a, b))


def test_sparsify_keeps_the_entries_above_the_median_magnitude():
    x = np.random.default_rng(1).normal(size=(6, 200)).astype(np.float32)
    y = baselines.sparsify_rows(x.copy())
    for row_x, row_y in zip(x, y):
        thr = np.quantile(np.abs(row_x), 0.5)
        np.testing.assert_array_equal(row_y, np.where(np.abs(row_x) <= thr, 0, row_x))
    assert ((y == 0).mean(1) == 0.5).all()  # 200 distinct values: exactly 100 at or below the median


@pytest.mark.parametrize("n, k", [(6, 64), (20, 4)])
def test_svd_embeddings_match_sklearn_truncated_svd(n, k):
    """Reference: mttl's sklearn TruncatedSVD (randomized) embedding; compared through the cosine
    similarities between rows (component signs are arbitrary)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, 3)) @ rng.normal(size=(3, 300)) + 0.1 * rng.normal(size=(n, 300))).astype(np.float32)
    x = baselines.sparsify_rows(x)
    emb = baselines.svd_embeddings(x, k)
    assert emb.shape == (n, min(n, k))
    # float64 rows divided by their float64 norm (k <= 64 squares): (k / 2 + 2) U64 ~ 4e-15 -> 1e-12
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-12)
    ref = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, n_oversamples=10, random_state=0,
                       tol=0.0).fit_transform(x)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    # the exact (Gram, float64) vs the randomized subspace of float32 data: sklearn's 5 power
    # iterations shrink the error by (sigma_{k+p+1} / sigma_k)^10 with 10 oversamples (Halko et
    # al. 2011, Cor. 10.10), ~0 here; what is left is float32 data rounding, U sqrt(F) ~ 1e-6: 1e-5
    np.testing.assert_allclose(cosine_similarity(emb), cosine_similarity(ref), atol=1e-5)


@pytest.mark.parametrize("start", d2c.STARTS)
def test_random_baseline_is_the_first_chains_start_and_all_in_one_is_one_cluster(start):
    p = baselines.baseline_partition("random", N, K, 7, start=start)
    np.testing.assert_array_equal(
        p, initial_state(SearchSettings(num_clusters=K, seed=7, start=start), N).partitions_pn[0])
    assert set(p) == set(range(K))
    assert (baselines.baseline_partition("all_in_one", N, K, 7) == 0).all()


def test_identical_adapters_still_give_k_non_empty_clusters():
    a, b = _adapters(noise=0.0)  # only K distinct points
    for module in a:
        a[module][:] = a[module][0]
        b[module][:] = b[module][0]
    with pytest.warns(Warning):
        p = baselines.kmeans(a, b, K, seed=0)
    assert np.all(np.bincount(p, minlength=K) >= 1)
    filled = baselines.fill_empty_clusters(np.zeros(N, np.int32), 4, np.arange(N, dtype=float)[:, None])
    assert np.all(np.bincount(filled, minlength=4) >= 1)


def test_random_partitions_cover_every_cluster():
    for seed in range(50):
        part = d2c.random_partition(np.random.default_rng(seed), 6, 5)
        assert sorted(set(part)) == list(range(5))


# --------------------------------------------------------------------------- population


def _rank(objectives_p):
    """Chains best first by the definition: objective (NaN counts as worst), then chain index."""
    key = lambda p: (np.isnan(objectives_p[p]), 0.0 if np.isnan(objectives_p[p]) else objectives_p[p], p)  # noqa: E731
    return sorted(range(len(objectives_p)), key=key)


@pytest.mark.parametrize("chains", range(1, 10))
def test_exchange_copies_the_best_quarter_over_the_worst_at_every_population_size(chains):
    """max(1, P // 4) of the worst chains (P >= 2) each get a copy of the i-th best, NaN
    objectives ranking last and ties going to the lower chain index; the rest are untouched."""
    rng = np.random.default_rng(chains)
    parts = rng.integers(0, 3, (chains, 7)).astype(np.int32)
    for trial in range(20):
        objectives = rng.choice([1.0, 2.0, 3.0, np.nan], chains) if trial % 2 else rng.normal(size=chains)
        if trial == 3:
            objectives[:] = np.nan
        new, pairs = population.exchange(parts, objectives)
        count = 0 if chains < 2 else max(1, chains // 4)
        order = _rank(objectives)
        assert pairs == list(zip(order[::-1][:count], order[:count]))
        want = parts.copy()
        for dst, src in pairs:
            want[dst] = parts[src]
        np.testing.assert_array_equal(new, want)
        assert population.best_chain(objectives) == order[0]
