"""The tuning controls (tune.py): a fresh LoRA trained from PEFT's initialisation under the same loop
as tuned factors (what the fine-tune alone earns), and one tuned scale per cluster (task
arithmetic with a tuned scale). Their reported losses are the Scorer's (parity-tested against
transformers + peft) of what they keep; the fresh start is PEFT's own initialisation."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from d2c_jax import merge, tune  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.scoring import Scorer  # noqa: E402
from fixtures_search_inputs import load_search_inputs  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

PARTITION = np.array([0, 1, 0, 1, 1], np.int32)
SETTINGS = tune.TuneSettings(steps=6, holdout=0.3, patience=6)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return load_search_inputs(tmp_path_factory.mktemp("controls"))


def _held(td):
    """The held-out part tune.split_examples makes of 3 examples at holdout 0.3: the last one."""
    return dataclasses.replace(td, batch=jax.tree.map(lambda x: x[:, 2:3], td.batch),
                               num_examples=np.ones(td.num_tasks, np.int32))


def _per_cluster(inputs, prepared, lora_of_cluster, td):
    """Reference: each task's Scorer loss under lora_of_cluster(c) (None: the base model), summed
    per cluster."""
    scorer = Scorer(inputs["params"], inputs["cfg"], prepared, td, batch_size=2)
    out = np.zeros(2)
    for t, c in enumerate(PARTITION):
        out[c] += scorer.loss_of_lora(lora_of_cluster(c), t)
    return out


def test_a_fresh_lora_is_initialised_as_peft_initialises_one(inputs):
    """PEFT's LoraLayer.reset_lora_parameters: A kaiming_uniform_(a=sqrt(5)), B zeros."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inputs["paths"]["base_model"])
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    a_peft = np.stack([m.lora_A["default"].weight.detach().numpy() for n, m in pm.named_modules()
                       if n.endswith("q_proj") and hasattr(m, "lora_A")])
    b_peft = np.stack([m.lora_B["default"].weight.detach().numpy() for n, m in pm.named_modules()
                       if n.endswith("q_proj") and hasattr(m, "lora_A")])
    d_in = a_peft.shape[-1]
    shapes = {"q_proj": {"a": jax.ShapeDtypeStruct((2,) + a_peft.shape, np.float32),
                         "b": jax.ShapeDtypeStruct((2,) + b_peft.shape, np.float32)}}
    ours = tune.fresh_lora(shapes, seed=0)["q_proj"]
    a_ours, b_ours = np.asarray(ours["a"]), np.asarray(ours["b"])
    bound = math.sqrt(6.0 / ((1 + 5.0) * d_in))  # kaiming_uniform's gain sqrt(2 / (1 + a^2)) * sqrt(3 / fan_in)
    assert np.all(b_peft == 0) and np.all(b_ours == 0)
    for a in (a_peft, a_ours):  # the same uniform law: within the bound, filling it, mean ~0
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size)  # 4 standard errors of a U(-b, b) mean
    # Same variance (b^2 / 3) within sampling error (relative standard error sqrt(0.8 / size)).
    for a in (a_peft, a_ours):
        assert abs(a.var() / (bound ** 2 / 3) - 1) < 4 * math.sqrt(0.8 / a.size)


def test_a_fresh_lora_starts_at_the_base_model_and_reports_the_losses_of_what_it_keeps(inputs):
    prepared = merge.prepare_merge(inputs["aset"], "ties_delta", 0.5)
    res = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity="factors", start="fresh", learning_rate=0.05))
    held = _held(inputs["td"])
    # The start (B = 0) is the base model: tune's loss program vs the Scorer's, LOSS_RTOL.
    np.testing.assert_allclose(res.unit_heldout_k, _per_cluster(inputs, prepared, lambda c: None, held),
                               rtol=LOSS_RTOL)
    kept = np.where(res.kept_k, res.tuned_heldout_k, res.unit_heldout_k)
    np.testing.assert_allclose(
        _per_cluster(inputs, prepared, lambda c: jax.tree.map(lambda x: x[c], res.lora), held), kept, rtol=LOSS_RTOL)
    assert res.kept_k.any(), "6 Adam steps at lr 0.05 from B = 0 should beat the base model on some cluster"
    for c in range(2):
        b_zero = all(not np.any(np.asarray(ab["b"][c])) for ab in res.lora.values())
        assert b_zero != bool(res.kept_k[c])  # not kept: the start itself


def test_one_tuned_scale_per_cluster_weights_every_member_alike(inputs):
    prepared = merge.prepare_merge(inputs["aset"], "core_ta", 0.5)
    res = tune.tune_partition(inputs["params"], inputs["cfg"], prepared, inputs["td"], PARTITION, 2,
                              dataclasses.replace(SETTINGS, granularity="scale", learning_rate=0.2))
    assert res.weights.shape == (2, 5)
    assert np.all(res.weights == res.weights[:, :1]) and np.all(res.tuned == res.tuned[:, :1])
    held = _held(inputs["td"])
    loras = tune.merged_clusters(prepared, PARTITION, 2, res.tuned)
    np.testing.assert_allclose(res.tuned_heldout_k,
                               _per_cluster(inputs, prepared, lambda c: jax.tree.map(lambda x: x[c], loras), held),
                               rtol=LOSS_RTOL)
    assert res.kept_k.any(), "6 Adam steps at lr 0.2 should move some cluster's scale to a better held-out loss"


def test_a_fresh_start_needs_factor_tuning():
    with pytest.raises(UserError, match="--tune_start=fresh: trains a new LoRA, so it needs --tune_granularity=factors"):
        tune.TuneSettings(granularity="adapter", start="fresh")
