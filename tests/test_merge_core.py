"""The core-space operators (merge_core.py) == float64 numpy of their papers' definitions
(tests/fixtures_merge_refs.py): core_ties == TIES on Core Space merging's cores; core_ta, core_tsv
and core_iso_cts == task arithmetic, TSV-Merge and Iso-CTS of the dense updates (the core space
changes nothing for them); every operator holds factors only; the streamed ties_delta equals
ties_delta's dense definition. Compared on the effective update b @ a (SVD factors are unique only
up to sign and rotation).

Tolerance: the merges run in float32 (unit roundoff 6e-8) through a chain of at most five SVDs;
the singular gaps of these random 12-20 wide factors are >= 1e-2 of the largest, so each SVD's
subspaces move by <= ~1e2 eps relative to the largest entry: 2e-4 of the largest entry of the
reference (the bound of test_merge_svd.py's operators) leaves a margin of ~10.
"""

import jax
import numpy as np
import pytest

from fixtures_merge_refs import (D, L, N, R, adapter_set, core_space, deltas, iso_cts_np, ties_np, truncate,
                                 tsv_np)

from d2c_jax import lora as lora_lib
from d2c_jax import merge

MASKS = [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 1, 1]]
WEIGHTS = np.array([1.0, 0.7, 1.3, 0.4, 2.0])
TOL = 2e-4


@pytest.fixture(scope="module")
def aset():
    return adapter_set()


def _ours(aset, method, mask, density=0.5, weights=None, rank=None):
    prep = merge.prepare_merge(aset, method, density, weights=weights, rank=rank)
    return lora_lib.lora_delta(jax.jit(merge.merge_mask)(prep, np.array(mask, bool)))


def _close(got, want, tol=TOL):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _per_layer(aset, mask, fn):
    """{module: [L, d_out, d_in]} of fn(members' float64 updates, A's, B's, member indices)."""
    sel = np.flatnonzero(mask)
    out = {}
    for m in aset.a:
        d = deltas(aset, m)
        out[m] = np.stack([fn([d[i, layer] for i in sel], [aset.a[m][i, layer].astype(np.float64) for i in sel],
                              [aset.b[m][i, layer].astype(np.float64) for i in sel], sel) for layer in range(L)])
    return out


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_core_ties_is_ties_on_the_core_space_cores(aset, density):
    """Core Space merging (public code, get_core_matrices): M_i = U_B^T delta_i V_A from the SVDs
    of the stacked raw A's and B's; TIES on the M_i (numel = the core's size); U_B M V_A^T."""
    for w in (np.ones(N), WEIGHTS):
        for mask in MASKS:
            def ref(ds, a_list, b_list, sel):
                u_b, vh_a = core_space(a_list, b_list)
                cores = [u_b.T @ x @ vh_a.T for x in ds]
                merged = ties_np([(c, w[i] * c, c.size) for c, i in zip(cores, sel)], density)
                return truncate(u_b @ merged @ vh_a, R)

            got = _ours(aset, "core_ties", mask, density=density, weights=w)
            want = _per_layer(aset, mask, ref)
            for m in aset.a:
                _close(got[m], want[m])


def test_core_ties_trim_is_not_ties_delta(aset):
    """The trim is basis-dependent: at density 0.5 the core-space TIES is another merge."""
    got, dense = _ours(aset, "core_ties", MASKS[2]), _ours(aset, "ties_delta", MASKS[2])
    assert max(np.abs(got[m] - dense[m]).max() / np.abs(dense[m]).max() for m in got) > 100 * TOL


@pytest.mark.parametrize("method", ["core_ta", "knots_linear"])
def test_core_ta_is_the_truncated_dense_sum(aset, method):
    """Task arithmetic: sum_i w_i delta_i (dense, float64), truncated to the output rank."""
    for r in (R, 2):
        for mask in MASKS:
            got = _ours(aset, method, mask, weights=WEIGHTS, rank=r)
            want = _per_layer(aset, mask, lambda ds, a, b, sel: truncate(sum(WEIGHTS[i] * x for x, i in zip(ds, sel)), r))
            for m in aset.a:
                _close(got[m], want[m])


