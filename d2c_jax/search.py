"""The search engine: proposals of all chains, request dedupe, loss cache, one scoring call,
acceptance, exchange, objective tracking, checkpoints.

The engine needs only a scorer: an object with `num_tasks` (= N adapters; adapter i is the adapter
of task i) and `losses(masks_cn: bool[C, N], tasks_c: int[C]) -> float32[C]`, the loss on task
tasks_c[c] of the merge of the adapters in masks_cn[c]. The scorer is assumed to be a pure function
of (mask, task): each pair is scored once and kept in the loss cache.

One iteration (for every chain p, in lock-step):
  1. draw M proposals from the stream (seed, PROPOSE, iteration, p) (`strategies.d2c.sample_move`),
  2. gather the before/after requests of all proposals of all chains, drop duplicates and those in
     the cache, and score the rest in ONE `scorer.losses` call (the scorer pads to fixed batches),
  3. per chain apply the proposal with the largest gain if it improves (gain > 0), else nothing,
  4. every `exchange_every` iterations replace the worst chains by the best (strategies.population),
  5. every `track_every` iterations (and at the last one and at exchanges) compute every chain's
     global objective (summed loss of each task under its cluster's merge) through the cache.
Random numbers are drawn before any scoring, from streams keyed by (seed, purpose, iteration,
chain), so they never depend on cache hits, batch size, or where the run was resumed. The result
(best chain's final partition, lowest global objective, first chain on ties) is therefore a pure
function of the settings and the scorer. `find_partition` is the one dispatcher from a strategy
name (d2c or a baseline of strategies/baselines.py) to a SearchResult.

Shapes: P chains, N adapters (= tasks), K clusters, M proposals, C requests, Q cache entries.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from d2c_jax.errors import UserError
from d2c_jax.run_config import SEARCH_STRATEGIES, SearchSettings
from d2c_jax.strategies import baselines, d2c, population


class Scorer(Protocol):
    num_tasks: int

    def losses(self, masks_cn: np.ndarray, tasks_c: np.ndarray) -> np.ndarray: ...


class AdapterFactors(Protocol):
    """What the weight-space baselines read: lora.AdapterSet's stacked raw factors."""

    a: Mapping[str, np.ndarray]
    b: Mapping[str, np.ndarray]


class Checkpointer(Protocol):
    """What the engine needs from `d2c_jax.checkpoint.Checkpointer`."""

    def restore(self, num_adapters: int) -> SearchState | None: ...

    def save(self, state: SearchState, force: bool = False) -> bool: ...

    def reached_preemption(self, step: int) -> bool: ...


@dataclasses.dataclass
class ResolveStats:
    """Counts of one or more `LossCache.resolve` calls."""

    requests: int = 0  # requests asked for, duplicates included
    unique: int = 0  # distinct (mask, task) pairs among them
    hits: int = 0  # distinct pairs found in the cache
    evaluations: int = 0  # distinct pairs sent to the scorer
    seconds: float = 0.0  # time spent in the scorer

    def __iadd__(self, other: ResolveStats) -> ResolveStats:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


