"""merge_mask is a pure masked reduction: vmap over masks under jit == merging each mask alone;
a one-member mask is that adapter unchanged; trimming keeps int(density * numel) entries of the
adapter's true-rank matrices, independent of the mask."""

import chex
import jax
import numpy as np
import pytest

from d2c_jax import lora as lora_lib
from d2c_jax import merge

L, D, F = 2, 16, 24
RANKS = [4, 8, 8, 3, 8]


def _adapter_set(ranks=RANKS) -> lora_lib.AdapterSet:
    """len(ranks) (5) adapters with different ranks, one without down_proj, one without layer 1."""
    rng = np.random.default_rng(0)
    n, r = len(ranks), max(ranks)
    shapes = {"q_proj": (D, D), "down_proj": (F, D)}
    a, b = {}, {}
    for m, (d_in, d_out) in shapes.items():
        a[m] = np.zeros((n, L, r, d_in), np.float32)
        b[m] = np.zeros((n, L, d_out, r), np.float32)
        for i, ri in enumerate(ranks):
            a[m][i, :, :ri] = rng.normal(size=(L, ri, d_in))
            b[m][i, :, :, :ri] = rng.normal(size=(L, d_out, ri))
    a["down_proj"][3] = b["down_proj"][3] = 0.0
    for m in shapes:
        a[m][2, 1] = b[m][2, 1] = 0.0
    return lora_lib.AdapterSet(
        names=tuple(f"t{i}" for i in range(n)),
        a=a,
        b=b,
        scaling=np.resize([2.0, 0.5, 1.0, 4.0 / np.sqrt(3.0), 3.0], n),
        ranks=np.array(ranks),
        paths=tuple(f"/x/t{i}" for i in range(n)),
    )


MASKS = np.array(
    [
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 1, 1, 0, 0],
        [1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ],
    bool,
)


@pytest.fixture(scope="module")
def adapter_set():
    return _adapter_set()


@pytest.mark.parametrize("method", merge.METHODS)
def test_vmapped_merge_equals_merging_each_mask_alone(adapter_set, method):
    prepared = merge.prepare_merge(adapter_set, method, 0.5, seed=3)
    batched = jax.jit(merge.merge_masks)(prepared, MASKS)
    one = jax.jit(merge.merge_mask)
    # DELTA_METHODS: the delta through a float32 SVD, tolerances.SVD_RTOL; the others: the same sums
    # over N members in another order (a batched vs an unbatched contraction), gamma_N ~ 1e-6
    tol = 2e-5 if method in merge.DELTA_METHODS else 1e-6
    for c, mask in enumerate(MASKS):
        alone = one(prepared, mask)
        for m in alone:
            for f in ("a", "b"):
                assert batched[m][f].shape == (len(MASKS),) + alone[m][f].shape
            # ties_delta: compare deltas (SVD factors are unique only up to sign).
            got = lora_lib.lora_delta({m: {k: batched[m][k][c] for k in "ab"}})[m]
            want = lora_lib.lora_delta({m: alone[m]})[m]
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max() + 1e-12)


@pytest.mark.parametrize("method", merge.METHODS)
def test_single_member_mask_is_the_adapter_unchanged(adapter_set, method):
    prepared = merge.prepare_merge(adapter_set, method, 0.5)
    f = jax.jit(merge.merge_mask)
    for i in range(adapter_set.num_adapters):
        mask = np.zeros(adapter_set.num_adapters, bool)
        mask[i] = True
        got = f(prepared, mask)
        want = lora_lib.effective_lora(adapter_set, i)
        chex.assert_trees_all_equal(got, want)


def test_empty_mask_gives_zeros(adapter_set):
    prepared = merge.prepare_merge(adapter_set, "ties", 0.5)
    out = jax.jit(merge.merge_mask)(prepared, np.zeros(adapter_set.num_adapters, bool))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 1.0])
def test_trim_keeps_int_density_times_true_rank_numel(adapter_set, density):
    prepared = merge.prepare_merge(adapter_set, "ties", density)
    for m, t in prepared.task.items():
        a = np.asarray(t["a"])  # [N, L, R, d_in]
        b = np.asarray(t["b"])  # [N, L, d_out, R]
        for i, r in enumerate(RANKS):
            for layer in range(L):
                raw_a = adapter_set.a[m][i, layer, :r]
                raw_b = adapter_set.b[m][i, layer, :, :r]
                if not raw_a.any():
                    assert not a[i, layer].any() and not b[i, layer].any()
                    continue
                assert np.count_nonzero(a[i, layer]) == int(density * raw_a.size)
                assert np.count_nonzero(b[i, layer]) == int(density * raw_b.size)
                # the kept entries are the largest in magnitude, unchanged
                kept = a[i, layer, :r] != 0
                if 0 < kept.sum() < kept.size:
                    assert np.abs(raw_a[kept]).min() >= np.abs(raw_a[~kept]).max()
                np.testing.assert_array_equal(a[i, layer, :r][kept], raw_a[kept])
                assert not a[i, layer, r:].any() and not b[i, layer, :, r:].any()


