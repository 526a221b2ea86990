"""Scores evaluation requests (membership mask, task) in bucketed batches on the accelerator.

Shapes: C requests, N adapters, M distinct masks, R requests per call (a bucket), G members per
merged mask (a bucket), T tasks, n examples per task, S sequence (a bucket), V vocab.

`Scorer.losses(masks_cn, tasks_c)` is what the search engine calls. It
  1. dedupes (mask, task) pairs,
  2. groups them by their task's sequence bucket (a task is scored at the length of its own
     longest example rounded up to {8, 12, 16, 24, ...} * 2^k, not at the longest of all tasks),
  3. splits each group into calls of a bucket size R from a small fixed set (`request_buckets`:
     powers of two times the mesh's "cand" size, up to `batch_size`): on CPU exactly (7 = 4+2+1:
     no padding, batching buys no throughput there), on accelerators rounded up to one bucket,
  4. in each call, merges each distinct mask once from its members only (the mask's adapters
     gathered from every leaf of the merge.Prepared pytree, padded to a power-of-two G: cost
     O(cluster size), not O(N)), then scores the R requests with one vmapped packed loss (each
     request's task packed: its real tokens through the layers, the LM head on its loss
     positions only, as on CPU; attention and the LM head in chunks that keep one device's
     float32 scores and logits within the logits budget).
On one CPU device (the default there, `batched=False`) steps 3-4 run unbatched instead: each
distinct mask is merged once (one executable per member bucket G; G = N: merge_mask on the mask,
no gathered copy) and each request is scored alone (one executable per sequence bucket S; two
requests in flight at once on two host threads):
XLA:CPU gains nothing from a request batch, and a run compiles a handful of executables instead
of one per (R, G, S).
Each (R, G, S) bucket is traced and compiled once (`trace_counts` proves it in tests); with the
persistent compilation cache (`compilation_cache.enable`) a second run compiles nothing.
Compiled shapes do not follow the exact N and T: the adapter axis of the prepared merge inputs is
padded to `slots(N)` (a multiple of SLOT_MULTIPLE) with zero factors, and each sequence bucket's
task axis to `slots(T_b)` with zero examples. Requests name real adapters and tasks only (masks
[C, N], tasks < T), so a padded slot is never a member of a merge nor a scored task: a search over
39 tasks and an add that makes them 40 run the same executables (launch/add.py reuses them
through the persistent cache).
With a mesh the request batch is split over the "cand" axis, the base weights and the prepared
merge inputs over "model"; the mesh may span several processes (every process calls `losses`
with the same requests, and the losses come back fully replicated, identical on every process).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import loss as loss_lib
from d2c_jax import merge as merge_lib
from d2c_jax import packing
from d2c_jax import sharding as sharding_lib
from d2c_jax.data import TaskData
from d2c_jax.errors import UserError
from d2c_jax.merge import Prepared
from d2c_jax.models.config import ModelConfig
from d2c_jax.types import Lora, Params, TokenBatch

MAX_AUTO_BATCH = 256  # --batch_size=auto never goes above this many requests per call
MIN_MEMBER_BUCKET = 8  # merged masks gather at least this many member slots (fewer compilations)
# Host threads that score one call's requests on one CPU device. XLA:CPU runs attention's small
# batched dots and the small elementwise fusions on one core; two requests in flight at once
# overlap those stretches (2 cores: -10 % seconds per request in experiments/benchmark/
# components.py, the same losses; a third thread gained nothing). `Scorer.threads` = 1 turns it off.
SCORING_THREADS = 2
# The adapter axis N and each sequence bucket's task axis are padded up to a multiple of this:
# runs whose N (or T_b) differ by a few share their executables (an add to a finished run), at
# most SLOT_MULTIPLE - 1 zero slots of device memory (the prepared merge inputs are N adapters
# big; a power of two would waste up to N - 1 of them).
SLOT_MULTIPLE = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _scoring_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="d2c-score")
        return _pool


def slots(count: int) -> int:
    """Padded size of an adapter or task axis of `count` rows (see SLOT_MULTIPLE)."""
    return -(-max(int(count), 1) // SLOT_MULTIPLE) * SLOT_MULTIPLE


def member_bucket(count: int, slots: int) -> int:
    """G: member slots of a merge of `count` adapters, a power of two >= MIN_MEMBER_BUCKET (few
    executables), at most `slots` (the adapter axis: G = slots merges over every slot)."""
    return min(max(MIN_MEMBER_BUCKET, 1 << (int(count) - 1).bit_length()), int(slots))


def member_lists(masks_mn: np.ndarray, rows: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """The masks [M, N] as member lists for merge_members: members_mg int32 [rows, g] (mask m's
    adapters first, then index 0) and valid_mg bool [rows, g]; rows past M hold no member."""
    members_mg = np.zeros((rows, g), np.int32)
    valid_mg = np.zeros((rows, g), bool)
    for i, mask_n in enumerate(np.asarray(masks_mn, bool)):
        idx = np.flatnonzero(mask_n)
        members_mg[i, :len(idx)] = idx
        valid_mg[i, :len(idx)] = True
    return members_mg, valid_mg


def pad_axis0(tree: Any, rows: int) -> Any:
    """Every leaf (host or device array, or ShapeDtypeStruct) padded with zeros to `rows` on its
    leading axis, on the host (no compilation); a leaf that already has `rows` is returned as it
    is, and leaves that are one array stay one array (a Prepared's shared factors)."""
    done: dict[int, Any] = {}

    def pad(x: Any) -> Any:
        if x.shape[0] == rows:
            return x
        if x.shape[0] > rows:
            raise ValueError(f"cannot pad {x.shape[0]} rows down to {rows}")
        if id(x) not in done:
            if isinstance(x, jax.ShapeDtypeStruct):
                done[id(x)] = jax.ShapeDtypeStruct((rows,) + tuple(x.shape[1:]), x.dtype, sharding=x.sharding)
            else:
                host = np.asarray(x)
                padded = np.concatenate([host, np.zeros((rows - host.shape[0],) + host.shape[1:], host.dtype)])
                done[id(x)] = jax.device_put(padded) if isinstance(x, jax.Array) else padded
        return done[id(x)]

    return jax.tree.map(pad, tree)


def pow2_buckets(largest: int, multiple: int = 1) -> tuple[int, ...]:
    """multiple * 2^k below `largest` (rounded up to a multiple), then `largest` itself."""
    largest = -(-max(int(largest), 1) // multiple) * multiple
    out, b = [], multiple
    while b < largest:
        out.append(b)
        b *= 2
    return tuple(out) + (largest,)


def split_into_buckets(count: int, buckets: tuple[int, ...], exact: bool) -> list[tuple[int, int]]:
    """(bucket, real rows) per call for `count` rows. exact: the largest bucket that is not
    bigger than what is left (padding only below the smallest bucket); else the smallest
    bucket that holds what is left (at most the largest)."""
    out, left = [], int(count)
    while left > 0:
        if exact:
            fitting = [b for b in buckets if b <= left]
            b = fitting[-1] if fitting else buckets[0]
        else:
            b = next((b for b in buckets if b >= left), buckets[-1])
        out.append((b, min(b, left)))
        left -= out[-1][1]
    return out


def seq_buckets(longest: int, smallest: int = 8) -> tuple[int, ...]:
    """{1, 1.5} * 2^k from `smallest` below `longest`, then `longest` (padding waste < 1/3)."""
    out, b = [], smallest
    while b < longest:
        out.append(b)
        if b * 3 // 2 < longest and (b * 3) % 2 == 0:
            out.append(b * 3 // 2)
        b *= 2
    return tuple(out) + (longest,)


def task_lengths(task_data: TaskData) -> np.ndarray:
    """int[T]: the number of positions each task's longest example needs (right padding)."""
    attn_tns = np.asarray(task_data.attn_tns)
    last_tn = np.where(attn_tns.any(-1), attn_tns.shape[-1] - np.argmax(attn_tns[..., ::-1] != 0, -1), 1)
    return last_tn.max(axis=1)


def memory_per_request(cfg: Any, *, examples: int, seq: int, tokens: int, attention_chunk: int,
                       loss_chunk: int, lora_bytes: int, model_shards: int = 1) -> int:
    """Peak bytes one device holds for one request of a batched call (the packed loss under the
    vmap), float32 throughout: the packed stream's activations ([P, D] residuals; [P, F] MLP and
    [P, (H+2K) Dh] q/k/v, split over the "model" axis as the projections are), q/k/v and the
    attention output gathered into the [n, S] grid, the attention scores and softmax of
    `attention_chunk` examples ([chunk, H, S, S], three temporaries, heads split over "model"),
    the logits of `loss_chunk` positions ([chunk, V], three temporaries, vocab split over
    "model") and its merged adapter (three copies: merged, gathered per request, upcast in the
    projections). Checked against XLA's compiled memory analysis by the dry run (dry_run.py)."""
    m = max(1, int(model_shards))
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    stream = tokens * (2 * cfg.hidden_size + (2 * cfg.intermediate_size + qkv) / m)
    grid = examples * seq * (qkv + cfg.num_heads * cfg.head_dim) / m
    scores = 3 * attention_chunk * cfg.num_heads * seq * seq / m
    logits = 3 * loss_chunk * cfg.vocab_size / m
    return int((stream + grid + scores + logits) * 4 + 3 * lora_bytes)


def device_memory_bytes() -> int:
    """What one device may hold: its allocator's limit, or half the host's RAM on CPU."""
    dev = jax.local_devices()[0]
    try:
        limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - backends without memory stats
        limit = None
    if limit:
        return int(limit)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _placed(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) laid out by `shardings` (one sharding, a
    matching pytree of them, or None: unplaced)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh), tree, shardings)


@dataclasses.dataclass(frozen=True)
class Executable:
    """One jitted function of the Scorer at one bucket, with abstract arguments to lower it
    (`jitted.lower(*args, **static).compile()`), as a run would call it."""

    name: str  # the trace_counts key: "score r16 g64 s320", "packed s96 p512", "merge g8", ...
    jitted: Any
    args: tuple
    static: dict
    requests: int  # evaluations one call scores (0: a merge)
    seq: int  # its sequence bucket (0: a merge)


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class Scorer:
    """Losses of merged adapters on tasks; `num_tasks` and `losses` are the engine's interface."""

    def __init__(
        self,
        params: Params,
        cfg: ModelConfig,
        prepared_merge: Prepared | None,
        task_data: TaskData,
        *,
        batch_size: int | str = "auto",
        mesh: jax.sharding.Mesh | None = None,
        example_chunk: int | None = None,
        logits_budget_bytes: int = 2 << 30,
        exact_split: bool | None = None,
        batched: bool | None = None,
        device_bytes: int | None = None,
    ):
        """`prepared_merge` from merge.prepare_merge (None: only `loss_of_lora` is available).
        `batch_size`: the largest request bucket ("auto": the largest that fits device memory,
        estimated from shapes, at most MAX_AUTO_BATCH); rounded up to a multiple of the mesh's
        "cand" size. `example_chunk` bounds how many examples go through the model at once
        (memory; see loss.py); None picks the largest that keeps one device's float32 logits
        within `logits_budget_bytes`. `exact_split` (default: on CPU) splits calls into
        buckets without padding instead of rounding up to one bucket. `batched` (default: off on
        one CPU device, where batching buys no throughput) scores requests in vmapped calls;
        off, each distinct mask is merged once and each request is scored alone, so a run
        compiles one merge per member bucket and one loss per sequence bucket, nothing more.
        `device_bytes`: one device's memory (default: `device_memory_bytes()`).

        Abstract: with `params` and `prepared_merge` as ShapeDtypeStructs (and a mesh of any
        devices, e.g. a TPU topology's) nothing is placed; the Scorer takes every decision of a
        real one and `executables()` lowers what it would run (dry_run.py)."""
        self.cfg = cfg
        self.mesh = mesh
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        self.device_bytes = device_memory_bytes() if device_bytes is None else int(device_bytes)
        self.num_tasks = task_data.num_tasks
        self.task_names = task_data.names
        self.cand = 1 if mesh is None else mesh.shape[sharding_lib.CAND]
        self.exact_split = jax.default_backend() == "cpu" if exact_split is None else bool(exact_split)
        if batched is None:
            batched = mesh is not None or jax.default_backend() != "cpu"
        if not batched and mesh is not None:
            raise ValueError("unbatched scoring is for one device (mesh None)")
        self.batched = bool(batched)
        n, seq = task_data.tokens_tns.shape[1:]
        self.num_examples_max = int(n)
        self._logits_budget = int(logits_budget_bytes)
        self._example_chunk = example_chunk
        self.trace_counts: collections.Counter[str] = collections.Counter()
        # Work done: score calls, masks merged and requests scored (padding excluded), padding.
        self.stats: collections.Counter[str] = collections.Counter()
        self.num_adapters = None if prepared_merge is None else _num_adapters(prepared_merge)
        # Compiled shapes: N padded to `adapter_slots` with zero factors (never a merge's member).
        self.adapter_slots = None if prepared_merge is None else slots(self.num_adapters)
        if prepared_merge is not None:
            prepared_merge = pad_axis0(prepared_merge, self.adapter_slots)

        data = task_data.batch
        top = int(max(task_data.tokens_tns.max(), task_data.targets_tns.max()))
        if top >= cfg.vocab_size:  # jnp.take would clamp silently
            raise UserError(None, f"the tokenizer produced token id {top}, but the model's "
                            f"vocabulary has {cfg.vocab_size} entries (wrong tokenizer?)")

        # Sequence buckets: task t is scored at seq_bucket_of[t] positions, with the other tasks
        # of that bucket (their arrays sliced once, indexed by local_task[t]).
        lengths_t = task_lengths(task_data)
        sbuckets = seq_buckets(int(seq))
        self.seq_bucket_of = np.array([next(b for b in sbuckets if b >= l) for l in lengths_t], np.int64)
        self.local_task = np.zeros(self.num_tasks, np.int64)
        by_bucket: dict[int, np.ndarray] = {}
        for sb in sorted(set(self.seq_bucket_of.tolist())):
            tasks = np.flatnonzero(self.seq_bucket_of == sb)
            self.local_task[tasks] = np.arange(len(tasks))
            by_bucket[sb] = tasks

        lora_bytes = 0 if prepared_merge is None else tree_bytes(
            jax.eval_shape(merge_lib.merge_mask, prepared_merge,
                           jax.ShapeDtypeStruct((self.adapter_slots,), jnp.bool_)))
        self._lora_bytes = lora_bytes
        self._host_data, self._tasks_by_seq = data, by_bucket
        model = 1 if mesh is None else mesh.shape[sharding_lib.MODEL]
        self._prepared_bytes = 0 if prepared_merge is None else tree_bytes(prepared_merge) // model
        padded_data = pad_axis0(data, slots(self.num_tasks))  # task axis to `slots`: zero examples
        if batch_size == "auto":
            batch_size = self.auto_batch_size(params, prepared_merge, padded_data, int(seq))
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.request_buckets = pow2_buckets(batch_size, self.cand)
        self.batch_size = self.request_buckets[-1]

        rep = None if mesh is None else sharding_lib.replicated(mesh)
        if self.abstract:  # shapes with the shardings a real run places them in
            self._params = _placed(params, None if mesh is None else sharding_lib.param_shardings(params, mesh))
            self._prepared = None if prepared_merge is None else _placed(
                prepared_merge, None if mesh is None else sharding_lib.prepared_shardings(prepared_merge, mesh))
        elif mesh is None:
            self._params = params
            self._prepared = prepared_merge
        else:
            self._params = sharding_lib.shard_params(params, mesh)
            self._prepared = (None if prepared_merge is None
                              else sharding_lib.shard_prepared(prepared_merge, mesh))
        # put_global: host copies -> global arrays, valid when the mesh spans several hosts.
        put = ((lambda b: _placed(jax.tree.map(np.asarray, b), rep)) if self.abstract
               else jax.device_put if mesh is None  # (jnp.asarray would compile a copy per shape)
               else (lambda b: sharding_lib.put_global(jax.tree.map(np.asarray, b), rep)))
        # Task axes padded to `slots` with zero examples (no request ever names a padded task).
        self._data = put(padded_data)  # full length: loss_of_lora
        self._data_by_seq = {sb: put(pad_axis0(self.task_batch(sb), slots(len(tasks))))
                             for sb, tasks in by_bucket.items()}
        # Each bucket's tasks packed (real tokens only; the LM head on loss positions): every
        # bucket for batched calls, unbatched where all n examples' attention fits (`packs`).
        self._packed_by_seq = {sb: put(pad_axis0(packing.pack(self.task_batch(sb)), slots(len(by_bucket[sb]))))
                               for sb in by_bucket if self.batched or self.packs(sb)}
        out = {} if mesh is None else {"out_shardings": rep}  # every host can read the losses
        self._score = jax.jit(self._score_impl, static_argnames=("example_chunk", "loss_chunk"), **out)
        self._single = jax.jit(self._single_impl, static_argnames=("example_chunk",), **out)
        self._merge_one = jax.jit(self._merge_one_impl)
        self._merge_all_slots = jax.jit(self._merge_all_slots_impl)
        self._packed = jax.jit(self._packed_impl, static_argnames=("loss_chunk",))
        # Sequence buckets whose unbatched loss has run once (traced and compiled by one thread).
        self._warm_seq: set[int] = set()
        self.threads = min(SCORING_THREADS, os.cpu_count() or 1)

    @property
    def placed_prepared(self) -> Prepared | None:
        """The prepared merge inputs as this Scorer placed them (on a mesh: split over "model")."""
        return self._prepared

    def auto_batch_size(self, params: Params, prepared: Prepared | None, data: TokenBatch, seq: int) -> int:
        """The largest power-of-two request batch whose estimated memory fits one device next to
        the resident weights, prepared merge inputs and examples (at most MAX_AUTO_BATCH)."""
        resident = tree_bytes(params) + tree_bytes(data) + (0 if prepared is None else tree_bytes(prepared))
        if self.mesh is not None:  # sharded over "model"
            resident = resident // self.mesh.shape[sharding_lib.MODEL]
        free = self.device_bytes - resident
        b = self.cand
        while b * 2 <= MAX_AUTO_BATCH and self.call_bytes(b * 2) <= free:
            b *= 2
        return b

    def call_bytes(self, requests: int) -> int:
        """Estimated temporaries of one device in a batched call of `requests` (the worst
        sequence bucket): its share of the requests (`memory_per_request`) plus the merge's
        gathered inputs (every member slot of one mask at a time, at most all N: a copy of the
        prepared inputs' share of this device)."""
        local = max(1, requests // self.cand)
        worst = 0
        model = 1 if self.mesh is None else self.mesh.shape[sharding_lib.MODEL]
        for sb in self._tasks_by_seq:
            p, q = packing.packed_sizes(self.task_batch(sb))
            worst = max(worst, memory_per_request(
                self.cfg, examples=self.num_examples_max, seq=sb, tokens=p,
                attention_chunk=self.attention_chunk(requests, sb),
                loss_chunk=min(q, self.batched_loss_chunk(requests)), lora_bytes=self._lora_bytes,
                model_shards=model))
        return local * worst + self._prepared_bytes

    def attention_chunk(self, requests: int, seq: int) -> int:
        """Examples attended at a time in a batched call: the most that keep one device's float32
        attention scores (three temporaries) within the logits budget (same chunk count, least
        padding)."""
        n = self.num_examples_max
        if self._example_chunk is not None:
            return max(1, min(int(self._example_chunk), n))
        per_example = max(1, requests // self.cand) * 3 * self.cfg.num_heads * seq * seq * 4
        chunk = max(1, min(n, self._logits_budget // per_example))
        return -(-n // -(-n // chunk))

    def batched_loss_chunk(self, requests: int) -> int:
        """Loss positions per LM-head pass of each request in a batched call: one device's float32
        logits within the logits budget."""
        return max(1, self._logits_budget // (max(1, requests // self.cand) * self.cfg.vocab_size * 4))

    def example_chunk(self, requests: int, seq: int) -> int:
        """Examples per forward pass: the most that keep one device's float32 logits of a call of
        `requests` within the logits budget (same chunk count, least padding)."""
        n = self.num_examples_max
        if self._example_chunk is not None:
            return max(1, min(int(self._example_chunk), n))
        per_example = max(1, requests // self.cand) * seq * self.cfg.vocab_size * 4
        chunk = max(1, min(n, self._logits_budget // per_example))
        return -(-n // -(-n // chunk))

    @property
    def compile_count(self) -> int:
        """How many times any of the jitted functions was traced (tests: one per bucket)."""
        return sum(self.trace_counts.values())

    def task_batch(self, seq: int) -> TokenBatch:
        """The host [T_b, n, seq] examples of sequence bucket `seq`'s tasks."""
        return jax.tree.map(lambda x: np.asarray(x)[self._tasks_by_seq[seq]][:, :, :seq], self._host_data)

    def member_buckets(self, largest_cluster: int) -> tuple[int, ...]:
        """Every member bucket G a merge of up to `largest_cluster` adapters uses."""
        out = {self._member_bucket(c) for c in range(1, int(largest_cluster) + 1)}
        return tuple(sorted(out))

    def executables(self, member_buckets: tuple[int, ...], all_requests: bool = False) -> list[Executable]:
        """What this Scorer compiles for the given member buckets: batched, one score call per
        sequence bucket at the largest member bucket and the largest request bucket (smaller
        buckets hold less; `all_requests`: every request bucket); unbatched, one loss per
        sequence bucket and one merge per member bucket. Arguments are abstract (shapes and the
        shardings a run places them in)."""
        rep = None if self.mesh is None else sharding_lib.replicated(self.mesh)
        batch = (lambda x: x) if self.mesh is None else (
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_lib.batch_sharding(self.mesh, x.ndim)))
        arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
        out = []
        if self.batched:
            g = max(member_buckets)
            for sb in sorted(self._data_by_seq):
                for r in (self.request_buckets if all_requests else self.request_buckets[-1:]):
                    args = (self._params, self._packed_by_seq[sb], self._prepared, arr((r, g), jnp.int32),
                            arr((r, g), jnp.bool_), arr((r,), jnp.bool_), batch(arr((r,), jnp.int32)),
                            batch(arr((r,), jnp.int32)))
                    out.append(Executable(f"score r{r} g{g} s{sb}", self._score, args, self._batched_chunks(r, sb),
                                          r, sb))
            return out
        lora = _placed(jax.eval_shape(merge_lib.merge_mask, self._prepared,
                                      jax.ShapeDtypeStruct((self.adapter_slots,), jnp.bool_)), None)
        task = arr((), jnp.int32)
        for sb in sorted(self._data_by_seq):
            if self.packs(sb):
                pt = self._packed_by_seq[sb]
                out.append(Executable(f"packed s{sb} p{pt.tokens.shape[-1]}", self._packed,
                                      (self._params, pt, lora, task), {"loss_chunk": self.loss_chunk}, 1, sb))
            else:
                out.append(Executable(f"single s{sb}", self._single, (self._params, self._data_by_seq[sb], lora, task),
                                      {"example_chunk": self.example_chunk(1, sb)}, 1, sb))
        for g in member_buckets:
            if g == self.adapter_slots:
                out.append(Executable(f"merge n{g}", self._merge_all_slots,
                                      (self._prepared, arr((g,), jnp.bool_)), {}, 0, 0))
            else:
                out.append(Executable(f"merge g{g}", self._merge_one,
                                      (self._prepared, arr((g,), jnp.int32), arr((g,), jnp.bool_)), {}, 0, 0))
        return out

    # -- traced bodies ------------------------------------------------------------------------

    def _constrain(self, tree: Any) -> Any:
        """Pins the leading (request) axis of every leaf to the "cand" mesh axis."""
        if self.mesh is None:
            return tree
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x, sharding_lib.batch_sharding(self.mesh, x.ndim)), tree)

    def _score_impl(self, params: Params, packed_t: packing.PackedBatch, prepared: Prepared, members_mg: jax.Array,
                    valid_mg: jax.Array, live_m: jax.Array, mask_of_r: jax.Array,
                    tasks_r: jax.Array, *, example_chunk: int, loss_chunk: int) -> jax.Array:
        """A batched call: the call's masks merged from their members, then each request's packed
        loss (real tokens through the layers, the LM head on its loss positions only)."""
        r, g, s = tasks_r.shape[0], members_mg.shape[1], packed_t.attn.shape[-1]
        self.trace_counts[f"score r{r} g{g} s{s}"] += 1
        lora_m = merge_members(prepared, members_mg, valid_mg, live_m)
        lora_r = self._constrain(jax.tree.map(lambda x: jnp.take(x, mask_of_r, axis=0), lora_m))
        pb_r = self._constrain(jax.tree.map(lambda x: jnp.take(x, tasks_r, axis=0), packed_t))
        chunks = {"loss_chunk": loss_chunk, "example_chunk": example_chunk}
        if r == 1:  # no vmap: XLA:CPU runs the unbatched dots faster than batch-1 ones
            lora, pb = jax.tree.map(lambda x: x[0], (lora_r, pb_r))
            return loss_lib.packed_task_loss(params, self.cfg, lora, pb, **chunks)[None]
        return loss_lib.candidate_packed_losses(params, self.cfg, lora_r, pb_r, **chunks)

    def _single_impl(self, params: Params, data_tns: TokenBatch, lora: Lora | None, task: jax.Array, *,
                     example_chunk: int) -> jax.Array:
        self.trace_counts[f"single s{data_tns.shape[-1]}"] += 1
        batch_ns = jax.tree.map(lambda x: jnp.take(x, task, axis=0), data_tns)
        return loss_lib.task_loss(params, self.cfg, lora, batch_ns, example_chunk=example_chunk)

    def _packed_impl(self, params: Params, packed_t: packing.PackedBatch, lora: Lora | None, task: jax.Array, *,
                     loss_chunk: int) -> jax.Array:
        self.trace_counts[f"packed s{packed_t.attn.shape[-1]} p{packed_t.tokens.shape[-1]}"] += 1
        pb = jax.tree.map(lambda x: jnp.take(x, task, axis=0), packed_t)
        return loss_lib.packed_task_loss(params, self.cfg, lora, pb, loss_chunk=loss_chunk)

    @property
    def placed_params(self) -> Params:
        """The base weights as this scorer holds them (ShapeDtypeStructs with their shardings
        when built from shapes)."""
        return self._params

    @property
    def loss_chunk(self) -> int:
        """Loss positions per LM-head pass of the packed path: float32 logits within the budget."""
        return max(1, self._logits_budget // (self.cfg.vocab_size * 4))

    def _merge_one_impl(self, prepared: Prepared, members_g: jax.Array, valid_g: jax.Array) -> Lora:
        self.trace_counts[f"merge g{members_g.shape[0]}"] += 1
        return merge_lib.merge_gathered(prepared, members_g, valid_g)

    def _merge_all_slots_impl(self, prepared: Prepared, mask_n: jax.Array) -> Lora:
        self.trace_counts[f"merge n{mask_n.shape[0]}"] += 1
        return merge_lib.merge_mask(prepared, mask_n)

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

        # Distinct (mask, task) requests, ordered by (sequence bucket, mask) so that a call's
        # requests share as few masks as possible.
        keys = np.concatenate([masks_cn.astype(np.int64), tasks_c[:, None]], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        umasks, mask_of_req = np.unique(uniq[:, :-1].astype(bool), axis=0, return_inverse=True)
        mask_of_req = mask_of_req.reshape(-1)
        req_tasks = uniq[:, -1]
        if not self.batched:
            return self._losses_one_by_one(umasks, mask_of_req, req_tasks)[inverse.reshape(-1)]
        order = np.lexsort((mask_of_req, self.seq_bucket_of[req_tasks]))
        out = np.empty(len(uniq), np.float32)
        pending = []  # (request rows, device losses): every call is dispatched before any is read
        for sb in np.unique(self.seq_bucket_of[req_tasks]):
            rows = order[self.seq_bucket_of[req_tasks[order]] == sb]
            r0 = 0
            for bucket, real in split_into_buckets(len(rows), self.request_buckets, self.exact_split):
                rr = rows[r0:r0 + real]
                r0 += real
                pending.append((rr, self._call(umasks, mask_of_req[rr], req_tasks[rr], int(sb), bucket)))
        for rr, losses_r in pending:
            out[rr] = np.asarray(losses_r)[: len(rr)]
        return out[inverse.reshape(-1)]

    def _member_bucket(self, count: int) -> int:
        """G: member slots of a merge of `count` adapters (a power of two >= 8, at most the padded
        N, `adapter_slots`)."""
        return member_bucket(count, self.adapter_slots)

    def packs(self, seq: int) -> bool:
        """Whether the unbatched scorer packs the tasks of sequence bucket `seq`: yes unless all
        n examples' float32 attention scores at once ([n, H, S, S], a few temporaries) would
        exceed the logits budget; then the padded loss runs `example_chunk` examples at a time."""
        return 3 * self.num_examples_max * self.cfg.num_heads * seq * seq * 4 <= self._logits_budget

    def _score_alone(self, lora: Lora | None, t: int) -> jax.Array:
        """Loss of one adapter on task t (unbatched), packed where it fits (`packs`)."""
        sb = int(self.seq_bucket_of[t])
        if self.packs(sb):
            return self._packed(self._params, self._packed_by_seq[sb], lora, np.int32(self.local_task[t]),
                                loss_chunk=self.loss_chunk)
        return self._single(self._params, self._data_by_seq[sb], lora, np.int32(self.local_task[t]),
                            example_chunk=self.example_chunk(1, sb))

    def merge(self, mask_n: np.ndarray) -> Lora:
        """merge_mask of one (non-empty) mask [N] of real adapters, with the unbatched scorer's
        merge executables."""
        mask_n = np.asarray(mask_n, bool)
        if mask_n.shape != (self.num_adapters,):
            raise ValueError(f"mask_n has shape {mask_n.shape}, expected ({self.num_adapters},)")
        idx = np.flatnonzero(mask_n)
        if not len(idx):
            raise ValueError("a merge needs at least one member")
        g = self._member_bucket(len(idx))
        if g == self.adapter_slots:  # every slot: merge_mask on the mask, no [N, ...] gathered copy
            return self._merge_all_slots(self._prepared, pad_axis0(mask_n, g))
        members_g, valid_g = member_lists(mask_n[None], 1, g)
        return self._merge_one(self._prepared, members_g[0], valid_g[0])

    def _losses_one_by_one(self, umasks: np.ndarray, mask_of_req: np.ndarray, req_tasks: np.ndarray) -> np.ndarray:
        """Unbatched: each distinct mask merged once, each request scored alone, `threads`
        requests in flight at once. The first request of a sequence bucket whose executable has
        not run yet goes alone first, so each executable is traced and compiled by one thread."""
        loras = [self.merge(mask_n) for mask_n in umasks]
        out = np.empty(len(req_tasks), np.float32)

        def one(i: int) -> float:
            return float(self._score_alone(loras[mask_of_req[i]], int(req_tasks[i])))

        rest = []
        for i, t in enumerate(req_tasks):
            sb = int(self.seq_bucket_of[t])
            if sb in self._warm_seq:
                rest.append(i)
            else:
                out[i] = one(i)
                self._warm_seq.add(sb)
        if self.threads > 1 and len(rest) > 1:
            futures = [_scoring_pool().submit(one, i) for i in rest]
            try:
                out[rest] = [f.result() for f in futures]
            finally:  # an error or Ctrl-C here: drop the requests not started yet
                for f in futures:
                    f.cancel()
        else:
            for i in rest:
                out[i] = one(i)
        self.stats.update(score_calls=len(req_tasks), masks_merged=len(umasks), requests_scored=len(req_tasks))
        return out

    def _call(self, umasks: np.ndarray, mask_ids: np.ndarray, tasks: np.ndarray, sb: int, bucket: int):
        """One jitted call for `bucket` request slots (the first len(tasks) real)."""
        distinct, mask_of_r = np.unique(mask_ids, return_inverse=True)
        masks_mn = umasks[distinct]
        g = self._member_bucket(masks_mn.sum(axis=1).max())
        members_mg, valid_mg = member_lists(masks_mn, bucket, g)
        live_m = np.arange(bucket) < len(masks_mn)
        self.stats.update(score_calls=1, masks_merged=len(masks_mn), requests_scored=len(tasks),
                          padded_requests=bucket - len(tasks))
        mask_of_r = pad_rows(mask_of_r.astype(np.int32).reshape(-1), bucket)
        tasks_r = pad_rows(self.local_task[tasks].astype(np.int32), bucket)
        return self._score(self._params, self._packed_by_seq[sb], self._prepared,
                           *(self._put(x, batch=False) for x in (members_mg, valid_mg, live_m)),
                           *(self._put(x) for x in (mask_of_r, tasks_r)), **self._batched_chunks(bucket, sb))

    def _batched_chunks(self, requests: int, seq: int) -> dict[str, int]:
        return {"example_chunk": self.attention_chunk(requests, seq), "loss_chunk": self.batched_loss_chunk(requests)}

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
        if not self.batched:  # at its task's bucket: the unbatched scorer's executable
            return float(self._score_alone(lora, t))
        seq = int(self._data.shape[-1])
        return float(self._single(self._params, self._data, lora, task,
                                  example_chunk=self.example_chunk(1, seq)))

    def _put(self, x: np.ndarray, batch: bool = True) -> Any:
        """Host array -> the call's input: leading axis over "cand" (batch) or replicated."""
        if self.mesh is None:
            return x
        if batch:
            return sharding_lib.put_global(x, sharding_lib.batch_sharding(self.mesh, x.ndim))
        return sharding_lib.put_global(x, sharding_lib.replicated(self.mesh))


def merge_members(prepared: Prepared, members_mg: jax.Array, valid_mg: jax.Array, live_m: jax.Array,
                  weights_m: jax.Array | None = None) -> Lora:
    """Merges M masks given as member lists: mask m is the adapters members_mg[m, valid_mg[m]].

    Each mask is merge.merge_gathered of its G member slots (the unbatched scorer's merge), so a
    merge costs O(G), not O(N). Slots past the members (index 0, not valid) are masked out.
    Masks are merged one after the other (lax.map): one merge's temporaries, one compiled merge.
    Rows with live_m False are padding and skip the merge (zeros). `weights_m` [M, N] or
    [M, N, L]: mask m merged with weights weights_m[m] (merge.with_weights; None: unit weights).
    """
    def one(args):
        members_g, valid_g, live, w = args
        p = prepared if w is None else merge_lib.with_weights(prepared, w)

        def skip(prepared, members_g, valid_g):
            shapes = jax.eval_shape(merge_lib.merge_gathered, prepared, members_g, valid_g)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        return jax.lax.cond(live, merge_lib.merge_gathered, skip, p, members_g, valid_g)

    return jax.lax.map(one, (members_mg, valid_mg, live_m, weights_m))


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
