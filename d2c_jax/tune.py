"""Learned merges: every cluster's per-adapter (or per-adapter-and-layer) merge weights, or the merged
adapter's factors themselves, tuned with optax on its tasks' search examples, all clusters of a
partition at once in one jitted, vmapped loop.

Shapes: K clusters, N adapters (= T tasks; adapter i is the adapter of task i), L layers,
n examples per task (n_fit fitted + n_held held out), S sequence.

The weights enter the merge as DESIGN.md pins them (`with_weights`): for the factor-wise methods
A_i is weighted by sign(w_i s_i) sqrt|w_i s_i| and B_i by sqrt|w_i s_i|, for the delta-space
methods (ties_delta, knots_*, iso_c) delta_i = s_i B_i A_i by w_i; the one-member case by w_i s_i
B_i. The sign election does not depend on the weights, so the merge is differentiable in them and
equal to the unit-weight merge at w = 1.

Granularity `factors` tunes the merged adapter itself: each cluster's rank-R factors (a, b of every
module and layer, scaling folded in) start from its unit-weight merge and are trained directly, a
few-shot multi-task fine-tune from the merge. The merge weights stay 1; the result carries the
kept factors (`TuneResult.lora`), which are what gets written. With start `fresh` the factors
start instead from PEFT's initialisation of a new LoRA of the same rank (A uniform in
±1/sqrt(d_in), kaiming_uniform with a = sqrt(5); B = 0: the base model): a LoRA trained from
scratch on the cluster's pooled examples under the same optimiser, steps and held-out guard, the
control that tells the merge's part from the fine-tune's. Granularity `scale` picks one weight c per
cluster, shared by all its members (task arithmetic with a tuned scale, with --merge=core_ta). A
weight shared by every member scales the merge: every operator here is positively homogeneous in
it (sums, means of agreeing entries and SVDs pass a common factor c > 0 through; sign elections and
trims read the unweighted members), so the merge at weights c is c times the unit-weight merge.
It therefore merges once, at unit weights, and scales the merged B (b -> c b). As the published
practice for task arithmetic does, c is searched, not trained: a log grid per cluster from 1 / (2 n)
(n members; the best c is near 1 / n, the members' mean) to 2, refined around the best value, on
the fit examples (`_scale_search`), with the same held-out guard.

Guard against fitting 10 examples per task: the last `holdout` fraction of each task's search
examples is held out. Training minimises the summed loss of every cluster's tasks on the other
examples, from w = 1 (the paper's unit weights); after every step the held-out loss of each cluster
is measured, each cluster keeps the weights of its best held-out step and stops (its later steps
are ignored) once it has not improved for `patience` steps, so a cluster's result does not depend
on which other clusters are tuned with it; the loop ends when every cluster has stopped, and a
cluster keeps its tuned weights only where they beat the unit weights on the held-out part (else
it keeps w = 1). The held-out examples are search
examples: the `.eval.jsonl` split is never read here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import loss as loss_lib
from d2c_jax import merge as merge_lib
from d2c_jax import scoring
from d2c_jax import sharding as sharding_lib
from d2c_jax.errors import UserError
from d2c_jax.merge import check_weights, with_weights  # noqa: F401  (how weights enter a merge; re-exported)

GRANULARITIES = ("adapter", "layer", "scale", "factors")
LEARNING_RATES = {"adapter": 0.05, "layer": 0.05, "scale": 0.05, "factors": 1e-3}  # Adam (--tune_learning_rate unset)
STARTS = ("merge", "fresh")


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    granularity: str = "adapter"  # one weight per adapter, per adapter and layer, per cluster, or the merged factors
    steps: int = 60  # at most this many optimiser steps
    learning_rate: float | None = None  # Adam; None: LEARNING_RATES[granularity]
    holdout: float = 0.3  # fraction of each task's search examples held out (at least one)
    patience: int = 15  # a cluster stops when its held-out loss has not improved for this many steps
    min_weight: float = 0.01  # weights are kept in [min_weight, max_weight] (sqrt|w| at 0 has no gradient)
    max_weight: float = 8.0
    start: str = "merge"  # factors: from the unit-weight merge, or a fresh LoRA (PEFT's initialisation)
    seed: int = 0  # the fresh LoRA's initial A

    def __post_init__(self):
        def bad(flag: str, msg: str):
            raise UserError(None, f"--{flag}={getattr(self, flag.replace('tune_', ''))}: {msg}")

        if self.granularity not in GRANULARITIES:
            raise UserError(None, f"--tune_granularity={self.granularity}: must be one of {', '.join(GRANULARITIES)}")
        if self.start not in STARTS:
            raise UserError(None, f"--tune_start={self.start}: must be one of {', '.join(STARTS)}")
        if self.start == "fresh" and self.granularity != "factors":
            raise UserError(None, f"--tune_start=fresh: trains a new LoRA, so it needs --tune_granularity=factors "
                            f"(got {self.granularity})")
        if self.steps < 1:
            bad("tune_steps", "must be >= 1")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            bad("tune_learning_rate", "must be > 0")
        if not 0 < self.holdout < 1:
            bad("tune_holdout", "must be in (0, 1)")
        if self.patience < 1:
            bad("tune_patience", "must be >= 1")

    @property
    def lr(self) -> float:
        return LEARNING_RATES[self.granularity] if self.learning_rate is None else float(self.learning_rate)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """Per cluster: weights [K, N] (or [K, N, L]) kept (tuned where they won, else 1), the tuned
    ones, and the summed loss of the cluster's tasks with unit / tuned weights on both parts."""

    weights: np.ndarray
    tuned: np.ndarray
    kept_k: np.ndarray  # bool [K]: the tuned weights beat the unit ones on the held-out part
    unit_fit_k: np.ndarray
    tuned_fit_k: np.ndarray
    unit_heldout_k: np.ndarray
    tuned_heldout_k: np.ndarray
    best_step_k: np.ndarray  # int [K]: the step of the kept tuned weights (0: the unit weights)
    steps: int
    seconds: float
    num_fit: int  # examples per task fitted
    num_heldout: int  # examples per task held out
    num_chains: int = 1  # P partitions tuned together: the cluster axis is P * K, chain-major
    lora: Any = None  # granularity "factors": the kept factors (lora leaves [P * K, ...]: tuned where kept, else the unit merge)

    def chain(self, p: int) -> TuneResult:
        """The result of partition p alone (cluster axis K)."""
        k = len(self.kept_k) // self.num_chains
        return self.clusters(np.arange(p * k, (p + 1) * k))

    def clusters(self, idx: Any) -> TuneResult:
        """The result restricted to (and ordered as) the clusters `idx` of one partition."""
        idx = np.asarray(idx)
        return dataclasses.replace(
            self, weights=self.weights[idx], tuned=self.tuned[idx], kept_k=self.kept_k[idx],
            unit_fit_k=self.unit_fit_k[idx], tuned_fit_k=self.tuned_fit_k[idx],
            unit_heldout_k=self.unit_heldout_k[idx], tuned_heldout_k=self.tuned_heldout_k[idx],
            best_step_k=self.best_step_k[idx], num_chains=1,
            lora=None if self.lora is None else jax.tree.map(lambda x: x[idx], self.lora))

    def chain_totals(self) -> np.ndarray:
        """float64 [P]: each partition's summed loss (fitted + held-out examples) with its kept
        weights, the criterion --tune_during_search picks a chain by."""
        kept = self.kept_k
        per_c = np.where(kept, self.tuned_fit_k + self.tuned_heldout_k, self.unit_fit_k + self.unit_heldout_k)
        return per_c.reshape(self.num_chains, -1).sum(axis=1)

    def summary(self) -> dict[str, Any]:
        """The numbers partition.json and the report show."""
        kept_heldout = np.where(self.kept_k, self.tuned_heldout_k, self.unit_heldout_k)
        return {
            "kept": [bool(x) for x in self.kept_k],
            "unit_heldout": [float(x) for x in self.unit_heldout_k],
            "tuned_heldout": [float(x) for x in self.tuned_heldout_k],
            "unit_fit": [float(x) for x in self.unit_fit_k],
            "tuned_fit": [float(x) for x in self.tuned_fit_k],
            "heldout_unit_total": float(self.unit_heldout_k.sum()),
            "heldout_kept_total": float(kept_heldout.sum()),
            "best_step": [int(x) for x in self.best_step_k],
            "steps": int(self.steps),
            "seconds": round(float(self.seconds), 3),
            "examples_fit": self.num_fit,
            "examples_heldout": self.num_heldout,
            "weights": self.weights.tolist(),  # float32 values, exactly (the written merges use them)
        }


