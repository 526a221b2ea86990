"""Operators in the core space of a cluster's stacked factors (Core Space merging, Panariello et
al., NeurIPS 2025), layer by layer: O((n R)^2) per layer and member, never a [d_out, d_in] update.

Shape legend: n member slots (N, or a gathered bucket G), R rank, r output rank, d_in / d_out
module widths, cA = min(n R, d_in), cB = min(d_out, n R) core sizes.

The core space of one layer/module of the members i (mask m_i): with the stacked factors
A_S = [A_1; ...; A_n] (n R x d_in) and B_S = [B_1, ..., B_n] (d_out x n R) (raw PEFT factors, as the
public code stacks them), V_A = the right singular vectors of A_S and U_B = the left singular
vectors of B_S, both cut to their numerical rank (S > 1e-5 S_max; dropped directions are zero
columns). Every member's update delta_i = s_i B_i A_i lies in span(U_B) x span(V_A), so
delta_i = U_B M_i V_A^T exactly, with the core M_i = U_B^T delta_i V_A (cB x cA). An operator
merges the cores into one core M, the merge is U_B M V_A^T, written at rank r by the truncated
SVD of M (U_B, V_A have orthonormal columns: it is the truncated SVD of the merge). With merge
weights w_i (1 unless tuned) and k = sum_i m_i members:
  core_ta       task arithmetic (Ilharco et al., ICLR 2023): M = sum_i w_i M_i. Equal to the dense
                sum_i w_i delta_i, truncated to rank r.
  knots_linear  KnOTS with a linear merge of the coefficients: U sum_i w_i C_i = sum_i w_i delta_i,
                so the same operator as core_ta (KnOTS' basis spans every member's update).
  iso_c         Iso-C (Marczak et al., ICML 2025): M = sum_i w_i M_i = P S Q^T, every singular value
                of the dense sum replaced by their mean over all min(d_out, d_in) of them (its
                other singular values are zero: mean = sum(S) / min(d_out, d_in)), written at rank
                r as b = mean U_B P_r, a = Q_r^T V_A^T: equal to Iso-C of the dense sum.
  core_ties     TIES (Yadav et al., NeurIPS 2023) on the cores, as Core Space merging's "ties":
                per member keep the top int(density * numel) |entries| of M_i (numel = the kept
                core size cB' cA'), sign per entry of the sum of the trimmed unweighted cores
                (>= 0 -> +1), mean of the agreeing w_i M_i over their count. Differs from
                ties_delta (the trim is basis-dependent).
  core_tsv      TSV-Merge (Gargiulo et al., CVPR 2025) on the cores: each member's top
                floor(min(cB', cA') / k) singular triplets of M_i (R, its whole rank, while
                k R <= min(d_out, d_in)), U = [U_i], V = [V_i] orthogonalised by their polar
                factors (U = P Z^T from U = P S Z^T), M = U_perp diag(w_i S_i) V_perp^T. Equal to
                TSV-Merge of the dense updates keeping each member's top R triplets.
  core_iso_cts  Iso-CTS (Marczak et al., ICML 2025), the official algorithm on the cores with its
                subspace size min(shape) replaced by D = min(r, cB', cA') (the output rank, so the
                isotropic result is exactly storable): common = int(0.8 D), rounded so that
                D - common splits evenly over the k members; the common directions = the top
                `common` singular vectors of sum_i w_i M_i; each member contributes the top
                (D - common) / k singular vectors of w_i M_i with the common directions projected
                out (left side); all D orthogonalised (polar factors); every singular value = the
                mean of the D selected. Equal to that algorithm on the dense updates.
The bases depend on the factors only (not on the weights): tuning differentiates through the
cores and the SVDs of the merged core, never through a basis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.lora import AdapterSet
from d2c_jax.merge_common import Prepared, map_layers, pad_rank, plain_svd, svd, ties, to_device, trim_dynamic

METHODS = ("core_ta", "knots_linear", "iso_c", "core_ties", "core_tsv", "core_iso_cts")
CORE_TOL = 1e-5  # relative singular-value cut of the stacked factors' bases
ISO_CTS_COMMON = 0.8  # Iso-CTS' common_space_fraction (the official default)
HIGHEST = jax.lax.Precision.HIGHEST


def prepare(adapter_set: AdapterSet, method: str, density: float, w: np.ndarray, rank: int) -> Prepared:
    """The raw factors only (merge weights w in weight_a, scalings in weight_b)."""
    task = {m: {"a": to_device(adapter_set.a[m]), "b": to_device(adapter_set.b[m])} for m in adapter_set.a}
    return Prepared(single={}, task=task, weight_a=to_device(w, jnp.float32),
                    weight_b=to_device(adapter_set.scaling, jnp.float32), method=method, rank=int(rank),
                    density=float(density))


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=HIGHEST)


def core_basis(a_nrd: jax.Array, b_nor: jax.Array, m_n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """U_B [d_out, cB] and V_A [d_in, cA] of the members' stacked factors (dropped directions are
    zero columns)."""
    n, r_in, d_in = a_nrd.shape
    d_out = b_nor.shape[1]
    a_stack = jax.lax.stop_gradient((a_nrd * m_n[:, None, None]).reshape(n * r_in, d_in))
    b_stack = jax.lax.stop_gradient(jnp.transpose(b_nor * m_n[:, None, None], (1, 0, 2)).reshape(d_out, n * r_in))
    if d_in == d_out:  # one batched SVD (one eigensolver in a TPU program, see gram_svd)
        u_ab, s_ab, _ = plain_svd(jnp.stack([a_stack.T, b_stack]))
        (v_a, u_b), (sa, sb) = u_ab, s_ab
        vh_a = v_a.T
    else:
        _, sa, vh_a = plain_svd(a_stack)
        u_b, sb, _ = plain_svd(b_stack)
    keep_a = sa > CORE_TOL * jnp.max(sa)
    keep_b = sb > CORE_TOL * jnp.max(sb)
    return u_b * keep_b[None, :], jnp.swapaxes(vh_a, 0, 1) * keep_a[None, :]


def _triplets(x_nkr: jax.Array, y_nrc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVDs of the rank-R cores x_i y_i: (U [n, cB, R], S [n, R], V [n, cA, R]) in low rank
    (y_i = Wy^T Sy Qy^T, then the SVD of x_i Wy^T Sy [cB, R])."""
    qy, sy, wyh = plain_svd(jnp.swapaxes(y_nrc, 1, 2))  # y^T = Qy Sy Wy^T: y = Wy Sy Qy^T
    k = jnp.einsum("nkr,nrj,nj->nkj", x_nkr, wyh.swapaxes(1, 2), sy, precision=HIGHEST)
    pk, sk, zh = svd(k)
    return pk, sk, jnp.einsum("ncj,nij->nci", qy, zh, precision=HIGHEST)


