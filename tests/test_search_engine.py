"""The search engine against fake scorers: Algorithm 1's rule, proposals, global objective,
population and exchange, batching, cache, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2c_jax.errors import UserError
from d2c_jax.run_config import SearchSettings
from d2c_jax.search import LossCache, evaluate_partition, initial_row, initial_state, run_search, search_step
from d2c_jax.strategies import d2c, population
from fixtures_search_fakes import FakeScorer, TableScorer, families

N, F = 12, 3


def _settings(**kw) -> SearchSettings:
    base = dict(num_clusters=3, iterations=40, seed=0, track_every=5)
    return SearchSettings(**{**base, **kw})


def _trajectory(scorer, settings):
    """Partitions after every iteration, running the engine step by step."""
    state = initial_state(settings, scorer.num_tasks)
    state.metrics.append(initial_row(scorer, state, settings))
    out = [state.partitions_pn.copy()]
    for _ in range(settings.iterations):
        state.metrics.append(search_step(scorer, state, settings))
        out.append(state.partitions_pn.copy())
    return out, state


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "scorer_seconds", "evals_per_s")} for r in rows]


@pytest.mark.parametrize("proposal", d2c.PROPOSALS)
def test_sample_move_follows_algorithm1_and_never_picks_a_singleton_source(proposal):
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 7))
        part = d2c.random_partition(rng, 7, k)
        assert set(part) == set(range(k))
        move = d2c.sample_move(rng, part, k, proposal)
        assert part[move.task] == move.src and move.dst != move.src and 0 <= move.dst < k
        assert np.sum(part == move.src) >= 2
        assert np.all(np.bincount(d2c.apply_move(part, move), minlength=k) >= 1)  # no cluster emptied
    assert d2c.sample_move(rng, np.zeros(5, np.int32), 1, proposal) is None  # K = 1: no move


def _exact_move_probabilities(part, k, proposal):
    """P(task t moves to cluster c'), written from the two readings' definitions.

    paper (Algorithm 1: "sample clusters c and c'; sample adapter t from c"): c uniform over the S
    clusters with >= 2 members, t uniform over c's s_c members, c' uniform over the other K - 1:
    1 / (S s_c (K - 1)). task_uniform: t uniform over the M tasks in clusters with >= 2 members:
    1 / (M (K - 1))."""
    sizes = {c: sum(1 for x in part if x == c) for c in range(k)}
    sources = [c for c in range(k) if sizes[c] >= 2]
    movable = [t for t in range(len(part)) if sizes[part[t]] >= 2]
    probs = {}
    for t in movable:
        for dst in range(k):
            if dst != part[t]:
                per_task = 1 / (len(sources) * sizes[part[t]]) if proposal == "paper" else 1 / len(movable)
                probs[t, dst] = per_task / (k - 1)
    return probs


@pytest.mark.parametrize("proposal", d2c.PROPOSALS)
def test_sample_move_draws_each_reading_with_its_exact_probabilities(proposal):
    """Each (t, c') pair's frequency over 48,000 seeded draws against the probability of the
    definition (`_exact_move_probabilities`), within 5 binomial standard errors of that pair.
    The two readings differ here by 13 to 27 standard errors per pair (sizes 4, 2, 1, 1: each
    member of the pair is drawn 1/4 of the time under paper, 1/6 under task_uniform), more than
    twice the 5 allowed, so a swapped or mixed reading fails."""
    part = np.array([0, 0, 0, 0, 1, 1, 2, 3])  # sizes 4, 2, 1, 1: tasks 6 and 7 never move
    k, draws = 4, 48_000
    counts: dict[tuple[int, int], int] = {}
    rng = np.random.default_rng(0)
    for _ in range(draws):
        move = d2c.sample_move(rng, part, k, proposal)
        counts[move.task, move.dst] = counts.get((move.task, move.dst), 0) + 1
    probs = _exact_move_probabilities(part.tolist(), k, proposal)
    assert set(counts) == set(probs)
    assert math.isclose(sum(probs.values()), 1.0)
    for pair, p in probs.items():
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(counts[pair] - draws * p) < 5 * sigma, (pair, counts[pair], draws * p)
    other = _exact_move_probabilities(part.tolist(), k, "task_uniform" if proposal == "paper" else "paper")
    assert min(abs(other[q] - probs[q]) * draws / math.sqrt(draws * probs[q] * (1 - probs[q])) for q in probs) > 10


def _sample_move_before_the_paper_reading(rng, partition_n, num_clusters):
    """The engine's proposal before --proposal existed, verbatim: what task_uniform must reproduce."""
    if num_clusters < 2:
        return None
    sizes_k = np.bincount(partition_n, minlength=num_clusters)
    movable_n = np.flatnonzero(sizes_k[partition_n] >= 2)
    task = int(movable_n[rng.integers(len(movable_n))])
    src = int(partition_n[task])
    dst = int(rng.integers(num_clusters - 1))
    dst += dst >= src
    return d2c.Move(task, src, dst)


def test_task_uniform_draws_exactly_what_the_engine_drew_before():
    """Same stream, same partition: the same moves, and the stream left at the same state (a
    chain's M proposals come from one stream), so earlier runs reproduce with task_uniform."""
    parts = np.random.default_rng(1)
    for trial in range(200):
        k = int(parts.integers(1, 8))
        part = d2c.random_partition(parts, 9, k)
        ours, old = d2c.stream(3, d2c.STREAM_PROPOSE, trial, 0), d2c.stream(3, d2c.STREAM_PROPOSE, trial, 0)
        for _ in range(3):
            assert d2c.sample_move(ours, part, k, "task_uniform") == _sample_move_before_the_paper_reading(old, part, k)
        assert ours.integers(2**62) == old.integers(2**62)


def test_round_robin_start_deals_equal_sizes_and_random_start_is_unchanged():
    rng = np.random.default_rng(0)
    for n, k in ((12, 5), (7, 7), (9, 1), (16, 4)):
        for _ in range(20):
            sizes = np.bincount(d2c.round_robin_partition(rng, n, k), minlength=k)
            assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and sizes.min() >= 1
    starts = d2c.initial_partitions(N, 3, 4, seed=2, start="round_robin")
    assert len({tuple(p) for p in starts}) == 4  # each chain its own deal
    for p, chain in enumerate(starts):  # chain p's deal comes from stream (seed, INIT, p)
        rng = d2c.stream(2, d2c.STREAM_INIT, p)
        dealt = np.empty(N, np.int32)
        dealt[rng.permutation(N)] = np.arange(N) % 3  # the i-th adapter of the shuffle goes to cluster i mod K
        np.testing.assert_array_equal(chain, dealt)
    # the default start is the random partition of the same stream, as before --start existed
    np.testing.assert_array_equal(d2c.initial_partitions(N, 3, 2, seed=2),
                                  [d2c.random_partition(d2c.stream(2, d2c.STREAM_INIT, p), N, 3) for p in range(2)])
    assert initial_state(_settings(start="round_robin", population=4, seed=2), N).partitions_pn.tolist() == \
        starts.tolist()


@pytest.mark.parametrize("proposal", d2c.PROPOSALS)
def test_d2c_local_is_algorithm1_exactly(proposal):
    """Replay: each iteration draws (t, c, c') under --proposal and keeps the move iff
    loss(c' ∪ t, t) < loss(c, t)."""
    scorer = FakeScorer(families(N, F))
    settings = _settings(iterations=60, proposal=proposal)
    parts, _ = _trajectory(scorer, settings)
    accepted = 0
    for it in range(1, settings.iterations + 1):
        prev = parts[it - 1][0]
        move = d2c.sample_move(d2c.stream(settings.seed, d2c.STREAM_PROPOSE, it, 0), prev, 3, proposal)
        src_n, dst_n = prev == move.src, (prev == move.dst)
        dst_n[move.task] = True
        l, l_new = scorer.loss(src_n, move.task), scorer.loss(dst_n, move.task)
        expected = d2c.apply_move(prev, move) if l_new < l else prev
        np.testing.assert_array_equal(parts[it][0], expected, err_msg=f"iteration {it}")
        accepted += bool(l_new < l)
    assert 0 < accepted < settings.iterations


def test_equal_loss_is_not_an_improvement():
    scorer = TableScorer(N, lambda members, t: 1.0)
    parts, state = _trajectory(scorer, _settings(iterations=20))
    assert all((p == parts[0]).all() for p in parts)
    assert sum(r["accepted"] for r in state.metrics) == 0


@pytest.mark.parametrize("proposal", d2c.PROPOSALS)
@pytest.mark.parametrize("objective", ["local", "global"])
def test_never_empties_a_cluster(objective, proposal):
    # K = N - 1: almost every cluster is a singleton; a loss that favours big clusters pushes to empty them.
    scorer = TableScorer(8, lambda members, t: 10.0 - len(members))
    parts, _ = _trajectory(scorer, _settings(num_clusters=7, iterations=30, objective=objective, population=2,
                                             proposal=proposal))
    for p in parts:
        for chain in p:
            assert np.all(np.bincount(chain, minlength=7) >= 1)


def test_proposals_apply_the_best_improving_move():
    scorer = FakeScorer(families(N, F))
    settings = _settings(iterations=15, proposals=4)
    parts, _ = _trajectory(scorer, settings)
    for it in range(1, settings.iterations + 1):
        prev = parts[it - 1][0]
        rng = d2c.stream(settings.seed, d2c.STREAM_PROPOSE, it, 0)
        moves = [d2c.sample_move(rng, prev, 3) for _ in range(4)]
        gains = []
        for m in moves:
            before, after = d2c.move_requests(prev, m, "local")
            gains.append(d2c.gain([scorer.loss(*r) for r in before], [scorer.loss(*r) for r in after]))
        best = int(np.argmax(gains))
        expected = d2c.apply_move(prev, moves[best]) if gains[best] > 0 else prev
        np.testing.assert_array_equal(parts[it][0], expected)


def test_global_objective_keeps_moves_that_lower_both_clusters_summed_loss():
    scorer = FakeScorer(families(N, F))
    settings = _settings(iterations=25, objective="global")
    parts, state = _trajectory(scorer, settings)

    def summed(part, clusters):
        # exactly rounded (as d2c.gain): the comparison below needs no margin
        return math.fsum(float(scorer.loss(part == k, t)) for k in clusters for t in np.flatnonzero(part == k))

    for it in range(1, settings.iterations + 1):
        prev = parts[it - 1][0]
        move = d2c.sample_move(d2c.stream(settings.seed, d2c.STREAM_PROPOSE, it, 0), prev, 3)
        moved = d2c.apply_move(prev, move)
        better = summed(moved, (move.src, move.dst)) < summed(prev, (move.src, move.dst))
        np.testing.assert_array_equal(parts[it][0], moved if better else prev)
    # The global objective of a single chain never increases under the global rule.
    tracked = [r["best_objective"] for r in state.metrics if r["tracked"]]
    # a kept move lowers the exact sum (rounding is monotone), so the exactly rounded total cannot rise
    assert all(b <= a for a, b in zip(tracked, tracked[1:]))


def test_population_chains_follow_the_single_chain_until_an_exchange():
    scorer = FakeScorer(families(N, F))
    single, _ = _trajectory(scorer, _settings(iterations=20))
    pop, _ = _trajectory(scorer, _settings(iterations=20, population=3))
    for s, p in zip(single, pop):
        np.testing.assert_array_equal(s[0], p[0])
    assert any((p[1] != p[0]).any() for p in pop)  # chains differ


def test_exchange_replaces_the_worst_chains_by_the_best():
    parts = np.arange(8 * 5).reshape(8, 5).astype(np.int32)
    objectives = np.array([3.0, 1.0, 5.0, 2.0, 9.0, 0.5, 7.0, 4.0])
    new, pairs = population.exchange(parts, objectives)
    assert pairs == [(4, 5), (6, 1)]  # P // 4 = 2 worst (9, 7) get the 2 best (0.5, 1)
    np.testing.assert_array_equal(new[4], parts[5])
    np.testing.assert_array_equal(new[6], parts[1])
    assert population.exchange(parts[:1], objectives[:1])[1] == []

    scorer = FakeScorer(families(N, F))
    settings = _settings(iterations=10, population=4, exchange_every=5, track_every=100)
    parts, state = _trajectory(scorer, settings)
    free, _ = _trajectory(scorer, _settings(iterations=5, population=4, track_every=100))
    rows = {r["iteration"]: r for r in state.metrics}
    assert [it for it, r in rows.items() if r["tracked"]] == [0, 5, 10]
    # Until the first exchange the chains run free; at it the worst (of the free run) gets the best.
    before = [evaluate_partition(scorer, p, 3)[0] for p in free[5]]
    assert rows[5]["exchanges"] == [[int(np.argmax(before)), int(np.argmin(before))]]
    for it in (5, 10):
        (dst, src), = rows[it]["exchanges"]
        np.testing.assert_array_equal(parts[it][dst], parts[it][src])
        assert rows[it]["objectives"][dst] == rows[it]["objectives"][src]


def test_result_does_not_depend_on_scorer_batch_size_and_asks_once_per_phase():
    results = []
    for batch in (1, 3, 64):
        scorer = FakeScorer(families(N, F), batch_size=batch)
        settings = _settings(population=3, proposals=3, objective="global", track_every=1)
        r = run_search(scorer, settings)
        results.append((r.partition_n.tolist(), r.objective, _strip_timing(r.state.metrics)))
        assert len(scorer.calls) <= 2 * settings.iterations + 1  # proposals + tracking per iteration
    assert results[0] == results[1] == results[2]


def test_same_seed_same_run_other_seed_other_run():
    def run(seed):
        r = run_search(FakeScorer(families(N, F)), _settings(seed=seed, population=2, proposals=2))
        return r.partition_n.tolist(), r.objective, _strip_timing(r.state.metrics)

    assert run(3) == run(3)
    assert run(3)[2] != run(4)[2]


def test_cache_dedupes_requests_and_round_trips_through_arrays():
    scorer = FakeScorer(families(6, 2))
    cache = LossCache(6)
    m1 = np.array([1, 1, 0, 0, 0, 0], bool)
    m2 = np.array([0, 0, 1, 1, 1, 0], bool)
    reqs = [(m1, 0), (m1, 1), (m1, 0), (m2, 2), (m1.copy(), 1)]
    losses, stats = cache.resolve(scorer, reqs)
    assert scorer.calls == [3] and (stats.unique, stats.hits, stats.evaluations) == (3, 0, 3)
    assert losses[0] == losses[2] == np.float64(scorer.loss(m1, 0))
    losses2, stats2 = cache.resolve(scorer, reqs + [(m2, 3)])
    assert scorer.calls == [3, 1] and (stats2.hits, stats2.evaluations) == (3, 1)
    np.testing.assert_array_equal(losses2[:5], losses)
    masks, tasks, vals = cache.to_arrays()
    assert masks.dtype == np.uint8 and masks.shape == (4, 6) and vals.dtype == np.float32
    again = LossCache.from_arrays(6, masks, tasks, vals)
    assert again.to_arrays()[0].tolist() == masks.tolist() and again._losses == cache._losses


def test_random_draws_do_not_depend_on_cache_hits():
    settings = _settings(population=2, proposals=2)
    cold = run_search(FakeScorer(families(N, F)), settings)
    # Warm: a cache already full of this run's entries (all hits) must give the same decisions.
    from d2c_jax import search

    state = initial_state(settings, N)
    state.cache = cold.state.cache
    scorer = FakeScorer(families(N, F))
    state.metrics.append(initial_row(scorer, state, settings))
    for _ in range(settings.iterations):
        search.search_step(scorer, state, settings)
    assert scorer.calls == []
    np.testing.assert_array_equal(state.partitions_pn, cold.state.partitions_pn)


def test_finds_the_hidden_families():
    r = run_search(FakeScorer(families(N, F)), _settings(iterations=150, population=4, proposals=2, exchange_every=20))
    groups = {tuple(np.flatnonzero(r.partition_n == k)) for k in range(3)}
    assert groups == {tuple(np.flatnonzero(families(N, F) == f)) for f in range(F)}
    assert r.objective == math.fsum(r.task_losses_n)  # the exactly rounded sum (search.objectives)


def test_k_out_of_range_is_a_user_error():
    for k in (N, N + 3):
        with pytest.raises(UserError, match="--num_clusters"):
            run_search(FakeScorer(families(N, F)), _settings(num_clusters=k))
    with pytest.raises(UserError, match="--num_clusters"):
        SearchSettings(num_clusters=0)


def test_one_cluster_makes_no_moves():
    r = run_search(FakeScorer(families(N, F)), _settings(num_clusters=1, iterations=5))
    assert (r.partition_n == 0).all() and r.state.metrics[-1]["proposals"] == 0


# --------------------------------------------------------------------------- speculation


def _run_with(settings, depth=None, adaptive=True, scorer=None):
    """run_search, or with a forced Speculator(depth, adaptive) when depth is given."""
    from d2c_jax import search

    scorer = scorer or FakeScorer(families(N, F))
    if depth is None:
        return run_search(scorer, settings), scorer
    orig = search.Speculator
    try:
        search.Speculator = lambda j_max: orig(depth, adaptive=adaptive)
        return run_search(scorer, settings), scorer
    finally:
        search.Speculator = orig


def _decisions(result):
    return [(r["iteration"], r["moves"], r.get("exchanges")) for r in result.state.metrics]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("depth,adaptive", [(2, False), (3, False), (5, True), (16, False), (16, True)])
def test_speculative_algorithm1_equals_the_sequential_run(seed, depth, adaptive):
    """P=1, M=1, local: Algorithm 1 exactly; every decision and the final partition identical."""
    settings = _settings(seed=seed, iterations=60, track_every=0)
    seq, seq_scorer = _run_with(settings, 1)
    spec, spec_scorer = _run_with(settings, depth, adaptive)
    assert spec.partition_n.tolist() == seq.partition_n.tolist() and spec.objective == seq.objective
    assert _decisions(spec) == _decisions(seq)
    assert 0 < sum(r["accepted"] for r in seq.state.metrics) < settings.iterations
    # Fewer scorer calls: several iterations' requests go in one call.
    assert len(spec_scorer.calls) < len(seq_scorer.calls)
    assert any(r.get("speculated", 0) > 1 for r in spec.state.metrics)


@pytest.mark.parametrize("kw", [dict(population=3, proposals=2, objective="local"),
                                dict(population=2, proposals=3, objective="global", exchange_every=7,
                                     track_every=5)])
@pytest.mark.parametrize("depth", [2, 6])
def test_speculation_with_chains_proposals_and_exchanges_is_exact(kw, depth):
    settings = _settings(seed=3, iterations=30, **kw)
    seq, _ = _run_with(settings, 1)
    spec, _ = _run_with(settings, depth, adaptive=False)
    assert spec.partition_n.tolist() == seq.partition_n.tolist() and spec.objective == seq.objective
    assert _decisions(spec) == _decisions(seq)
    assert [r["objectives"] for r in spec.state.metrics] == [r["objectives"] for r in seq.state.metrics]


def test_speculation_depth_follows_the_acceptance_rate():
    from d2c_jax.search import Speculator

    s = Speculator(8)
    assert s.depth() == 2  # no evidence: rate 1/2
    for _ in range(32):
        s.record(1, 0)
    assert s.depth() == 8  # nothing accepted lately: as deep as allowed
    for _ in range(32):
        s.record(1, 1)
    assert s.depth() == 1  # everything accepted: speculation would be wasted
    for i in range(32):
        s.record(1, int(i % 4 == 0))
    assert s.depth() == 4  # one in four accepted: about four iterations ahead
    assert Speculator(8, adaptive=False).depth() == 8


def test_resume_in_the_middle_of_a_speculative_window_is_exact(tmp_path):
    from d2c_jax import search
    from d2c_jax.checkpoint import Checkpointer

    fp = {"settings": {"k": 3}}
    settings = _settings(seed=2, iterations=40, track_every=0)
    seq, _ = _run_with(settings, 1)
    orig = search.Speculator
    search.Speculator = lambda j_max: orig(6, adaptive=False)
    try:
        stops = iter(range(1, 100))
        with Checkpointer(tmp_path / "ck", every=100, keep=1, fingerprint=fp, metrics_path=tmp_path / "ck.metrics.jsonl") as ck:
            # Stop after iteration 9: inside a window drawn at an earlier iteration.
            first = run_search(FakeScorer(families(N, F)), settings, checkpointer=ck,
                               should_stop=lambda: next(stops) == 9)
        assert first.preempted and first.state.iteration == 9
        assert any(r.get("speculated", 0) for r in first.state.metrics)
        with Checkpointer(tmp_path / "ck", every=100, keep=1, fingerprint=fp, metrics_path=tmp_path / "ck.metrics.jsonl") as ck:
            resumed = run_search(FakeScorer(families(N, F)), settings, checkpointer=ck)
    finally:
        search.Speculator = orig
    assert resumed.partition_n.tolist() == seq.partition_n.tolist() and resumed.objective == seq.objective
    assert _decisions(resumed) == _decisions(seq)


def test_cpu_scorers_do_not_speculate_by_default_accelerators_fill_a_bucket():
    from d2c_jax.search import speculation_depth

    class Acc:
        exact_split, batch_size = False, 64

    class Cpu:
        exact_split, batch_size = True, 64

    settings = _settings()
    assert speculation_depth(settings, Cpu()) == 1
    assert speculation_depth(settings, Acc()) == 32  # 2 requests per iteration
    assert speculation_depth(_settings(speculate=5), Cpu()) == 5


# --------------------------------------------------------------------------- evaluate only what changed


def test_tracking_rescores_only_the_clusters_changed_since_the_last_tracking_point():
    settings = _settings(iterations=40, track_every=5)
    scorer = FakeScorer(families(N, F))
    parts, state = _trajectory(scorer, settings)
    rows = state.metrics
    assert rows[0]["evaluations"] == N  # the initial partition: every task once
    for it in range(5, 41, 5):
        changed = {int(k) for k in np.unique(np.r_[parts[it - 5][0][parts[it - 5][0] != parts[it][0]],
                                                   parts[it][0][parts[it - 5][0] != parts[it][0]]])}
        touched = sum(int(np.sum(parts[it][0] == k)) for k in changed)
        # Tracking at `it` asks at most for the members of the changed clusters (some of them may
        # already be cached as the "before" requests of the iterations since).
        track_calls = rows[it]["evaluations"]
        assert track_calls <= touched + 2 * 5
        if not changed:
            assert rows[it]["cache_hits"] >= N


def test_before_losses_are_cache_hits_when_known():
    settings = _settings(iterations=60, track_every=1)  # every partition's losses are known
    _, state = _trajectory(FakeScorer(families(N, F)), settings)
    for r in state.metrics[1:]:
        # 1 after-request per iteration, plus the members of the two clusters a move changed.
        assert r["evaluations"] <= 1 + (N if r["accepted"] else 0)
        if not r["accepted"]:
            assert r["evaluations"] <= 1


def test_default_tracking_is_at_the_end_only():
    settings = _settings(iterations=20, track_every=0)
    r = run_search(FakeScorer(families(N, F)), settings)
    tracked = [row["iteration"] for row in r.state.metrics if row["tracked"]]
    assert tracked == [20] and r.state.metrics[0]["evaluations"] == 0
    assert SearchSettings(num_clusters=2).track_every == 0


# --------------------------------------------------------------------------- accounting


class _CountingScorer(FakeScorer):
    """FakeScorer that records every (mask, task) pair it is asked to score."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.scored: list[tuple[bytes, int]] = []

    def losses(self, masks_cn, tasks_c):
        self.scored += [(np.packbits(m).tobytes(), int(t)) for m, t in zip(np.asarray(masks_cn, bool), tasks_c)]
        return super().losses(masks_cn, tasks_c)


@pytest.mark.parametrize("kw", [dict(population=3, proposals=2, objective="local", speculate=4, track_every=3),
                                dict(population=2, proposals=3, objective="global", speculate=6, exchange_every=5),
                                dict(population=1, proposals=1, objective="local", speculate=8, track_every=0)])
def test_evaluations_recorded_per_iteration_are_the_scorers_real_calls(kw):
    """With speculation forced on (--speculate), every metrics row's `evaluations` is the number
    of (mask, task) pairs the scorer scored during that iteration (speculated ones included), the
    run's total is their sum, and with an unbounded cache no pair is ever scored twice."""
    from d2c_jax.search import Speculator, speculation_depth

    settings = _settings(iterations=30, seed=5, **kw)
    scorer = _CountingScorer(families(N, F))
    state = initial_state(settings, N)
    state.metrics.append(initial_row(scorer, state, settings))
    counts = [len(scorer.scored)]
    speculator = Speculator(speculation_depth(settings, scorer))
    assert speculator.j_max == settings.speculate
    for _ in range(settings.iterations):
        before = len(scorer.scored)
        state.metrics.append(search_step(scorer, state, settings, speculator))
        counts.append(len(scorer.scored) - before)
    assert [r["evaluations"] for r in state.metrics] == counts
    assert len(set(scorer.scored)) == len(scorer.scored)
    assert any(r["speculated"] > 1 for r in state.metrics[1:])  # speculation did happen
    # run_search records the same rows, and its total is what the scorer really scored.
    again = _CountingScorer(families(N, F))
    result = run_search(again, settings)
    assert _strip_timing(result.state.metrics) == _strip_timing(state.metrics)
    assert result.evaluations == len(again.scored) == sum(counts)


# --------------------------------------------------------------------------- population mechanics


@pytest.mark.parametrize("chains", [5, 6, 7])
def test_every_chain_draws_from_its_own_stream_whatever_the_population_size(chains):
    """Chains that start from the same partition (as after an exchange) still propose different
    moves, the initial partitions differ pairwise, and chain p's draws do not depend on P."""
    from d2c_jax.search import _proposals

    settings = _settings(population=chains, proposals=2)
    starts = d2c.initial_partitions(N, 3, chains, seed=4)
    assert len({tuple(p) for p in starts}) == chains
    np.testing.assert_array_equal(starts[:5], d2c.initial_partitions(N, 3, 5, seed=4))
    same_pn = np.repeat(starts[:1], chains, axis=0)
    draws = [[tuple(tuple(m) for m in moves) for moves in _proposals(settings, it, same_pn)] for it in range(1, 6)]
    for p in range(chains):
        for q in range(p):
            assert [d[p] for d in draws] != [d[q] for d in draws], (p, q)
    fewer = [[tuple(tuple(m) for m in moves) for moves in _proposals(_settings(population=5, proposals=2), it,
                                                                    same_pn[:5])] for it in range(1, 6)]
    assert [d[:5] for d in draws] == fewer


class _NanScorer(FakeScorer):
    """NaN for every task of a cluster that holds both adapters 0 and 1."""

    def loss(self, mask_n, task):
        return np.float32(np.nan) if mask_n[0] and mask_n[1] else super().loss(mask_n, task)


@pytest.mark.parametrize("chains", [5, 6, 7])
@pytest.mark.parametrize("objective", ["local", "global"])
def test_a_nan_objective_never_wins_and_no_move_into_nan_is_accepted(chains, objective):
    """Chains whose clusters score NaN: no accepted move ever creates a NaN loss (a NaN gain is
    not an improvement), the exchanges copy finite chains over NaN ones, and the result is the
    best finite chain."""
    scorer = _NanScorer(families(N, F))
    settings = _settings(population=chains, proposals=2, objective=objective, iterations=20, exchange_every=5,
                         track_every=1, seed=1)
    state = initial_state(settings, N)
    nan_at_start = [bool(p[0] == p[1]) for p in state.partitions_pn]
    assert any(nan_at_start) and not all(nan_at_start)  # the seed gives both kinds of chain
    result = run_search(scorer, settings)
    for row in result.state.metrics[1:]:
        for _, task, src, dst, gain in row["moves"]:
            assert np.isfinite(gain) and gain > 0
        if row["exchanges"]:
            objectives = np.asarray(row["objectives"], float)
            for dst, src in row["exchanges"]:
                assert np.isfinite(objectives[src])
    finite = np.isfinite(result.objectives_p)
    assert (~finite).sum() < sum(nan_at_start)  # exchanges replaced NaN chains
    assert finite.any() and np.isfinite(result.objective)
    assert result.objective == result.objectives_p[finite].min()
    assert result.chain == int(np.flatnonzero(result.objectives_p == result.objective)[0])
