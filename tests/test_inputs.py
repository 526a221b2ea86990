"""d2c_jax/inputs.py: the one loading path reads every input once, checks before the weights, and
with a mesh reads the base weights straight into the sharding of sharding.PARAM_RULES."""

from __future__ import annotations

import os

import chex
import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from d2c_jax import data, hf_io, lora, sharding  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.inputs import load_inputs  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402
from fixtures_search_inputs import NAMES, make_search_inputs  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("inputs"), tags=True)


def test_reads_what_each_module_reads_on_its_own(paths):
    inputs = load_inputs(paths["base_model"], paths["adapters_dir"], paths["data_dir"], examples_per_task=2,
                         max_seq_len=64, dtype="float32")
    assert inputs.names == tuple(NAMES)
    cfg = load_config(paths["base_model"])
    want = data.load_task_data(paths["data_dir"], NAMES, hf_io.load_tokenizer(paths["base_model"]),
                               examples_per_task=2, max_seq_len=64)
    chex.assert_trees_all_equal(inputs.task_data.batch, want.batch)
    adapters = lora.load_adapter_set(paths["adapters_dir"], cfg)
    chex.assert_trees_all_equal((inputs.adapters.a, inputs.adapters.b), (adapters.a, adapters.b))
    assert inputs.tags["task_1"] == {"family": "b", "language": "en"}
    assert "params" not in vars(inputs)  # the weights are read on first use only
    chex.assert_trees_all_equal(inputs.params, hf_io.load_params(paths["base_model"], cfg, "float32"))
    # One prepared merge per (method, density, seed), shared by every scorer.
    assert inputs.prepared("ties", 0.5) is inputs.prepared("ties", 0.5)


def test_with_a_mesh_the_weights_are_read_into_their_shardings(paths):
    mesh = sharding.make_mesh(num_candidate_shards=2)  # 2 x 4 over the 8 test devices
    inputs = load_inputs(paths["base_model"], paths["adapters_dir"], paths["data_dir"], examples_per_task=2,
                         max_seq_len=64, dtype="float32", mesh=mesh)
    want = sharding.param_shardings(inputs.params, mesh)
    same = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), inputs.params, want)
    assert all(jax.tree.leaves(same))
    assert inputs.params["layers"]["q_proj"]["kernel"].sharding.spec == want["layers"]["q_proj"]["kernel"].spec
    cfg = load_config(paths["base_model"])
    chex.assert_trees_all_equal(inputs.params, hf_io.load_params(paths["base_model"], cfg, "float32"))
    # The Scorer keeps them where they are.
    scorer = inputs.scorer("ties", 0.5, batch_size=4)
    assert scorer._params is inputs.params
    masks = np.eye(len(NAMES), dtype=bool)[:2] | np.eye(len(NAMES), dtype=bool)[2:4]
    plain = load_inputs(paths["base_model"], paths["adapters_dir"], paths["data_dir"], examples_per_task=2,
                        max_seq_len=64, dtype="float32").scorer("ties", 0.5, batch_size=4)
    from tolerances import LOSS_RTOL  # sharded (reductions split across devices) vs one device

    np.testing.assert_allclose(scorer.losses(masks, np.array([0, 3])), plain.losses(masks, np.array([0, 3])),
                               rtol=LOSS_RTOL)


def test_without_adapters_the_tasks_come_from_the_data(paths, tmp_path):
    inputs = load_inputs(paths["base_model"], None, paths["data_dir"], split="eval", max_seq_len=64)
    assert inputs.names == tuple(NAMES) and inputs.adapters is None
    with pytest.raises(UserError, match="merging needs --adapters_dir"):
        inputs.prepared("ties", 0.5)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    with pytest.raises(UserError, match="no <task>.jsonl files"):
        load_inputs(paths["base_model"], None, str(empty))
