"""Property tests (hypothesis) of the merge on random adapter sets: invariance to adapter order,
a one-member merge is that adapter, density 1 with agreeing signs is the plain mean of the
weighted factors (TIES by definition, written here in numpy), the vmapped batch equals the loop,
and finite inputs never give NaN or Inf.

Shapes: N adapters, L layers, R rank, d_in / d_out module widths, C masks.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2c_jax import merge
from d2c_jax.lora import AdapterSet, lora_delta
from tolerances import SVD_RTOL

L, R, D_IN, D_OUT = 2, 3, 5, 4
ORDER_METHODS = ("ties", "linear", "magnitude_prune", "ties_delta")  # dare_ties draws its drops in adapter order
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def adapter_sets(draw, min_n=1, max_n=5, agreeing=False):
    """A random AdapterSet: two modules, ranks in [1, R] (zero-padded), scalings in [0.1, 4]."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, R + 1, size=n) if not agreeing else np.full(n, R)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    a, b = {}, {}
    for m in ("q_proj", "down_proj"):
        a_nlrd = np.zeros((n, L, R, D_IN), np.float32)
        b_nldr = np.zeros((n, L, D_OUT, R), np.float32)
        if agreeing:  # every adapter's entry has the sign of one shared pattern, |x| >= 0.1
            sign_a = rng.choice([-1.0, 1.0], size=(L, R, D_IN))
            sign_b = rng.choice([-1.0, 1.0], size=(L, D_OUT, R))
            a_nlrd[:] = sign_a * rng.uniform(0.1, 1.0, size=(n, L, R, D_IN)) * scale
            b_nldr[:] = sign_b * rng.uniform(0.1, 1.0, size=(n, L, D_OUT, R)) * scale
        else:
            for i, r in enumerate(ranks):
                a_nlrd[i, :, :r] = rng.normal(size=(L, r, D_IN)) * scale
                b_nldr[i, :, :, :r] = rng.normal(size=(L, D_OUT, r)) * scale
        a[m], b[m] = a_nlrd, b_nldr
    scaling = rng.uniform(0.1, 4.0, size=n)
    return AdapterSet(names=tuple(f"t{i}" for i in range(n)), a=a, b=b, scaling=scaling,
                      ranks=np.asarray(ranks, np.int32), paths=tuple(f"/t{i}" for i in range(n)))


def _permuted(aset: AdapterSet, perm: np.ndarray) -> AdapterSet:
    return AdapterSet(names=tuple(aset.names[i] for i in perm), a={m: v[perm] for m, v in aset.a.items()},
                      b={m: v[perm] for m, v in aset.b.items()}, scaling=aset.scaling[perm], ranks=aset.ranks[perm],
                      paths=tuple(aset.paths[i] for i in perm))


def _np(tree):
    return {m: {k: np.asarray(v, np.float64) for k, v in f.items()} for m, f in tree.items()}


def _close(x, y, rtol=2e-5):
    """|x - y| <= rtol of max |y|. The default: merges of the same adapters summed in another order,
    through ties_delta's float32 SVD (tolerances.SVD_RTOL)."""
    scale = max(np.abs(y).max(), 1e-30)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)


@SETTINGS
@given(aset=adapter_sets(min_n=2), method=st.sampled_from(ORDER_METHODS), density=st.sampled_from([0.3, 0.7, 1.0]),
       data=st.data())
def test_merge_is_invariant_to_adapter_order(aset, method, density, data):
    n = aset.num_adapters
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    perm = np.array(data.draw(st.permutations(range(n))))
    merged = lora_delta(_np(merge.merge_mask(merge.prepare_merge(aset, method, density), mask)))
    permuted = lora_delta(_np(merge.merge_mask(merge.prepare_merge(_permuted(aset, perm), method, density), mask[perm])))
    for m in merged:
        _close(permuted[m], merged[m])


@SETTINGS
@given(aset=adapter_sets(), method=st.sampled_from(merge.METHODS), density=st.sampled_from([0.2, 0.5, 1.0]),
       data=st.data())
def test_a_one_member_merge_is_that_adapter_unchanged(aset, method, density, data):
    i = data.draw(st.integers(0, aset.num_adapters - 1))
    mask = np.zeros(aset.num_adapters, bool)
    mask[i] = True
    out = _np(merge.merge_mask(merge.prepare_merge(aset, method, density), mask))
    for m in aset.a:
        np.testing.assert_array_equal(out[m]["a"], aset.a[m][i])
        # B_i s_i: one float32 product, by prepare_merge and here: bit for bit
        np.testing.assert_array_equal(out[m]["b"], aset.b[m][i] * np.float32(aset.scaling[i]))