REMAT_ABOVE_BYTES = 2 << 30  # a tuning step whose backward would keep more activations than this rematerialises


def backward_bytes(cfg: Any, fit: Any) -> int:
    """About what a plain backward pass through the fitted examples [T, n_fit, S] keeps: every
    layer's activations (the residual stream, attention and MLP inputs and outputs: ~8 D + 3 F
    values per token, float32) and the float32 logits with their gradient."""
    tokens = int(np.prod(fit.tokens.shape))
    per_layer = 8 * cfg.hidden_size + 3 * cfg.intermediate_size
    return tokens * (cfg.num_layers * per_layer * 4 + cfg.vocab_size * 8)


def needs_remat(cfg: Any, fit: Any) -> bool:
    """Whether tuning rematerialises (loss.task_loss_sums' `remat`): only where the plain backward
    would keep more than REMAT_ABOVE_BYTES (a large model), since recomputing costs time."""
    return backward_bytes(cfg, fit) > REMAT_ABOVE_BYTES


def split_examples(task_data: Any, holdout: float) -> tuple[Any, Any, int, int]:
    """(fit, held-out) TokenBatches [T, n_part, S]: the last ceil(holdout * n) examples (at least
    one, at most n - 1) of every task are held out."""
    counts = np.asarray(task_data.num_examples)
    if counts.min() < 2:
        raise UserError(None, "weight tuning needs at least 2 search examples per task (one is held out)")
    n_held = min(max(1, math.ceil(holdout * counts.min())), int(counts.min()) - 1)
    n_fit = int(counts.min()) - n_held
    # Every task's real examples come first (dummy rows after them): fit = the first n_fit,
    # held out = the n_held after them, the same count for every task.
    fit = jax.tree.map(lambda x: jnp.asarray(x[:, :n_fit]), task_data.batch)
    held = jax.tree.map(lambda x: jnp.asarray(x[:, n_fit:n_fit + n_held]), task_data.batch)
    return fit, held, n_fit, n_held


