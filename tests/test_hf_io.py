"""Loading HF checkpoints: config parsing, the name/transpose table, sharded and bf16 files,
placement with shardings, and one clear UserError per user mistake."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import chex
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.hf_io import TABLE, entries, load_model, load_params, load_tokenizer  # noqa: E402
from d2c_jax.models.config import config_from_dict, load_config, module_shapes  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=2)


@pytest.fixture(scope="module")
def stablelm_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("stablelm"), "stablelm", seed=2, use_qkv_bias=True)


@pytest.fixture
def llama_copy(llama_dir, tmp_path):
    return shutil.copytree(llama_dir, tmp_path / "copy")


def _edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def _edit_weights(model_dir, fn):
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _hf_value(model, e, layer=None) -> np.ndarray:
    """The HF tensor for table entry e, in our layout (transposed kernels)."""
    state = model.state_dict()
    name = e.hf.format(l=layer) if layer is not None else e.hf
    if name == "lm_head.weight" and name not in state:
        name = "model.embed_tokens.weight"
    x = state[name].float().numpy()
    return x.T if e.transpose else x


def _get(params, path):
    for p in path:
        params = params[p]
    return np.asarray(params, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Config.


def test_llama_config_fields(llama_dir):
    cfg = load_config(llama_dir)
    assert (cfg.arch, cfg.norm, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "llama", "rms", 2, 4, 2, 16)
    assert cfg.rotary_dim == 16 and cfg.rope_scaling is None and not cfg.qkv_bias and not cfg.tie_embeddings
    assert module_shapes(cfg) == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    hash(cfg)  # usable as a jit static argument


def test_stablelm_config_partial_rotary_and_layernorm(stablelm_dir):
    cfg = load_config(stablelm_dir)
    assert (cfg.arch, cfg.norm, cfg.qkv_bias, cfg.rotary_dim) == ("stablelm", "layer", True, 4)


_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 300}


def test_transformers5_rope_parameters_llama3():
    raw = dict(_LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192},
               tie_word_embeddings=True, eos_token_id=[5, 7])
    cfg = config_from_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == ("llama3", 32.0, 1.0, 4.0, 8192)
    assert cfg.tie_embeddings and cfg.eos_token_id == 5 and cfg.eos_token_ids == (5, 7)


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_legacy_rope_scaling_llama3(key):
    raw = dict(_LLAMA, rope_theta=500000.0, rope_scaling={key: "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192})
    cfg = config_from_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("changes, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_config_is_a_user_error(llama_copy, changes, words):
    _edit_config(llama_copy, **changes)
    with pytest.raises(UserError) as e:
        load_config(llama_copy)
    assert words in e.value.message and e.value.path.endswith("config.json")


@pytest.mark.parametrize("key", ["qk_layernorm", "use_parallel_residual"])
def test_stablelm_unsupported_options_are_user_errors(key):
    raw = dict(_LLAMA, architectures=["StableLmForCausalLM"], **{key: True})
    with pytest.raises(UserError, match=key):
        config_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# Weights.


@pytest.mark.parametrize("which", ["llama", "stablelm"])
def test_every_table_entry_equals_the_hf_tensor(which, llama_dir, stablelm_dir):
    d = llama_dir if which == "llama" else stablelm_dir
    cfg, params = load_model(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    got = {e.path for e in entries(cfg)}
    assert got <= {e.path for e in TABLE}
    assert len(jax.tree.leaves(params)) == len(got)
    for e in entries(cfg):
        ours = _get(params, e.path)
        if "{l}" in e.hf:
            for l in range(cfg.num_layers):
                np.testing.assert_array_equal(ours[l], _hf_value(model, e, l), err_msg=e.hf)
        else:
            np.testing.assert_array_equal(ours, _hf_value(model, e), err_msg=e.hf)


def test_sharded_checkpoint_loads_like_single_file(llama_dir, tmp_path):
    sharded = make_tiny_model(tmp_path / "sharded", "llama", seed=2, max_shard_size="50KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    cfg = load_config(llama_dir)
    a, b = load_params(llama_dir, cfg), load_params(sharded, cfg)
    chex.assert_trees_all_equal(a, b)


def test_bfloat16_checkpoint_reads_exact_values(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg = load_config(tmp_path / "bf16")
    p32 = load_params(tmp_path / "bf16", cfg, "float32")
    p16 = load_params(tmp_path / "bf16", cfg, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    for e in entries(cfg):
        ref = np.stack([_hf_value(model, e, l) for l in range(2)]) if "{l}" in e.hf else _hf_value(model, e)
        np.testing.assert_array_equal(_get(p32, e.path), ref, err_msg=e.hf)
        np.testing.assert_array_equal(_get(p16, e.path), ref, err_msg=e.hf)


def test_shardings_place_params(llama_dir):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))
    cfg = load_config(llama_dir)
    ref = load_params(llama_dir, cfg)
    col = NamedSharding(mesh, P(None, None, "x"))

    def rule(name):
        return col if name.startswith("layers/") and name.endswith("kernel") else None

    by_fn = load_params(llama_dir, cfg, shardings=rule)
    assert by_fn["layers"]["q_proj"]["kernel"].sharding == col
    tree = {"embed": NamedSharding(mesh, P(None, "x"))}
    by_tree = load_params(llama_dir, cfg, shardings=tree)
    assert by_tree["embed"].sharding == tree["embed"]
    chex.assert_trees_all_equal(ref, by_fn)
    chex.assert_trees_all_equal(ref, by_tree)


def test_tokenizer_loads_locally(llama_dir):
    tok = load_tokenizer(llama_dir)
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "hello world"


# ---------------------------------------------------------------------------------------------
# User errors name the file and the problem.


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_missing_config(llama_copy):
    os.remove(os.path.join(llama_copy, "config.json"))
    with pytest.raises(UserError, match="missing config.json"):
        load_config(llama_copy)


def test_missing_weights(llama_dir, llama_copy):
    os.remove(os.path.join(llama_copy, "model.safetensors"))
    with pytest.raises(UserError, match="no model weights"):
        load_params(llama_copy, load_config(llama_dir))


def test_missing_tensor(llama_copy):
    _edit_weights(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(llama_copy)


def test_unexpected_tensor(llama_copy):
    _edit_weights(llama_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'") as e:
        load_model(llama_copy)
    assert e.value.path.endswith("model.safetensors")


def test_shape_mismatch(llama_copy):
    _edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(UserError, match=r"has shape \[128, 64\], expected \[96, 64\]") as e:
        load_model(llama_copy)
    assert e.value.path.endswith("model.safetensors")


def test_nan_weights(llama_copy):
    def poison(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] = np.nan

    _edit_weights(llama_copy, poison)
    with pytest.raises(UserError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight' contains NaN or Inf") as e:
        load_model(llama_copy)
    assert e.value.path.endswith("model.safetensors")


def test_missing_tokenizer(llama_copy):
    for f in os.listdir(llama_copy):
        if f.startswith("tokenizer"):
            os.remove(os.path.join(llama_copy, f))
    with pytest.raises(UserError, match="no tokenizer files .*copy the base model's tokenizer into this directory"):
        load_tokenizer(llama_copy)
