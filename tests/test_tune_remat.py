"""Tuning at a large model's size: the rematerialised loss (loss.task_loss_sums' `remat`: layers
recomputed, gradients accumulated over example chunks, the LM head a block of positions at a
time) has the plain loss's value and gradient, and tuning with its examples split over a mesh's
"cand" axis (tune.place_examples) reports what tuning on one device reports. The plain loss is
the one parity-tested against transformers + PEFT (test_loss_parity.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import loss, merge, sharding, tune  # noqa: E402
from fixtures_search_inputs import load_search_inputs  # noqa: E402

PARTITION = np.array([0, 1, 0, 1, 1], np.int32)
# Float32 sums of the same terms in another order (position blocks, chunk by chunk): a few ulps
# of the summed cross-entropies, far below 1e-5 relative for these few hundred terms.
SUM_ORDER_RTOL = 1e-5
# A gradient entry is a float32 dot product in the backward pass over up to ~10^3 terms (batch x
# positions, or model dims), which the recomputed graph may sum in another order: the summation
# bound n * eps32 * sum|terms| with n ~ 10^3 gives ~1.2e-4 of the leaf's gradient scale.
GRAD_ORDER_ATOL = 1.2e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return load_search_inputs(tmp_path_factory.mktemp("remat"))


def _lora_t(setup):
    prepared = merge.prepare_merge(setup["aset"], "ties", 0.5)
    lora_k = tune.merged_clusters(prepared, PARTITION, 2)
    return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(PARTITION), axis=0), lora_k)


# The fixture's S is 32 with response tokens up to position 22: 20 positions per block make two
# blocks, the last padded and holding response tokens, 3 examples in 2 chunks (a dummy row);
# then one block, one chunk.
@pytest.mark.parametrize("head_positions,example_chunk", [(20, 2), (64, None)])
def test_rematerialised_loss_has_the_plain_loss_value_and_gradient(setup, monkeypatch, head_positions, example_chunk):
    monkeypatch.setattr(loss, "REMAT_HEAD_POSITIONS", head_positions)
    params, cfg, batch = setup["params"], setup["cfg"], setup["td"].batch

    def total(lora_t, remat):
        return jnp.sum(loss.candidate_losses(params, cfg, lora_t, batch, example_chunk=example_chunk, remat=remat))

    weights = np.asarray(batch.weights)
    assert batch.tokens.shape[-1] == 32 and weights[..., 20:].any()  # the padded last block counts
    lora_t = _lora_t(setup)
    plain, g_plain = jax.value_and_grad(total)(lora_t, False)
    remat, g_remat = jax.jit(jax.value_and_grad(total), static_argnums=1)(lora_t, True)
    np.testing.assert_allclose(float(remat), float(plain), rtol=SUM_ORDER_RTOL)
    flat_p, flat_r = jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)
    assert len(flat_p) == len(flat_r) and any(np.abs(np.asarray(g)).max() > 0 for g in flat_p)
    for gp, gr in zip(flat_p, flat_r):
        scale = np.abs(np.asarray(gp)).max()  # per leaf: elementwise relative error is meaningless near 0
        np.testing.assert_allclose(np.asarray(gr), np.asarray(gp), rtol=0, atol=GRAD_ORDER_ATOL * max(scale, 1e-30))


def test_remat_is_chosen_by_the_backward_pass_size(setup):
    """Off for this tiny model (no recomputation cost where memory is plenty), on at Llama-3.2-3B
    shapes (40 tasks x 7 fitted examples x 304 tokens)."""
    from d2c_jax.models.config import ModelConfig

    fit, _, _, _ = tune.split_examples(setup["td"], 0.3)
    assert not tune.needs_remat(setup["cfg"], fit)
    llama = ModelConfig(arch="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
                        num_heads=24, num_kv_heads=8, head_dim=128)
    shaped = dataclasses.replace(fit, tokens=jax.ShapeDtypeStruct((40, 7, 304), jnp.int32))
    assert tune.needs_remat(llama, shaped)
    # 85,120 tokens x (28 layers x (8 x 3072 + 3 x 8192) x 4 bytes + 128,256 x 8 bytes)
    assert tune.backward_bytes(llama, shaped) == 85120 * (28 * (8 * 3072 + 3 * 8192) * 4 + 128256 * 8)


def test_tuning_with_examples_split_over_a_mesh_reports_what_one_device_reports(setup, monkeypatch):
    """5 tasks over a 5 x 1 ("cand" x "model") mesh, rematerialised (forced) as at a large size,
    against tuning on one device without remat: the same unit-merge losses (exactly the same
    terms) and the same first step (one Adam step from the same gradient up to summation order)."""
    if jax.device_count() < 5:
        pytest.skip("needs 5 devices (conftest forces 8 host devices)")
    prepared = merge.prepare_merge(setup["aset"], "ties", 0.5)
    settings = tune.TuneSettings(granularity="adapter", steps=1, learning_rate=0.05, patience=1)
    args = (setup["params"], setup["cfg"], prepared, setup["td"], PARTITION, 2, settings)
    one = tune.tune_partition(*args)
    mesh = sharding.make_mesh(num_candidate_shards=5, devices=jax.devices()[:5])
    assert tune.example_sharding(mesh, (5, 2, 8)).spec[0] == sharding.CAND
    monkeypatch.setattr(tune, "REMAT_ABOVE_BYTES", 0)
    split = tune.tune_partition(*args, mesh=mesh)
    for f in ("unit_fit_k", "unit_heldout_k", "tuned_fit_k", "tuned_heldout_k"):
        np.testing.assert_allclose(getattr(split, f), getattr(one, f), rtol=SUM_ORDER_RTOL, err_msg=f)
    np.testing.assert_allclose(split.tuned, one.tuned, rtol=0, atol=SUM_ORDER_RTOL)