def tune_partitions(
    params: Any,
    cfg: Any,
    prepared: Any,
    task_data: Any,
    partitions_pn: Any,
    num_clusters: int,
    settings: TuneSettings = TuneSettings(),
    *,
    example_chunk: int | None = None,
    mesh: Any = None,
    log: Any = None,
) -> TuneResult:
    """Tunes the merge weights (or, granularity "factors", the merged factors) of every cluster
    of P partitions [P, N] (the module docstring); the result's cluster axis is P * K
    (chain-major), see `TuneResult.chain`.

    The partitions go one after another through the same compiled steps (the partition is an
    argument, not a constant), so each partition's result is bit for bit the one it gets when
    tuned alone, on any machine: vmapping partitions together would change the shapes XLA picks
    its kernels for, and Adam's normalised steps carry a last-bit rounding difference in a
    near-zero gradient into a weight change of up to the learning rate."""
    start = time.perf_counter()
    partitions_pn = np.asarray(partitions_pn, np.int32).reshape(-1, np.shape(partitions_pn)[-1])
    fit, held, n_fit, n_held = split_examples(task_data, settings.holdout)
    if mesh is not None:  # every task's examples on the devices of its "cand" shard
        fit, held = place_examples(fit, mesh), place_examples(held, mesh)
    fns = step_functions(cfg, settings, int(num_clusters), example_chunk, needs_remat(cfg, fit))
    runs = [_tune_one(fns, params, prepared, fit, held, jnp.asarray(part_n), settings, log) for part_n in partitions_pn]
    cat = {f: np.concatenate([r[f] for r in runs]) for f in runs[0] if f not in ("lora", "steps")}
    lora = (jax.tree.map(lambda *xs: np.concatenate(xs), *[r["lora"] for r in runs])
            if settings.granularity == "factors" else None)
    return TuneResult(**cat, steps=max(r["steps"] for r in runs), seconds=time.perf_counter() - start,
                      num_fit=n_fit, num_heldout=n_held, num_chains=len(runs), lora=lora)


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The jitted functions of one partition's tuning: params, prepared, the examples and the
    partition part_n [N] (task -> cluster) are arguments, so every partition runs the same
    executables."""

    train_step: Any
    losses: Any
    merged: Any
    init: Any
    k: int


def place_examples(batch: Any, mesh: Any) -> Any:
    """A TokenBatch [T, n, S] with its task axis split over the mesh's "cand" axis (replicated
    where T does not divide), so each device group runs the forward and backward of its tasks."""

    host = jax.tree.map(np.asarray, batch)
    return sharding_lib.put_global(host, jax.tree.map(lambda x: example_sharding(mesh, x.shape), host))


def example_sharding(mesh: Any, shape: tuple[int, ...]) -> Any:
    """place_examples' sharding of an example array of this shape."""
    if shape[0] % mesh.shape[sharding_lib.CAND]:
        return sharding_lib.replicated(mesh)
    return sharding_lib.batch_sharding(mesh, len(shape))


