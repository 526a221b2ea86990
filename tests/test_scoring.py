"""Scorer: batched merge+loss equals one-at-a-time, independent of batch size, no recompiles."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import data, hf_io, loss, lora as lora_lib, merge  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402
from d2c_jax.scoring import Scorer, pow2_buckets, seq_buckets, split_into_buckets, task_lengths  # noqa: E402
from fixtures_adapters import make_peft_adapters  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

TASKS = ("t0", "t1", "t2", "t3")
PROMPTS = ["the quick brown fox", "one two three", "hello world", "what is the capital",
           "translate the sentence", "count the vowels"]
RESPONSES = ["jumps over the lazy dog", "four five", "this is a test", "of the country",
             "into french", "in the words please"]


def build_setup(root, arch: str = "llama", examples: int = 3):
    """A tiny base model, one PEFT adapter and a few examples (varied lengths) per task."""
    model_dir = make_tiny_model(os.path.join(root, "base"), arch, seed=3)
    make_peft_adapters(model_dir, os.path.join(root, "adapters"), TASKS, r=4, alpha=8, seed=1)
    ddir = os.path.join(root, "data")
    os.makedirs(ddir, exist_ok=True)
    for ti, task in enumerate(TASKS):
        with open(os.path.join(ddir, f"{task}.jsonl"), "w") as f:
            for e in range(examples + ti % 2):  # tasks with fewer rows get dummy rows
                i = (ti + e) % len(PROMPTS)
                f.write(json.dumps({"prompt": PROMPTS[i], "response": RESPONSES[(i * 5) % 6]}) + "\n")
    cfg = load_config(model_dir)
    params = hf_io.load_params(model_dir, cfg, "float32")
    tok = hf_io.load_tokenizer(model_dir)
    adapters = lora_lib.load_adapter_set(os.path.join(root, "adapters"), cfg)
    td = data.load_task_data(ddir, adapters.names, tok, examples_per_task=10, max_seq_len=64)
    return dict(model_dir=model_dir, data_dir=ddir, cfg=cfg, params=params, tok=tok,
                adapters=adapters, task_data=td, prepared=merge.prepare_merge(adapters, "ties", 0.5))


def requests():
    """Masks with repeats, shared masks across tasks and a duplicated (mask, task) pair."""
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1],
                      [0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], bool)
    tasks = np.array([0, 2, 0, 1, 3, 2, 1, 0], np.int32)
    return masks, tasks


_SHARED: dict = {}  # one setup and one Scorer per batch size for this module and test_sharding


def shared_setup(tmp_path_factory) -> dict:
    """Qwen2 (qkv biases: exercises every sharding rule) built once per session."""
    if "setup" not in _SHARED:
        _SHARED["setup"] = build_setup(str(tmp_path_factory.mktemp("scoring")), arch="qwen2")
    return _SHARED["setup"]


def shared_scorer(tmp_path_factory, batch_size: int, batched: bool = True) -> Scorer:
    """Scorers are shared: each one costs a compilation. batched: the vmapped request batches
    (accelerators, meshes); on one CPU device the default is unbatched."""
    key = ("scorer", batch_size, batched)
    if key not in _SHARED:
        s = shared_setup(tmp_path_factory)
        _SHARED[key] = Scorer(s["params"], s["cfg"], s["prepared"], s["task_data"],
                              batch_size=batch_size, batched=batched)
    return _SHARED[key]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    return lambda batch_size, batched=True: shared_scorer(tmp_path_factory, batch_size, batched)


@pytest.fixture(scope="module")
def direct(setup):
    """One request at a time, without the Scorer: merge_mask then task_loss."""
    td, cfg = setup["task_data"], setup["cfg"]

    @jax.jit
    def one(params, prepared, mask, t):
        lora = merge.merge_mask(prepared, mask)
        return loss.task_loss(params, cfg, lora, jax.tree.map(lambda x: jnp.asarray(x)[t], td.batch))

    return lambda mask, t: float(one(setup["params"], setup["prepared"], mask, t))


def test_batched_losses_equal_one_request_at_a_time(scorers, direct):
    masks, tasks = requests()
    scorer = scorers(3)
    before = scorer.stats.copy()
    got = scorer.losses(masks, tasks)
    want = np.array([direct(m, t) for m, t in zip(masks, tasks)])
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)  # batched vs padded task_loss programs
    assert got[0] == got[7]  # duplicate request
    # 7 distinct (mask, task) pairs over 5 distinct masks, split exactly into buckets 2+2+2+1
    # (CPU) of the bucket set (1, 2, 3): no padded request, no mask merged twice within a call.
    done = scorer.stats - before
    assert scorer.request_buckets == (1, 2, 3)
    assert done["requests_scored"] == 7 and done["padded_requests"] == 0
    assert 5 <= done["masks_merged"] <= 7


def test_losses_do_not_depend_on_batch_size(scorers):
    masks, tasks = requests()
    results = [scorers(b).losses(masks, tasks) for b in (1, 3, 8)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=LOSS_RTOL)  # other batch shapes: other programs


def test_each_bucket_compiles_once_and_calls_compute_only_real_requests(setup):
    """On a scorer of its own: trace counts start at zero whatever the other tests (in any order)
    traced on the shared ones."""
    masks, tasks = requests()
    scorer = Scorer(setup["params"], setup["cfg"], setup["prepared"], setup["task_data"], batch_size=8, batched=True)
    assert scorer.request_buckets == (1, 2, 4, 8)
    more_m = np.concatenate([masks, ~masks[:3]])
    more_t = np.concatenate([tasks, tasks[:3]])
    before = scorer.stats.copy()
    scorer.losses(masks, tasks)  # 7 distinct: 4 + 2 + 1
    scorer.losses(masks[:1], tasks[:1])  # 1
    scorer.losses(more_m, more_t)  # 10 distinct: 8 + 2
    done = scorer.stats - before
    assert done["requests_scored"] == 7 + 1 + 10 and done["padded_requests"] == 0
    # Requests are split per sequence bucket of their task, then into request buckets.
    groups = [np.bincount(scorer.seq_bucket_of[np.unique(np.c_[m, t], axis=0)[:, -1]])
              for m, t in ((masks, tasks), (masks[:1], tasks[:1]), (more_m, more_t))]
    want_calls = sum(len(split_into_buckets(c, scorer.request_buckets, True)) for g in groups for c in g if c)
    assert done["score_calls"] == want_calls
    first = dict(scorer.trace_counts)
    assert all(v == 1 for v in first.values()), first
    scorer.losses(masks, tasks)  # the same shapes again (cache aside): nothing new traced
    scorer.losses(more_m[::-1], more_t[::-1])
    assert dict(scorer.trace_counts) == first
    scorer.loss_of_lora(None, 0)
    scorer.loss_of_lora(None, "t3")
    assert sum(v for k, v in scorer.trace_counts.items() if k.startswith("single")) == 1


def test_unbatched_scorer_merges_each_mask_once_and_compiles_one_executable_per_bucket(setup, scorers, direct):
    """The CPU default: each distinct mask merged once per call, each request scored alone on
    its task's packed examples; one merge executable per member bucket and one loss executable
    per sequence bucket, whatever the number of requests. Losses equal merge_mask + the padded
    task_loss (both checked against PEFT in test_merge_parity.py / test_loss_parity.py)."""
    td = setup["task_data"]
    assert Scorer(setup["params"], setup["cfg"], setup["prepared"], td, batch_size=1).batched is False
    scorer = scorers(1, batched=False)
    masks, tasks = requests()
    before = scorer.stats.copy()
    got = scorer.losses(masks, tasks)
    want = np.array([direct(m, t) for m, t in zip(masks, tasks)])
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)  # packed vs padded task_loss programs
    done = scorer.stats - before
    assert done["masks_merged"] == len(np.unique(masks, axis=0))
    assert done["requests_scored"] == len(np.unique(np.c_[masks, tasks], axis=0))
    seq = {int(scorer.seq_bucket_of[t]) for t in tasks}
    first = dict(scorer.trace_counts)
    assert all(v == 1 for v in first.values()), first
    assert sorted(k.split()[0] for k in first) == ["merge"] + ["packed"] * len(seq), first
    more = np.concatenate([masks, ~masks[:3]])
    scorer.losses(more, np.concatenate([tasks, tasks[:3]]))
    scorer.losses(np.eye(4, dtype=bool), np.arange(4))
    single = [scorer.loss_of_lora(lora_lib.effective_lora(setup["adapters"], i), i) for i in range(4)]
    # the one-member merge B s (float32) vs effective_lora's: LOSS_RTOL covers the programs' orders
    np.testing.assert_allclose(single, scorer.losses(np.eye(4, dtype=bool), np.arange(4)), rtol=LOSS_RTOL)
    assert dict(scorer.trace_counts) == first  # the same buckets again: nothing new traced


def test_unbatched_scorer_gives_identical_losses_with_two_requests_in_flight(setup):
    """Two host threads score a call's requests at once (the CPU default on 2+ cores): every
    loss is bit-identical to scoring them one after the other, and nothing is traced twice."""
    scorer = Scorer(setup["params"], setup["cfg"], setup["prepared"], setup["task_data"], batched=False)
    masks, tasks = requests()
    scorer.threads = 2
    two = scorer.losses(masks, tasks)
    traced = dict(scorer.trace_counts)
    scorer.threads = 1
    one = scorer.losses(masks, tasks)
    np.testing.assert_array_equal(two, one)
    assert all(v == 1 for v in traced.values()) and dict(scorer.trace_counts) == traced, traced


def test_unbatched_scorer_falls_back_to_chunked_padded_examples_when_attention_would_not_fit(setup, direct):
    """Long examples: [n, H, S, S] attention scores over the logits budget are not packed; the
    padded loss then runs a chunk of examples at a time, with the same losses."""
    scorer = Scorer(setup["params"], setup["cfg"], setup["prepared"], setup["task_data"], batched=False,
                    logits_budget_bytes=1)
    assert not any(scorer.packs(int(sb)) for sb in scorer.seq_bucket_of)
    masks, tasks = requests()
    np.testing.assert_allclose(scorer.losses(masks, tasks), [direct(m, t) for m, t in zip(masks, tasks)],
                               rtol=LOSS_RTOL)  # chunked vs whole padded programs
    assert scorer.example_chunk(1, int(scorer.seq_bucket_of[0])) == 1
    assert all(k.startswith(("merge", "single")) for k in scorer.trace_counts)


def test_loss_of_lora_matches_single_member_masks_and_base(setup, scorers):
    s = setup
    scorer = scorers(8)
    eye = np.eye(4, dtype=bool)
    by_mask = scorer.losses(eye, np.arange(4))
    single = [scorer.loss_of_lora(lora_lib.effective_lora(s["adapters"], i), i) for i in range(4)]
    np.testing.assert_allclose(single, by_mask, rtol=LOSS_RTOL)  # tolerances.py
    zeros = jax.tree.map(np.zeros_like, lora_lib.effective_lora(s["adapters"], 0))
    # a zero adapter adds exact zeros, but through another program than the base model's
    assert scorer.loss_of_lora(zeros, 1) == pytest.approx(scorer.loss_of_lora(None, 1), rel=LOSS_RTOL)
    # guard: the adapter moves the loss by 100x the tolerance
    assert scorer.loss_of_lora(None, 1) != pytest.approx(single[1], rel=100 * LOSS_RTOL)


def test_example_chunk_is_picked_to_fit_the_logits_budget(setup):
    s = setup
    n, seq = s["task_data"].tokens_tns.shape[1:]
    per_example = 2 * seq * s["cfg"].vocab_size * 4  # batch 2, float32 logits
    make = lambda budget: Scorer(s["params"], s["cfg"], s["prepared"], s["task_data"],  # noqa: E731
                                 batch_size=2, logits_budget_bytes=budget).example_chunk(2, seq)
    assert n == 4
    assert make(1) == 1 and make(2 * per_example) == 2 and make(3 * per_example) == 2
    assert make(100 * per_example) == 4


def test_bad_requests_are_rejected(scorers):
    scorer = scorers(8)
    with pytest.raises(ValueError, match="shape"):
        scorer.losses(np.ones((2, 3), bool), np.zeros(2))
    with pytest.raises(ValueError, match="out of range"):
        scorer.losses(np.ones((1, 4), bool), np.array([4]))
    with pytest.raises(ValueError, match="at least one member"):
        scorer.losses(np.zeros((1, 4), bool), np.array([0]))
    assert scorer.losses(np.zeros((0, 4), bool), np.zeros(0)).shape == (0,)


def test_bucket_sets_and_splits():
    assert pow2_buckets(8) == (1, 2, 4, 8) and pow2_buckets(6) == (1, 2, 4, 6)
    assert pow2_buckets(8, multiple=4) == (4, 8) and pow2_buckets(6, multiple=4) == (4, 8)
    assert split_into_buckets(7, (1, 2, 4, 8), exact=True) == [(4, 4), (2, 2), (1, 1)]
    assert split_into_buckets(19, (1, 2, 4, 8), exact=True) == [(8, 8), (8, 8), (2, 2), (1, 1)]
    assert split_into_buckets(2, (4, 8), exact=True) == [(4, 2)]  # below the smallest: padded
    assert split_into_buckets(7, (1, 2, 4, 8), exact=False) == [(8, 7)]
    assert split_into_buckets(19, (1, 2, 4, 8), exact=False) == [(8, 8), (8, 8), (4, 3)]
    assert seq_buckets(100) == (8, 12, 16, 24, 32, 48, 64, 96, 100)
    assert seq_buckets(8) == (8,)


def test_tasks_are_scored_at_their_own_length(setup):
    td = setup["task_data"]
    want = [max(int(np.flatnonzero(row).max()) + 1 for row in attn_ns) for attn_ns in td.attn_tns]
    np.testing.assert_array_equal(task_lengths(td), want)
    scorer = Scorer(setup["params"], setup["cfg"], setup["prepared"], td, batch_size=1)
    for t, sb in enumerate(scorer.seq_bucket_of):
        assert want[t] <= sb and sb in seq_buckets(td.tokens_tns.shape[-1])
        assert scorer._data_by_seq[sb].shape[-1] == sb


# --------------------------------------------------------------------------- more than 8 adapters

WIDE_N = 11  # > MIN_MEMBER_BUCKET: masks of up to 8 members merge gathered (G = 8 < N), larger ones at G = N


def build_wide(root: str, n: int, example, *, prefix: str = "w", model_seed: int = 5, adapter_seed: int = 2,
               **model_overrides) -> dict:
    """n rank-2 adapters (q_proj, v_proj) on the tiny Llama, two examples per task: example(i, e) ->
    (prompt, response) of task i's example e."""
    model_dir = make_tiny_model(os.path.join(root, "base"), "llama", seed=model_seed, **model_overrides)
    names = [f"{prefix}{i:02d}" for i in range(n)]
    make_peft_adapters(model_dir, os.path.join(root, "adapters"), names, r=2, alpha=4, seed=adapter_seed,
                       target_modules=("q_proj", "v_proj"))
    ddir = os.path.join(root, "data")
    os.makedirs(ddir)
    for i, name in enumerate(names):
        with open(os.path.join(ddir, f"{name}.jsonl"), "w") as f:
            for e in range(2):
                prompt, response = example(i, e)
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    cfg = load_config(model_dir)
    adapters = lora_lib.load_adapter_set(os.path.join(root, "adapters"), cfg)
    td = data.load_task_data(ddir, adapters.names, hf_io.load_tokenizer(model_dir), examples_per_task=2,
                             max_seq_len=32)
    return dict(cfg=cfg, params=hf_io.load_params(model_dir, cfg, "float32"), adapters=adapters, task_data=td)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """WIDE_N adapters (build_wide)."""
    def example(i, e):
        j = (i + e) % len(PROMPTS)
        return PROMPTS[j], RESPONSES[(j + i) % 6]

    return build_wide(str(tmp_path_factory.mktemp("wide")), WIDE_N, example)