class LossCache:
    """Loss per (mask, task) in least-recently-used order, at most `max_size` entries (0: unbounded).

    A hit moves the entry to the end; past max_size the oldest entries go. An evicted pair is just
    scored again when asked for (the scorer is a pure function of (mask, task)). The order is what
    a checkpoint saves and restores, so a resumed run evicts exactly what an uninterrupted one does.
    """

    def __init__(self, num_adapters: int, max_size: int = 0):
        self.num_adapters = num_adapters
        self.max_size = max_size
        self._losses: dict[tuple[bytes, int], float] = {}

    def __len__(self) -> int:
        return len(self._losses)

    @staticmethod
    def key(mask_n: np.ndarray, task: int) -> tuple[bytes, int]:
        return np.packbits(np.asarray(mask_n, bool)).tobytes(), int(task)

    def missing(self, requests: Sequence[d2c.Request]) -> bool:
        """Whether any request is not cached."""
        return any(self.key(mask_n, task) not in self._losses for mask_n, task in requests)

    def resolve(self, scorer: Scorer, requests: Sequence[d2c.Request]) -> tuple[np.ndarray, ResolveStats]:
        """float64[C] losses of the requests; the missing distinct ones in ONE scorer call."""
        keys = [self.key(mask_n, task) for mask_n, task in requests]
        missing: dict[tuple[bytes, int], d2c.Request] = {}
        for k, req in zip(keys, requests):
            if k not in self._losses and k not in missing:
                missing[k] = req
        stats = ResolveStats(requests=len(keys), unique=len(set(keys)))
        stats.evaluations = len(missing)
        stats.hits = stats.unique - stats.evaluations
        if missing:
            masks_cn = np.stack([np.asarray(m, bool) for m, _ in missing.values()])
            tasks_c = np.array([t for _, t in missing.values()], np.int32)
            start = time.perf_counter()
            losses_c = np.asarray(scorer.losses(masks_cn, tasks_c), np.float32)
            stats.seconds = time.perf_counter() - start
            if losses_c.shape != (len(missing),):
                raise ValueError(f"scorer returned shape {losses_c.shape} for {len(missing)} requests")
            for k, loss in zip(missing, losses_c):
                self._losses[k] = float(loss)
        losses = np.array([self._losses[k] for k in keys], np.float64)
        for k in dict.fromkeys(keys):  # most recently used last (hits and new entries alike)
            self._losses[k] = self._losses.pop(k)
        self.evict()
        return losses, stats

    def evict(self) -> None:
        """Drops the least recently used entries beyond max_size."""
        excess = len(self._losses) - self.max_size if self.max_size else 0
        for k in list(itertools.islice(self._losses, max(excess, 0))):
            del self._losses[k]

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks uint8[Q, N] of 0/1, tasks int32[Q], losses float32[Q]) in insertion order."""
        q, n = len(self._losses), self.num_adapters
        masks_qn = np.zeros((q, n), np.uint8)
        tasks_q = np.zeros(q, np.int32)
        losses_q = np.zeros(q, np.float32)
        for i, ((packed, task), loss) in enumerate(self._losses.items()):
            masks_qn[i] = np.unpackbits(np.frombuffer(packed, np.uint8), count=n)
            tasks_q[i], losses_q[i] = task, loss
        return masks_qn, tasks_q, losses_q

    @classmethod
    def from_arrays(cls, num_adapters: int, masks_qn: np.ndarray, tasks_q: np.ndarray, losses_q: np.ndarray) -> LossCache:
        cache = cls(num_adapters)
        for mask_n, task, loss in zip(np.asarray(masks_qn, bool), tasks_q, np.asarray(losses_q, np.float32)):
            cache._losses[cls.key(mask_n, int(task))] = float(loss)
        return cache


@dataclasses.dataclass
class SearchState:
    """Everything a resumed run needs (the random streams are keyed by iteration: no RNG state)."""

    partitions_pn: np.ndarray  # int32 [P, N]
    iteration: int  # iterations completed
    cache: LossCache
    metrics: list[dict[str, Any]]  # one row per completed iteration, plus row 0 (initial)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    partition_n: np.ndarray  # int32 [N]: the best chain's final partition
    objective: float  # its global objective: summed loss of each task under its cluster's merge
    task_losses_n: np.ndarray  # float64 [N]: each task's loss under its cluster's merge
    chain: int
    objectives_p: np.ndarray  # float64 [P]: final global objective of every chain
    state: SearchState
    preempted: bool  # stopped early (SIGTERM / preemption) after saving a checkpoint
    evaluations: int  # scorer evaluations over the whole run (resumed parts included)


def check_num_clusters(num_clusters: int, num_adapters: int) -> None:
    if not 1 <= num_clusters < num_adapters:
        raise UserError(
            None, f"--num_clusters={num_clusters} must be between 1 and {num_adapters - 1} "
            f"(the number of adapters minus one; there are {num_adapters})",
        )


def initial_state(settings: SearchSettings, num_adapters: int) -> SearchState:
    partitions_pn = d2c.initial_partitions(num_adapters, settings.num_clusters, settings.population, settings.seed,
                                           settings.start)
    return SearchState(partitions_pn, 0, LossCache(num_adapters, settings.cache_size), [])


def partition_losses(
    scorer: Scorer, cache: LossCache, partitions_pn: np.ndarray, num_clusters: int
) -> tuple[np.ndarray, ResolveStats]:
    """float64[P, N]: every task's loss under its cluster's merge, for every chain (one call)."""
    requests: list[d2c.Request] = []
    for partition_n in partitions_pn:
        requests += d2c.partition_requests(partition_n, num_clusters)
    losses_c, stats = cache.resolve(scorer, requests)
    losses_pn = np.zeros(partitions_pn.shape, np.float64)
    for (_, task), loss, p in zip(requests, losses_c, np.repeat(np.arange(len(partitions_pn)), partitions_pn.shape[1])):
        losses_pn[p, task] = loss
    return losses_pn, stats


def objectives(losses_pn: np.ndarray) -> np.ndarray:
    """float64[P]: the summed per-task loss of each chain (exactly rounded: order-independent)."""
    return np.array([math.fsum(row) for row in losses_pn], np.float64)


def evaluate_partition(
    scorer: Scorer, partition_n: np.ndarray, num_clusters: int, cache: LossCache | None = None
) -> tuple[float, np.ndarray, ResolveStats]:
    """(global objective, per-task losses float64[N], stats) of one fixed partition."""
    cache = cache if cache is not None else LossCache(scorer.num_tasks)
    losses_pn, stats = partition_losses(scorer, cache, np.asarray(partition_n, np.int32)[None], num_clusters)
    return float(objectives(losses_pn)[0]), losses_pn[0], stats


def _row(iteration: int, stats: ResolveStats, seconds: float, cache_size: int, **extra: Any) -> dict[str, Any]:
    return {
        "iteration": iteration,
        **extra,
        "requests": stats.requests,
        "unique_requests": stats.unique,
        "cache_hits": stats.hits,
        "evaluations": stats.evaluations,
        "cache_size": cache_size,
        "seconds": round(seconds, 6),
        "scorer_seconds": round(stats.seconds, 6),  # inside scorer.losses (the scoring step)
        "evals_per_s": round(stats.evaluations / seconds, 3) if seconds > 0 else None,
    }


def _objective_fields(objectives_p: np.ndarray | None) -> dict[str, Any]:
    if objectives_p is None:
        return {"tracked": False, "best_objective": None, "mean_objective": None, "objectives": None}
    return {
        "tracked": True,
        "best_objective": float(np.min(objectives_p)),
        "mean_objective": float(np.mean(objectives_p)),
        "objectives": [float(x) for x in objectives_p],
    }


def initial_row(scorer: Scorer, state: SearchState, settings: SearchSettings) -> dict[str, Any]:
    """Metrics row 0: the objectives of the initial partitions (only with --track_every > 0:
    the search itself needs them only where it exchanges chains or ends)."""
    if settings.track_every == 0:
        return _row(0, ResolveStats(), 0.0, len(state.cache), accepted=0, moves=[], **_objective_fields(None))
    start = time.perf_counter()
    losses_pn, stats = partition_losses(scorer, state.cache, state.partitions_pn, settings.num_clusters)
    fields = _objective_fields(objectives(losses_pn))
    return _row(0, stats, time.perf_counter() - start, len(state.cache), accepted=0, moves=[], **fields)


def baseline_row(stats: ResolveStats, seconds: float, objective: float) -> dict[str, Any]:
    """The one metrics row of a baseline: a fixed partition scored by `evaluate_partition` from an
    empty cache (so the cache ends up holding exactly the `stats.unique` distinct requests)."""
    return _row(0, stats, seconds, stats.unique, accepted=0, moves=[],
                **_objective_fields(np.array([objective], np.float64)))


def _proposals(settings: SearchSettings, it: int, partitions_pn: np.ndarray) -> list[list[d2c.Move]]:
    """Every chain's M proposals of iteration `it` from its stream (seed, PROPOSE, it, p)."""
    out = []
    for p in range(len(partitions_pn)):
        rng = d2c.stream(settings.seed, d2c.STREAM_PROPOSE, it, p)
        moves = [d2c.sample_move(rng, partitions_pn[p], settings.num_clusters, settings.proposal)
                 for _ in range(settings.proposals)]
        out.append([m for m in moves if m is not None])
    return out


