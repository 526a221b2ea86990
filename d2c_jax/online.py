"""Adapters that arrive after a search: place each where its examples say it fits, no new search.

Shapes: N adapters (= tasks; adapter i is the adapter of task i), K clusters, P chains, C requests.
A partition here is int32[N] with -1 for adapters not (yet, or no longer) in the run, so one
Scorer over every adapter serves a whole stream of arrivals and removals.

Placement of a new adapter t under the run's objective (lower is better):
  local   Δ_c = loss(merge(c ∪ {t}), t)
  global  Δ_c = loss(merge(c ∪ {t}), t) + Σ_{u ∈ c} [loss(merge(c ∪ {t}), u) − loss(merge(c), u)]
  a new cluster, while fewer than `max_clusters` exist: Δ = loss(t's own adapter, t)
With per-task weights w (`weights_n`), every loss of task u above counts w_u times: e.g. w_u = 1 /
loss(u's own adapter, u) makes each term a change relative to what u's own adapter reaches, the
loss analogue of the S-score's per-task ratio (tasks with large losses no longer dominate).
t joins the candidate of lowest Δ (the first on ties); only that cluster's merge changes. The
candidates are scored in ONE `LossCache.resolve` call (the current losses loss(merge(c), u) are in
the cache already); with the local objective the chosen cluster's other tasks are then scored under
its new merge in one more call, so one arrival costs K (+1 with room for a new cluster) + |c|
evaluations; with the global one N + K, all in the first call.

`refine` runs the D²C search (`search.run_search`) warm-started from the current partition, over
the adapters in the run only (`SubsetScorer`), so any task may move.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from d2c_jax.run_config import OBJECTIVES, SearchSettings
from d2c_jax.search import Checkpointer, LossCache, Scorer, SearchResult, SearchState, run_search
from d2c_jax.strategies import d2c


class SubsetScorer:
    """The adapters `idx` of a larger scorer as a scorer of their own (engine index i = idx[i])."""

    def __init__(self, scorer: Scorer, idx: Sequence[int]):
        self.scorer, self.idx = scorer, np.asarray(idx, np.int64)
        self.num_tasks = len(self.idx)

    def losses(self, masks_cn: np.ndarray, tasks_c: np.ndarray) -> np.ndarray:
        masks_cn = np.asarray(masks_cn, bool)
        full_cn = np.zeros((len(masks_cn), self.scorer.num_tasks), bool)
        full_cn[:, self.idx] = masks_cn
        return self.scorer.losses(full_cn, self.idx[np.asarray(tasks_c, np.int64)])


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one arrival went and what it cost."""

    task: int
    cluster: int  # its label in the new partition
    opened: bool  # a new cluster
    candidates: tuple[int, ...]  # the labels tried (a new cluster: its label)
    changes: tuple[float, ...]  # Δ of each candidate
    evaluations: int
    seconds: float


def labels(partition_n: np.ndarray) -> list[int]:
    """The cluster labels in use, ascending."""
    p = np.asarray(partition_n)
    return sorted(int(c) for c in np.unique(p[p >= 0]))


def cluster_requests(partition_n: np.ndarray, label: int) -> list[d2c.Request]:
    """(mask, task) of every task of cluster `label` under its cluster's merge."""
    mask_n = np.asarray(partition_n) == label
    return [(mask_n, int(t)) for t in np.flatnonzero(mask_n)]


def partition_requests(partition_n: np.ndarray) -> list[d2c.Request]:
    return [r for c in labels(partition_n) for r in cluster_requests(partition_n, c)]


def seeded_cache(partition_n: np.ndarray, losses_n: np.ndarray, max_size: int = 0) -> LossCache:
    """A LossCache holding each present task's loss under its cluster's merge (e.g. partition.json's
    task_losses), so placement never scores those again."""
    reqs = partition_requests(partition_n)
    if not reqs:
        return LossCache(len(partition_n), max_size)
    cache = LossCache.from_arrays(len(partition_n), np.array([m for m, _ in reqs], np.uint8),
                                  np.array([t for _, t in reqs], np.int32),
                                  np.array([losses_n[t] for _, t in reqs], np.float32))
    cache.max_size = max_size
    return cache


def task_losses(scorer: Scorer, cache: LossCache, partition_n: np.ndarray) -> tuple[np.ndarray, int]:
    """(float64[N] each present task's loss under its cluster's merge, NaN elsewhere; evaluations)."""
    reqs = partition_requests(partition_n)
    losses_c, stats = cache.resolve(scorer, reqs)
    out = np.full(len(partition_n), np.nan)
    for (_, t), loss in zip(reqs, losses_c):
        out[t] = loss
    return out, stats.evaluations


