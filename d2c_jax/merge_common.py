"""What every merge operator shares: the `Prepared` pytree, masked reductions over the adapter
axis, TIES' sign election, the CPU-safe differentiable SVD and the rank fitting of the output.

Shape legend: N adapters (or gathered member slots), L layers, R rank, r output rank, d_in / d_out
module widths, C candidate masks.

Nothing here knows a merge method by name: the operators live in merge_factor.py (factor-wise),
merge_svd.py (ties_delta and KnOTS-TIES, streamed layer by layer) and merge_core.py (the core
space); merge.py dispatches to them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prepared:
    """Mask-independent merge inputs (a pytree; method, rank and density are static). Every
    array leaf has the adapter axis N first, so a cluster's members can be gathered from it.

    Factor-wise methods (merge_factor.py):
      single: {module: {"a": [N, L, R, d_in], "b": [N, L, d_out, R]}} the adapters as they are
              (b = w s B), used when the mask has one member;
      task:   {module: {"a", "b"}} trimmed (or dropped) unweighted factors;
      weight_a, weight_b: [N] multipliers of task["a"] / task["b"].
    Update-space methods (merge_svd.py, merge_core.py), holding factors only (never an update
    [d_out, d_in] per adapter):
      single: {} (unused);
      task:   {module: {"a": A [N, L, R, d_in], "b": B [N, L, d_out, R]}} the raw PEFT factors
              (ties_delta also "thresh" [N, L]: its trim threshold per adapter and layer);
      weight_a: [N] (or [N, L]) merge weights w_i; weight_b: [N] scalings s_i, so that adapter i's
              update is delta_i = weight_a_i weight_b_i B_i A_i.
    """

    single: dict[str, dict[str, jax.Array]]
    task: dict[str, dict[str, jax.Array]]
    weight_a: jax.Array
    weight_b: jax.Array
    method: str = dataclasses.field(metadata=dict(static=True), default="ties")
    rank: int = dataclasses.field(metadata=dict(static=True), default=0)
    density: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    @property
    def num_adapters(self) -> int:
        return int(self.weight_b.shape[0])

    @property
    def num_layers(self) -> int:
        return int(next(iter(self.task.values()))["a"].shape[1])


def to_device(x: Any, dtype: Any = None) -> jax.Array:
    """A host array on the default device, in `dtype` (default: its own, as JAX canonicalises it:
    float64 -> float32), converted on the host. jnp.asarray would compile a copy or convert program
    per shape, which every prepare of new shapes (an add's placement) paid once per stack."""
    x = np.asarray(x, dtype)
    return jax.device_put(x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False))


def expand(v_n: jax.Array, x: jax.Array) -> jax.Array:
    """Per-adapter [N] (or per-adapter-and-layer [N, L]) values broadcast against x [N, L, ...]."""
    return v_n.reshape(v_n.shape + (1,) * (x.ndim - v_n.ndim))


def masked_sum(m_n: jax.Array, x_n: jax.Array, unroll: bool = False) -> jax.Array:
    """sum_i m_i x_i. unroll (a few gathered members, one mask, no vmap): an elementwise sum
    that XLA fuses into one pass. Otherwise a contraction, so that vmap over masks is one
    matmul, not a [C, N, ...] temporary (HIGHEST: TPUs would otherwise round the float32
    operands to bfloat16); it also compiles faster and differentiates compactly (tune.py)."""
    if unroll:
        return sum(expand(m_n[i], x_n[i]) * x_n[i] for i in range(x_n.shape[0]))
    return jnp.tensordot(m_n.astype(x_n.dtype), x_n, axes=1, precision=jax.lax.Precision.HIGHEST)


def weighted_sum(x_n: jax.Array, w_n: jax.Array, m_n: jax.Array, unroll: bool = False) -> jax.Array:
    return masked_sum(m_n, x_n * expand(w_n, x_n), unroll)


def ties(x_n: jax.Array, w_n: jax.Array, m_n: jax.Array, unroll: bool = False) -> jax.Array:
    """Sign election on the unweighted members, then the disjoint mean of the weighted ones.

    An entry agrees with a +1 majority iff it is > 0 (and with -1 iff < 0; zeros never agree).
    unroll (merge_gathered): two fused passes (the sign sum, then the agreeing sum and count,
    member by member: ~10x faster on CPU than five contractions over materialised temporaries).
    Otherwise the sums and counts of agreeing entries are masked sums of mask-independent
    tensors, which XLA computes once per call however many masks are vmapped.
    """
    majority_pos = masked_sum(m_n, x_n, unroll) >= 0
    if unroll:
        num = count = jnp.zeros(x_n.shape[1:], x_n.dtype)
        for i in range(x_n.shape[0]):
            x, member = x_n[i], expand(m_n[i], x_n[i]) > 0
            agree = jnp.where(majority_pos, x > 0, x < 0) & member
            num = num + jnp.where(agree, x * expand(w_n[i], x), 0.0)
            count = count + agree.astype(x_n.dtype)
        return num / jnp.maximum(count, 1.0)
    pos, neg = x_n > 0, x_n < 0
    wx = x_n * expand(w_n, x_n)
    num = jnp.where(majority_pos, masked_sum(m_n, jnp.where(pos, wx, 0.0)),
                    masked_sum(m_n, jnp.where(neg, wx, 0.0)))
    count = jnp.where(majority_pos, masked_sum(m_n, pos.astype(x_n.dtype)),
                      masked_sum(m_n, neg.astype(x_n.dtype)))
    return num / jnp.maximum(count, 1.0)


