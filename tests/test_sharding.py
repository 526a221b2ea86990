"""sharding.py: partition rules, mesh, and sharded scoring equal to unsharded (8 CPU devices)."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from d2c_jax import sharding
from d2c_jax.errors import UserError


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 forced CPU devices of conftest.py")
    return sharding.make_mesh(num_candidate_shards=4, devices=jax.devices()[:8])


def test_mesh_axes_and_bad_shard_count(mesh):
    assert dict(mesh.shape) == {"cand": 4, "model": 2}
    with pytest.raises(UserError, match="must divide"):
        sharding.make_mesh(num_candidate_shards=3, devices=jax.devices()[:8])


def test_rules_shard_projections_and_replicate_what_does_not_divide(mesh):
    spec = lambda name, shape: sharding.spec_for(name, shape, mesh)  # noqa: E731
    assert spec("layers/q_proj/kernel", (2, 64, 64)) == P(None, None, "model")
    assert spec("layers/up_proj/kernel", (2, 64, 128)) == P(None, None, "model")
    assert spec("layers/o_proj/kernel", (2, 64, 64)) == P(None, "model", None)
    assert spec("layers/down_proj/kernel", (2, 128, 64)) == P(None, "model", None)
    assert spec("layers/k_proj/bias", (2, 32)) == P(None, "model")
    assert spec("embed", (300, 64)) == P("model", None)
    assert spec("embed", (301, 64)) == P()  # odd vocab: replicated
    assert spec("layers/input_norm/scale", (2, 64)) == P()
    assert spec("final_norm/bias", (64,)) == P()


def test_initialize_distributed_only_when_asked(monkeypatch):
    monkeypatch.delenv("D2C_DISTRIBUTED", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setattr(sharding, "_tpu_chips_present", lambda: False)  # as on a laptop
    monkeypatch.setattr(sharding, "_INITIALIZED", [])
    assert sharding.initialize_distributed() is False


def test_sharded_scoring_equals_unsharded(mesh, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from d2c_jax.scoring import Scorer
    from test_scoring import requests, shared_scorer, shared_setup

    s = shared_setup(tmp_path_factory)
    masks, tasks = requests()
    sharded = Scorer(s["params"], s["cfg"], s["prepared"], s["task_data"], batch_size=8, mesh=mesh)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert sharded._params["layers"][name]["kernel"].sharding.spec == P(None, None, "model")
        assert sharded._params["layers"][name]["bias"].sharding.spec == P(None, "model")
    assert sharded._params["layers"]["o_proj"]["kernel"].sharding.spec == P(None, "model", None)
    got = sharded.losses(masks, tasks)
    want = shared_scorer(tmp_path_factory, 8).losses(masks, tasks)
    # the model axis splits q/k/v/o's reductions across devices: another order, LOSS_RTOL
    from tolerances import LOSS_RTOL

    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
    print("sharded vs unsharded max rel err", float(np.max(np.abs(got - want) / np.abs(want))))


def test_host_copies_assemble_into_the_same_global_arrays(mesh):
    """The multi-process placement path (each process slices its host copy into its own shards),
    checked on the single-process 8-device mesh against jax.device_put."""
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(16, 8)).astype(np.float32),
              "layers": {"q_proj": {"kernel": rng.normal(size=(2, 8, 8)).astype(np.float32)}},
              "final_norm": {"scale": np.ones(8, np.float32)}}
    shardings = sharding.param_shardings(params, mesh)
    got = sharding.assemble_from_host(params, shardings)
    want = jax.device_put(params, shardings)
    chex.assert_trees_all_equal(got, want)
    assert jax.tree.leaves(jax.tree.map(lambda g, w: g.sharding == w.sharding, got, want)) == [True] * 3
    batch_bn = rng.integers(0, 2, size=(8, 5)).astype(bool)
    got = sharding.assemble_from_host(batch_bn, sharding.batch_sharding(mesh, 2))
    assert got.sharding.spec == P("cand", None) and len(got.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(got), batch_bn)
    assert sharding.put_global(batch_bn, sharding.replicated(mesh)).sharding.is_fully_replicated


def test_prepared_inputs_shard_over_model_and_memory_from_shapes_matches_placement(mesh, tmp_path_factory):
    """The Scorer's resident base weights and prepared merge inputs, placed on the 8-device mesh:
    each device holds exactly what per_device_bytes computes from shapes alone, and the prepared
    factors are split over "model" (not replicated)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from d2c_jax.scoring import Scorer
    from test_scoring import shared_setup

    s = shared_setup(tmp_path_factory)
    scorer = Scorer(s["params"], s["cfg"], s["prepared"], s["task_data"], batch_size=8, mesh=mesh)
    for tree, rules in ((scorer._params, sharding.param_shardings), (scorer._prepared, sharding.prepared_shardings)):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        want = sharding.per_device_bytes(shapes, rules(shapes, mesh))
        for dev in mesh.devices.flat:
            held = sum(sh.data.nbytes for x in jax.tree.leaves(tree) for sh in x.addressable_shards
                       if sh.device == dev)
            assert held == want
    a = scorer._prepared.task["q_proj"]["a"]  # [N, L, R, d_in]
    assert a.sharding.spec == P(None, None, None, "model")
    total = sum(x.nbytes for x in jax.tree.leaves(scorer._prepared))
    assert sharding.per_device_bytes(scorer._prepared, sharding.prepared_shardings(scorer._prepared, mesh)) < total