def step_functions(cfg: Any, settings: TuneSettings, k: int, example_chunk: int | None, remat: bool = False) -> _Steps:
    """The jitted steps (see _Steps); `remat`: the loss rematerialised (needs_remat). Built once per
    (model config, what the steps read of the settings, K, chunk, remat) and reused, so every call
    of tune_partitions with the same shapes runs the executables compiled by the first."""
    return _step_functions(cfg, settings.granularity, settings.lr, settings.min_weight, settings.max_weight,
                           int(k), example_chunk, bool(remat))


@functools.lru_cache(maxsize=64)
def _step_functions(cfg: Any, granularity: str, lr: float, min_weight: float, max_weight: float, k: int,
                    example_chunk: int | None, remat: bool) -> _Steps:
    import optax

    factors, scale = granularity == "factors", granularity == "scale"

    def merged(prepared, w_k, part_n):
        return _weighted_merges(prepared, w_k, part_n[None, :] == jnp.arange(k, dtype=part_n.dtype)[:, None])

    def cluster_losses(params, source, theta_k, arrays, part_n):
        """theta_k: weights [K, N(, L)] of the merge `source` (a Prepared); (factors) the clusters'
        lora leaves [K, ...]; (scale) c [K, 1] scaling the unit-weight merges `source` [K, ...]."""
        if factors:
            lora_k = theta_k
        elif scale:
            lora_k = scaled(source, theta_k[:, 0])
        else:
            lora_k = merged(source, theta_k, part_n)
        lora_t = jax.tree.map(lambda x: jnp.take(x, part_n, axis=0), lora_k)  # task t's cluster's merge
        loss_t = loss_lib.candidate_losses(params, cfg, lora_t, arrays, example_chunk=example_chunk, remat=remat)
        return jax.ops.segment_sum(loss_t, part_n, num_segments=k)

    opt = optax.adam(lr)

    def train_step(params, source, fit, held, part_n, theta_k, opt_state):
        def total(theta):
            per_k = cluster_losses(params, source, theta, fit, part_n)
            return jnp.sum(per_k), per_k

        (_, fit_k), grad = jax.value_and_grad(total, has_aux=True)(theta_k)
        updates, opt_state = opt.update(grad, opt_state, theta_k)
        theta_new = optax.apply_updates(theta_k, updates)
        if not factors:
            theta_new = jnp.clip(theta_new, min_weight, max_weight)
        return theta_new, opt_state, fit_k, cluster_losses(params, source, theta_new, held, part_n)

    return _Steps(train_step=jax.jit(train_step), losses=jax.jit(cluster_losses), merged=jax.jit(merged),
                  init=opt.init, k=k)


def scaled(lora_k: Any, c_k: Any) -> Any:
    """Each cluster's adapter [K, ...] with its update scaled by c_k [K] (b -> c b)."""
    return {m: {"a": ab["a"], "b": ab["b"] * c_k.reshape((-1,) + (1,) * (ab["b"].ndim - 1))}
            for m, ab in lora_k.items()}


