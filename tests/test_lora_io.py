"""Loading, stacking and saving PEFT adapters, checked against PEFT itself (PeftModel's
scaling * lora_B @ lora_A), and the user errors for broken adapters."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fixtures_adapters import make_peft_adapters, peft_deltas  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from tolerances import U  # noqa: E402

from d2c_jax import lora as lora_lib  # noqa: E402
from d2c_jax import merge  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.models.config import LORA_MODULES, load_config, module_shapes  # noqa: E402

ALL7 = LORA_MODULES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_io")
    base = make_tiny_model(root / "base", "llama", seed=0, num_hidden_layers=3)
    ads = root / "adapters"
    make_peft_adapters(base, ads, ["d_rank4"], r=4, alpha=8, seed=1)
    make_peft_adapters(base, ads, ["c_mlp_layer1"], r=8, alpha=16, seed=2,
                       target_modules=("q_proj", "gate_proj", "up_proj", "down_proj"), layers_to_transform=[1])
    make_peft_adapters(base, ads, ["b_regex_rslora"], r=6, alpha=12, seed=3, use_rslora=True,
                       target_modules=r".*layers\.[02]\.self_attn\.(q_proj|v_proj)")
    make_peft_adapters(base, ads, ["a_all"], r=8, alpha=4, seed=4, target_modules=ALL7)
    cfg = load_config(base)
    return {"base": str(base), "ads": str(ads), "cfg": cfg, "root": root}


def _peft_model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _reference_deltas(base, adapter_dir, num_layers):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_peft_model(base), adapter_dir, adapter_name="x")
    return peft_deltas(pm, "x", num_layers)


def _assert_same_deltas(ours: dict, ref: dict, rtol=18 * U):
    """rtol of the largest |delta|: ours and PEFT's s B @ A, each a float32 dot of width r <= 8 and
    a product: <= gamma_8 sum_k |b_k a_k| + U |delta| per side (tolerances.py), and for Gaussian
    factors sum_k |b_k a_k| ~ (2 / pi) r sigma^2 = 5 sigma^2 <= max |delta| ~ 4 sqrt(r) sigma^2:
    2 (8 + 1) U = 1.1e-6."""
    assert set(ref) <= set(ours)
    scale = max(np.abs(r).max() for r in ref.values())
    for m in ours:
        want = ref.get(m, np.zeros_like(ours[m]))
        assert np.abs(ours[m] - want).max() <= rtol * scale, m


def test_load_adapter_set_stacks_ranks_modules_layers_like_peft(setup):
    aset = lora_lib.load_adapter_set(setup["ads"], setup["cfg"])
    assert aset.names == ("a_all", "b_regex_rslora", "c_mlp_layer1", "d_rank4")
    np.testing.assert_array_equal(aset.ranks, [8, 6, 8, 4])
    np.testing.assert_array_equal(aset.scaling, [4 / 8, 12 / np.sqrt(6), 16 / 8, 8 / 4])  # the same float64 ops
    assert list(aset.a) == list(ALL7)
    shapes = module_shapes(setup["cfg"])
    for m, (d_in, d_out) in shapes.items():
        assert aset.a[m].shape == (4, 3, 8, d_in)
        assert aset.b[m].shape == (4, 3, d_out, 8)
    for i, name in enumerate(aset.names):
        ref = _reference_deltas(setup["base"], os.path.join(setup["ads"], name), 3)
        _assert_same_deltas(lora_lib.lora_delta(lora_lib.effective_lora(aset, i)), ref)
    # the regex adapter adapts q/v of layers 0 and 2 only; padding beyond rank 6 is zero
    i = aset.names.index("b_regex_rslora")
    assert not aset.a["q_proj"][i, 1].any() and aset.a["q_proj"][i, 2].any()
    assert not aset.a["k_proj"][i].any() and not aset.a["q_proj"][i, :, 6:].any()
    i = aset.names.index("c_mlp_layer1")
    assert aset.a["gate_proj"][i, 1].any() and not aset.a["gate_proj"][i, 0].any()


def test_infer_dims_reads_the_base_shapes_off_the_adapters(setup):
    dirs = [os.path.join(setup["ads"], n) for n in sorted(os.listdir(setup["ads"]))]
    dims = lora_lib.infer_dims(dirs)
    assert dims.num_layers == 3
    assert dict(dims.shapes) == module_shapes(setup["cfg"])


def test_bf16_adapter_loads_as_float32(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    src = os.path.join(setup["ads"], "d_rank4")
    dst = tmp_path / "bf16"
    shutil.copytree(src, dst)
    t = load_file(os.path.join(src, lora_lib.WEIGHTS_NAME))
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(dst / lora_lib.WEIGHTS_NAME))
    ad = lora_lib.load_adapter(dst, setup["cfg"])
    key = lora_lib.peft_key(2, "v_proj", "B")
    np.testing.assert_array_equal(ad.b["v_proj"][2], t[key].to(torch.bfloat16).float().numpy())


def test_saved_merge_loads_in_peft_with_the_same_delta(setup, tmp_path):
    from peft import PeftModel

    aset = lora_lib.load_adapter_set(setup["ads"], setup["cfg"])
    prepared = merge.prepare_merge(aset, "ties", 0.5)
    lora = jax.tree.map(np.asarray, merge.merge_mask(prepared, np.array([1, 1, 0, 1], bool)))
    out = tmp_path / "merged"
    os.makedirs(out)
    (out / "stale.txt").write_text("old")  # an existing output is replaced as a whole
    lora_lib.save_peft_adapter(out, lora, rank=aset.rank, alpha=aset.rank, base_model_path=setup["base"])
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no temp dirs left behind
    assert sorted(os.listdir(out)) == [lora_lib.CONFIG_NAME, lora_lib.WEIGHTS_NAME]
    pm = PeftModel.from_pretrained(_peft_model(setup["base"]), str(out), adapter_name="m")
    _assert_same_deltas(lora_lib.lora_delta(lora), peft_deltas(pm, "m", 3))
    # and our loader reads it back exactly
    back = lora_lib.load_adapter_set(tmp_path, setup["cfg"])
    for m in lora:
        np.testing.assert_array_equal(back.a[m][0], lora[m]["a"])
        np.testing.assert_array_equal(back.b[m][0] * back.scaling[0], lora[m]["b"])


def test_save_with_layers_to_transform_writes_only_those_layers(setup, tmp_path):
    from peft import PeftModel

    aset = lora_lib.load_adapter_set(setup["ads"], setup["cfg"])
    lora = lora_lib.effective_lora(aset, aset.names.index("c_mlp_layer1"))
    lora = {m: lora[m] for m in ("q_proj", "gate_proj", "up_proj", "down_proj")}
    out = tmp_path / "one"
    lora_lib.save_peft_adapter(out, lora, rank=8, alpha=8, base_model_path=setup["base"], layers_to_transform=[1])
    pm = PeftModel.from_pretrained(_peft_model(setup["base"]), str(out), adapter_name="o")
    ref = peft_deltas(pm, "o", 3)
    _assert_same_deltas(lora_lib.lora_delta(lora), ref)
    assert not ref["q_proj"][0].any() and ref["q_proj"][1].any()


def test_keys_an_adapter_config_omits_mean_what_peft_assumes(setup, tmp_path):
    """Our defaults are PEFT's own (peft.LoraConfig's, and PEFT's per-architecture target_modules),
    and for every key of a PEFT-written adapter_config.json, the adapter with that key omitted
    loads with the delta PEFT itself loads (PeftModel.from_pretrained), e.g. lora_alpha -> 8,
    use_rslora -> False, r -> 8, target_modules -> q_proj, v_proj."""
    import dataclasses

    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    from d2c_jax.models.config import MODEL_TYPES

    peft_defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}
    for key, value in lora_lib.PEFT_DEFAULTS.items():
        if key == "target_modules":
            assert all(PEFT_TARGETS[arch] == value for arch in MODEL_TYPES), PEFT_TARGETS
        else:
            assert peft_defaults[key] == value, key
    # Values that differ from every default: a key omitted changes the delta (or nothing).
    src = tmp_path / "src"
    make_peft_adapters(setup["base"], src, ["qv"], r=8, alpha=12, use_rslora=True, seed=6,
                       target_modules=("q_proj", "v_proj"))
    written = json.loads((src / "qv" / lora_lib.CONFIG_NAME).read_text())
    full = lora_lib.lora_delta(lora_lib.effective_lora(lora_lib.load_adapter_dirs([src / "qv"], setup["cfg"]), 0))
    peft_loads = 0
    for key in sorted(written):
        if key == "peft_type":
            continue
        d = tmp_path / key / "qv"
        shutil.copytree(src / "qv", d)
        (d / lora_lib.CONFIG_NAME).write_text(json.dumps({k: v for k, v in written.items() if k != key}))
        ours = lora_lib.lora_delta(lora_lib.effective_lora(lora_lib.load_adapter_dirs([d], setup["cfg"]), 0))
        if key in peft_defaults and peft_defaults[key] == written[key]:
            ref = full  # PEFT's default is the written value: nothing changes
        else:
            ref = _reference_deltas(setup["base"], str(d), 3)
            peft_loads += 1
        _assert_same_deltas(ours, ref)
    assert peft_loads >= 4  # lora_alpha, use_rslora, target_modules, task_type at least
    no_alpha = lora_lib.load_adapter(tmp_path / "lora_alpha" / "qv", setup["cfg"])
    assert no_alpha.scaling == pytest.approx(8 / np.sqrt(8))


# ----------------------------------------------------------------------------- user errors


def _copy(setup, tmp_path, name="d_rank4"):
    parent = tmp_path / "ads"
    dst = parent / name
    shutil.copytree(os.path.join(setup["ads"], name), dst)
    return parent, dst


def _edit_config(d, **changes):
    p = d / lora_lib.CONFIG_NAME
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    from safetensors.numpy import load_file, save_file

    p = str(d / lora_lib.WEIGHTS_NAME)
    t = dict(load_file(p))
    fn(t)
    save_file(t, p)


W = lora_lib.WEIGHTS_NAME
KEY_A = lora_lib.peft_key(0, "q_proj", "A")
KEY_B = lora_lib.peft_key(0, "q_proj", "B")


def _nan(t):
    t[KEY_A] = t[KEY_A].copy()
    t[KEY_A][0, 0] = np.nan


def _wrong_shape(t):
    t[KEY_A] = np.zeros((4, 32), np.float32)


def _rename_layer(t):
    t[lora_lib.peft_key(7, "q_proj", "A")] = t.pop(KEY_A)
    t[lora_lib.peft_key(7, "q_proj", "B")] = t.pop(KEY_B)


def _add_lm_head(t):
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)


def _add_bias(t):
    t["base_model.model.model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)


CASES = {
    "missing_config": (lambda d: os.remove(d / lora_lib.CONFIG_NAME), lora_lib.CONFIG_NAME, "missing"),
    "bad_json": (lambda d: (d / lora_lib.CONFIG_NAME).write_text("{nope"), lora_lib.CONFIG_NAME, "cannot parse"),
    "bin_only": (
        lambda d: os.replace(d / lora_lib.WEIGHTS_NAME, d / "adapter_model.bin"),
        lora_lib.WEIGHTS_NAME,
        "adapter_model.bin",
    ),
    "truncated": (
        lambda d: (d / lora_lib.WEIGHTS_NAME).write_bytes((d / lora_lib.WEIGHTS_NAME).read_bytes()[:-100]),
        lora_lib.WEIGHTS_NAME,
        "not a valid safetensors",
    ),
    "not_lora": (lambda d: _edit_config(d, peft_type="IA3"), lora_lib.CONFIG_NAME, "peft_type"),
    "rank_pattern": (lambda d: _edit_config(d, rank_pattern={"q_proj": 2}), lora_lib.CONFIG_NAME, "rank_pattern"),
    "dora": (lambda d: _edit_config(d, use_dora=True), lora_lib.CONFIG_NAME, "use_dora"),
    "unsupported_target": (
        lambda d: _edit_config(d, target_modules=["q_proj", "lm_head"]),
        lora_lib.CONFIG_NAME,
        "unsupported target module 'lm_head'",
    ),
    "nan": (lambda d: _edit_tensors(d, _nan), W, f"{KEY_A} contains NaN"),
    "wrong_shape": (lambda d: _edit_tensors(d, _wrong_shape), W, f"{KEY_A} has shape (4, 32)"),
    "layer_out_of_range": (lambda d: _edit_tensors(d, _rename_layer), W, "layer index 7 out of range"),
    "lm_head_tensor": (lambda d: _edit_tensors(d, _add_lm_head), W, "unsupported target module 'lm_head'"),
    "bias_tensor": (lambda d: _edit_tensors(d, _add_bias), W, "unexpected tensor"),
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: t.pop(KEY_B)), W, f"missing tensor {KEY_B}"),
    "untargeted_tensor": (
        lambda d: _edit_config(d, target_modules=["k_proj", "v_proj", "o_proj"]),
        lora_lib.WEIGHTS_NAME,
        "not targeted",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_adapter_is_a_user_error_naming_the_file(setup, tmp_path, case):
    breaker, filename, words = CASES[case]
    parent, d = _copy(setup, tmp_path)
    breaker(d)
    with pytest.raises(UserError) as e:
        lora_lib.load_adapter_set(parent, setup["cfg"])
    assert e.value.path == str(d / filename)
    assert words in e.value.message


def test_wrong_shape_message_names_tensor_and_both_shapes(setup, tmp_path):
    parent, d = _copy(setup, tmp_path)
    _edit_tensors(d, _wrong_shape)
    with pytest.raises(UserError, match=r"has shape \(4, 32\) but the base model and r=4 need \(4, 64\)"):
        lora_lib.load_adapter_set(parent, setup["cfg"])


def test_missing_or_empty_adapters_dir_is_a_user_error(tmp_path, setup):
    with pytest.raises(UserError, match="does not exist") as e:
        lora_lib.load_adapter_set(tmp_path / "nope", setup["cfg"])
    assert e.value.path == str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no adapters here")
    with pytest.raises(UserError, match="no adapter sub-directories"):
        lora_lib.load_adapter_set(tmp_path / "empty", setup["cfg"])
