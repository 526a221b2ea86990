"""Update-space operators defined on the dense updates, computed layer by layer from the factors:
ties_delta (PEFT's "ties_svd") and KnOTS-TIES. Never more than one layer's member updates live.

Shape legend: N adapters (or gathered member slots), L layers, R input rank, r output rank,
d_in / d_out module widths, k = min(d_out, N R) basis size.

With delta_i = w_i s_i B_i A_i (the scaled update of adapter i in one layer/module, w_i its merge
weight, 1 unless tuned):
  ties_delta    PEFT "ties_svd": TIES on the deltas (per adapter and layer keep the top
                int(density * d_out d_in) |entries| of s_i B_i A_i, sign per entry of the sum of the
                trimmed unweighted members (>= 0 -> +1), mean of the agreeing weighted entries),
                then truncated SVD to rank r: b = U_r S_r, a = V_r^T. The trim is a threshold per
                adapter and layer computed once in `prepare` (midway between the kept and the first
                dropped magnitude, so the float32 recomputation of an entry does not cross it),
                applied to each member's update as it is recomputed: prepared memory is the
                factors plus [N, L] thresholds.
  knots_ties    KnOTS-TIES (Stoica et al., ICLR 2025): concatenate the members' unweighted updates
                X = [s_1 B_1 A_1, ..., s_n B_n A_n] (d_out x n d_in), SVD X = U S V^T, keep the
                directions with S > 1e-5 S_max (relative, so float32 rounding noise is cut; the
                reference cuts S > 1e-5 in float64), per-task coefficients C_i = S V_i^T = U^T
                delta_i / w_i; TIES on the C_i: per member and layer keep the top
                int(density * numel) |entries| (numel = kept directions x d_in; density >= 1 keeps
                all, as KnOTS' LLM setting topK=100 does), elect the sign per entry by the sign of
                the sum of the trimmed C_i (>= 0 -> +1), mean of the agreeing w_i C_i over their
                count; merged = U C_merged, written at rank r by truncated SVD.
KnOTS' U and S are taken in low rank: with A_i = P_i S_i Q_i^T (SVD), X X^T = sum_i Y_i Y_i^T for
Y_i = s_i B_i P_i S_i (d_out x R), so X's U and S are those of Y = [m_i Y_i] (non-members zero).
The truncated SVD of U C is U times that of C (k x d_in), U having orthonormal columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.lora import AdapterSet
from d2c_jax.merge_common import (Prepared, factors, fit_rank, map_layers, pad_rank, plain_svd, svd, ties, to_device,
                                   trim_dynamic)

METHODS = ("ties_delta", "knots_ties")
KNOTS_TOL = 1e-5  # relative singular-value cut of the KnOTS basis
HIGHEST = jax.lax.Precision.HIGHEST
__all__ = ["METHODS", "prepare", "merge_many", "factors", "fit_rank", "svd"]


def _thresholds(a_nlrd: np.ndarray, b_nldr: np.ndarray, scaling: np.ndarray, density: float) -> np.ndarray:
    """[N, L] float32: |entries| of s_i B_i A_i at or above it are the top int(density * numel)
    of that adapter's layer (0 keeps all; inf keeps none). One [d_out, d_in] at a time."""
    n, num_layers = a_nlrd.shape[:2]
    out = np.zeros((n, num_layers), np.float32)
    if density >= 1:
        return out
    for i in range(n):
        for layer in range(num_layers):
            d = np.abs((b_nldr[i, layer] * np.float32(scaling[i])) @ a_nlrd[i, layer]).ravel()
            size, k = d.size, int(density * d.size)  # PEFT: int(density * tensor.numel())
            if k == 0:
                out[i, layer] = np.inf
            elif k < size:
                part = np.partition(d, [size - k - 1, size - k])  # the first dropped, the last kept
                out[i, layer] = (part[size - k - 1] + part[size - k]) / 2
    return out