def test_core_tsv_is_tsv_merge_of_the_dense_updates(aset):
    """TSV-Merge of the dense weighted updates, each keeping its top floor(min(k R, d_out, d_in) / k)
    triplets (R while k R fits; the core space's floor(min(core) / k))."""
    for w in (np.ones(N), WEIGHTS):
        for mask in MASKS:
            k = int(np.sum(mask))

            def ref(ds, a_list, b_list, sel):
                keep = min(k * R, *ds[0].shape) // k
                return truncate(tsv_np([w[i] * x for x, i in zip(ds, sel)], keep), R)

            got = _ours(aset, "core_tsv", mask, weights=w)
            want = _per_layer(aset, mask, ref)
            for m in aset.a:
                _close(got[m], want[m])


@pytest.mark.parametrize("rank", [R, 2 * R])
def test_core_iso_cts_is_iso_cts_of_the_dense_updates(aset, rank):
    """Iso-CTS (official algorithm) of the dense weighted updates with subspace size
    D = min(r, k R, d_out, d_in): rank D, isotropic, so stored exactly at rank r."""
    for w in (np.ones(N), WEIGHTS):
        for mask in MASKS:
            k = int(np.sum(mask))

            def ref(ds, a_list, b_list, sel):
                return iso_cts_np([w[i] * x for x, i in zip(ds, sel)], min(rank, k * R, *ds[0].shape))

            got = _ours(aset, "core_iso_cts", mask, weights=w, rank=rank)
            want = _per_layer(aset, mask, ref)
            for m in aset.a:
                _close(got[m], want[m])


def test_streamed_ties_delta_is_ties_on_the_dense_updates(aset):
    """ties_delta (PEFT ties_svd): TIES on the dense updates, trimmed per adapter and layer at
    int(density * d_out d_in), truncated to rank R; computed layer by layer from the factors."""
    for density in (1.0, 0.5, 0.2):
        for mask in MASKS:
            got = _ours(aset, "ties_delta", mask, density=density, weights=WEIGHTS)
            want = _per_layer(aset, mask, lambda ds, a, b, sel: truncate(
                ties_np([(x, WEIGHTS[i] * x, x.size) for x, i in zip(ds, sel)], density), R))
            for m in aset.a:
                _close(got[m], want[m])


@pytest.mark.parametrize("method", merge.DELTA_METHODS)
def test_update_space_operators_hold_factors_only(aset, method):
    """No [d_out, d_in] leaf: prepared memory is O(N L R (d_in + d_out)) (+ [N, L] thresholds)."""
    prep = merge.prepare_merge(aset, method, 0.5)
    factor_bytes = sum(aset.a[m].nbytes + aset.b[m].nbytes for m in aset.a)
    leaves = jax.tree.leaves(prep)
    assert sum(x.nbytes for x in leaves) <= factor_bytes + 2 * len(aset.a) * N * L * 4 + 2 * N * 4
    assert all(x.ndim < 2 or min(x.shape[-2:]) <= R for x in leaves)  # factors and [N, L] only


@pytest.mark.parametrize("method", merge.CORE_METHODS + ("ties_delta", "knots_ties"))
def test_weight_gradients_match_finite_differences(aset, method):
    """Tuning differentiates the merge in its weights: d/dw_j of a fixed linear functional of
    the merged update (rank 2R) == central differences (float64 weights' steps of 1e-3 on the float32
    merge: the difference quotient carries ~eps / 1e-3 ~ 1e-4 relative rounding and O(h^2)
    truncation, so 1e-2 relative to the gradient's largest entry)."""
    rng = np.random.default_rng(3)
    probe = {m: rng.normal(size=deltas(aset, m).shape[1:]) for m in aset.a}
    unit = merge.prepare_merge(aset, method, 0.5, rank=2 * R)  # core_iso_cts: common and task directions
    mask = np.array(MASKS[2], bool)

    def f(w):
        out = merge.merge_mask(merge.with_weights(unit, w), mask)
        return sum(jax.numpy.sum((v["b"] @ v["a"]) * probe[m]) for m, v in out.items())

    w0 = np.array([1.0, 0.9, 1.2, 0.8, 1.1])
    grad = np.asarray(jax.jit(jax.grad(f))(jax.numpy.asarray(w0, jax.numpy.float32)))
    f_jit, h = jax.jit(f), 1e-3
    fd = np.array([(float(f_jit(w0 + h * e)) - float(f_jit(w0 - h * e))) / (2 * h) for e in np.eye(N)])
    assert np.all(np.isfinite(grad))
    assert np.abs(grad[mask]).max() > 0 and not grad[~mask].any()
    np.testing.assert_allclose(grad, fd, atol=1e-2 * np.abs(fd).max())