def _random_requests(n: int, sizes, seed: int):
    """One random mask per size (members drawn uniformly), each with a random member task."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(sizes), n), bool)
    tasks = np.zeros(len(sizes), np.int32)
    for i, size in enumerate(sizes):
        members = rng.choice(n, size, replace=False)
        masks[i, members] = True
        tasks[i] = rng.choice(members)
    return masks, tasks


@pytest.fixture(scope="module")
def wide_scorers(wide):
    """(prepared, unbatched Scorer, batched Scorer) of the wide set, ties at density 0.5."""
    prepared = merge.prepare_merge(wide["adapters"], "ties", 0.5)
    return (prepared, Scorer(wide["params"], wide["cfg"], prepared, wide["task_data"], batched=False),
            Scorer(wide["params"], wide["cfg"], prepared, wide["task_data"], batch_size=4, batched=True))


def test_scorer_with_more_adapters_than_the_smallest_member_bucket_equals_merging_the_full_stack(wide, wide_scorers):
    """With N > 8 a mask of at most 8 members is merged from its gathered members (G = 8 < N) and
    a larger one over all N slots (padded to 16 with zero adapters); both scorers (unbatched,
    batched) must give merge_mask over the whole stack [N, ...] followed by task_loss, for random
    masks of every size."""
    cfg, td = wide["cfg"], wide["task_data"]
    prepared, unbatched, batched = wide_scorers
    masks, tasks = _random_requests(WIDE_N, [1, 2, 3, 5, 7, 8, 9, WIDE_N, 4, 6], seed=11)

    @jax.jit
    def full_stack(mask, t):
        lora = merge.merge_mask(prepared, mask)
        return loss.task_loss(wide["params"], cfg, lora, jax.tree.map(lambda x: jnp.asarray(x)[t], td.batch))

    want = np.array([float(full_stack(m, t)) for m, t in zip(masks, tasks)])
    # N = 11 is padded to 16 slots (zero factors): a mask of 9 or more members merges over all 16.
    assert unbatched._member_bucket(8) == 8 < WIDE_N and unbatched._member_bucket(9) == unbatched.adapter_slots == 16
    # float32 sums in another order (gathered slots vs the full stack) and the packed vs padded
    # loss: a few ulps of float32 per operation; 1e-5 relative is ~100 ulps.
    np.testing.assert_allclose(unbatched.losses(masks, tasks), want, rtol=1e-5)
    np.testing.assert_allclose(batched.losses(masks, tasks), want, rtol=1e-5)
    # The same masks scored on another member task each: every member's view of the merge.
    other = np.array([np.flatnonzero(m)[-1] for m in masks], np.int32)
    want_other = np.array([float(full_stack(m, t)) for m, t in zip(masks, other)])
    np.testing.assert_allclose(unbatched.losses(masks, other), want_other, rtol=1e-5)


def test_a_search_records_the_evaluations_the_real_scorer_made(wide_scorers):
    """With speculation forced on (--speculate=3), the search's recorded evaluations (per row and
    in total) are the requests the Scorer really scored: each distinct (mask, task) pair once."""
    from d2c_jax.run_config import SearchSettings
    from d2c_jax.search import run_search

    scorer = wide_scorers[1]
    before = scorer.stats.copy()
    settings = SearchSettings(num_clusters=3, iterations=6, population=2, proposals=2, speculate=3, seed=2)
    result = run_search(scorer, settings)
    done = scorer.stats - before
    assert any(r.get("speculated", 0) > 1 for r in result.state.metrics)
    assert result.evaluations == sum(r["evaluations"] for r in result.state.metrics) == done["requests_scored"]
    assert done["requests_scored"] == len(result.state.cache)  # unbounded cache: nothing scored twice