def prepare(adapter_set: AdapterSet, method: str, density: float, w: np.ndarray, rank: int) -> Prepared:
    """The raw factors (merge weights w in weight_a, scalings in weight_b); ties_delta's thresholds."""
    task = {}
    for m in adapter_set.a:
        task[m] = {"a": to_device(adapter_set.a[m]), "b": to_device(adapter_set.b[m])}
        if method == "ties_delta":
            task[m]["thresh"] = to_device(_thresholds(adapter_set.a[m], adapter_set.b[m], adapter_set.scaling,
                                                        density))
    return Prepared(single={}, task=task, weight_a=to_device(w, jnp.float32),
                    weight_b=to_device(adapter_set.scaling, jnp.float32), method=method, rank=int(rank),
                    density=float(density))


def _ties_delta_layer(leaves: dict, w_n: jax.Array, s_n: jax.Array, m_n: jax.Array, rank: int) -> tuple:
    """One layer: each member's update recomputed and trimmed as it is summed (two passes over
    the members, a [d_out, d_in] carry each), then truncated SVD."""
    a_nrd, b_nor, t_n = leaves["a"], leaves["b"], leaves["thresh"]

    def trimmed(i):
        d = jnp.matmul(b_nor[i] * s_n[i], a_nrd[i], precision=HIGHEST)
        return jnp.where(jnp.abs(d) >= t_n[i], d, 0.0) * m_n[i]

    shape = (b_nor.shape[1], a_nrd.shape[2])
    n = a_nrd.shape[0]
    sign_sum = jax.lax.fori_loop(0, n, lambda i, acc: acc + trimmed(i), jnp.zeros(shape))
    pos = sign_sum >= 0

    def agree(i, carry):
        num, count = carry
        d = trimmed(i)
        ok = jnp.where(pos, d > 0, d < 0)
        return num + jnp.where(ok, d * w_n[i], 0.0), count + ok.astype(d.dtype)

    num, count = jax.lax.fori_loop(0, n, agree, (jnp.zeros(shape), jnp.zeros(shape)))
    return factors(num / jnp.maximum(count, 1.0), rank)


def _knots_layer(leaves: dict, w_n: jax.Array, s_n: jax.Array, m_n: jax.Array, rank: int, density: float) -> tuple:
    """One layer of KnOTS-TIES from the members' factors (the module docstring)."""
    a_nrd, b_nor = leaves["a"], leaves["b"]
    n, r_in, d_in = a_nrd.shape
    d_out = b_nor.shape[1]
    sb_nor = b_nor * s_n[:, None, None]
    p_nrr, sa_nr, _ = plain_svd(jax.lax.stop_gradient(a_nrd))  # A_i = P_i S_i Q_i^T
    y_nor = jnp.einsum("nor,nrk,nk->nok", sb_nor, p_nrr, sa_nr, precision=HIGHEST) * m_n[:, None, None]
    y = jnp.transpose(y_nor, (1, 0, 2)).reshape(d_out, n * r_in)
    u, s, _ = plain_svd(jax.lax.stop_gradient(y))
    keep = s > KNOTS_TOL * jnp.max(s)
    u = u * keep[None, :]  # [d_out, k]; dropped directions are zero columns
    c_nki = jnp.einsum("ok,nor,nri->nki", u, sb_nor, a_nrd, precision=HIGHEST)
    if density < 1:
        count = jnp.floor(density * jnp.sum(keep).astype(jnp.float32) * d_in).astype(jnp.int32)
        c_nki = trim_dynamic(c_nki.reshape(n, -1), count).reshape(c_nki.shape)
    c_ki = ties(c_nki, w_n, m_n)
    p, sig, qh = svd(c_ki)  # merged = U C = (U P) S Q^T
    k = min(rank, sig.shape[-1])
    return pad_rank(qh[:k], jnp.matmul(u, p[:, :k] * sig[:k], precision=HIGHEST), rank)


def merge_many(prepared: Prepared, m_n: jax.Array, unroll: bool = False,
               members: jax.Array | None = None) -> dict[str, dict[str, jax.Array]]:
    """Two or more members, layer by layer (`unroll` is irrelevant: the members are looped);
    `members`: the mask m_n is over these gathered slots (merge.merge_gathered)."""
    del unroll
    rank = prepared.rank
    if prepared.method == "ties_delta":
        return map_layers(prepared, lambda leaves, w_n, s_n: _ties_delta_layer(leaves, w_n, s_n, m_n, rank), members)
    return map_layers(prepared, lambda leaves, w_n, s_n: _knots_layer(leaves, w_n, s_n, m_n, rank, prepared.density),
                      members)
