"""Scores evaluation requests (membership mask, task) in fixed-shape batches on the accelerator.

Shapes: C requests, N adapters, M distinct masks, B batch (requests or masks per call), T tasks,
n examples per task, S sequence.

`Scorer.losses(masks_cn, tasks_c)` is what the search engine calls. It
  1. dedupes (mask, task) pairs and the masks among them,
  2. merges each distinct mask once, B masks per call of one jitted merge function,
  3. scores the requests of each merged block B at a time with one jitted score function that
     gathers each request's merged adapter and task arrays on device,
padding the last blocks with dummy entries whose results are dropped. Every call has the same
shapes, so nothing recompiles after the first call (`trace_counts` proves it in tests). With a
mesh the request/mask batch is split over the "cand" axis and the base weights over "model";
the mesh may span several processes (every process calls `losses` with the same requests, and
the losses come back fully replicated, identical on every process).
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import loss as loss_lib
from d2c_jax import merge as merge_lib
from d2c_jax import sharding as sharding_lib
from d2c_jax.data import TaskData
from d2c_jax.errors import UserError
from d2c_jax.merge import Prepared
from d2c_jax.models.config import ModelConfig
from d2c_jax.types import Lora, Params, TokenBatch


class Scorer:
    """Losses of merged adapters on tasks; `num_tasks` and `losses` are the engine's interface."""

    def __init__(
        self,
        params: Params,
        cfg: ModelConfig,
        prepared_merge: Prepared | None,
        task_data: TaskData,
        *,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        example_chunk: int | None = None,
        logits_budget_bytes: int = 2 << 30,
    ):
        """`prepared_merge` from merge.prepare_merge (None: only `loss_of_lora` is available).
        `batch_size` is rounded up to a multiple of the mesh's "cand" size. `example_chunk`
        bounds how many examples go through the model at once (memory; see loss.py); None picks
        the largest that keeps one device's float32 logits within `logits_budget_bytes`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.mesh = mesh
        self.num_tasks = task_data.num_tasks
        self.task_names = task_data.names
        cand = 1 if mesh is None else mesh.shape[sharding_lib.CAND]
        self.batch_size = -(-int(batch_size) // cand) * cand
        n, seq = task_data.tokens_tns.shape[1:]
        if example_chunk is None:
            per_example = (self.batch_size // cand) * seq * cfg.vocab_size * 4
            example_chunk = max(1, min(n, int(logits_budget_bytes) // per_example))
            example_chunk = -(-n // -(-n // example_chunk))  # same chunk count, least padding
        self.example_chunk = int(example_chunk)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        # Work done: merge/score calls, masks merged and requests scored (padding excluded).
        self.stats: collections.Counter[str] = collections.Counter()
        self.num_adapters = None if prepared_merge is None else _num_adapters(prepared_merge)

        data = task_data.batch
        top = int(max(task_data.tokens_tns.max(), task_data.targets_tns.max()))
        if top >= cfg.vocab_size:  # jnp.take would clamp silently
            raise UserError(None, f"the tokenizer produced token id {top}, but the model's "
                            f"vocabulary has {cfg.vocab_size} entries (wrong tokenizer?)")
        if mesh is None:
            self._params = params
            self._data = jax.tree.map(jnp.asarray, data)
            self._prepared = prepared_merge
            self._merge = jax.jit(self._merge_impl)
            self._score = jax.jit(self._score_impl)
            self._single = jax.jit(self._single_impl)
        else:
            rep = sharding_lib.replicated(mesh)
            self._params = sharding_lib.shard_params(params, mesh)
            # put_global: host copies -> global arrays, valid when the mesh spans several hosts.
            self._data = sharding_lib.put_global(data, rep)
            self._prepared = (None if prepared_merge is None
                              else sharding_lib.put_global(prepared_merge, rep))
            # Outputs replicated: every host can read the losses (multi-host safe).
            self._merge = jax.jit(self._merge_impl)
            self._score = jax.jit(self._score_impl, out_shardings=rep)
            self._single = jax.jit(self._single_impl, out_shardings=rep)

    @property
    def compile_count(self) -> int:
        """How many times any of the jitted functions was traced (tests: stays constant)."""
        return sum(self.trace_counts.values())

    # -- traced bodies ------------------------------------------------------------------------

    def _constrain(self, tree: Any) -> Any:
        """Pins the leading (request) axis of every leaf to the "cand" mesh axis."""
        if self.mesh is None:
            return tree
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x, sharding_lib.batch_sharding(self.mesh, x.ndim)), tree)

    def _merge_impl(self, prepared: Any, masks_bn: jax.Array) -> Any:
        self.trace_counts["merge"] += 1
        masks_bn = self._constrain(masks_bn)
        return self._constrain(jax.vmap(merge_lib.merge_mask, in_axes=(None, 0))(prepared, masks_bn))

    def _score_impl(self, params: Params, data_tns: TokenBatch, lora_m: Lora, idx_b: jax.Array,
                    tasks_b: jax.Array) -> jax.Array:
        self.trace_counts["score"] += 1
        lora_b = self._constrain(jax.tree.map(lambda x: jnp.take(x, idx_b, axis=0), lora_m))
        batch_bns = self._constrain(jax.tree.map(lambda x: jnp.take(x, tasks_b, axis=0), data_tns))
        return loss_lib.candidate_losses(params, self.cfg, lora_b, batch_bns,
                                         example_chunk=self.example_chunk)

    def _single_impl(self, params: Params, data_tns: TokenBatch, lora: Lora | None,
                     task: jax.Array) -> jax.Array:
        self.trace_counts["single"] += 1
        batch_ns = jax.tree.map(lambda x: jnp.take(x, task, axis=0), data_tns)
        return loss_lib.task_loss(params, self.cfg, lora, batch_ns, example_chunk=self.example_chunk)

    # -- public -------------------------------------------------------------------------------

    def losses(self, masks_cn: np.ndarray, tasks_c: np.ndarray) -> np.ndarray:
        """Loss of merge(mask) on task, per request: float32 [C]."""
        if self._prepared is None:
            raise ValueError("this Scorer was built without a prepared merge")
        masks_cn = np.asarray(masks_cn, dtype=bool)
        tasks_c = np.asarray(tasks_c, dtype=np.int64).reshape(-1)
        c = tasks_c.shape[0]
        if masks_cn.shape != (c, self.num_adapters):
            raise ValueError(f"masks_cn has shape {masks_cn.shape}, expected ({c}, {self.num_adapters})")
        if c == 0:
            return np.zeros((0,), np.float32)
        if (tasks_c < 0).any() or (tasks_c >= self.num_tasks).any():
            raise ValueError(f"task index out of range [0, {self.num_tasks})")
        if not masks_cn.any(axis=1).all():
            raise ValueError("every mask needs at least one member")

        # Distinct (mask, task) requests, sorted by mask so a mask's requests are contiguous.
        keys = np.concatenate([masks_cn.astype(np.int64), tasks_c[:, None]], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        umasks, mask_of_req = np.unique(uniq[:, :-1].astype(bool), axis=0, return_inverse=True)
        mask_of_req = mask_of_req.reshape(-1)
        req_tasks = uniq[:, -1].astype(np.int32)

        b = self.batch_size
        out = np.empty(len(uniq), np.float32)
        pending: list = []  # (request rows, device losses) of the blocks still in flight
        for m0 in range(0, len(umasks), b):
            block = pad_rows(umasks[m0:m0 + b], b)
            lora_m = self._merge(self._prepared, self._put(block))
            self.stats.update(merge_calls=1, masks_merged=min(b, len(umasks) - m0))
            reqs = np.nonzero((mask_of_req >= m0) & (mask_of_req < m0 + b))[0]
            block_pending = []
            for r0 in range(0, len(reqs), b):
                rr = reqs[r0:r0 + b]
                idx = pad_rows((mask_of_req[rr] - m0).astype(np.int32), b)
                tasks = pad_rows(req_tasks[rr], b)
                self.stats.update(score_calls=1, requests_scored=len(rr))
                block_pending.append((rr, self._score(self._params, self._data, lora_m,
                                                      self._put(idx), self._put(tasks))))
            # Reading the previous block's losses keeps at most two merged blocks alive on device
            # while the accelerator stays busy with this one.
            for rr, losses_b in pending:
                out[rr] = np.asarray(losses_b)[: len(rr)]
            pending = block_pending
        for rr, losses_b in pending:
            out[rr] = np.asarray(losses_b)[: len(rr)]
        return out[inverse.reshape(-1)]

    def loss_of_lora(self, lora: Lora | None, task: int | str) -> float:
        """Loss of any adapter (lora pytree, scaling folded in; None = the base model) on a task."""
        t = self.task_names.index(task) if isinstance(task, str) else int(task)
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task index {t} out of range [0, {self.num_tasks})")
        task = np.int32(t)
        if self.mesh is not None:  # global arrays only: host values may not enter a multi-host jit
            rep = sharding_lib.replicated(self.mesh)
            lora = None if lora is None else sharding_lib.put_global(lora, rep)
            task = sharding_lib.put_global(task, rep)
        return float(self._single(self._params, self._data, lora, task))

    def _put(self, x: np.ndarray) -> Any:
        if self.mesh is None:
            return x
        return sharding_lib.put_global(x, sharding_lib.batch_sharding(self.mesh, x.ndim))


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pads the leading axis to `rows` by repeating row 0 (a valid dummy whose result is dropped)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)], axis=0)


def _num_adapters(prepared: Any) -> int:
    """N: every leaf of a prepared merge is stacked over the adapter axis."""
    n = getattr(prepared, "num_adapters", None)
    if n is not None:
        return int(n)
    return int(jax.tree.leaves(prepared)[0].shape[0])