def test_dare_ties_drop_mask_is_fixed_by_the_seed(adapter_set):
    p1 = merge.prepare_merge(adapter_set, "dare_ties", 0.5, seed=7)
    p2 = merge.prepare_merge(adapter_set, "dare_ties", 0.5, seed=7)
    p3 = merge.prepare_merge(adapter_set, "dare_ties", 0.5, seed=8)
    chex.assert_trees_all_equal(p1, p2)
    assert not np.array_equal(np.asarray(p1.task["q_proj"]["a"]), np.asarray(p3.task["q_proj"]["a"]))
    # kept entries are rescaled by 1 / density
    raw = adapter_set.a["q_proj"]
    kept = np.asarray(p1.task["q_proj"]["a"])
    nz = kept != 0
    np.testing.assert_array_equal(kept[nz], raw[nz] / 0.5)  # dividing by a power of two is exact


def test_bad_method_density_weights_are_user_errors(adapter_set):
    from d2c_jax.errors import UserError

    with pytest.raises(UserError, match="unknown merge method"):
        merge.prepare_merge(adapter_set, "nope", 0.5)
    with pytest.raises(UserError, match="density"):
        merge.prepare_merge(adapter_set, "ties", -0.1)
    with pytest.raises(UserError, match="weights"):
        merge.prepare_merge(adapter_set, "ties", 0.5, weights=[1.0, 2.0])


@pytest.mark.parametrize("method", merge.METHODS)
def test_gathered_member_merges_equal_full_masks(method):
    """scoring.merge_members (each mask's members gathered from every Prepared leaf, padded with
    masked-out slots) and merge.merge_gathered (one mask, the unbatched scorer's) equal
    merge_mask on the full N mask, for every method."""
    from d2c_jax.scoring import merge_members

    prepared = merge.prepare_merge(_adapter_set(), method, 0.5, seed=1)
    masks = MASKS[MASKS.any(axis=1)]
    g = 4
    members = np.zeros((len(masks) + 1, g), np.int32)  # + one padding row (live False)
    valid = np.zeros((len(masks) + 1, g), bool)
    for i, m in enumerate(masks):
        idx = np.flatnonzero(m)[:g]
        members[i, :len(idx)], valid[i, :len(idx)] = idx, True
    live = np.arange(len(masks) + 1) < len(masks)
    got = jax.jit(merge_members)(prepared, members, valid, live)
    one = jax.jit(merge.merge_gathered)  # the unbatched scorer's merge: one mask, gathered per branch
    for i, m in enumerate(masks):
        if m.sum() > g:
            continue
        want = jax.jit(merge.merge_mask)(prepared, m)
        for got_i in (jax.tree.map(lambda v: v[i], got), one(prepared, members[i], valid[i])):
            _assert_same_merge(method, want, got_i)
    for x in jax.tree.leaves(jax.tree.map(lambda v: v[-1], got)):
        assert not np.asarray(x).any()  # padding row: skipped, zeros


def _assert_same_merge(method, want, got_i):
    """Same merge: the factors (tolerance of float32 sums), or for SVD-written merges the delta."""
    if method in merge.DELTA_METHODS:
        # Written through a truncated float32 SVD: the factors are unique only up to signs and
        # rotations, the delta B @ A is the merge. Its error is eps * |delta| (backward
        # stability), so it is compared against the largest entry.
        for m_name in want:
            x = np.asarray(lora_lib.lora_delta(want)[m_name])
            y = np.asarray(lora_lib.lora_delta(got_i)[m_name])
            assert np.abs(y - x).max() <= 2e-5 * np.abs(x).max(), (method, m_name)
        return
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got_i)):
        # gathered members' sums vs the full mask's (masked-out terms add exact zeros): the same
        # terms in another order, gamma_N of sum |terms| (~1e-6 relative, atol for cancellations)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-5, atol=1e-6)


def test_gathered_merge_cost_does_not_grow_with_n():
    """The compiled merge of G members costs the same FLOPs for N = 40 and N = 200 (XLA's own
    cost analysis: counts, not timings); the full-mask merge grows with N. (XLA's "bytes
    accessed" charges a gather its whole operand, so it is no measure here.)"""
    from d2c_jax.scoring import merge_members

    def cost(n, gathered):
        tree = merge.prepare_merge(_adapter_set(), "ties", 0.5)
        big = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype), tree)
        if gathered:
            args = (big, jax.ShapeDtypeStruct((4, 8), np.int32), jax.ShapeDtypeStruct((4, 8), bool),
                    jax.ShapeDtypeStruct((4,), bool))
            compiled = jax.jit(merge_members).lower(*args).compile()
        else:
            compiled = jax.jit(merge.merge_masks).lower(big, jax.ShapeDtypeStruct((4, n), bool)).compile()
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return ca["flops"]

    assert cost(40, True) == cost(200, True)
    assert cost(200, False) > 4 * cost(40, False)