def _tune_one(fns: _Steps, params: Any, prepared: Any, fit: Any, held: Any, part_n: jax.Array,
              settings: TuneSettings, log: Any) -> dict[str, Any]:
    """One partition's tuning loop (the module docstring): TuneResult's per-cluster fields."""
    factors = settings.granularity == "factors"
    num_layers = prepared.num_layers
    k, n = fns.k, int(part_n.shape[0])
    shape = (k, n) if settings.granularity != "layer" else (k, n, num_layers)

    def losses(theta, arrays):
        return np.asarray(fns.losses(params, source, theta, arrays, part_n), np.float64)

    def select(mask_k, new, old):  # per cluster: new where mask_k, else old (host arrays)
        return jax.tree.map(lambda a, b: np.where(mask_k.reshape((-1,) + (1,) * (np.ndim(a) - 1)), a, b),
                            jax.tree.map(np.asarray, new), old)

    if settings.granularity == "scale":
        return _scale_search(fns, params, prepared, fit, held, part_n, settings, log)
    source = prepared  # what the weights act on
    ones = jnp.ones(shape, jnp.float32)
    if factors and settings.start == "fresh":
        theta = fresh_lora(jax.eval_shape(fns.merged, prepared, ones, part_n), settings.seed)
    else:
        theta = fns.merged(prepared, ones, part_n) if factors else ones  # the start: the paper's unit-weight merge
    unit = jax.tree.map(np.asarray, theta)
    unit_held, unit_fit = losses(theta, held), losses(theta, fit)
    best_held, best = unit_held.copy(), unit
    best_step = np.zeros(k, np.int32)
    opt_state = fns.init(theta)
    since = np.zeros(k, np.int32)  # steps since each cluster's last held-out improvement
    steps = 0
    for it in range(1, settings.steps + 1):
        theta, opt_state, _, held_k = fns.train_step(params, source, fit, held, part_n, theta, opt_state)
        held_k = np.asarray(held_k, np.float64)
        steps = it
        active = since < settings.patience  # a stopped cluster's later steps are ignored
        better = active & (held_k < best_held)
        if better.any():
            best = select(better, theta, best)
            best_held[better] = held_k[better]
            best_step[better] = it
        since = np.where(better, 0, since + 1)
        if log is not None and (it == 1 or it % 10 == 0):
            log(f"tune step {it}: held-out {held_k.sum():.4f} (unit {unit_held.sum():.4f}, best {best_held.sum():.4f})")
        if not (since < settings.patience).any():
            break
    tuned_fit = losses(jax.tree.map(jnp.asarray, best), fit)
    kept = best_step > 0  # strictly better than the unit merge on the held-out part
    kept_theta = select(kept, best, unit)
    return {"weights": np.ones(shape, np.float32) if factors else kept_theta.astype(np.float32),
            "tuned": np.ones(shape, np.float32) if factors else best, "kept_k": kept,
            "unit_fit_k": unit_fit, "tuned_fit_k": tuned_fit, "unit_heldout_k": unit_held,
            "tuned_heldout_k": best_held, "best_step_k": best_step, "steps": steps,
            "lora": kept_theta if factors else None}


SCALE_GRID = 17  # scale: log-spaced values of c per cluster, from 1 / (2 n) (n its members) to SCALE_MAX
SCALE_MAX = 2.0
SCALE_REFINE = (6, 6)  # then, per round, this many values strictly between the best one's evaluated neighbours


def scale_bounds(sizes_k: np.ndarray, settings: TuneSettings) -> tuple[np.ndarray, np.ndarray]:
    """float64 [K] (lowest, highest) c of the scale search: 1 / (2 n_k) .. SCALE_MAX, within
    [min_weight, max_weight] (the best c of task arithmetic is near 1 / n: the mean update)."""
    lo = np.clip(1.0 / (2.0 * np.maximum(sizes_k, 1)), settings.min_weight, settings.max_weight)
    return lo, np.clip(np.full(len(sizes_k), SCALE_MAX), lo, settings.max_weight)