def _move_requests(settings: SearchSettings, partitions_pn: np.ndarray, proposals: list[list[d2c.Move]]):
    """(requests, spans): the before/after requests of every proposal, and per chain the
    (move, before slice, after slice) of each."""
    requests: list[d2c.Request] = []
    spans: list[list[tuple[d2c.Move, slice, slice]]] = []
    for p, moves in enumerate(proposals):
        chain_spans = []
        for move in moves:
            before, after = d2c.move_requests(partitions_pn[p], move, settings.objective)
            b0 = len(requests)
            requests += before + after
            chain_spans.append((move, slice(b0, b0 + len(before)), slice(b0 + len(before), len(requests))))
        spans.append(chain_spans)
    return requests, spans


def _exchanges_at(settings: SearchSettings, it: int, population_size: int) -> bool:
    return settings.exchange_every > 0 and it % settings.exchange_every == 0 and population_size > 1


def _tracks_at(settings: SearchSettings, it: int, population_size: int) -> bool:
    """Objective tracking after iteration `it`: every track_every (0: never), at exchanges and at
    the last iteration (the result's objective)."""
    return (_exchanges_at(settings, it, population_size) or it == settings.iterations
            or (settings.track_every > 0 and it % settings.track_every == 0))


class Speculator:
    """Exact speculation: how many iterations ahead (J) to draw proposals assuming every chain
    rejects, so that their requests are scored in one call.

    The decisions are replayed in order by `search_step` from the cache, and an iteration whose
    chain accepted a move redraws from the new partition (its own stream, keyed by iteration),
    so the result is identical for any J. J = round(1 / recent acceptance rate) (a chain's
    expected run of rejections), clipped to [1, j_max]; `adaptive=False` always uses j_max.
    """

    WINDOW = 32  # iterations of acceptance history

    def __init__(self, j_max: int, adaptive: bool = True):
        self.j_max = max(1, int(j_max))
        self.adaptive = adaptive
        self._history: list[tuple[int, int]] = []  # (chains, accepted) per iteration

    def record(self, chains: int, accepted: int) -> None:
        self._history = (self._history + [(chains, accepted)])[-self.WINDOW:]

    def depth(self) -> int:
        if not self.adaptive:
            return self.j_max
        chains = sum(c for c, _ in self._history)
        accepted = sum(a for _, a in self._history)
        rate = (accepted + 1) / (chains + 2)  # Laplace prior: 1/2 before any evidence
        return int(min(self.j_max, max(1, round(1 / rate))))