@pytest.mark.parametrize("method", merge.METHODS)
def test_prepared_shapes_are_what_prepare_merge_builds(aset, method):
    """merge.prepared_shapes (memory reports, compiling without adapters) == the Prepared that
    prepare_merge builds: the same tree, static fields, shapes and dtypes."""
    dims = {m: (aset.a[m].shape[-1], aset.b[m].shape[-2]) for m in aset.a}
    got = merge.prepared_shapes(dims, N, L, R, method, density=0.5)
    want = merge.prepare_merge(aset, method, 0.5)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [(x.shape, x.dtype) for x in jax.tree.leaves(want)]


def test_merge_cli_writes_a_core_space_merge_that_peft_loads(tmp_path):
    """launch/merge.py --method=core_iso_cts: the adapter it writes, loaded by PEFT, has the
    update of merge_mask on the same adapters (float32 write and read: 1e-5 of the largest)."""
    import os
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from fixtures_adapters import make_peft_adapters, peft_deltas
    from fixtures_models import make_tiny_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from d2c_jax.models.config import load_config

    base = make_tiny_model(tmp_path / "base", "llama", seed=0)
    dirs = make_peft_adapters(base, tmp_path / "adapters", ["x", "y", "z"], alphas=[16, 8, 32], seed=5)
    out = tmp_path / "merged"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(repo, "launch", "merge.py"), f"--adapters={','.join(dirs)}",
                           "--method=core_iso_cts", f"--output_dir={out}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    got = peft_deltas(PeftModel.from_pretrained(model, str(out), adapter_name="m"), "m", 2)
    aset = lora_lib.load_adapter_set(tmp_path / "adapters", load_config(base))
    want = lora_lib.lora_delta(merge.merge_mask(merge.prepare_merge(aset, "core_iso_cts"), np.ones(3, bool)))
    assert set(got) == set(want)
    for m in want:
        np.testing.assert_allclose(got[m], want[m], atol=1e-5 * np.abs(want[m]).max())


def test_core_ties_and_ties_delta_through_the_tpu_svd_match_their_definitions(aset, monkeypatch):
    """Compiled for a TPU every SVD is merge_common.gram_svd (Gram eigensolves, no QR): the same
    float64 definitions hold within the same TOL with it in place of LAPACK's SVD (its error
    bounds: tests/test_merge_svd.py)."""
    from d2c_jax import merge_common

    monkeypatch.setattr(merge_common, "_svd_library", merge_common.gram_svd)
    mask = MASKS[3]

    def ours(method):  # a fresh function: no trace cached with LAPACK's SVD
        prep = merge.prepare_merge(aset, method, 0.5, weights=WEIGHTS)
        return lora_lib.lora_delta(jax.jit(lambda p, m: merge.merge_mask(p, m))(prep, np.array(mask, bool)))

    def core_ref(ds, a_list, b_list, sel):
        u_b, vh_a = core_space(a_list, b_list)
        cores = [u_b.T @ x @ vh_a.T for x in ds]
        return truncate(u_b @ ties_np([(c, WEIGHTS[i] * c, c.size) for c, i in zip(cores, sel)], 0.5) @ vh_a, R)

    refs = {"core_ties": core_ref, "ties_delta": lambda ds, a, b, sel: truncate(
        ties_np([(x, WEIGHTS[i] * x, x.size) for x, i in zip(ds, sel)], 0.5), R)}
    for method, ref in refs.items():
        got, want = ours(method), _per_layer(aset, mask, ref)
        for m in aset.a:
            _close(got[m], want[m])
