"""SVD-based merge operators (KnOTS, Iso-C) and the rank fitting every operator's output goes through.

Shape legend: N adapters, L layers, R input rank, r output rank, d_in / d_out module widths,
k = min(d_out, N * R) basis size, C candidate masks.

Same contract as `merge.py`: `prepare(adapter_set, method, ...)` does the mask-independent work
once (every leaf of `merge.Prepared` stacked on the leading adapter axis N), and `merge_mask(prepared,
mask_n)` is pure and jit/vmap-able over mask_n (and differentiable in the weights, see
`tune.with_weights`). The output is the decoder's lora pytree with scaling 1 at rank `rank`.
`merge.prepare_merge` / `merge.merge_mask` dispatch here for the methods of `SVD_METHODS`.

With delta_i = w_i s_i B_i A_i (the scaled update of adapter i in one layer/module, w_i its
merge weight, 1 unless tuned):
  iso_c         Iso-C (Marczak et al., ICML 2025): the task-arithmetic sum M = sum_i delta_i,
                SVD M = U S V^T, every singular value replaced by their mean over all
                min(d_out, d_in) of them: M_iso = mean(S) U V^T; written at rank r as
                b = mean(S) U_r, a = V_r^T (the top-r directions of M).
  knots_ties    KnOTS-TIES (Stoica et al., ICLR 2025): concatenate the members' unweighted updates
                X = [s_1 B_1 A_1, ..., s_n B_n A_n] (d_out x n d_in), SVD X = U S V^T, keep the
                directions with S > 1e-5 S_max (relative, so float32 rounding noise is cut; the
                reference cuts S > 1e-5 in float64), per-task coefficients C_i = S V_i^T = U^T
                delta_i / w_i; TIES on the C_i: per member and layer keep the top
                int(density * numel) |entries| (numel = kept directions x d_in; density >= 1 keeps
                all, as KnOTS' LLM setting topK=100 does), elect the sign per entry by the sign of
                the sum of the trimmed C_i (>= 0 -> +1), mean of the agreeing w_i C_i over their
                count; merged = U C_merged, written at rank r by truncated SVD.
  knots_linear  KnOTS with a linear (task-arithmetic) merge of the coefficients: U sum_i w_i C_i,
                which equals sum_i delta_i exactly (U spans every member's update), so it is
                computed without the basis; written at rank r by truncated SVD.
The SVD of X is taken in low rank: with A_i^T = Q_i R_i (QR, once per adapter), X = [s_i B_i
R_i^T] blockdiag(Q_i^T) and the block-diagonal factor has orthonormal rows, so X's U and S are
those of the d_out x N R matrix Y = [m_i s_i B_i R_i^T] (non-members masked to zero columns).
A mask with one member returns that adapter unchanged (rank-fitted), as in merge.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import merge as merge_lib
from d2c_jax.lora import AdapterSet

SVD_METHODS = merge_lib.SVD_METHODS
KNOTS_TOL = 1e-5  # relative singular-value cut of the KnOTS basis


def prepare(adapter_set: AdapterSet, method: str, density: float, w: np.ndarray, rank: int) -> merge_lib.Prepared:
    """The deltas (and KnOTS' basis factors) of every adapter, scaled by s_i (weights: w)."""
    n = adapter_set.num_adapters
    s = adapter_set.scaling.astype(np.float64)
    single, task = {}, {}
    for m in adapter_set.a:
        a_nlrd = adapter_set.a[m].astype(np.float64)
        b_nldr = adapter_set.b[m].astype(np.float64)
        sb = b_nldr * s.reshape(n, 1, 1, 1)
        ws = (w * s).astype(np.float32).reshape(n, 1, 1, 1)  # as merge.prepare_merge: b = w s B
        single[m] = {"a": jnp.asarray(adapter_set.a[m]), "b": jnp.asarray(adapter_set.b[m] * ws)}
        leaves = {"delta": jnp.asarray(np.einsum("nlor,nlri->nloi", sb, a_nlrd), jnp.float32)}
        if method == "knots_ties":
            _, r_nlrr = np.linalg.qr(np.swapaxes(a_nlrd, -1, -2))  # A^T = Q R, R [R, R]
            leaves["y"] = jnp.asarray(sb @ np.swapaxes(r_nlrr, -1, -2), jnp.float32)
        task[m] = leaves
    wj = jnp.asarray(w, jnp.float32)
    return merge_lib.Prepared(single=single, task=task, weight_a=wj, weight_b=wj, method=method, rank=int(rank),
                    density=float(density))


# ----------------------------------------------------------------------------- differentiable SVD


@jax.custom_jvp
def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reduced SVD (u, s, vh) over leading batch axes (merge._svd: CPU-safe batching), with a JVP
    that skips pairs of (near-)equal singular values: a truncation U_r S_r V_r^T whose top r are
    separated from the rest gets its exact gradient even when the rest are repeated zeros (where
    jnp.linalg.svd's JVP gives NaN)."""
    return merge_lib._svd(x)


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
    if k < rank:
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, rank - k)])
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, rank - k), (0, 0)])
    return a, b


