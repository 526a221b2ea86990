"""The second suite (preset `warm_start`): every adapter is fine-tuned from its language's warm-start
LoRA, so same-language adapters are alike in weights though they learn different skills. Proven from
the PEFT files a tiny build writes (read with safetensors in float64, not with our loader); the presets built
before keep their settings hash."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from d2c_jax.suite import PRESETS, ensure_suite, make_settings, read_manifest
from d2c_jax.suite import build, tasks

# 2 families x 3 languages of the preset's kind, a 2-layer width-32 model, a few dozen steps.
TINY = dict(
    families=2, languages=3, seed=1, concepts=12, min_words=3, max_words=5, search_examples=4,
    eval_examples=6, train_examples=48, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, pretrain_steps=30, pretrain_batch=16, adapter_steps=20,
    adapter_batch=8, rank=8, alpha=32, family_list=("rotate", "swap"),
)
WARM = dict(warm_start_families=("reverse", "copy"), warm_start_steps=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return ensure_suite(tmp_path_factory.mktemp("warm") / "warm", log=lambda m: None, **TINY, **WARM)


def test_same_language_adapters_are_closer_in_weights_than_same_family_ones(built):
    from experiments.weight_similarity import relation_cosines  # reads the safetensors files

    # Without a warm start the built-in suite's updates are closer within a family (full preset:
    # 0.38 vs 0.11, docs/second_suite.md); a tiny build is too short to learn the families, so
    # that contrast is measured on the presets, not here.
    for what, sims in relation_cosines(built.root).items():
        assert sims["same language"] > sims["same family"], (what, sims)


def test_the_tasks_are_the_named_families_and_the_manifest_records_the_warm_start(built):
    warm = built
    m = read_manifest(warm.root)
    assert m["tasks"] == [f"{f}_l{j}" for f in ("rotate", "swap") for j in range(3)]
    assert m["settings"]["family_list"] == ["rotate", "swap"]
    assert m["settings"]["warm_start_families"] == ["reverse", "copy"] and m["settings"]["warm_start_steps"] == 60
    with open(os.path.join(warm.data_dir, "tasks.json")) as f:
        meta = json.load(f)
    assert meta["swap_l2"] == {"metric": "chrf", "tags": {"family": "swap", "language": "l2"}}


def test_warm_start_rows_are_the_warm_families_in_that_language():
    s = make_settings(**TINY, **WARM)
    w = build._make_world(s)
    batch = build._warm_start_batches(s, w)  # [steps, L, B, S]
    assert batch.tokens.shape[:3] == (60, 3, 8)
    fam_ids = {w.vocab.id(f) for f in s.warm_start_families}
    for lang in range(3):
        toks = batch.tokens[:, lang].reshape(-1, batch.tokens.shape[-1])
        # bos, family, language tag, ':' ... (tasks.make_prompt)
        assert set(toks[:, 1].tolist()) == fam_ids
        assert set(toks[:, 2].tolist()) == {w.vocab.id(tasks.language_name(lang))}
    # None of the suite's own tasks is trained in the warm start.
    assert not fam_ids & {w.vocab.id(f) for f in s.family_list}


def test_presets_built_before_keep_their_settings_hash():
    # The hash of `full` as recorded in the suite.json of the built full preset before the later
    # fields (family_list, warm_start_*) existed: adding them changes nothing for a suite that
    # leaves them at their defaults.
    assert build.settings_hash(make_settings(**PRESETS["full"])) == \
        "0d8b78d84f9313f9f5c5b601d891953f244f4fd1d0d63529470e846b854876db"
    for name in ("demo", "full"):
        d = build.settings_dict(make_settings(**PRESETS[name]))
        assert not set(d) & set(build._LATER_FIELDS)
        assert d == {"version": build.SUITE_VERSION, **{k: v for k, v in dataclasses.asdict(
            make_settings(**PRESETS[name])).items() if k not in build._LATER_FIELDS}}
    assert {"family_list", "warm_start_families", "warm_start_steps"} <= set(
        build.settings_dict(make_settings(**PRESETS["warm_start"])))


@pytest.mark.parametrize("bad, says", [
    (dict(family_list=("rotate",)), "family_list has 1 names but families=2"),
    (dict(family_list=("rotate", "nope")), "unknown family 'nope'"),
    (dict(family_list=("rotate", "rotate")), "names a family twice"),
    (dict(warm_start_steps=5), "go together"),
])
def test_bad_settings_are_one_line_errors(bad, says):
    from d2c_jax.errors import UserError

    with pytest.raises(UserError, match=says):
        make_settings(**{**TINY, **bad})
