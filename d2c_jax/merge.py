"""Merging a cluster of LoRA adapters, as a masked reduction over the stacked adapter axis.

Shape legend: N adapters, L layers, R rank, d_in / d_out module widths, C candidate masks.

`prepare_merge` does everything that does not depend on which adapters are merged (weighting,
magnitude trimming, the DARE drop mask) once, in numpy; `merge_mask(prepared, mask_n)` is pure and
jit/vmap-able over mask_n, so many candidate clusters merge in one call. The output is the
decoder's lora pytree with scaling 1 (lora_alpha = R): {module: {"a": [L, R, d_in], "b": [L, d_out, R]}}.

Methods (weights w_i default 1; s_i = the adapter's scaling):
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
  ties_delta      PEFT "ties_svd": TIES on delta_i = s_i B_i @ A_i (weights w_i), then truncated
                  SVD back to rank R: b = U_R S_R, a = V_R^T.
  knots_ties, knots_linear, iso_c: SVD operators, see merge_svd.py (prepare_merge / merge_mask
                  dispatch there).
A mask with exactly one member returns that adapter unchanged (a = A_i, b = w_i s_i B_i, no
trimming), like PEFT, which falls back to "linear" for a single adapter. `rank` (default: the
adapters' R) is the output rank: every output, the one-member case included, goes through
merge_svd.fit_rank (zero-padding, or truncated SVD of b @ a when smaller than R).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.errors import UserError
from d2c_jax import lora as lora_lib
from d2c_jax.lora import AdapterSet
from d2c_jax.types import Lora

SVD_METHODS = ("knots_ties", "knots_linear", "iso_c")  # the operators of d2c_jax/merge_svd.py
METHODS = ("ties", "linear", "magnitude_prune", "dare_ties", "ties_delta") + SVD_METHODS
DELTA_METHODS = ("ties_delta",) + SVD_METHODS  # weights multiply delta_i (not sqrt on A and B)
_SIGN_ELECTED = ("ties", "dare_ties", "ties_delta")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prepared:
    """Mask-independent merge inputs (a pytree; method and rank are static).

    single: {module: {"a": [N, L, R, d_in], "b": [N, L, d_out, R]}}  the adapters as they are
            (b = w s B), used when the mask has one member.
    task:   factor methods: {module: {"a": [N, L, R, d_in], "b": [N, L, d_out, R]}} trimmed
            (or dropped) unweighted factors; ties_delta: {module: {"delta": [N, L, d_out, d_in]}}.
            SVD operators (merge_svd.prepare): task {module: {"delta": s_i B_i A_i, knots_ties also
            "y": s_i B_i R_i^T}}; their trimming depends on the mask, so `density` is kept here.
    weight_a, weight_b: [N] per-adapter multipliers of task["a"] / task["b"] (or of "delta").
    """

    single: dict[str, dict[str, jax.Array]]
    task: dict[str, dict[str, jax.Array]]
    weight_a: jax.Array
    weight_b: jax.Array
    method: str = dataclasses.field(metadata=dict(static=True), default="ties")
    rank: int = dataclasses.field(metadata=dict(static=True), default=0)
    density: float = dataclasses.field(metadata=dict(static=True), default=1.0)  # SVD operators only

    @property
    def num_adapters(self) -> int:
        return int(self.weight_a.shape[0])


def _check(method: str, density: float, weights: Sequence[float] | None, n: int) -> np.ndarray:
    if method not in METHODS:
        raise UserError(None, f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
        raise UserError(None, f"--density={density!r}: must be in (0, 1] (the fraction of entries kept per tensor)")
    w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)):
        raise UserError(None, f"weights must be {n} finite numbers (one per adapter); got {list(np.ravel(w))}")
    return w


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


def prepare_merge(
    adapter_set: AdapterSet,
    method: str = "ties",
    density: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
) -> Prepared:
    """Precomputes the mask-independent part of `method` (trimming is per adapter, done once).
    `rank`: the output rank r (None: the adapters' rank R)."""
    n = adapter_set.num_adapters
    w = _check(method, density, weights, n)
    rank = adapter_set.rank if rank is None else int(rank)
    if rank < 1:
        raise UserError(None, f"output rank {rank} must be >= 1")
    if method in SVD_METHODS:
        from d2c_jax import merge_svd

        return merge_svd.prepare(adapter_set, method, density, w, rank)
    ws = w * adapter_set.scaling  # float64, like PEFT's python floats
    if method == "ties_delta":
        weight_a = weight_b = w.astype(np.float32)
    else:
        weight_a = (np.sign(ws) + (ws == 0)) * np.sqrt(np.abs(ws))  # sign(0) = +1, as PEFT
        weight_b = np.sqrt(np.abs(ws))
        weight_a, weight_b = weight_a.astype(np.float32), weight_b.astype(np.float32)
    rng = np.random.default_rng(seed)
    single, task = {}, {}
    for m in adapter_set.a:
        a_nlrd, b_nldr = adapter_set.a[m], adapter_set.b[m]
        b_scaled = b_nldr * ws.astype(np.float32).reshape(n, 1, 1, 1)
        a_dev = jnp.asarray(a_nlrd)
        single[m] = {"a": a_dev, "b": jnp.asarray(b_scaled)}
        if method == "linear":
            task[m] = {"a": a_dev, "b": jnp.asarray(b_nldr)}
        elif method in ("ties", "magnitude_prune"):
            ta = np.stack([_trim_factor(a_nlrd[i], adapter_set.ranks[i], 0, density) for i in range(n)])
            tb = np.stack([_trim_factor(b_nldr[i], adapter_set.ranks[i], 1, density) for i in range(n)])
            task[m] = {"a": jnp.asarray(ta), "b": jnp.asarray(tb)}
        elif method == "dare_ties":
            ta = np.stack([_dare_factor(a_nlrd[i], adapter_set.ranks[i], 0, density, rng) for i in range(n)])
            tb = np.stack([_dare_factor(b_nldr[i], adapter_set.ranks[i], 1, density, rng) for i in range(n)])
            task[m] = {"a": jnp.asarray(ta), "b": jnp.asarray(tb)}
        else:  # ties_delta: trim the scaled delta s_i B_i @ A_i of each layer
            deltas = []
            for i in range(n):
                d_loi = np.einsum("lor,lri->loi", b_nldr[i], a_nlrd[i]) * np.float32(adapter_set.scaling[i])
                L = d_loi.shape[0]
                k = int(density * d_loi[0].size) if density < 1 else d_loi[0].size
                deltas.append(trim_topk(d_loi.reshape(L, -1), k).reshape(d_loi.shape))
            task[m] = {"delta": jnp.asarray(np.stack(deltas).astype(np.float32))}
    return Prepared(
        single=single,
        task=task,
        weight_a=jnp.asarray(weight_a),
        weight_b=jnp.asarray(weight_b),
        method=method,
        rank=rank,
    )


def _expand(v_n: jax.Array, x: jax.Array) -> jax.Array:
    """Per-adapter [N] (or per-adapter-and-layer [N, L]) values broadcast against x [N, L, ...]."""
    return v_n.reshape(v_n.shape + (1,) * (x.ndim - v_n.ndim))


UNROLL_MAX = 16  # merge_gathered unrolls its masked reductions up to this many member slots


def _masked_sum(m_n: jax.Array, x_n: jax.Array, unroll: bool = False) -> jax.Array:
    """sum_i m_i x_i. unroll (a few gathered members, one mask, no vmap): an elementwise sum
    that XLA fuses into one pass. Otherwise a contraction, so that vmap over masks is one
    matmul, not a [C, N, ...] temporary (HIGHEST: TPUs would otherwise round the float32
    operands to bfloat16); it also compiles faster and differentiates compactly (tune.py)."""
    if unroll:
        return sum(_expand(m_n[i], x_n[i]) * x_n[i] for i in range(x_n.shape[0]))
    return jnp.tensordot(m_n.astype(x_n.dtype), x_n, axes=1, precision=jax.lax.Precision.HIGHEST)


def _weighted_sum(x_n: jax.Array, w_n: jax.Array, m_n: jax.Array, unroll: bool = False) -> jax.Array:
    return _masked_sum(m_n, x_n * _expand(w_n, x_n), unroll)


def _ties(x_n: jax.Array, w_n: jax.Array, m_n: jax.Array, unroll: bool = False) -> jax.Array:
    """Sign election on the unweighted members, then the disjoint mean of the weighted ones.

    An entry agrees with a +1 majority iff it is > 0 (and with -1 iff < 0; zeros never agree).
    unroll (merge_gathered): two fused passes (the sign sum, then the agreeing sum and count,
    member by member: ~10x faster on CPU than five contractions over materialised temporaries).
    Otherwise the sums and counts of agreeing entries are masked sums of mask-independent
    tensors, which XLA computes once per call however many masks are vmapped.
    """
    majority_pos = _masked_sum(m_n, x_n, unroll) >= 0
    if unroll:
        num = count = jnp.zeros(x_n.shape[1:], x_n.dtype)
        for i in range(x_n.shape[0]):
            x, member = x_n[i], _expand(m_n[i], x_n[i]) > 0
            agree = jnp.where(majority_pos, x > 0, x < 0) & member
            num = num + jnp.where(agree, x * _expand(w_n[i], x), 0.0)
            count = count + agree.astype(x_n.dtype)
        return num / jnp.maximum(count, 1.0)
    pos, neg = x_n > 0, x_n < 0
    wx = x_n * _expand(w_n, x_n)
    num = jnp.where(majority_pos, _masked_sum(m_n, jnp.where(pos, wx, 0.0)),
                    _masked_sum(m_n, jnp.where(neg, wx, 0.0)))
    count = jnp.where(majority_pos, _masked_sum(m_n, pos.astype(x_n.dtype)),
                      _masked_sum(m_n, neg.astype(x_n.dtype)))
    return num / jnp.maximum(count, 1.0)


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


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reduced SVD over the leading batch axes (sequential on CPU, see _svd_one_vmap)."""
    if jax.default_backend() != "cpu":
        return tuple(jnp.linalg.svd(x, full_matrices=False))
    f = _svd_one
    for _ in range(x.ndim - 2):
        f = jax.vmap(f)
    return f(x)


def merge_mask(prepared: Prepared, mask_n: Any) -> Lora:
    """Merges the adapters selected by mask_n (bool/0-1 [N]) into one lora with scaling 1.

    Pure and jit/vmap-able over mask_n. An empty mask gives zeros.
    """
    from d2c_jax import merge_svd

    chex.assert_shape(mask_n, (prepared.num_adapters,))
    if prepared.method in SVD_METHODS:
        return merge_svd.merge_mask(prepared, mask_n)
    m_n = (jnp.asarray(mask_n) != 0).astype(jnp.float32)
    # Both cases, selected: vmapped over masks and differentiated (tune.py) a lax.cond would
    # become the same select, at a much larger compile cost. merge_gathered branches for real.
    single = jnp.sum(m_n) == 1
    one, many = _merge_single(prepared, m_n), _merge_many(prepared, m_n)
    return jax.tree.map(lambda x1, x: jnp.where(single, x1, x), one, many)


def merge_gathered(prepared: Prepared, members_g: jax.Array, valid_g: jax.Array) -> Lora:
    """merge_mask of the adapters members_g[valid_g] (G slots, padding slots not valid): the
    same merge at O(G) cost, not O(N). Each branch gathers only the leaves it reads, inside the
    branch, where XLA fuses the gather into the unrolled sums instead of copying [G, ...]."""
    def take(x):
        return jnp.take(x, members_g, axis=0)

    if prepared.method in SVD_METHODS:
        return merge_mask(jax.tree.map(take, prepared), valid_g)
    m_g = (jnp.asarray(valid_g) != 0).astype(jnp.float32)

    unroll = members_g.shape[0] <= UNROLL_MAX

    def single(p: Prepared) -> Lora:
        return _merge_single(dataclasses.replace(p, single=jax.tree.map(take, p.single)), m_g, unroll)

    def many(p: Prepared) -> Lora:
        return _merge_many(dataclasses.replace(p, task=jax.tree.map(take, p.task), weight_a=take(p.weight_a),
                                               weight_b=take(p.weight_b)), m_g, unroll)

    return jax.lax.cond(jnp.sum(m_g) == 1, single, many, prepared)


def _merge_single(prepared: Prepared, m_n: jax.Array, unroll: bool = False) -> Lora:
    """The one member unchanged (a = A_i, b = w_i s_i B_i), fitted to the output rank."""
    from d2c_jax import merge_svd

    out = {}
    for mod, sv in prepared.single.items():
        a, b = merge_svd.fit_rank(_masked_sum(m_n, sv["a"], unroll), _masked_sum(m_n, sv["b"], unroll),
                                  prepared.rank)
        out[mod] = {"a": a, "b": b}
    return out


def _merge_many(prepared: Prepared, m_n: jax.Array, unroll: bool = False) -> Lora:
    """Two or more members: `prepared.method`'s merge (see the module docstring)."""
    from d2c_jax import merge_svd

    out = {}
    for mod, tv in prepared.task.items():
        if prepared.method == "ties_delta":
            delta = _ties(tv["delta"], prepared.weight_a, m_n, unroll)
            a, b = merge_svd.factors(delta, prepared.rank)
        elif prepared.method in _SIGN_ELECTED:
            a = _ties(tv["a"], prepared.weight_a, m_n, unroll)
            b = _ties(tv["b"], prepared.weight_b, m_n, unroll)
            a, b = merge_svd.fit_rank(a, b, prepared.rank)
        else:
            a = _weighted_sum(tv["a"], prepared.weight_a, m_n, unroll)
            b = _weighted_sum(tv["b"], prepared.weight_b, m_n, unroll)
            a, b = merge_svd.fit_rank(a, b, prepared.rank)
        out[mod] = {"a": a, "b": b}
    return out


def merge_masks(prepared: Prepared, masks_cn: Any) -> Lora:
    """vmap of merge_mask over C masks: every leaf gets a leading C axis."""
    return jax.vmap(merge_mask, in_axes=(None, 0))(prepared, jnp.asarray(masks_cn))


def merge_adapter_dirs(
    adapter_dirs: Sequence[str],
    output_dir: str,
    *,
    method: str = "ties",
    density: float = 0.5,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    base_model: str | None = None,
    rank: int | None = None,
    factors: Lora | None = None,
    owner: str | None = None,
) -> str:
    """Merges the given PEFT adapters into one PEFT adapter at output_dir (written atomically).

    `weights`: one per adapter, or [N, L] (one per adapter and layer, e.g. tuned ones); `rank`:
    the output rank (default: the adapters'). Without base_model the base dims are read off the adapters' tensors and the output lists the
    adapted layers explicitly (layers_to_transform), so it also fits a deeper base model; with
    base_model the adapters are checked against it. `factors`: the merged adapter's factors to
    write instead of the merge (tune.py's granularity "factors", tuned from this merge); `owner`:
    the command named in the output's marker (lora.save_peft_adapter). Returns output_dir.
    """
    from d2c_jax.models.config import load_config

    adapter_dirs = [str(d) for d in adapter_dirs]
    if not adapter_dirs:
        raise UserError(None, "no adapters given")
    if len({os.path.realpath(d) for d in adapter_dirs}) < len(adapter_dirs):
        raise UserError(None, "--adapters names the same adapter directory twice")
    dims = load_config(base_model) if base_model else lora_lib.infer_dims(adapter_dirs)
    aset = lora_lib.load_adapter_dirs(adapter_dirs, dims)
    per_layer = weights is not None and np.ndim(weights) == 2
    prepared = prepare_merge(aset, method, density, seed=seed, weights=None if per_layer else weights,
                             rank=rank)
    if per_layer:
        from d2c_jax import tune

        prepared = tune.with_weights(prepared, tune.check_weights(weights, aset.num_adapters,
                                                                  aset.num_layers))
    if factors is None:
        factors = jax.jit(merge_mask)(prepared, np.ones(aset.num_adapters, bool))
    merged = jax.tree.map(np.asarray, factors)
    if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(merged)):
        raise UserError(output_dir, "the merge is not finite (NaN or Inf); nothing written")
    if not any(np.any(x) for x in jax.tree.leaves(merged)):
        raise UserError(output_dir, "the merge is all zeros (the adapters cancel out); nothing written")
    layers = lora_lib.covered_layers(aset)
    if base_model and layers == list(range(aset.num_layers)):
        layers = None
    if base_model:
        base_path = base_model
    else:
        base_path = next((p for p in aset.base_model_paths if p), None)
    return lora_lib.save_peft_adapter(
        output_dir, merged, rank=prepared.rank, alpha=prepared.rank, base_model_path=base_path,
        layers_to_transform=layers, owner=owner
    )