def scale_candidates(lo_k: np.ndarray, hi_k: np.ndarray) -> list[np.ndarray]:
    """The coarse grid: SCALE_GRID values of c [K] per cluster, log-spaced from lo_k to hi_k."""
    return [lo_k * (hi_k / lo_k) ** (i / (SCALE_GRID - 1)) for i in range(SCALE_GRID)]


def refine_candidates(tried_kg: np.ndarray, loss_kg: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` values of c [K] per cluster, log-spaced strictly between the evaluated neighbours
    of its best value so far (the best itself where it is the lowest or highest tried)."""
    best = np.argmin(loss_kg, axis=1)
    log_c = np.log(tried_kg)
    b = log_c[np.arange(len(best)), best]
    below = np.where(log_c < b[:, None], log_c, -np.inf).max(axis=1)
    above = np.where(log_c > b[:, None], log_c, np.inf).min(axis=1)
    lo, hi = np.where(np.isfinite(below), below, b), np.where(np.isfinite(above), above, b)
    return [np.exp(lo + (hi - lo) * (i + 1) / (count + 1)) for i in range(count)]


def _scale_search(fns: _Steps, params: Any, prepared: Any, fit: Any, held: Any, part_n: jax.Array,
                  settings: TuneSettings, log: Any) -> dict[str, Any]:
    """Granularity "scale": each cluster's c chosen by a search on the fit examples (the practice
    for task arithmetic's scale, which gradient steps from 1 approach slowly), the held-out guard as
    for the trained weights. The clusters' losses are separable (cluster k's loss reads c_k only),
    so one batched loss call per candidate vector c [K] evaluates every cluster's candidate: a
    coarse log grid (scale_candidates), then SCALE_REFINE rounds around each cluster's best
    (refine_candidates); c = 1 (the unit merge) is a candidate too. The cluster keeps its best c
    only where it also beats c = 1 on the held-out part (best_step 1; else c = 1, best_step 0);
    `steps` counts the loss calls on the fit examples."""
    k, n = fns.k, int(part_n.shape[0])
    unit_k = fns.merged(prepared, jnp.ones((k, 1), jnp.float32), part_n)

    def losses(c_k, arrays):
        return np.asarray(fns.losses(params, unit_k, jnp.asarray(c_k, jnp.float32)[:, None], arrays, part_n),
                          np.float64)

    ones = np.ones(k)
    tried, fit_losses = [ones], [losses(ones, fit)]
    lo, hi = scale_bounds(np.bincount(np.asarray(part_n), minlength=k), settings)
    rounds = [scale_candidates(lo, hi)] + [None] * len(SCALE_REFINE)
    for r, batch in enumerate(rounds):
        if batch is None:
            batch = refine_candidates(np.stack(tried, 1), np.stack(fit_losses, 1), SCALE_REFINE[r - 1])
        for c_k in batch:
            tried.append(c_k)
            fit_losses.append(losses(c_k, fit))
        if log is not None:
            log(f"tune scale round {r}: fit {np.stack(fit_losses, 1).min(axis=1).sum():.4f} "
                f"(unit {fit_losses[0].sum():.4f})")
    tried_kg, loss_kg = np.stack(tried, 1), np.stack(fit_losses, 1)
    best_g = np.argmin(loss_kg, axis=1)
    best_c = tried_kg[np.arange(k), best_g].astype(np.float32)
    unit_held, best_held = losses(ones, held), losses(best_c, held)
    kept = best_held < unit_held  # strictly better than the unit merge on the held-out part
    kept_c = np.where(kept, best_c, np.float32(1.0))
    return {"weights": np.broadcast_to(kept_c[:, None], (k, n)).astype(np.float32),
            "tuned": np.broadcast_to(best_c[:, None], (k, n)).astype(np.float32), "kept_k": kept,
            "unit_fit_k": fit_losses[0], "tuned_fit_k": loss_kg[np.arange(k), best_g], "unit_heldout_k": unit_held,
            "tuned_heldout_k": best_held, "best_step_k": kept.astype(np.int32), "steps": len(tried) - 1,
            "lora": None}


def fresh_lora(shapes: Any, seed: int) -> Any:
    """PEFT's initialisation of a new LoRA for lora leaves of these shapes ({module: {"a": [K, L,
    R, d_in], "b": [K, L, d_out, R]}}): A by kaiming_uniform_(a=sqrt(5)), i.e. uniform in
    ±1/sqrt(d_in), B = 0 (so the update starts at 0: the base model)."""
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (mod, ab) in enumerate(sorted(shapes.items())):
        bound = 1.0 / math.sqrt(ab["a"].shape[-1])
        a = jax.random.uniform(jax.random.fold_in(key, i), ab["a"].shape, jnp.float32, -bound, bound)
        out[mod] = {"a": a, "b": jnp.zeros(ab["b"].shape, jnp.float32)}
    return out


def tune_partition(params: Any, cfg: Any, prepared: Any, task_data: Any, partition_n: Any, num_clusters: int,
                   settings: TuneSettings = TuneSettings(), **kwargs: Any) -> TuneResult:
    """tune_partitions for one partition [N]: the result's cluster axis is K."""
    return tune_partitions(params, cfg, prepared, task_data, np.asarray(partition_n)[None], num_clusters,
                           settings, **kwargs)


def merged_clusters(prepared: Any, partition_n: Any, num_clusters: int, weights: Any | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> Any:
    """The K merges of a partition (lora leaves with a leading K axis), with per-cluster weights
    [K, N] / [K, N, L] (None: unit weights). Each cluster is merged over its own members only,
    gathered into the member bucket of the largest cluster (`final_member_bucket`), one cluster
    after the other (scoring.merge_members, the scorer's merge): O(K G) work and one merge's
    temporaries, not K merges over all N slots at once. An empty cluster gives zeros.

    With `mesh`: `prepared` as the Scorer placed it (split over "model", `Scorer.placed_prepared`);
    the merge runs on the mesh, each device holding its share, and the results are replicated so
    that every host reads them. Without: on the default device."""
    partition_n = np.asarray(partition_n, np.int32)
    masks_kn = partition_n[None, :] == np.arange(num_clusters)[:, None]
    g = final_member_bucket(int(masks_kn.sum(axis=1).max()), masks_kn.shape[1])
    members_kg, valid_kg = scoring.member_lists(masks_kn, num_clusters, g)
    live_k = masks_kn.any(axis=1)
    if mesh is None:
        w = None if weights is None else jnp.asarray(weights, jnp.float32)
        return _merge_members(prepared, members_kg, valid_kg, live_k, w)
    w = None if weights is None else np.asarray(weights, np.float32)
    if w is not None and prepared.num_adapters > w.shape[1]:  # the Scorer's adapter slots: zero weights
        w = np.pad(w, [(0, 0), (0, prepared.num_adapters - w.shape[1])] + [(0, 0)] * (w.ndim - 2))
    host = (members_kg, valid_kg, live_k) + (() if w is None else (w,))
    placed = sharding_lib.put_global(host, sharding_lib.replicated(mesh))
    return merge_members_on(mesh)(prepared, *placed[:3], None if weights is None else placed[3])


def final_member_bucket(largest_cluster: int, num_adapters: int) -> int:
    """G of the final merge (merged_clusters) of a partition whose largest cluster has
    `largest_cluster` of the N adapters (the prepared merge's unpadded adapter axis)."""
    return scoring.member_bucket(largest_cluster, num_adapters)


_merge_members = jax.jit(scoring.merge_members)  # module-level: one compiled merge per shapes, reused


@functools.lru_cache(maxsize=None)
def merge_members_on(mesh: jax.sharding.Mesh) -> Any:
    """scoring.merge_members jitted for `mesh`, results replicated (merged_clusters with a mesh)."""
    return jax.jit(scoring.merge_members, out_shardings=sharding_lib.replicated(mesh))


def _weighted_merges(prepared: Any, w_k: Any, masks_kn: Any) -> Any:
    """The K merges of masks [K, N] with weights [K, N] / [K, N, L] (or [K, 1]: one shared by a
    cluster's members), lora leaves with a leading K axis (tuning's merge, inside its steps)."""
    w_k = jnp.broadcast_to(w_k, masks_kn.shape + w_k.shape[2:])
    return jax.vmap(lambda w, m: merge_lib.merge_mask(with_weights(prepared, w), m))(w_k, masks_kn)