def trim_topk(x_lk: np.ndarray, k: int) -> np.ndarray:
    """Keeps, per row, the k entries of largest magnitude (PEFT's magnitude_based_pruning)."""
    if k <= 0:
        return np.zeros_like(x_lk)
    if k >= x_lk.shape[1]:
        return x_lk.copy()
    idx = np.argpartition(-np.abs(x_lk), k - 1, axis=1)[:, :k]
    keep = np.zeros(x_lk.shape, bool)
    np.put_along_axis(keep, idx, True, axis=1)
    return np.where(keep, x_lk, np.zeros((), x_lk.dtype))


def trim_dynamic(x_nk: jax.Array, count: jax.Array) -> jax.Array:
    """Per row of x [n, k] keeps the `count` (a traced int) entries of largest magnitude (ties at
    the threshold kept; zeros never). The count may depend on the mask, so no static top-k."""
    flat = jnp.abs(x_nk)
    srt = -jnp.sort(-flat, axis=-1)
    idx = jnp.clip(count - 1, 0, x_nk.shape[-1] - 1)
    thresh = srt[:, idx][:, None]
    keep = (flat >= thresh) & (count > 0) & (flat > 0)
    return jnp.where(keep, x_nk, 0.0)


# ----------------------------------------------------------------------------- the SVD


