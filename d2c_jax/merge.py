"""Merging a cluster of LoRA adapters: the operators' registry and the entry points.

Shape legend: N adapters, L layers, R rank, d_in / d_out module widths, C candidate masks, G
gathered member slots.

`prepare_merge` does everything that does not depend on which adapters are merged (weighting,
magnitude trimming, the DARE drop mask, trim thresholds) once, in numpy; `merge_mask(prepared,
mask_n)` is pure and jit/vmap-able over mask_n, so many candidate clusters merge in one call;
`merge_gathered` merges a mask's G gathered members at O(G) cost. The output is the decoder's
lora pytree with scaling 1 (lora_alpha = r): {module: {"a": [L, r, d_in], "b": [L, d_out, r]}}.

The operators, each module defining its methods, `prepare` and `merge_many`:
  merge_factor.py  ties, linear, magnitude_prune, dare_ties (PEFT's, factor-wise)
  merge_svd.py     ties_delta (PEFT's ties_svd), knots_ties (KnOTS), layer by layer from factors
  merge_core.py    core_ta, knots_linear, iso_c, core_ties, core_tsv, core_iso_cts: in the core
                   space of the members' stacked factors
Every update-space operator holds only the factors (never an update [d_out, d_in] per adapter).
A mask with exactly one member returns that adapter unchanged (a = A_i, b = w_i s_i B_i, no
trimming), like PEFT, which falls back to "linear" for a single adapter. `rank` (default: the
adapters' R) is the output rank: every output, the one-member case included, goes through
merge_common.fit_rank (zero-padding, or truncated SVD of b @ a when smaller than R).

Weights (DESIGN.md): for the factor-wise methods A_i is weighted by sign(w_i s_i) sqrt|w_i s_i|
and B_i by sqrt|w_i s_i|; for the update-space methods (DELTA_METHODS) delta_i = s_i B_i A_i by
w_i; the one-member case by w_i s_i B_i. `with_weights` multiplies tuned weights into a
unit-weight Prepared the same way.
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

from d2c_jax import lora as lora_lib
from d2c_jax import merge_core, merge_factor, merge_svd
from d2c_jax.errors import UserError
from d2c_jax.lora import AdapterSet
from d2c_jax.merge_common import Prepared, expand, merge_single
from d2c_jax.models.config import load_config
from d2c_jax.types import Lora

_OPERATORS = {m: mod for mod in (merge_factor, merge_svd, merge_core) for m in mod.METHODS}
SVD_METHODS = ("knots_ties", "knots_linear", "iso_c")  # the SVD operators of the published papers
CORE_METHODS = ("core_ta", "core_ties", "core_tsv", "core_iso_cts")  # new: merged in the core space
METHODS = merge_factor.METHODS + ("ties_delta",) + SVD_METHODS + CORE_METHODS
DELTA_METHODS = merge_svd.METHODS + merge_core.METHODS  # weights multiply delta_i (not sqrt on A and B)
assert set(METHODS) == set(_OPERATORS)
__all__ = ["Prepared", "METHODS", "DELTA_METHODS", "SVD_METHODS", "CORE_METHODS", "prepare_merge", "merge_mask",
           "merge_gathered", "merge_masks", "prepared_shapes", "with_weights", "check_weights", "merge_adapter_dirs"]


def _check(method: str, density: float, weights: Sequence[float] | None, n: int) -> np.ndarray:
    if method not in METHODS:
        raise UserError(None, f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
        raise UserError(None, f"--density={density!r}: must be in (0, 1] (the fraction of entries kept per tensor)")
    w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)):
        raise UserError(None, f"weights must be {n} finite numbers (one per adapter); got {list(np.ravel(w))}")
    return w


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
    w = _check(method, density, weights, adapter_set.num_adapters)
    rank = adapter_set.rank if rank is None else int(rank)
    if rank < 1:
        raise UserError(None, f"output rank {rank} must be >= 1")
    if method in merge_factor.METHODS:
        return merge_factor.prepare(adapter_set, method, density, seed, w, rank)
    return _OPERATORS[method].prepare(adapter_set, method, density, w, rank)


def prepared_shapes(dims: dict[str, tuple[int, int]], num_adapters: int, num_layers: int, rank: int,
                    method: str, out_rank: int | None = None, density: float = 0.5) -> Prepared:
    """The Prepared that `prepare_merge(adapters, method, rank=out_rank)` builds for N rank-R
    adapters on modules {name: (d_in, d_out)}, as ShapeDtypeStructs (for memory reports and
    compiling without the adapters)."""
    _check(method, density, None, num_adapters)
    n, nl = num_adapters, num_layers

    def f32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    factors = {m: {"a": f32(n, nl, rank, d_in), "b": f32(n, nl, d_out, rank)} for m, (d_in, d_out) in dims.items()}
    single = factors if method in merge_factor.METHODS else {}
    task = {m: dict(v, thresh=f32(n, nl)) if method == "ties_delta" else dict(v) for m, v in factors.items()}
    return Prepared(single=single, task=task, weight_a=f32(n), weight_b=f32(n), method=method,
                    rank=int(out_rank or rank), density=float(density))


def _merge_many(prepared: Prepared, m_n: jax.Array, unroll: bool = False) -> Lora:
    return _OPERATORS[prepared.method].merge_many(prepared, m_n, unroll)


def merge_mask(prepared: Prepared, mask_n: Any) -> Lora:
    """Merges the adapters selected by mask_n (bool/0-1 [N]) into one lora with scaling 1.

    Pure and jit/vmap-able over mask_n. An empty mask gives zeros.
    """
    chex.assert_shape(mask_n, (prepared.num_adapters,))
    m_n = (jnp.asarray(mask_n) != 0).astype(jnp.float32)
    # Both cases, selected: vmapped over masks and differentiated (tune.py) a lax.cond would
    # become the same select, at a much larger compile cost. merge_gathered branches for real.
    single = jnp.sum(m_n) == 1
    one, many = merge_single(prepared, m_n), _merge_many(prepared, m_n)
    return jax.tree.map(lambda x1, x: jnp.where(single, x1, x), one, many)


UNROLL_MAX = 16  # merge_gathered unrolls its masked reductions up to this many member slots


def merge_gathered(prepared: Prepared, members_g: jax.Array, valid_g: jax.Array) -> Lora:
    """merge_mask of the adapters members_g[valid_g] (G slots, padding slots not valid): the
    same merge at O(G) cost, not O(N). Each branch gathers only the leaves it reads, inside the
    branch, where XLA fuses the gather into the unrolled sums instead of copying [G, ...]."""
    def take(x):
        return jnp.take(x, members_g, axis=0)

    m_g = (jnp.asarray(valid_g) != 0).astype(jnp.float32)
    unroll = members_g.shape[0] <= UNROLL_MAX

    def single(p: Prepared) -> Lora:  # only the one member's slot gathered
        one = members_g[jnp.argmax(m_g)][None]

        def take1(x):
            return jnp.take(x, one, axis=0)

        return merge_single(dataclasses.replace(p, single=jax.tree.map(take1, p.single),
                                                task=jax.tree.map(take1, p.task) if not p.single else p.task,
                                                weight_a=take1(p.weight_a), weight_b=take1(p.weight_b)),
                            jnp.ones(1, jnp.float32), True)

    def many(p: Prepared) -> Lora:
        if p.method in DELTA_METHODS or not unroll:  # layer by layer: members gathered inside the loop
            return _OPERATORS[p.method].merge_many(p, m_g, unroll, members=members_g)
        return _merge_many(dataclasses.replace(p, task=jax.tree.map(take, p.task), weight_a=take(p.weight_a),
                                               weight_b=take(p.weight_b)), m_g, unroll)

    return jax.lax.cond(jnp.sum(m_g) == 1, single, many, prepared)


def with_weights(prepared: Prepared, w: Any) -> Prepared:
    """`prepared` (built with unit weights) with merge weights w [N] or [N, L] multiplied in, as the
    module docstring says; pure and differentiable in w (so it can be vmapped per cluster)."""
    w = jnp.asarray(w, jnp.float32)

    def times(v: jax.Array, f: jax.Array) -> jax.Array:
        return v.reshape(v.shape + (1,) * (w.ndim - v.ndim)) * f

    if prepared.method in DELTA_METHODS:  # delta_i = weight_a_i weight_b_i B_i A_i: w on weight_a
        return dataclasses.replace(prepared, weight_a=times(prepared.weight_a, w))
    fa, fb = jnp.sign(w) * jnp.sqrt(jnp.abs(w)), jnp.sqrt(jnp.abs(w))
    single = {m: {"a": sv["a"], "b": sv["b"] * expand(w, sv["b"])} for m, sv in prepared.single.items()}
    return dataclasses.replace(prepared, single=single, weight_a=times(prepared.weight_a, fa),
                               weight_b=times(prepared.weight_b, fb))


def check_weights(w: Any, num_adapters: int, num_layers: int) -> np.ndarray:
    """Validated weights [N] or [N, L] (float32)."""
    arr = np.asarray(w, np.float64)
    if arr.shape not in ((num_adapters,), (num_adapters, num_layers)) or not np.all(np.isfinite(arr)):
        raise UserError(None, f"weights must be finite, of shape ({num_adapters},) or ({num_adapters}, "
                        f"{num_layers}); got shape {arr.shape}")
    return arr.astype(np.float32)


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
        prepared = with_weights(prepared, check_weights(weights, aset.num_adapters, aset.num_layers))
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
