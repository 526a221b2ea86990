"""The loss cache under --cache_size: least-recently-used eviction, never above the bound, the
same search result as an unbounded cache (an evicted pair is scored again), and a resumed run
identical to an uninterrupted one, metrics included (the LRU order is what checkpoints save)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from d2c_jax.checkpoint import Checkpointer
from d2c_jax.run_config import SearchSettings, default_cache_size
from d2c_jax.search import LossCache, run_search
from fixtures_search_fakes import FakeScorer, TableScorer, families

N = 12
SETTINGS = SearchSettings(num_clusters=3, iterations=40, population=2, proposals=2, objective="global",
                          track_every=4, seed=3, cache_size=25)
FP = {"files": {}, "examples": {}, "settings": {}}


def _mask(*members):
    m = np.zeros(4, bool)
    m[list(members)] = True
    return m


def test_least_recently_used_entries_go_first():
    scorer = TableScorer(4, lambda members, task: float(sum(members) + task))
    cache = LossCache(4, max_size=2)
    cache.resolve(scorer, [(_mask(0), 0), (_mask(1), 1)])
    cache.resolve(scorer, [(_mask(0), 0)])  # a hit: (0, 0) is now the most recent
    cache.resolve(scorer, [(_mask(2), 2)])  # evicts (1, 1)
    assert len(cache) == 2 and scorer.calls == [2, 1]
    losses, stats = cache.resolve(scorer, [(_mask(1), 1), (_mask(0), 0)])  # (1, 1) scored again
    assert losses.tolist() == [2.0, 0.0] and stats.evaluations == 1 and stats.hits == 1
    masks, tasks, _ = cache.to_arrays()
    assert tasks.tolist() == [1, 0]  # oldest first: (2, 2) was evicted


def test_a_bounded_cache_stays_bounded_and_finds_the_same_partition():
    unbounded = run_search(FakeScorer(families(N, 3)), dataclasses.replace(SETTINGS, cache_size=0))
    bounded_scorer = FakeScorer(families(N, 3))
    bounded = run_search(bounded_scorer, SETTINGS)
    assert max(r["cache_size"] for r in bounded.state.metrics) <= SETTINGS.cache_size < len(unbounded.state.cache)
    assert bounded.partition_n.tolist() == unbounded.partition_n.tolist()
    assert bounded.objective == unbounded.objective
    assert bounded.evaluations > unbounded.evaluations  # evicted pairs were scored again


def test_resume_with_eviction_is_exact(tmp_path):
    reference = run_search(FakeScorer(families(N, 3)), SETTINGS)
    calls = [0]

    def stop_at_13():
        calls[0] += 1
        return calls[0] == 13

    with Checkpointer(tmp_path, every=5, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        first = run_search(FakeScorer(families(N, 3)), SETTINGS, checkpointer=ck, should_stop=stop_at_13)
    assert first.preempted
    with Checkpointer(tmp_path, every=5, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl") as ck:
        resumed = run_search(FakeScorer(families(N, 3)), SETTINGS, checkpointer=ck)
    assert resumed.partition_n.tolist() == reference.partition_n.tolist()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "evals_per_s", "scorer_seconds")} for r in rows]  # noqa: E731
    assert strip(json.loads(json.dumps(resumed.state.metrics))) == strip(json.loads(json.dumps(reference.state.metrics)))


def test_default_cache_size_is_sized_from_memory():
    assert default_cache_size(12) >= 100_000
    assert default_cache_size(12, memory_fraction=1.0) > default_cache_size(4096, memory_fraction=1.0)


def test_resume_with_a_smaller_cache_equals_a_run_that_had_it_from_the_start(tmp_path):
    """--cache_size is a resource flag: a run checkpointed with an unbounded cache and resumed with
    a smaller one evicts at the resume exactly as a run bounded from the start (LRU keeps the most
    recently used entries, whatever the bound was before), so every later row matches."""
    # local objective: an iteration asks for fewer pairs than the cache holds, so which entries
    # the resumed cache keeps (and in which order) decides later hits.
    settings = dataclasses.replace(SETTINGS, objective="local")
    bounded = run_search(FakeScorer(families(N, 3)), settings)
    calls = [0]

    def stop_at_13():
        calls[0] += 1
        return calls[0] == 13

    ck_args = dict(every=5, keep=2, fingerprint=FP, metrics_path=f"{tmp_path}.metrics.jsonl")
    with Checkpointer(tmp_path, **ck_args) as ck:
        first = run_search(FakeScorer(families(N, 3)), dataclasses.replace(settings, cache_size=0),
                           checkpointer=ck, should_stop=stop_at_13)
    assert first.preempted and len(first.state.cache) > settings.cache_size
    with Checkpointer(tmp_path, **ck_args) as ck:
        resumed = run_search(FakeScorer(families(N, 3)), settings, checkpointer=ck)
    assert resumed.partition_n.tolist() == bounded.partition_n.tolist() and resumed.objective == bounded.objective
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "evals_per_s", "scorer_seconds")} for r in rows]  # noqa: E731
    after = first.state.iteration + 1
    assert strip(resumed.state.metrics[after:]) == strip(bounded.state.metrics[after:])
    assert resumed.state.cache.to_arrays()[0].tolist() == bounded.state.cache.to_arrays()[0].tolist()


def test_a_checkpointed_cache_keeps_its_least_recently_used_order():
    """state -> checkpoint arrays -> state: the same entries in the same LRU order, so the restored
    cache hits and evicts exactly as the saved one would."""
    from d2c_jax.checkpoint import state_to_tree, tree_to_state
    from d2c_jax.search import SearchState

    scorer = TableScorer(6, lambda members, task: float(sum(members) * 10 + task))
    rng = np.random.default_rng(0)

    def some_requests(count):
        masks = rng.random((count, 6)) < 0.5
        masks[np.arange(count), rng.integers(0, 6, count)] = True
        return [(m, int(rng.choice(np.flatnonzero(m)))) for m in masks]

    cache = LossCache(6, max_size=12)
    for _ in range(6):
        cache.resolve(scorer, some_requests(5))
    state = SearchState(np.zeros((1, 6), np.int32), 3, cache, [])
    restored = tree_to_state(state_to_tree(state), [], 6).cache
    restored.max_size = cache.max_size
    for got, want in zip(restored.to_arrays(), cache.to_arrays()):
        np.testing.assert_array_equal(got, want)
    for _ in range(4):
        reqs = some_requests(5)
        a, b = cache.resolve(scorer, reqs)[1], restored.resolve(scorer, reqs)[1]
        assert (a.hits, a.evaluations) == (b.hits, b.evaluations)
    for got, want in zip(restored.to_arrays(), cache.to_arrays()):
        np.testing.assert_array_equal(got, want)