def speculative_requests(state: SearchState, settings: SearchSettings, depth: int) -> list[d2c.Request]:
    """The requests of iterations state.iteration+1 ... +depth (never past an exchange or the
    last iteration) if no chain accepts any move meanwhile, tracking requests included."""
    requests: list[d2c.Request] = []
    partitions_pn = state.partitions_pn
    tracked = False
    for it in range(state.iteration + 1, min(state.iteration + depth, settings.iterations) + 1):
        requests += _move_requests(settings, partitions_pn, _proposals(settings, it, partitions_pn))[0]
        if not tracked and _tracks_at(settings, it, len(partitions_pn)):
            tracked = True
            for partition_n in partitions_pn:
                requests += d2c.partition_requests(partition_n, settings.num_clusters)
        if _exchanges_at(settings, it, len(partitions_pn)):
            break
    return requests


def search_step(scorer: Scorer, state: SearchState, settings: SearchSettings,
                speculator: Speculator | None = None) -> dict[str, Any]:
    """Runs one iteration in place on `state`; returns its metrics row. With a `speculator`, an
    iteration whose requests are not all cached first scores the next J iterations' requests
    (see Speculator); the decisions are the same as without."""
    start = time.perf_counter()
    it = state.iteration + 1
    k = settings.num_clusters
    partitions_pn = state.partitions_pn

    # 1. Proposals, drawn before any scoring.
    proposals = _proposals(settings, it, partitions_pn)

    # 2. All requests of all chains and proposals, resolved in one scorer call (with speculation:
    # together with the next iterations' requests).
    requests, spans = _move_requests(settings, partitions_pn, proposals)
    ahead = 0
    spec_stats = ResolveStats()
    if speculator is not None and state.cache.missing(requests):
        ahead = speculator.depth()
        if ahead > 1:
            _, spec_stats = state.cache.resolve(scorer, speculative_requests(state, settings, ahead))
    losses_c, stats = state.cache.resolve(scorer, requests)
    stats.evaluations += spec_stats.evaluations
    stats.seconds += spec_stats.seconds

    # 3. Per chain: the best improving proposal (first on ties), or none.
    accepted = []
    new_pn = partitions_pn.copy()
    for p, chain_spans in enumerate(spans):
        best_gain, best_move = 0.0, None
        for move, before, after in chain_spans:
            g = d2c.gain(losses_c[before], losses_c[after])
            if g > best_gain:
                best_gain, best_move = g, move
        if best_move is not None:
            new_pn[p] = d2c.apply_move(partitions_pn[p], best_move)
            accepted.append([p, best_move.task, best_move.src, best_move.dst, best_gain])
    state.partitions_pn = new_pn
    state.iteration = it
    if speculator is not None:
        speculator.record(len(new_pn), len(accepted))

    # 4./5. Exchange and objective tracking (only the pairs not cached: the clusters changed
    # since they were last scored).
    exchange = _exchanges_at(settings, it, len(new_pn))
    track = _tracks_at(settings, it, len(new_pn))
    objectives_p, pairs = None, []
    if track:
        losses_pn, track_stats = partition_losses(scorer, state.cache, new_pn, k)
        stats += track_stats
        objectives_p = objectives(losses_pn)
        if exchange:
            state.partitions_pn, pairs = population.exchange(new_pn, objectives_p)
            objectives_p = objectives_p.copy()
            for dst, src in pairs:
                objectives_p[dst] = objectives_p[src]
    return _row(
        it, stats, time.perf_counter() - start, len(state.cache),
        accepted=len(accepted), moves=accepted, proposals=sum(len(m) for m in proposals),
        speculated=ahead if ahead > 1 else 0,
        exchanges=[list(x) for x in pairs], **_objective_fields(objectives_p),
    )