@SETTINGS
@given(aset=adapter_sets(min_n=2, agreeing=True), data=st.data())
def test_ties_at_density_1_with_agreeing_signs_is_the_mean(aset, data):
    """TIES keeps everything (density 1), elects the common sign, and averages the weighted
    factors (A_i * sqrt(s_i), B_i * sqrt(s_i) for s_i > 0) over the members."""
    n = aset.num_adapters
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda x: sum(x) >= 2)))
    out = _np(merge.merge_mask(merge.prepare_merge(aset, "ties", 1.0), mask))
    w = np.sqrt(aset.scaling[mask])
    for m in aset.a:
        mean_a = np.mean(aset.a[m][mask].astype(np.float64) * w[:, None, None, None], axis=0)
        mean_b = np.mean(aset.b[m][mask].astype(np.float64) * w[:, None, None, None], axis=0)
        _close(out[m]["a"], mean_a)
        _close(out[m]["b"], mean_b)


_JIT_MERGE_MASKS = jax.jit(merge.merge_masks)
_JIT_MERGE_MASK = jax.jit(merge.merge_mask)


@SETTINGS
@given(aset=adapter_sets(min_n=4, max_n=4), method=st.sampled_from(merge.METHODS), data=st.data())
def test_the_vmapped_batch_equals_the_loop(aset, method, data):
    """Jitted, with fixed N = 4 and C = 3, so each method compiles once. Merges written through
    an SVD (DELTA_METHODS) are compared on the update b @ a (their factors are unique only up to
    signs), at test_merge_vmap.py's bound for float32 SVDs."""
    masks_cn = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=3, max_size=3)))
    prepared = merge.prepare_merge(aset, method, 0.5)
    batch = _JIT_MERGE_MASKS(prepared, masks_cn)
    for c, mask in enumerate(masks_cn):
        one = _JIT_MERGE_MASK(prepared, mask)
        if method in merge.DELTA_METHODS:
            got = lora_delta(jax.tree.map(lambda x: x[c], batch))
            for m, want in lora_delta(one).items():
                _close(got[m], want, rtol=SVD_RTOL)
            continue
        got, one = _np(jax.tree.map(lambda x: x[c], batch)), _np(one)
        for m in one:
            for k in one[m]:
                # the same sums over N = 4 members (a batched vs an unbatched contraction) in another
                # order: gamma_4 ~ 4 U = 2.4e-7 of sum |terms|, <= 4 max |merge| here: 1e-6
                _close(got[m][k], one[m][k], rtol=1e-6)


@SETTINGS
@given(aset=adapter_sets(), method=st.sampled_from(merge.METHODS), density=st.floats(0.01, 1.0), data=st.data())
def test_finite_inputs_never_give_nan_or_inf(aset, method, density, data):
    n = aset.num_adapters
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    out = _np(merge.merge_mask(merge.prepare_merge(aset, method, density), mask))
    for m in out:
        for k in out[m]:
            assert np.all(np.isfinite(out[m][k])), (method, m, k)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01, float("nan")])
def test_density_outside_0_1_is_refused(density):
    from d2c_jax.errors import UserError

    aset = AdapterSet(names=("a", "b"), a={"q_proj": np.ones((2, L, R, D_IN), np.float32)},
                      b={"q_proj": np.ones((2, L, D_OUT, R), np.float32)}, scaling=np.ones(2),
                      ranks=np.full(2, R, np.int32), paths=("/a", "/b"))
    with pytest.raises(UserError, match=r"--density=.*: must be in \(0, 1\]"):
        merge.prepare_merge(aset, "ties", density)


@pytest.mark.parametrize("method", merge.METHODS)
def test_preparing_compiles_nothing_and_holds_float32_copies_of_the_host_arrays(method):
    """prepare_merge only moves its host arrays onto the device (an add's placement prepares new
    shapes: a compiled copy per stack would cost it time): no XLA compilation, every leaf float32,
    and the raw factors and scalings (float64 on the host) as jax's own float32 conversion."""
    from fixtures_merge_refs import adapter_set

    aset = adapter_set(seed=3)
    compiles = []

    def listen(event, *args, **kwargs):  # jax's events of an XLA compilation, or of a persistent-cache lookup
        if event in ("/jax/core/compile/backend_compile_duration",
                     "/jax/compilation_cache/compile_requests_use_cache"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    jax.monitoring.register_event_listener(listen)
    try:
        prepared = merge.prepare_merge(aset, method, 0.5, seed=1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        jax.monitoring.unregister_event_listener(listen)
    assert compiles == [], f"{len(compiles)} compilations"
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(prepared))
    if method in merge.DELTA_METHODS:  # these keep the raw factors and the scalings
        np.testing.assert_array_equal(prepared.weight_b, np.asarray(aset.scaling, np.float32))
        for m in aset.a:
            np.testing.assert_array_equal(prepared.task[m]["a"], aset.a[m])
            np.testing.assert_array_equal(prepared.task[m]["b"], aset.b[m])