def place(scorer: Scorer, cache: LossCache, partition_n: np.ndarray, new: int, *, objective: str = "local",
          max_clusters: int | None = None, weights_n: np.ndarray | None = None) -> tuple[np.ndarray, Placement]:
    """(new partition, Placement) of adapter `new` (absent from `partition_n`), see the module
    docstring. `max_clusters`: the most clusters allowed (None: no new cluster is opened);
    `weights_n`: float[N] each task's weight in Δ (None: 1)."""
    start = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    partition_n = np.asarray(partition_n, np.int32)
    if partition_n[new] >= 0:
        raise ValueError(f"adapter {new} is already in the partition")
    present = labels(partition_n)
    candidates: list[tuple[int, list[d2c.Request], list[d2c.Request]]] = []  # (label, after, before)
    for c in present:
        before = cluster_requests(partition_n, c)
        after_n = (partition_n == c).copy()
        after_n[new] = True
        after = [(after_n, new)] + ([(after_n, t) for _, t in before] if objective == "global" else [])
        candidates.append((c, after, before if objective == "global" else []))
    if max_clusters is not None and len(present) < max_clusters:
        alone = np.zeros(len(partition_n), bool)
        alone[new] = True
        free = next(k for k in range(max_clusters + 1) if k not in present)
        candidates.append((free, [(alone, new)], []))
    if not candidates:
        raise ValueError("no cluster to place the adapter in")
    requests = [r for _, after, before in candidates for r in after + before]
    losses_c, stats = cache.resolve(scorer, requests)
    w_n = np.ones(len(partition_n)) if weights_n is None else np.asarray(weights_n, np.float64)
    changes, i = [], 0
    for _, after, before in candidates:
        a = [w_n[t] * float(x) for (_, t), x in zip(after, losses_c[i:i + len(after)])]
        b = [w_n[t] * float(x) for (_, t), x in zip(before, losses_c[i + len(after):i + len(after) + len(before)])]
        i += len(after) + len(before)
        changes.append(math.fsum(a) - math.fsum(b))
    best = int(np.argmin(changes))  # the first of equal minima
    label = candidates[best][0]
    out = partition_n.copy()
    out[new] = label
    _, more = cache.resolve(scorer, cluster_requests(out, label))  # cached with the global objective
    placement = Placement(task=int(new), cluster=int(label), opened=label not in present,
                          candidates=tuple(c for c, _, _ in candidates), changes=tuple(float(x) for x in changes),
                          evaluations=stats.evaluations + more.evaluations, seconds=time.perf_counter() - start)
    return out, placement


def remove(scorer: Scorer, cache: LossCache, partition_n: np.ndarray, task: int) -> tuple[np.ndarray, int]:
    """(new partition without `task`, evaluations): its cluster is merged again without it and its
    other tasks scored (a cluster left empty disappears)."""
    out = np.asarray(partition_n, np.int32).copy()
    label = int(out[task])
    if label < 0:
        raise ValueError(f"adapter {task} is not in the partition")
    out[task] = -1
    _, stats = cache.resolve(scorer, cluster_requests(out, label))
    return out, stats.evaluations


def compact(partition_n: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..k-1 in order of each cluster's lowest member (-1 kept)."""
    partition_n = np.asarray(partition_n, np.int32)
    out = np.full_like(partition_n, -1)
    order = sorted(labels(partition_n), key=lambda c: int(np.flatnonzero(partition_n == c)[0]))
    for new, c in enumerate(order):
        out[partition_n == c] = new
    return out


def refine(scorer: Scorer, partition_n: np.ndarray, losses_n: np.ndarray, iterations: int, *,
           objective: str = "local", population: int = 1, proposals: int = 1, seed: int = 0,
           checkpointer: Checkpointer | None = None, should_stop: Callable[[], bool] | None = None,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray, SearchResult]:
    """A short D²C search over the adapters in the run, warm-started from `partition_n` (every
    chain) with its known losses `losses_n` cached. Returns (partition int32[N] with -1 kept, in
    `compact` labels; its per-task losses float64[N], NaN where absent; the engine's result, whose
    `preempted` says `should_stop` stopped it)."""
    partition_n = compact(partition_n)
    idx = np.flatnonzero(partition_n >= 0)
    sub = SubsetScorer(scorer, idx)
    sub_partition = partition_n[idx]
    k = len(labels(sub_partition))
    settings = SearchSettings(num_clusters=k, iterations=int(iterations), objective=objective, population=population,
                              proposals=proposals, seed=seed)
    start = SearchState(np.repeat(sub_partition[None], population, axis=0), 0,
                        seeded_cache(sub_partition, np.asarray(losses_n)[idx]), [])
    result = run_search(sub, settings, checkpointer=checkpointer, should_stop=should_stop, progress=progress,
                        desc="refine", start=start)
    out = np.full(len(partition_n), -1, np.int32)
    out[idx] = result.partition_n
    losses = np.full(len(partition_n), np.nan)
    losses[idx] = result.task_losses_n
    return compact(out), losses, result


def summary(partition_n: np.ndarray, losses_n: np.ndarray) -> dict[str, Any]:
    """The partition.json numbers of a partition: objective and per-cluster sums over present tasks."""
    partition_n = np.asarray(partition_n)
    return {
        "objective": math.fsum(float(losses_n[t]) for t in np.flatnonzero(partition_n >= 0)),
        "cluster_objectives": [math.fsum(float(losses_n[t]) for t in np.flatnonzero(partition_n == c))
                               for c in labels(partition_n)],
    }