def fit_rank(a_lrd: jax.Array, b_ldr: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The same update at rank r: unchanged when r equals its rank, zero-padded when larger,
    truncated SVD of b @ a when smaller (what a rank-r adapter can store)."""
    cur = a_lrd.shape[-2]
    if rank == cur:
        return a_lrd, b_ldr
    if rank > cur:
        return (jnp.pad(a_lrd, [(0, 0)] * (a_lrd.ndim - 2) + [(0, rank - cur), (0, 0)]),
                jnp.pad(b_ldr, [(0, 0)] * (b_ldr.ndim - 1) + [(0, rank - cur)]))
    return factors(b_ldr @ a_lrd, rank)


# ----------------------------------------------------------------------------- the operators


def _knots_basis(y_nlor: jax.Array, m_n: jax.Array) -> jax.Array:
    """U [L, d_out, k] of the members' concatenated updates; dropped directions are zero columns."""
    n, L, d_out, r = y_nlor.shape
    y_lo_nr = jnp.transpose(y_nlor * merge_lib._expand(m_n, y_nlor), (1, 2, 0, 3)).reshape(L, d_out, n * r)
    u, s, _ = merge_lib._svd(jax.lax.stop_gradient(y_lo_nr))
    keep = s > KNOTS_TOL * jnp.max(s, axis=-1, keepdims=True)
    return u * keep[..., None, :]


def _trim_dynamic(c_nlki: jax.Array, kept_l: jax.Array, density: float) -> jax.Array:
    """Per adapter and layer keeps the int(density * kept_l * d_in) entries of largest magnitude
    (kept_l: the layer's number of basis directions, which depends on the mask)."""
    n, L, k, d_in = c_nlki.shape
    flat = jnp.abs(c_nlki).reshape(n, L, k * d_in)
    srt = -jnp.sort(-flat, axis=-1)
    count = jnp.floor(density * kept_l.astype(jnp.float32) * d_in).astype(jnp.int32)  # [L]
    idx = jnp.clip(count - 1, 0, k * d_in - 1)
    thresh = jnp.take_along_axis(srt, jnp.broadcast_to(idx[None, :, None], (n, L, 1)), axis=-1)
    keep = (flat >= thresh) & (count[None, :, None] > 0) & (flat > 0)
    return jnp.where(keep.reshape(c_nlki.shape), c_nlki, 0.0)


def merge_mask(prepared: merge_lib.Prepared, mask_n: Any) -> dict[str, dict[str, jax.Array]]:
    """Merges the adapters of mask_n with `prepared.method`; pure, jit/vmap-able over mask_n."""
    m_n = (jnp.asarray(mask_n) != 0).astype(jnp.float32)
    single = jnp.sum(m_n) == 1
    w = prepared.weight_a
    out = {}
    for mod, sv in prepared.single.items():
        a1, b1 = fit_rank(merge_lib._masked_sum(m_n, sv["a"]), merge_lib._masked_sum(m_n, sv["b"]),
                          prepared.rank)
        tv = prepared.task[mod]
        if prepared.method == "knots_ties":
            u_lok = _knots_basis(tv["y"], m_n)
            c_nlki = jnp.einsum("lok,nloi->nlki", u_lok, tv["delta"],
                                precision=jax.lax.Precision.HIGHEST)
            if prepared.density < 1:
                kept_l = jnp.sum(jnp.any(u_lok != 0, axis=1), axis=-1)
                c_nlki = _trim_dynamic(c_nlki, kept_l, prepared.density)
            c_lki = merge_lib._ties(c_nlki, w, m_n)
            delta = jnp.einsum("lok,lki->loi", u_lok, c_lki, precision=jax.lax.Precision.HIGHEST)
            a, b = factors(delta, prepared.rank)
        else:
            delta = merge_lib._weighted_sum(tv["delta"], w, m_n)
            a, b = factors(delta, prepared.rank, flat=prepared.method == "iso_c")
        out[mod] = {"a": jnp.where(single, a1, a), "b": jnp.where(single, b1, b)}
    return out
