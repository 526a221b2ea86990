"""The factor-wise operators: PEFT's add_weighted_adapter merges, on A and B separately.

Shape legend: N adapters, L layers, R rank, d_in / d_out module widths.

With weights w_i (default 1) and s_i the adapter's scaling:
  ties            PEFT add_weighted_adapter(combination_type="ties"), factor-wise: A_i weighted by
                  sign(w_i s_i) sqrt|w_i s_i|, B_i by sqrt|w_i s_i|; per adapter and per layer/module
                  matrix keep the top int(density * numel) |entries| (numel of the true-rank matrix);
                  sign per entry = sign of the sum of the trimmed unweighted members (>= 0 -> +1);
                  mean of the agreeing weighted entries over their count (at least 1).
  linear          PEFT "linear": sum of the weighted factors (A and B separately).
  magnitude_prune PEFT "magnitude_prune": trim as ties, then the weighted sum.
  dare_ties       PEFT "dare_ties" with the random drop mask drawn once from `seed`: keep each
                  entry with probability density and rescale by 1 / density, then ties' sign
                  election and disjoint mean.
Prepared memory: two copies of the factors (as they are, and trimmed), O(N L R (d_in + d_out)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.lora import AdapterSet
from d2c_jax.merge_common import Prepared, fit_rank, map_layers, ties, to_device, trim_topk, weighted_sum

METHODS = ("ties", "linear", "magnitude_prune", "dare_ties")
_SIGN_ELECTED = ("ties", "dare_ties")


def _trim_factor(x: np.ndarray, rank: int, rank_axis: int, density: float) -> np.ndarray:
    """Magnitude-trims each layer's [r, d_in] (rank_axis 0) or [d_out, r] (rank_axis 1) matrix."""
    if density >= 1:
        return x.copy()
    out = np.zeros_like(x)
    true = x[:, :rank] if rank_axis == 0 else x[:, :, :rank]  # [L, r, d_in] or [L, d_out, r]
    L = true.shape[0]
    flat = true.reshape(L, -1)
    k = int(density * flat.shape[1])  # PEFT: int(density * tensor.numel())
    kept = trim_topk(flat, k).reshape(true.shape)
    if rank_axis == 0:
        out[:, :rank] = kept
    else:
        out[:, :, :rank] = kept
    return out


def _dare_factor(x: np.ndarray, rank: int, rank_axis: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """PEFT's random_pruning(rescale=True) with a fixed seed: keep w.p. density, scale 1/density."""
    if density >= 1:
        return x.copy()
    keep = rng.random(x.shape) < density
    out = np.where(keep, x / np.float32(density), np.zeros((), x.dtype)).astype(np.float32)
    if rank_axis == 0:
        out[:, rank:] = 0
    else:
        out[:, :, rank:] = 0
    return out


def prepare(adapter_set: AdapterSet, method: str, density: float, seed: int, w: np.ndarray, rank: int) -> Prepared:
    """Trims (or drops) every adapter's factors once; weights sign(ws) sqrt|ws| on A, sqrt|ws| on B."""
    n = adapter_set.num_adapters
    ws = w * adapter_set.scaling  # float64, like PEFT's python floats
    weight_a = ((np.sign(ws) + (ws == 0)) * np.sqrt(np.abs(ws))).astype(np.float32)  # sign(0) = +1, as PEFT
    weight_b = np.sqrt(np.abs(ws)).astype(np.float32)
    rng = np.random.default_rng(seed)
    single, task = {}, {}
    for m in adapter_set.a:
        a_nlrd, b_nldr = adapter_set.a[m], adapter_set.b[m]
        a_dev = to_device(a_nlrd)
        single[m] = {"a": a_dev, "b": to_device(b_nldr * ws.astype(np.float32).reshape(n, 1, 1, 1))}
        if method == "linear":
            task[m] = {"a": a_dev, "b": to_device(b_nldr)}
            continue
        if method == "dare_ties":
            ta = np.stack([_dare_factor(a_nlrd[i], adapter_set.ranks[i], 0, density, rng) for i in range(n)])
            tb = np.stack([_dare_factor(b_nldr[i], adapter_set.ranks[i], 1, density, rng) for i in range(n)])
        else:  # ties, magnitude_prune
            ta = np.stack([_trim_factor(a_nlrd[i], adapter_set.ranks[i], 0, density) for i in range(n)])
            tb = np.stack([_trim_factor(b_nldr[i], adapter_set.ranks[i], 1, density) for i in range(n)])
        task[m] = {"a": to_device(ta), "b": to_device(tb)}
    return Prepared(single=single, task=task, weight_a=to_device(weight_a), weight_b=to_device(weight_b),
                    method=method, rank=rank, density=float(density))


def merge_many(prepared: Prepared, m_n: jax.Array, unroll: bool = False,
               members: jax.Array | None = None) -> dict[str, dict[str, jax.Array]]:
    """Two or more members: sign election and disjoint mean, or the weighted sum, per factor.

    unroll (a few gathered members): every layer at once, fused member by member. Otherwise one
    layer at a time (merge_common.map_layers): the weighted factors and the sign masks are
    [N, ...] temporaries of one layer, not of all L (for 40 Llama-3.2-3B adapters 13.8 GiB for
    one merge, and K times that under tuning's vmap over clusters). `members` [G]: m_n is over
    these slots, gathered layer by layer (merge.merge_gathered)."""
    combine = ties if prepared.method in _SIGN_ELECTED else weighted_sum
    out = {}
    if unroll:
        for mod, tv in prepared.task.items():
            a = combine(tv["a"], prepared.weight_a, m_n, unroll)
            b = combine(tv["b"], prepared.weight_b, m_n, unroll)
            out[mod] = dict(zip("ab", fit_rank(a, b, prepared.rank)))
        return out

    def layer(leaves: dict[str, jax.Array], wa_n: jax.Array, wb_n: jax.Array) -> tuple[jax.Array, jax.Array]:
        return combine(leaves["a"], wa_n, m_n), combine(leaves["b"], wb_n, m_n)

    for mod, ab in map_layers(prepared, layer, members).items():
        out[mod] = dict(zip("ab", fit_rank(ab["a"], ab["b"], prepared.rank)))
    return out