def speculation_depth(settings: SearchSettings, scorer: Scorer) -> int:
    """j_max: --speculate when given; else as many iterations as fill the scorer's largest
    request bucket on an accelerator (a batch costs about as much as one request there) and 1
    on CPU (a batch costs its requests' sum: speculation would only add wasted evaluations)."""
    if settings.speculate > 0:
        return settings.speculate
    if getattr(scorer, "exact_split", True):
        return 1
    per_iteration = settings.population * settings.proposals * (2 if settings.objective == "local" else 16)
    return max(1, int(getattr(scorer, "batch_size", 1)) // per_iteration)


def run_search(
    scorer: Scorer,
    settings: SearchSettings,
    *,
    checkpointer: Checkpointer | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[SearchState], None] | None = None,
    progress: bool = False,
    desc: str = "d2c",
    start: SearchState | None = None,
) -> SearchResult:
    """Runs (or resumes, when `checkpointer` holds a checkpoint) the D²C / population search.

    `should_stop` is polled at the end of every iteration (e.g. a SIGTERM flag): the engine then
    saves a checkpoint and returns with `preempted=True`. `on_checkpoint(state)` is called after
    every checkpoint saved (e.g. to say where it is on a signal). `start`: the state to begin
    from when there is no checkpoint (a warm start: given partitions and a seeded cache, iteration
    0, no metrics rows); default: the random initial partitions.
    """
    n = scorer.num_tasks
    check_num_clusters(settings.num_clusters, n)
    state = checkpointer.restore(n) if checkpointer is not None else None
    if state is None:
        state = initial_state(settings, n) if start is None else start
        state.metrics.append(initial_row(scorer, state, settings))
    elif state.partitions_pn.shape != (settings.population, n) or state.iteration > settings.iterations:
        raise ValueError(f"checkpoint state {state.partitions_pn.shape} @ {state.iteration} does not fit {settings}")
    state.cache.max_size = settings.cache_size  # a changed --cache_size applies from here on
    state.cache.evict()
    speculator = Speculator(speculation_depth(settings, scorer))

    bar = _progress(settings.iterations, state, progress, desc)
    preempted = False
    try:
        while state.iteration < settings.iterations:
            row = search_step(scorer, state, settings, speculator)
            state.metrics.append(row)
            stop = bool(should_stop and should_stop())
            if checkpointer is not None:
                stop = stop or checkpointer.reached_preemption(state.iteration)
                last = state.iteration == settings.iterations
                if checkpointer.save(state, force=stop or last) and on_checkpoint is not None:
                    on_checkpoint(state)
            if bar is not None:
                _update_progress(bar, state)
            if stop and state.iteration < settings.iterations:
                preempted = True
                break
    finally:
        if bar is not None:
            bar.close()

    losses_pn, _ = partition_losses(scorer, state.cache, state.partitions_pn, settings.num_clusters)
    objectives_p = objectives(losses_pn)
    chain = population.best_chain(objectives_p)
    return SearchResult(
        partition_n=state.partitions_pn[chain].copy(),
        objective=float(objectives_p[chain]),
        task_losses_n=losses_pn[chain],
        chain=chain,
        objectives_p=objectives_p,
        state=state,
        preempted=preempted,
        evaluations=sum(int(r["evaluations"]) for r in state.metrics),
    )


