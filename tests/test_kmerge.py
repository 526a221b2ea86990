"""K-Merge / K-Merge++ baselines: the factor-space cosine against dense float64 numpy, the running
average against PEFT's sequence of add_weighted_adapter calls (as K-Merge's code makes them), and
the slot rules on adapters built so that the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2c_jax import kmerge


def _factors(rng, modules, layers, rank, d_in, d_out, zero_layers=()):
    out = {}
    for m in modules:
        a = rng.standard_normal((layers, rank, d_in)).astype(np.float32)
        b = rng.standard_normal((layers, d_out, rank)).astype(np.float32)
        for l in zero_layers:
            b[l] = 0.0
        out[m] = {"a": a, "b": b}
    return out


def _dense_cosines(x, y):
    """Reference: ΔW = B @ A formed densely in float64, cosine per (module, layer); NaN where either
    is all zeros."""
    rows = []
    for m in sorted(set(x) & set(y)):
        row = []
        for l in range(x[m]["a"].shape[0]):
            dx = x[m]["b"][l].astype(np.float64) @ x[m]["a"][l].astype(np.float64)
            dy = y[m]["b"][l].astype(np.float64) @ y[m]["a"][l].astype(np.float64)
            nx, ny = np.linalg.norm(dx), np.linalg.norm(dy)
            row.append(np.sum(dx * dy) / (nx * ny) if nx > 0 and ny > 0 else np.nan)
        rows.append(row)
    return np.array(rows)


def test_factor_space_cosine_matches_dense_float64_reference():
    rng = np.random.default_rng(0)
    x = _factors(rng, ["q_proj", "v_proj", "o_proj"], 3, 4, 24, 16, zero_layers=(1,))
    y = _factors(rng, ["q_proj", "v_proj", "gate_proj"], 3, 6, 24, 16)
    y["q_proj"]["a"] = y["q_proj"]["a"][:, :4]  # ranks may differ between the two adapters
    y["q_proj"]["b"] = y["q_proj"]["b"][:, :, :4]
    y["v_proj"]["b"][2] = -3.0 * x["v_proj"]["b"][2, :, :4] @ np.eye(4, 6, dtype=np.float32)
    y["v_proj"]["a"][2] = np.eye(6, 4, dtype=np.float32) @ x["v_proj"]["a"][2]  # ΔW_y = -3 ΔW_x: cos -1
    got, ref = kmerge.layer_cosines(x, y), _dense_cosines(x, y)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    # Both in float64: the two summation orders differ by a few ulps times the sums' lengths
    # (<= 24 * 16 terms): far below 1e-12.
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=1e-12, atol=1e-12)
    assert got[1, 2] == pytest.approx(-1.0, abs=1e-12)
    assert kmerge.similarity(x, y) == pytest.approx(np.nanmean(ref), abs=1e-12)
    assert kmerge.similarity(x, {}) == 0.0  # nothing in common


def test_running_average_is_kmerge_sequence_of_peft_linear_merges(tmp_path):
    """K-Merge's slot update with PEFT: add_weighted_adapter([slot, new], [(n-1)/n, 1/n], "linear"),
    then the slot replaced by the result; our running average of the unit-weight linear merge
    must have the same effective ΔW = scaling * B @ A."""
    from fixtures_adapters import make_peft_adapters, peft_deltas
    from fixtures_models import make_tiny_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from d2c_jax import lora, merge
    from d2c_jax.models.config import load_config

    base = make_tiny_model(tmp_path / "base", "llama")
    names = ["a0", "a1", "a2"]
    dirs = make_peft_adapters(base, tmp_path / "ad", names, r=4, alphas=[8, 4, 12])
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, dirs[0], adapter_name="cluster_0")
    for n, d in enumerate(dirs[1:], start=2):
        model.load_adapter(d, adapter_name="new_lora")
        model.add_weighted_adapter(["cluster_0", "new_lora"], [1 - 1 / n, 1 / n], "temp", combination_type="linear")
        model.delete_adapter("cluster_0")
        model.add_weighted_adapter(["temp"], [1.0], "cluster_0", combination_type="linear")
        model.delete_adapter("temp")
        model.delete_adapter("new_lora")
    cfg = load_config(str(base))
    ref = peft_deltas(model, "cluster_0", cfg.num_layers)

    aset = lora.load_adapter_dirs(dirs, cfg)
    merged = merge.merge_mask(merge.prepare_merge(aset, "linear", 1.0), np.ones(3, bool))
    ours = lora.lora_delta(kmerge.running_average({m: {k: np.asarray(v) for k, v in x.items()}
                                                    for m, x in merged.items()}, 3))
    for m, d in ref.items():
        scale = np.abs(d).max()
        # float32 factors summed over 3 adapters on both sides: a few float32 ulps (1.2e-7) of
        # the largest entry.
        np.testing.assert_allclose(ours[m], d, rtol=0, atol=1e-6 * scale, err_msg=m)


def _rank1(u, v):
    """One module, one layer: ΔW = u v^T."""
    return {"q_proj": {"a": np.asarray(v, np.float32)[None, None, :], "b": np.asarray(u, np.float32)[None, :, None]}}


def _slot_factors(members, adapters):
    """A slot's K-Merge adapter: the linear merge of its members' factors, times sqrt(1/n)."""
    summed = {"q_proj": {k: sum(adapters[i]["q_proj"][k] for i in members) for k in ("a", "b")}}
    return kmerge.running_average(summed, len(members))


@pytest.mark.parametrize("rule", kmerge.RULES)
def test_slot_rules_on_adapters_of_known_similarity(rule):
    e = np.eye(4)
    adapters = [
        _rank1(e[0], e[0]),  # 0
        _rank1(e[1], e[1]),  # 1: orthogonal to 0 (cosine 0 < 0.02)
        _rank1(2 * e[0], e[0]),  # 2: the direction of 0 (cosine 1)
        _rank1(e[2], e[2]),  # 3: orthogonal to both
    ]
    slots = kmerge.Slots(3)
    chosen = []
    for i, ad in enumerate(adapters):
        k, sims = kmerge.choose_slot(rule, slots, ad, lambda s: _slot_factors(slots.members[s], adapters))
        slots.members[k].append(i)
        chosen.append(k)
    if rule == "kmerge":  # the first K fill the slots in order, then the nearest
        assert chosen == [0, 1, 2, 0]
    else:  # a new slot only when unlike every filled slot; 2 joins 0 although slot 2 is free
        assert chosen == [0, 1, 0, 2]
    assert slots.partition([0, 1, 2, 3]).tolist() == chosen


def test_full_slots_take_the_nearest_and_the_first_on_ties():
    e = np.eye(4)
    adapters = [_rank1(e[0], e[0]), _rank1(e[1], e[1]), _rank1(e[0] + e[1], e[0] + e[1])]
    slots = kmerge.Slots(2, [[0], [1]])
    for rule in kmerge.RULES:
        k, sims = kmerge.choose_slot(rule, slots, adapters[2], lambda s: _slot_factors(slots.members[s], adapters))
        assert sims == pytest.approx([0.5, 0.5]) and k == 0  # equal cosines: the first slot