def test_memory_report_llama_3b_shapes():
    """experiments/memory_report.py: 8 devices on "model" hold about 1/8 of the resident bytes."""
    from experiments import memory_report

    one, eight = memory_report.report(8, 40, 32)
    # Base: 3.2B bfloat16 parameters ~ 6 GiB. Prepared: adapters as they are + trimmed factors (2x),
    # 40 adapters x 28 layers x rank 32 x (d_in of q,k,v,o for A + d_out of q,k,v,o for B), float32.
    dims = 3072 * 4 + (3072 + 1024 + 1024 + 3072)  # a: d_in of q,k,v,o; b: d_out of q,k,v,o
    # + the merge weights weight_a, weight_b ([N] float32 each); integer bytes / 2**30: exact
    assert one["prepared_gib"] == (2 * 40 * 28 * 32 * dims * 4 + 2 * 40 * 4) / 2**30
    assert 5.5 < one["params_gib"] < 6.5
    assert eight["total_gib"] < one["total_gib"] / 7


def test_auto_model_shards_takes_the_fewest_devices_per_replica_whose_share_fits():
    """The rule: base + PREPARED_COPIES x prepared, split over m devices, within REPLICA_SHARE of one."""
    params, prepared = 1000, 100
    need = params + sharding.PREPARED_COPIES * prepared
    fits = lambda m: need / m / sharding.REPLICA_SHARE  # noqa: E731 - the device size at which m just fits
    assert sharding.auto_model_shards(8, fits(1) * 1.01, params, prepared) == 1
    assert sharding.auto_model_shards(8, fits(1) * 0.99, params, prepared) == 2
    assert sharding.auto_model_shards(6, fits(2) * 0.99, params, prepared) == 3  # 4 does not divide 6
    assert sharding.auto_model_shards(8, 1.0, params, prepared) == 8  # nothing fits: every device
    assert sharding.auto_model_shards(1, 1.0, params, prepared) == 1


def test_auto_model_shards_at_llama_3b_shapes_avoids_the_layout_the_tpu_compiler_measured_too_big():
    """40 rank-32 q/k/v/o adapters prepared for ties, bfloat16 base, v5e's 15.75 GiB: libtpu's
    compiled score call needs 31.03 GiB per device with one device per replica, 5.06 GiB with 4
    (docs/performance.md, `--dry_run=v5e-8`); auto must not take 1. One 80 GB GPU: 1."""
    from experiments import memory_report

    cfg = memory_report.llama_3b_config()
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(memory_report.param_shapes(cfg)))
    prepared = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(memory_report.prepared_shapes(cfg, 40, 32)))
    assert 1 < sharding.auto_model_shards(8, 15.75 * 2**30, params, prepared) <= 4
    assert sharding.auto_model_shards(8, 79.6 * 2**30, params, prepared) == 1