@jax.custom_batching.custom_vmap
def _svd_one(x_oi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(jnp.linalg.svd(x_oi, full_matrices=False))


@_svd_one.def_vmap
def _svd_one_vmap(axis_size, in_batched, x):
    """Batches of SVDs run one matrix at a time. jaxlib's CPU LAPACK kernels split a batch over the
    intra-op thread pool and block a pool thread until the pieces finish; two such SVDs running at
    once on a 2-thread pool deadlock (seen with jax 0.10.2). One matrix per call runs inline."""
    del axis_size
    if not in_batched[0]:
        return _svd_one(x), (False, False, False)
    return jax.lax.map(_svd_one, x), (True, True, True)


def _svd_library(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """jnp.linalg.svd (LAPACK on CPU, sequential over the batch, see _svd_one_vmap; cuSOLVER)."""
    if jax.default_backend() != "cpu":
        return tuple(jnp.linalg.svd(x, full_matrices=False))
    f = _svd_one
    for _ in range(x.ndim - 2):
        f = jax.vmap(f)
    return f(x)


GRAM_PASSES = 2  # one-sided Jacobi sweeps of gram_svd (the whole matrix as one block)


def _jacobi_eigh(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(eigenvalues, eigenvectors) by XLA's Jacobi eigensolver: one loop, cheap to compile at any size."""
    v, w = jax.lax.linalg.eigh(h, implementation=jax.lax.linalg.EighImplementation.JACOBI)
    return w, v


def gram_svd(x: jax.Array, eigh: Any = jnp.linalg.eigh) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reduced SVD (u, s, vh) of x [..., m, n] from symmetric eigendecompositions of its k x k Gram
    matrices only, k = min(m, n): no QR. One-sided Jacobi with the whole matrix as one block: G = X V
    with V the eigenvectors of G^T G, twice (the second pass, on the nearly orthogonal columns,
    cuts the first one's rounding of the squared spectrum); then s_j = |g_j| and u_j = g_j / s_j.
    X V = G holds to rounding whatever the spectrum (V is a product of orthogonal matrices), so
    U S V^T is as accurate as LAPACK's and so are the top triplets; a small s_j carries an error
    of about eps s_1^2 / s_j (the squared spectrum: numerically null directions show s_j up to
    about eps s_1^2 / the smallest non-null s) and u_j is orthogonal to the others to about
    eps s_1^2 / s_j^2; u_j is zero where s_j <= k eps s_1. Why: TPUs lower jnp.linalg.svd to QDWH and spectral
    divide-and-conquer, whose QR factorisations XLA unrolls per 128-column block (minutes of
    compilation per call at 1280 columns); `eigh` = XLA's Jacobi solver compiles in seconds."""
    m, n = x.shape[-2:]
    if m < n:
        u, s, vh = gram_svd(jnp.swapaxes(x, -1, -2), eigh)
        return jnp.swapaxes(vh, -1, -2), s, jnp.swapaxes(u, -1, -2)
    def sweep(_, gv):  # a loop, so that the program holds one eigensolver, however many passes
        g, v = gv
        _, w = eigh(jnp.matmul(jnp.swapaxes(g, -1, -2), g, precision=jax.lax.Precision.HIGHEST))
        return (jnp.matmul(g, w, precision=jax.lax.Precision.HIGHEST),
                jnp.matmul(v, w, precision=jax.lax.Precision.HIGHEST))

    eye = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), x.shape[:-2] + (n, n))
    g, v = jax.lax.fori_loop(0, GRAM_PASSES, sweep, (x, eye))
    s = jnp.sqrt(jnp.sum(g * g, axis=-2))
    order = jnp.argsort(-s, axis=-1, stable=True)
    s = jnp.take_along_axis(s, order, axis=-1)
    g = jnp.take_along_axis(g, order[..., None, :], axis=-1)
    v = jnp.take_along_axis(v, order[..., None, :], axis=-1)
    live = s > n * jnp.finfo(x.dtype).eps * s[..., :1]
    u = g * jnp.where(live, 1.0 / jnp.where(live, s, 1.0), 0.0)[..., None, :]
    return u, s, jnp.swapaxes(v, -1, -2)


def plain_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reduced SVD over the leading batch axes; no JVP. Compiled for a TPU, gram_svd with XLA's
    Jacobi eigensolver; elsewhere the library's SVD."""
    return jax.lax.platform_dependent(x, tpu=lambda y: gram_svd(y, _jacobi_eigh), default=_svd_library)


@jax.custom_jvp
def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reduced SVD (u, s, vh) over leading batch axes (CPU-safe batching), with a JVP that skips
    pairs of (near-)equal singular values: a truncation U_r S_r V_r^T whose top r are separated
    from the rest gets its exact gradient even when the rest are repeated zeros (where
    jnp.linalg.svd's JVP gives NaN)."""
    return plain_svd(x)


@svd.defjvp
def _svd_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    u, s, vh = svd(x)
    v = jnp.swapaxes(vh, -1, -2)
    ut = jnp.swapaxes(u, -1, -2)
    ds_mat = ut @ dx @ v
    ds = jnp.diagonal(ds_mat, axis1=-2, axis2=-1)
    s_row = s[..., None, :]
    diffs = (s_row + jnp.swapaxes(s_row, -1, -2)) * (s_row - jnp.swapaxes(s_row, -1, -2))
    tol = 1e-6 * jnp.max(s, axis=-1, keepdims=True)[..., None] ** 2 + 1e-30
    f = jnp.where(jnp.abs(diffs) > tol, 1.0 / jnp.where(jnp.abs(diffs) > tol, diffs, 1.0), 0.0)
    dss = ds_mat * s_row
    sds = jnp.swapaxes(s_row, -1, -2) * ds_mat
    du = u @ (f * (dss + jnp.swapaxes(dss, -1, -2)))
    dv = v @ (f * (sds + jnp.swapaxes(sds, -1, -2)))
    m_, n_ = x.shape[-2:]
    s_ok = s_row > 1e-6 * jnp.max(s, axis=-1, keepdims=True)[..., None]
    s_inv = jnp.where(s_ok, 1.0 / jnp.where(s_ok, s_row, 1.0), 0.0)
    if m_ > n_:
        dxv = dx @ v
        du = du + (dxv - u @ (ut @ dxv)) * s_inv
    if n_ > m_:
        dxtu = jnp.swapaxes(dx, -1, -2) @ u
        dv = dv + (dxtu - v @ (vh @ dxtu)) * s_inv
    return (u, s, vh), (du, ds, jnp.swapaxes(dv, -1, -2))


def factors(delta_loi: jax.Array, rank: int, flat: bool = False) -> tuple[jax.Array, jax.Array]:
    """Truncated SVD to rank r: b = U_r S_r [L, d_out, r], a = V_r^T [L, r, d_in] (zero-padded
    when r > min dim). flat: b = mean(S) U_r (Iso-C's flattened spectrum, mean over all of S)."""
    u, s, vh = svd(delta_loi)
    k = min(rank, s.shape[-1])
    scale = jnp.mean(s, axis=-1, keepdims=True)[..., None, :] if flat else s[..., None, :k]
    b = u[..., :k] * scale
    a = vh[..., :k, :]
    return pad_rank(a, b, rank)


def pad_rank(a_rd: jax.Array, b_dr: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Zero-pads factors of rank k <= r to rank r (a [..., k, d_in], b [..., d_out, k])."""
    k = a_rd.shape[-2]
    if k == rank:
        return a_rd, b_dr
    return (jnp.pad(a_rd, [(0, 0)] * (a_rd.ndim - 2) + [(0, rank - k), (0, 0)]),
            jnp.pad(b_dr, [(0, 0)] * (b_dr.ndim - 1) + [(0, rank - k)]))


def fit_rank(a_lrd: jax.Array, b_ldr: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The same update at rank r: unchanged when r equals its rank, zero-padded when larger,
    truncated SVD of b @ a when smaller (what a rank-r adapter can store)."""
    if rank >= a_lrd.shape[-2]:
        return pad_rank(a_lrd, b_ldr, rank)
    return factors(b_ldr @ a_lrd, rank)


def merge_single(prepared: Prepared, m_n: jax.Array, unroll: bool = False) -> dict[str, dict[str, jax.Array]]:
    """The one member unchanged (a = A_i, b = w_i s_i B_i), fitted to the output rank."""
    out = {}
    if prepared.single:
        for mod, sv in prepared.single.items():
            a, b = masked_sum(m_n, sv["a"], unroll), masked_sum(m_n, sv["b"], unroll)
            out[mod] = dict(zip("ab", fit_rank(a, b, prepared.rank)))
        return out
    wb = prepared.weight_b.reshape(prepared.weight_b.shape + (1,) * (prepared.weight_a.ndim - 1))
    w = prepared.weight_a * wb  # [N] or [N, L]: w_i s_i
    for mod, tv in prepared.task.items():
        a, b = masked_sum(m_n, tv["a"], unroll), masked_sum(m_n, tv["b"] * expand(w, tv["b"]), unroll)
        out[mod] = dict(zip("ab", fit_rank(a, b, prepared.rank)))
    return out


def per_layer_weights(w: jax.Array, num_layers: int) -> jax.Array:
    """Merge weights [N] or [N, L] as [L, N]."""
    if w.ndim == 1:
        return jnp.broadcast_to(w[None, :], (num_layers, w.shape[0]))
    return jnp.swapaxes(w, 0, 1)


def map_layers(prepared: Prepared, layer_fn: Any, members: jax.Array | None = None) -> dict[str, dict[str, jax.Array]]:
    """{module: {"a": [L, r, d_in], "b": [L, d_out, r]}} from layer_fn(leaves, w_n, s_n) -> (a, b),
    where leaves are the module's task leaves at one layer ([N, ...] each), w_n and s_n that
    layer's weight_a and weight_b (the merge weights and the scalings, or the factor-wise A and B
    multipliers). One layer at a time (lax.map, rematerialised under
    differentiation), so only one layer's temporaries are ever live: a layer's updates of the
    members, never all layers'. Modules of equal shapes (q and o, k and v) go through one loop, so
    the program holds one copy of layer_fn per shape (each SVD in it is minutes of compilation on
    TPUs at the paper's scale, see gram_svd). `members` [G]: only these adapter slots, gathered
    layer by layer (no [G, L, ...] copy of the members' factors)."""
    num_layers = prepared.num_layers
    w_ln = per_layer_weights(prepared.weight_a, num_layers)
    s_ln = per_layer_weights(prepared.weight_b, num_layers)  # [N, L] for tuned factor-wise weights

    def pick(x: jax.Array, axis: int = 0) -> jax.Array:
        return x if members is None else jnp.take(x, members, axis=axis)

    groups: dict[tuple, list[str]] = {}  # modules whose leaves have the same shapes share one loop
    for mod, tv in prepared.task.items():
        groups.setdefault(tuple((k, v.shape, v.dtype) for k, v in sorted(tv.items())), []).append(mod)
    out = {}
    for mods in groups.values():
        def body(step, mods=mods):
            which, layer = step // num_layers, step % num_layers
            leaves = {k: jax.lax.select_n(which, *(pick(jax.lax.dynamic_index_in_dim(
                prepared.task[mod][k], layer, axis=1, keepdims=False)) for mod in mods))
                for k in prepared.task[mods[0]]}
            return layer_fn(leaves, *(pick(jax.lax.dynamic_index_in_dim(v_ln, layer, axis=0, keepdims=False))
                                      for v_ln in (w_ln, s_ln)))

        a, b = jax.lax.map(jax.checkpoint(body), jnp.arange(len(mods) * num_layers))
        for i, mod in enumerate(mods):
            out[mod] = {"a": a[i * num_layers:(i + 1) * num_layers], "b": b[i * num_layers:(i + 1) * num_layers]}
    return {mod: out[mod] for mod in prepared.task}
