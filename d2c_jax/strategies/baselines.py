"""One-shot clustering baselines of the paper: random, k-means on weights, model-based clustering.

They take the raw PEFT factors as numpy arrays ({module: a [N, L, R, d_in]}, {module: b
[N, L, d_out, R]}, `AdapterSet.a` / `.b`) and return a partition int32[N] in [0, K) with every
cluster non-empty. All randomness comes from `seed`.

- `random`: the same random partition the first D²C chain starts from, with the same `start`
  (so D²C's gain over random is measured from the same point).
- `kmeans`: k-means (k-means++, 10 inits) on each adapter's flattened, concatenated A and B.
- `svd_kmeans`: mttl's model-based clustering (Ostapenko et al. 2024, `SVDEmbeddingTransform` +
  `MBCWithCosSimTransform`): flatten each adapter, zero the entries at or below its 0.5 magnitude
  quantile, truncated SVD (64 components; exact, via the Gram matrix, where mttl uses sklearn's
  randomized TruncatedSVD), row-normalise, cosine similarity matrix between adapters, k-means++
  with 10 inits on the rows of that matrix.
- `all_in_one`: one cluster.

Shapes: N adapters, F flattened factor entries, K clusters, E SVD components.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from d2c_jax.strategies import d2c

SVD_COMPONENTS = 64
SVD_SPARSITY = 0.5


def random_baseline(num_adapters: int, num_clusters: int, seed: int, start: str = "random") -> np.ndarray:
    """Chain 0's initial partition of the D²C search with the same seed and start."""
    return d2c.initial_partitions(num_adapters, num_clusters, 1, seed, start)[0]


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


def sparsify_rows(x_nf: np.ndarray, quantile: float = SVD_SPARSITY) -> np.ndarray:
    """In place: zeroes each row's entries whose magnitude is <= the row's `quantile` magnitude
    quantile (mttl's threshold), one row at a time to bound memory."""
    for row_f in x_nf:
        abs_f = np.abs(row_f)
        row_f[abs_f <= np.quantile(abs_f, quantile)] = 0.0
    return x_nf


def svd_embeddings(x_nf: np.ndarray, num_components: int = SVD_COMPONENTS) -> np.ndarray:
    """Rows of U_k Σ_k of the (uncentred) truncated SVD of x_nf, L2-normalised: mttl's SVD
    embedding. Computed exactly from the N×N Gram matrix x xᵀ = U Σ² Uᵀ (accumulated in float64
    over column blocks), so F can be billions of entries without a random [F, k] projection;
    mttl's randomized TruncatedSVD approximates the same subspace. Component signs are arbitrary,
    which cosine similarities between rows do not see."""
    n, f = x_nf.shape
    gram_nn = np.zeros((n, n), np.float64)
    block = max(1, (1 << 25) // max(n, 1))
    for start in range(0, f, block):
        xb = np.asarray(x_nf[:, start:start + block], np.float64)
        gram_nn += xb @ xb.T
    eigval_n, eigvec_nn = np.linalg.eigh(gram_nn)  # ascending
    k = min(num_components, n, f)
    top = np.argsort(eigval_n)[::-1][:k]
    emb_ne = eigvec_nn[:, top] * np.sqrt(np.clip(eigval_n[top], 0.0, None))
    norm_n = np.linalg.norm(emb_ne, 2, axis=1, keepdims=True)
    return emb_ne / np.where(norm_n > 0, norm_n, 1.0)


def svd_kmeans(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], num_clusters: int, seed: int) -> np.ndarray:
    """Model-based clustering: k-means++ (10 inits) on the cosine similarities of SVD embeddings."""
    from sklearn.cluster import KMeans
    from sklearn.metrics.pairwise import cosine_similarity

    emb_ne = svd_embeddings(sparsify_rows(flatten_adapters(a, b)))
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
    start: str = "random",
) -> np.ndarray:
    """Dispatches on the strategy name; kmeans / svd_kmeans need the factors `a`, `b`; random
    draws the D²C `start` (d2c.STARTS)."""
    if strategy == "random":
        return random_baseline(num_adapters, num_clusters, seed, start)
    if strategy == "all_in_one":
        return all_in_one(num_adapters)
    if strategy in ("kmeans", "svd_kmeans"):
        if a is None or b is None:
            raise ValueError(f"{strategy} needs the adapter factors")
        fn = kmeans if strategy == "kmeans" else svd_kmeans
        return fn(a, b, num_clusters, seed)
    raise ValueError(f"unknown baseline {strategy!r}")
