"""The SVD operators (merge_svd.py) == plain numpy (float64) written from the published definitions:
Iso-C (Marczak et al., ICML 2025), KnOTS-TIES / KnOTS-linear (Stoica et al., ICLR 2025); the
rank fitting == numpy's truncated SVD; the SVD's JVP == finite differences where jnp's is NaN.
Compared on the effective update b @ a (SVD factors are unique only up to sign)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures_merge_refs import D, L, N, R, adapter_set, deltas, ties_np, truncate

from d2c_jax import lora as lora_lib
from d2c_jax import merge, merge_svd

MASKS = [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 1, 1]]
WEIGHTS = np.array([1.0, 0.7, 1.3, 0.4, 2.0])
_deltas, _truncate, _ties_np = deltas, truncate, ties_np


@pytest.fixture(scope="module")
def aset():
    return adapter_set()


def ref_iso_c(aset, m, mask, w, r):
    """Iso-C: M = sum_i w_i delta_i; SVD; all singular values -> their mean; keep the top r."""
    d = _deltas(aset, m)
    sel = np.flatnonzero(mask)
    out = []
    for layer in range(L):
        mat = sum(w[i] * d[i, layer] for i in sel)
        u, s, vh = np.linalg.svd(mat, full_matrices=False)
        out.append(s.mean() * u[:, :r] @ vh[:r])
    return np.stack(out)


def ref_knots(aset, m, mask, w, r, density, ties=True):
    """KnOTS: X = [delta_1 ... delta_n] (d_out x n d_in), SVD, keep S > 1e-5 S_max, C_i = S V_i^T,
    merge the C_i (TIES, or the weighted sum), merged = U C, truncated to rank r."""
    d = _deltas(aset, m)
    sel = np.flatnonzero(mask)
    out = []
    for layer in range(L):
        x = np.concatenate([d[i, layer] for i in sel], axis=1)
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        keep = s > 1e-5 * s.max()
        u, s, vh = u[:, keep], s[keep], vh[keep]
        d_in = d.shape[-1]
        cs = [s[:, None] * vh[:, j * d_in:(j + 1) * d_in] for j in range(len(sel))]
        if ties:
            merged_c = _ties_np([(c, w[i] * c, c.size) for c, i in zip(cs, sel)], density)
        else:
            merged_c = sum(w[i] * c for c, i in zip(cs, sel))
        out.append(_truncate(u @ merged_c, r))
    return np.stack(out)


def _ours(aset, method, mask, density=0.5, weights=None, rank=None):
    prep = merge.prepare_merge(aset, method, density, weights=weights, rank=rank)
    return lora_lib.lora_delta(jax.jit(merge.merge_mask)(prep, np.array(mask, bool)))


def _close(got, want, tol=2e-4):
    """float32 SVDs (ours) vs float64 numpy of the definition, of the largest |entry|: a float32
    SVD is backward stable, ||E|| ~ sqrt(n) U sigma_1 = 5e-7 sigma_1 (n = N d_in <= 80 columns);
    a rank-r truncation moves by ||E|| over the relative gap (sigma_r - sigma_r+1) / sigma_1
    (Wedin), >= 0.018 at r = 1..4 for these deltas: 3e-5 each; the merge chains up to three
    (stacked deltas, the merged C, the output rank): 1e-4 -> 2e-4."""
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("weighted", [False, True])
def test_iso_c_matches_numpy_definition(aset, weighted):
    w = WEIGHTS if weighted else np.ones(N)
    for r in (R, 2):
        for mask in MASKS[:1] + MASKS[2:]:
            got = _ours(aset, "iso_c", mask, weights=w, rank=r)
            for m in aset.a:
                _close(got[m], ref_iso_c(aset, m, mask, w, r))


@pytest.mark.parametrize("density", [1.0, 0.5, 0.3])
def test_knots_ties_matches_numpy_definition(aset, density):
    for mask in MASKS:
        for w in (np.ones(N), WEIGHTS):
            got = _ours(aset, "knots_ties", mask, density=density, weights=w)
            for m in aset.a:
                _close(got[m], ref_knots(aset, m, mask, w, R, density))


def test_knots_linear_matches_numpy_definition(aset):
    for mask in MASKS:
        got = _ours(aset, "knots_linear", mask, weights=WEIGHTS, rank=4)
        for m in aset.a:
            _close(got[m], ref_knots(aset, m, mask, WEIGHTS, 4, 1.0, ties=False))


@pytest.mark.parametrize("method", ["ties", "linear", "ties_delta", "knots_ties"])
def test_output_rank_is_the_truncated_svd_of_the_full_rank_merge(aset, method):
    full = _ours(aset, method, MASKS[1], rank=R)
    for r in (1, 2):
        got = _ours(aset, method, MASKS[1], rank=r)
        for m in aset.a:
            # dropped directions come back only as float32 rounding, ~sqrt(n) U sigma_1 = 5e-7 of the
            # largest entry; the kept ones are >= 0.018 sigma_1 (the gap in _close): 1e-4 lies between
            assert np.linalg.matrix_rank(got[m][0], tol=1e-4 * np.abs(got[m][0]).max()) <= r
            _close(got[m], np.stack([_truncate(x.astype(np.float64), r) for x in full[m]]))
    if method in merge.DELTA_METHODS:
        return  # a delta-space merge has more than R directions: a larger rank keeps more of it
    wide = merge.prepare_merge(aset, method, 0.5, rank=R + 2)  # factor-wise: zero-padded
    out = jax.jit(merge.merge_mask)(wide, np.array(MASKS[1], bool))
    assert out["q_proj"]["a"].shape == (L, R + 2, D)
    for m in aset.a:
        # zero-padded factors: no SVD, only the float32 B @ A of width R: MERGE_RTOL (tolerances.py)
        _close(lora_lib.lora_delta(out)[m], full[m], 1e-5)


def test_single_member_fits_the_output_rank(aset):
    for method in ("ties", "iso_c"):
        got = _ours(aset, method, [0, 0, 1, 0, 0], rank=2)
        for m in aset.a:
            want = _deltas(aset, m)[2]
            _close(got[m], np.stack([_truncate(x, 2) for x in want]))


def test_svd_jvp_matches_finite_differences_with_repeated_zero_singular_values():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 8))  # rank 2: six zero singular values
    direction = rng.normal(size=(8, 8))

    def f(t):
        a, b = merge_svd.factors(jnp.asarray(base + t * direction, jnp.float32)[None], 2)
        return jnp.sum((b @ a) ** 2 * jnp.arange(64.0).reshape(8, 8))

    g = jax.grad(f)(0.0)
    assert np.isfinite(g)

    def f64(t):
        return float(np.sum(_truncate(base + t * direction, 2) ** 2 * np.arange(64.0).reshape(8, 8)))

    eps = 1e-5
    fd = (f64(eps) - f64(-eps)) / (2 * eps)
    # float64 central difference: truncation eps^2 |f'''| ~ 1e-10, rounding 1e-16 / eps = 1e-11; the float32
    # gradient through an SVD of a rank-2 matrix: U sigma_1 / sigma_2 per singular pair times the 64
    # weights and the jvp's 1/(sigma_i^2 - sigma_j^2) terms, ~1e-4 relative: 2e-3
    np.testing.assert_allclose(float(g), fd, rtol=2e-3)


def _graded(rng, m, n, spectrum):
    """A float64 matrix [m, n] with the given singular values (random singular vectors)."""
    k = min(m, n)
    u = np.linalg.qr(rng.normal(size=(m, k)))[0]
    v = np.linalg.qr(rng.normal(size=(n, k)))[0]
    return (u * spectrum) @ v.T


@pytest.mark.parametrize("shape, spectrum", [
    ((96, 40), np.logspace(0, -3, 40)),  # graded over three decades
    ((40, 96), np.logspace(0, -3, 40)),  # wide: the SVD of the transpose
    ((96, 40), np.concatenate([np.logspace(0, -1, 20), np.zeros(20)])),  # rank 20 of 40
])
def test_gram_svd_matches_float64_svd_within_the_squared_spectrum_bounds(shape, spectrum):
    """gram_svd (the SVD the TPU programs use, here with LAPACK's eigh in place of XLA's Jacobi
    solver) against numpy's float64 SVD of the same float32 matrix. Bounds, k = min(m, n) = 40,
    from the eigensolver's backward error k U ||G^T G|| = k U s_1^2 on each pass's Gram matrix:
    U S V^T within 2 passes x k U x 2 (the product G W rounds by another k U) of ||X||; V
    orthonormal to as much; s_j within k U s_1^2 / s_j (an eigenvalue s_j^2 off by k U s_1^2);
    numerically null directions below k U s_1^2 / (the smallest non-null s); the rank-5
    truncation (the operators' use) within the backward error times s_1 / (s_5 - s_6) (Wedin)."""
    from d2c_jax.merge_common import GRAM_PASSES, gram_svd

    from tolerances import U

    x64 = _graded(np.random.default_rng(3), *shape, spectrum)
    x = x64.astype(np.float32)
    u, s, vh = (np.asarray(t, np.float64) for t in jax.jit(gram_svd)(jnp.asarray(x)))
    u0, s0, vh0 = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    k = min(shape)
    backward = 2 * GRAM_PASSES * k * U
    assert np.linalg.norm((u * s) @ vh - x) <= backward * np.linalg.norm(x)
    v_side = vh if shape[0] >= shape[1] else u.T  # the orthogonal one (the eigenvectors' product)
    np.testing.assert_allclose(v_side @ v_side.T, np.eye(k), atol=backward)
    live = s0 > 1e-6 * s0[0]
    assert np.all(np.abs(s - s0)[live] <= k * U * s0[0] ** 2 / s0[live])
    if not live.all():
        assert np.all(s[~live] <= k * U * s0[0] ** 2 / s0[live].min())
    r = 5
    wedin = backward * np.linalg.norm(x) * s0[0] / (s0[r - 1] - s0[r])
    top, top0 = (u[:, :r] * s[:r]) @ vh[:r], (u0[:, :r] * s0[:r]) @ vh0[:r]
    assert np.linalg.norm(top - top0) <= wedin


def test_svd_compiled_for_a_tpu_uses_no_qr():
    """XLA expands a TPU QR per 128-column block (minutes of compilation each at 1280 columns):
    the SVD compiled for a TPU is two Gram eigensolves (gram_svd), no QR."""
    pytest.importorskip("libtpu")
    from d2c_jax import dry_run
    from d2c_jax.merge_common import plain_svd

    devices = dry_run.topology_devices("v5e-1")[0]
    x = jax.ShapeDtypeStruct((2, 300, 140), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(devices[0]))
    text = jax.jit(plain_svd).lower(x).as_text()
    assert "custom_call @Eigh" in text and "@Qr" not in text and "householder" not in text.lower()
