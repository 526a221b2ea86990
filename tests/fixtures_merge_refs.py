"""Float64 numpy merges written from the published definitions, for the operator tests (never
from our code): TIES (Yadav et al., NeurIPS 2023), TSV-Merge (Gargiulo et al., CVPR 2025), Iso-CTS
(Marczak et al., ICML 2025, its official algorithm), the core space of Core Space merging
(Panariello et al., NeurIPS 2025, its public code), and a small random adapter set.

Shapes: N adapters, L layers, R rank, d_in / d_out module widths.
"""

from __future__ import annotations

import numpy as np

from d2c_jax import lora as lora_lib

L, D, F, R = 2, 12, 20, 3
N = 5
SCALING = np.array([2.0, 0.5, 1.0, 1.5, 3.0])


def adapter_set(shapes=None, seed: int = 0) -> lora_lib.AdapterSet:
    """N random rank-R adapters on two modules {name: (d_in, d_out)} (default: one square, one wide)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"q_proj": (D, D), "down_proj": (F, D)}
    a = {m: rng.normal(size=(N, L, R, di)).astype(np.float32) for m, (di, do) in shapes.items()}
    b = {m: rng.normal(size=(N, L, do, R)).astype(np.float32) for m, (di, do) in shapes.items()}
    return lora_lib.AdapterSet(names=tuple(f"t{i}" for i in range(N)), a=a, b=b, scaling=SCALING,
                               ranks=np.full(N, R), paths=tuple(f"/x/t{i}" for i in range(N)))


def deltas(aset, m):
    """[N, L, d_out, d_in] float64: s_i B_i A_i."""
    return np.einsum("nlor,nlri->nloi", aset.b[m].astype(np.float64) * aset.scaling[:, None, None, None],
                     aset.a[m].astype(np.float64))


def truncate(x, r):
    """The best rank-r approximation of x (truncated SVD)."""
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def ties_np(vectors, density):
    """TIES on a list of same-shape arrays (rows: tasks): per task keep the top int(density*numel),
    elect the sign of the sum of the trimmed (>= 0 -> +1), mean of the agreeing over their count.
    `vectors` are (unweighted, weighted, numel) triples: election on the first, mean of the second."""
    trimmed, weighted = [], []
    for x, wx, numel in vectors:
        flat = np.abs(x).ravel()
        k = int(density * numel) if density < 1 else flat.size
        keep = np.zeros(flat.size, bool)
        if k > 0:
            keep[np.argsort(-flat, kind="stable")[:k]] = True
        keep = keep.reshape(x.shape) & (x != 0)
        trimmed.append(np.where(keep, x, 0.0))
        weighted.append(np.where(keep, wx, 0.0))
    t, wt = np.stack(trimmed), np.stack(weighted)
    sign = np.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(t) == sign) & (t != 0)
    return np.where(agree, wt, 0.0).sum(0) / np.maximum(agree.sum(0), 1)


def core_space(a_list, b_list):
    """Core Space merging's reference bases: V_A^T = right singular vectors of the stacked A's
    [n R, d_in], U_B = left singular vectors of the stacked B's [d_out, n R] (reduced SVDs)."""
    vh_a = np.linalg.svd(np.concatenate(a_list, axis=0), full_matrices=False)[2]
    u_b = np.linalg.svd(np.concatenate(b_list, axis=1), full_matrices=False)[0]
    return u_b, vh_a


def polar(u):
    """TSV's orthogonalisation: U = P S Z^T -> P Z^T."""
    p, _, zh = np.linalg.svd(u, full_matrices=False)
    return p @ zh


def tsv_np(mats, keep):
    """TSV-Merge: each matrix's top `keep` singular triplets, U and V concatenated and
    orthogonalised, merged = U_perp diag(S) V_perp^T."""
    us, ss, vs = [], [], []
    for x in mats:
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep])
    return polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ polar(np.concatenate(vs, 0).T).T


def iso_cts_np(mats, dim, common_fraction=0.8):
    """Iso-CTS, the official algorithm with its subspace size min(shape) given as `dim`."""
    t = len(mats)
    common = int(dim * common_fraction)
    common = dim - round((dim - common) / t) * t
    per_task = (dim - common) // t
    u, s, vh = np.linalg.svd(sum(mats), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    us, ss, vs = [], [], []
    for x in mats:
        ut, st, vt = np.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vt[:per_task])
    u_all = polar(np.concatenate(us + [uc], 1))
    v_all = polar(np.concatenate(vs + [vc], 0).T)
    mean = np.concatenate(ss + [sc]).mean()
    return mean * u_all @ v_all.T
