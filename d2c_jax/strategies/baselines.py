"""One-shot clustering baselines of the paper: random, k-means on weights, model-based clustering.

They take the raw PEFT factors as numpy arrays ({module: a [N, L, R, d_in]}, {module: b
[N, L, d_out, R]}, `AdapterSet.a` / `.b`) and return a partition int32[N] in [0, K) with every
cluster non-empty. All randomness comes from `seed`.

- `random`: the same random partition the first D²C chain starts from (so D²C's gain over random
  is measured from the same point).
- `kmeans`: k-means (k-means++, 10 inits) on each adapter's flattened, concatenated A and B.
- `svd_kmeans`: mttl's model-based clustering (Ostapenko et al. 2024, `SVDEmbeddingTransform` +
  `MBCWithCosSimTransform`): flatten each adapter, zero the entries at or below its 0.5 magnitude
  quantile, TruncatedSVD (64 components, randomized), row-normalise, cosine similarity matrix
  between adapters, k-means++ with 10 inits on the rows of that matrix.
- `all_in_one`: one cluster.

Shapes: N adapters, F flattened factor entries, K clusters, E SVD components.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from d2c_jax.strategies import d2c

SVD_COMPONENTS = 64
SVD_SPARSITY = 0.5


def random_baseline(num_adapters: int, num_clusters: int, seed: int) -> np.ndarray:
    """Chain 0's initial partition of the D²C search with the same seed."""
    return d2c.initial_partitions(num_adapters, num_clusters, 1, seed)[0]


def all_in_one(num_adapters: int) -> np.ndarray:
    return np.zeros(num_adapters, np.int32)


def flatten_adapters(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32[N, F]: per adapter, A then B of each module (sorted by name), flattened."""
    parts = []
    for module in sorted(a):
        n = a[module].shape[0]
        parts.append(np.asarray(a[module], np.float32).reshape(n, -1))
        parts.append(np.asarray(b[module], np.float32).reshape(n, -1))
    if not parts:
        raise ValueError("no adapter factors to cluster")
    return np.concatenate(parts, axis=1)


def kmeans(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], num_clusters: int, seed: int) -> np.ndarray:
    """k-means on the flattened concatenated A and B of each adapter."""
    from sklearn.cluster import KMeans

    x_nf = flatten_adapters(a, b)
    labels_n = KMeans(n_clusters=num_clusters, init="k-means++", n_init=10, random_state=seed).fit_predict(x_nf)
    return fill_empty_clusters(labels_n, num_clusters, x_nf)


def svd_embeddings(x_nf: np.ndarray, seed: int) -> np.ndarray:
    """mttl's SVD embedding: sparsify at the per-adapter magnitude quantile, TruncatedSVD, L2 rows."""
    from sklearn.decomposition import TruncatedSVD

    x_nf = np.array(x_nf, np.float32, copy=True)
    abs_nf = np.abs(x_nf)
    thr_n = np.quantile(abs_nf, SVD_SPARSITY, axis=1)
    x_nf[abs_nf <= thr_n[:, None]] = 0.0
    svd = TruncatedSVD(
        n_components=min(SVD_COMPONENTS, x_nf.shape[1]), algorithm="randomized", n_iter=5,
        n_oversamples=10, power_iteration_normalizer="auto", random_state=seed, tol=0.0,
    )
    emb_ne = svd.fit_transform(x_nf)
    norm_n = np.linalg.norm(emb_ne, 2, axis=1, keepdims=True)
    return emb_ne / np.where(norm_n > 0, norm_n, 1.0)


def svd_kmeans(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], num_clusters: int, seed: int) -> np.ndarray:
    """Model-based clustering: k-means++ (10 inits) on the cosine similarities of SVD embeddings."""
    from sklearn.cluster import KMeans
    from sklearn.metrics.pairwise import cosine_similarity

    emb_ne = svd_embeddings(flatten_adapters(a, b), seed)
    sim_nn = cosine_similarity(emb_ne, emb_ne)
    labels_n = KMeans(n_clusters=num_clusters, init="k-means++", n_init=10, random_state=seed).fit_predict(sim_nn)
    return fill_empty_clusters(labels_n, num_clusters, sim_nn)


def fill_empty_clusters(labels_n: np.ndarray, num_clusters: int, x_nf: np.ndarray) -> np.ndarray:
    """k-means can leave a cluster empty when adapters coincide; each empty cluster takes the
    member farthest from its cluster mean out of the largest cluster (deterministic)."""
    labels_n = np.asarray(labels_n, np.int32).copy()
    x_nf = np.asarray(x_nf, np.float64)
    for k in range(num_clusters):
        if np.any(labels_n == k):
            continue
        sizes_k = np.bincount(labels_n, minlength=num_clusters)
        big = int(np.argmax(sizes_k))
        members = np.flatnonzero(labels_n == big)
        dist_m = np.linalg.norm(x_nf[members] - x_nf[members].mean(0), axis=1)
        labels_n[members[int(np.argmax(dist_m))]] = k
    return labels_n


def baseline_partition(
    strategy: str,
    num_adapters: int,
    num_clusters: int,
    seed: int,
    a: Mapping[str, np.ndarray] | None = None,
    b: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Dispatches on the strategy name; kmeans / svd_kmeans need the factors `a`, `b`."""
    if strategy == "random":
        return random_baseline(num_adapters, num_clusters, seed)
    if strategy == "all_in_one":
        return all_in_one(num_adapters)
    if strategy in ("kmeans", "svd_kmeans"):
        if a is None or b is None:
            raise ValueError(f"{strategy} needs the adapter factors")
        fn = kmeans if strategy == "kmeans" else svd_kmeans
        return fn(a, b, num_clusters, seed)
    raise ValueError(f"unknown baseline {strategy!r}")