def _polar_parts(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """U = P S Z^T with the components of S <= 1e-5 S_max zeroed (P, Z columns, 1 / S)."""
    p, s, zh = plain_svd(u)
    live = s > CORE_TOL * jnp.max(s)
    inv = jnp.where(live, 1.0 / jnp.where(live, s, 1.0), 0.0)
    return p * live[None, :], jnp.swapaxes(zh, 0, 1) * live[None, :], inv


@jax.custom_jvp
def _polar(u: jax.Array) -> jax.Array:
    """The polar factor P Z^T of U = P S Z^T (TSV's and Iso-CTS' orthogonalisation) on U's
    non-zero singular components (zero columns of U stay zero)."""
    p, z, _ = _polar_parts(u)
    return _mm(p, z.T)


@_polar.defjvp
def _polar_jvp(primals, tangents):
    """d(P Z^T) = P W Z^T + (I - P P^T) dU Z S^-1 Z^T + P S^-1 P^T dU (I - Z Z^T), with
    W_ij = (Y_ij - Y_ji) / (s_i + s_j), Y = P^T dU Z: finite however close the singular values
    (the SVD's JVP would divide by their differences; at an orthonormal U they are all 1)."""
    (u,), (du,) = primals, tangents
    p, z, inv = _polar_parts(u)
    s = jnp.where(inv > 0, 1.0 / jnp.where(inv > 0, inv, 1.0), 0.0)
    y = _mm(_mm(p.T, du), z)
    denom = s[:, None] + s[None, :]
    w = jnp.where(denom > 0, (y - y.T) / jnp.where(denom > 0, denom, 1.0), 0.0)
    du_z = _mm(du, z)
    pt_du = _mm(p.T, du)
    left = (du_z - _mm(p, _mm(p.T, du_z))) * inv[None, :]
    right = (pt_du - _mm(_mm(pt_du, z), z.T)) * inv[:, None]
    return _mm(p, z.T), _mm(_mm(p, w), z.T) + _mm(left, z.T) + _mm(p, right)


def _cat(u_nkr: jax.Array) -> jax.Array:
    """[n, c, R] -> [c, n R] (members' columns side by side)."""
    n, c, r = u_nkr.shape
    return jnp.transpose(u_nkr, (1, 0, 2)).reshape(c, n * r)


def _tsv(x_nkr, y_nrc, w_n, m_n, dims):
    """TSV-Merge of the cores (module docstring)."""
    count = jnp.sum(m_n)
    pk, sk, qv = _triplets(jax.lax.stop_gradient(x_nkr), jax.lax.stop_gradient(y_nrc))
    keep = jnp.floor(jnp.minimum(*dims) / jnp.maximum(count, 1.0))
    live = (jnp.arange(sk.shape[1])[None, :] < keep) & (sk > CORE_TOL * jnp.max(sk)) & (m_n[:, None] > 0)
    live = live.astype(sk.dtype)
    u, v = _polar(_cat(pk * live[:, None, :])), _polar(_cat(qv * live[:, None, :]))
    s_cat = (sk * live * w_n[:, None]).reshape(-1)
    return _mm(u * s_cat[None, :], v.T)


def _iso_cts(x_nkr, y_nrc, w_n, m_n, dims, rank):
    """Iso-CTS of the cores with subspace size D = min(r, cB', cA') (module docstring), as
    factors (b [cB, r'], a [r', cA], r' = min(r, columns))."""
    count = jnp.maximum(jnp.sum(m_n), 1.0)
    total = _mm(jnp.transpose(x_nkr * (w_n * m_n)[:, None, None], (1, 0, 2)).reshape(x_nkr.shape[1], -1),
                y_nrc.reshape(-1, y_nrc.shape[2]))
    p, sig, qh = svd(total)
    c = min(rank, sig.shape[0])
    dim = jnp.minimum(jnp.minimum(*dims), rank)
    common = jnp.floor(dim * ISO_CTS_COMMON)
    per_task = jnp.round((dim - common) / count)  # half to even, as Python's round
    common = dim - per_task * count
    on_c = (jnp.arange(c) < common).astype(sig.dtype)
    pc = p[:, :c] * on_c[None, :]
    x_res = (x_nkr - jnp.einsum("kc,jc,njr->nkr", pc, pc, x_nkr, precision=HIGHEST)) * w_n[:, None, None]
    pk, sk, qv = _triplets(x_res, jax.lax.stop_gradient(y_nrc))
    live = (jnp.arange(sk.shape[1])[None, :] < per_task) & (m_n[:, None] > 0) & (sk > CORE_TOL * jnp.max(sig))
    live = live.astype(sk.dtype)
    u = _polar(jnp.concatenate([_cat(pk * live[:, None, :]), pc], axis=1))
    v = _polar(jnp.concatenate([_cat(qv * live[:, None, :]), jnp.swapaxes(qh[:c], 0, 1) * on_c[None, :]], axis=1))
    mean = (jnp.sum(sk * live) + jnp.sum(sig[:c] * on_c)) / jnp.maximum(dim, 1.0)
    on = jnp.concatenate([live.reshape(-1), on_c])
    # Rank D <= r with every singular value equal: its factors are the D selected columns, moved
    # to the front (an SVD of it would differentiate wrongly through the repeated values).
    cols = jnp.argsort(-on, stable=True)[:rank]
    keep = jnp.take(on, cols)
    return jnp.take(u, cols, axis=1) * (mean * keep)[None, :], jnp.take(v, cols, axis=1).T * keep[:, None]


def _core_layer(leaves: dict, w_n: jax.Array, s_n: jax.Array, m_n: jax.Array, method: str, rank: int,
                density: float, d_min: int) -> tuple[jax.Array, jax.Array]:
    """One layer: the members' cores, merged by `method`, mapped back at rank r."""
    a_nrd, b_nor = leaves["a"], leaves["b"]
    u_b, v_a = core_basis(a_nrd, b_nor, m_n)
    x_nkr = jnp.einsum("ok,nor->nkr", u_b, b_nor * (s_n * m_n)[:, None, None], precision=HIGHEST)
    y_nrc = _mm(a_nrd, v_a)
    dims = (jnp.sum(jnp.any(u_b != 0, axis=0)).astype(jnp.float32),
            jnp.sum(jnp.any(v_a != 0, axis=0)).astype(jnp.float32))
    if method in ("core_ta", "knots_linear", "iso_c"):
        merged = jnp.einsum("nkr,nrc->kc", x_nkr * w_n[:, None, None], y_nrc, precision=HIGHEST)
    elif method == "core_ties":
        cores = jnp.einsum("nkr,nrc->nkc", x_nkr, y_nrc, precision=HIGHEST)
        if density < 1:
            count = jnp.floor(density * dims[0] * dims[1]).astype(jnp.int32)
            cores = trim_dynamic(cores.reshape(cores.shape[0], -1), count).reshape(cores.shape)
        merged = ties(cores, w_n, m_n)
    elif method == "core_tsv":
        merged = _tsv(x_nkr, y_nrc, w_n, m_n, dims)
    else:
        b_core, a_core = _iso_cts(x_nkr, y_nrc, w_n, m_n, dims, rank)
        return pad_rank(_mm(a_core, v_a.T), _mm(u_b, b_core), rank)
    p, sig, qh = svd(merged)
    k = min(rank, sig.shape[0])
    scale = jnp.sum(sig) / d_min if method == "iso_c" else sig[:k]
    return pad_rank(_mm(qh[:k], v_a.T), _mm(u_b, p[:, :k] * scale), rank)


def merge_many(prepared: Prepared, m_n: jax.Array, unroll: bool = False,
               members: jax.Array | None = None) -> dict[str, dict[str, jax.Array]]:
    """Two or more members, layer by layer in their core space; `members`: the mask m_n is over
    these gathered slots (merge.merge_gathered)."""
    del unroll

    def layer(leaves, w_n, s_n):
        d_min = min(leaves["a"].shape[2], leaves["b"].shape[1])
        return _core_layer(leaves, w_n, s_n, m_n, prepared.method, prepared.rank, prepared.density, d_min)

    return map_layers(prepared, layer, members)