def find_partition(
    scorer: Scorer,
    strategy: str,
    settings: SearchSettings,
    adapters: AdapterFactors | None = None,
    *,
    agree: Callable[[np.ndarray], np.ndarray] | None = None,
    **search_kwargs: Any,
) -> SearchResult:
    """The one strategy dispatcher: "d2c" runs `run_search` (with `search_kwargs`); a baseline
    ("random", "kmeans", "svd_kmeans", "all_in_one") picks its partition and scores it from an
    empty cache (one metrics row). kmeans / svd_kmeans need `adapters` (their a, b factors);
    `agree` may replace a baseline's partition by one every process shares (multi-host)."""
    if strategy in SEARCH_STRATEGIES:
        return run_search(scorer, settings, **search_kwargs)
    start = time.perf_counter()
    a, b = (adapters.a, adapters.b) if adapters is not None else (None, None)
    partition_n = np.asarray(baselines.baseline_partition(strategy, scorer.num_tasks, settings.num_clusters,
                                                          settings.seed, a, b, settings.start), np.int32)
    if agree is not None:
        partition_n = agree(partition_n)
    cache = LossCache(scorer.num_tasks)
    objective, task_losses_n, stats = evaluate_partition(scorer, partition_n, settings.num_clusters, cache)
    row = baseline_row(stats, time.perf_counter() - start, objective)
    return SearchResult(
        partition_n=partition_n, objective=objective, task_losses_n=task_losses_n, chain=0,
        objectives_p=np.array([objective], np.float64),
        state=SearchState(partition_n[None], 0, cache, [row]), preempted=False,
        evaluations=stats.evaluations,
    )


def _progress(total: int, state: SearchState, enabled: bool, desc: str):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.iteration, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)
    _update_progress(bar, state, advance=False)
    return bar


def _update_progress(bar, state: SearchState, advance: bool = True) -> None:
    tracked = [r for r in state.metrics if r.get("tracked")]
    last = state.metrics[-1]
    postfix = {
        "best": f"{tracked[-1]['best_objective']:.4f}" if tracked else "-",
        "accepted": sum(r.get("accepted", 0) for r in state.metrics),
        "cache": len(state.cache),
    }
    if last.get("evals_per_s"):
        postfix["eval/s"] = f"{last['evals_per_s']:.1f}"
    bar.set_postfix(postfix, refresh=False)
    if advance:
        bar.update(1)
