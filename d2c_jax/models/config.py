"""HF `config.json` → a frozen, hashable ModelConfig (usable as a jit static argument).

Supported: LlamaForCausalLM (GQA, tied embeddings, rope "default" | "linear" | "llama3"),
Qwen2ForCausalLM (qkv bias), StableLmForCausalLM (LayerNorm with bias, partial rotary, optional
qkv bias). Reads transformers-5 `rope_parameters` and the legacy `rope_theta` / `rope_scaling`.
Every field read is validated first (type, sign, range; null only where transformers reads it as
"the default"): a bad one is a UserError naming config.json and the field.
Shape legend: D model dim, F mlp dim, H heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from d2c_jax.errors import UserError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "StableLmForCausalLM": "stablelm",
}
MODEL_TYPES = frozenset(ARCHITECTURES.values())  # model_type values accepted without "architectures"
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs to know about a base model.

    rope_scaling: None, ("linear", factor) or
    ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    eos_token_id is the first of `eos_token_ids` (HF allows a list, e.g. Llama 3 instruct).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0 means head_dim (set in __post_init__)
    rope_scaling: tuple | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if not self.eos_token_ids and self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_ids", (self.eos_token_id,))


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each of the 7 LoRA-able linear modules."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


def _arch_of(raw: dict[str, Any], path: str) -> str:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(path, f"architectures={archs!r}: must be a list of class names such as [\"LlamaForCausalLM\"]")
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and raw.get("model_type") in MODEL_TYPES:
        return raw["model_type"]
    name = ",".join(archs) if archs else f"model_type={raw.get('model_type')!r}"
    raise UserError(
        path, f"unsupported architecture {name}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def _rope(raw: dict[str, Any], path: str) -> tuple[float, tuple | None, float]:
    """Returns (rope_theta, rope_scaling tuple, partial_rotary_factor)."""
    params = raw.get("rope_parameters")
    where = "rope_parameters" if params is not None else "rope_scaling"
    params = (raw.get("rope_scaling") or {}) if params is None else params
    if not isinstance(params, dict):
        raise UserError(path, f"{where}={params!r} must be a JSON object")
    params = dict(params)
    theta_key = f"{where}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = _number(path, theta_key, params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    partial_key = f"{where}.partial_rotary_factor" if "partial_rotary_factor" in params else "partial_rotary_factor"
    partial = _number(path, partial_key, params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)),
                      maximum=1.0)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None, partial

    def field(key: str, cast=float):
        if key not in params:
            raise UserError(path, f"rope_type {kind!r} is missing the field {key!r}")
        if cast is int:
            return _integer(path, f"{where}.{key}", params[key])
        return _number(path, f"{where}.{key}", params[key])

    if kind == "linear":
        return theta, ("linear", field("factor")), partial
    if kind == "llama3":
        scaling = ("llama3", field("factor"), field("low_freq_factor"), field("high_freq_factor"),
                   field("original_max_position_embeddings", int))
        return theta, scaling, partial
    raise UserError(path, f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def _integer(path: str, key: str, value: Any, minimum: int = 1) -> int:
    """A config.json integer field: a JSON integer >= minimum (not null, a float, a string or a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(path, f"{key}={value!r}: must be an integer >= {minimum}")
    return value


def _number(path: str, key: str, value: Any, maximum: float | None = None) -> float:
    """A config.json real field: a finite JSON number > 0 (and <= maximum)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (maximum is not None and value > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise UserError(path, f"{key}={value!r}: must be a finite number > 0{bound}")
    return float(value)


def _token_id(path: str, key: str, value: Any, vocab: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab:
        raise UserError(path, f"{key}={value!r}: must be a token id in [0, vocab_size={vocab}) or null")
    return value


def _flag(path: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(path, f"{key}={value!r}: must be true or false")
    return value


def _reject(path: str, raw: dict[str, Any], key: str, bad: Any, why: str) -> None:
    if raw.get(key, None) == bad:
        raise UserError(path, f"{key}={bad!r} is not supported ({why})")


def config_from_dict(raw: dict[str, Any], path: str = "config.json") -> ModelConfig:
    """Builds the ModelConfig from a parsed config.json (path is only used in errors)."""
    arch = _arch_of(raw, path)
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(path, f"hidden_act={act!r} is not supported (only silu)")
    if arch == "llama":
        _reject(path, raw, "attention_bias", True, "Llama attention biases")
        _reject(path, raw, "mlp_bias", True, "Llama MLP biases")
    if arch == "qwen2":
        _reject(path, raw, "use_sliding_window", True, "sliding-window attention")
    if arch == "stablelm":
        _reject(path, raw, "qk_layernorm", True, "per-head q/k LayerNorm")
        _reject(path, raw, "use_parallel_residual", True, "parallel residual")
    for key in ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers"):
        if key not in raw:
            raise UserError(path, f"missing field {key!r}")
    hidden = _integer(path, "hidden_size", raw["hidden_size"])
    heads = _integer(path, "num_attention_heads", raw["num_attention_heads"])
    vocab = _integer(path, "vocab_size", raw["vocab_size"])
    inter = _integer(path, "intermediate_size", raw["intermediate_size"])
    layers = _integer(path, "num_hidden_layers", raw["num_hidden_layers"])
    # null means "the default" for these two, as in transformers
    kv_heads = heads if raw.get("num_key_value_heads") is None else _integer(
        path, "num_key_value_heads", raw["num_key_value_heads"])
    if raw.get("head_dim") is None and hidden < heads:
        raise UserError(path, f"hidden_size={hidden} is smaller than num_attention_heads={heads} (head dim 0)")
    head_dim = hidden // heads if raw.get("head_dim") is None else _integer(path, "head_dim", raw["head_dim"])
    if heads % kv_heads:
        raise UserError(path, f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    theta, scaling, partial = _rope(raw, path)
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise UserError(path, f"partial_rotary_factor={partial} gives a bad rotary dim {rotary_dim}")
    if arch == "stablelm":
        norm, qkv_bias = "layer", _flag(path, "use_qkv_bias", raw.get("use_qkv_bias", False))
        eps = _number(path, "layer_norm_eps", raw.get("layer_norm_eps", 1e-5))
    else:
        norm, eps, qkv_bias = "rms", _number(path, "rms_norm_eps", raw.get("rms_norm_eps", 1e-6)), arch == "qwen2"
    eos = raw.get("eos_token_id")
    eos_ids = tuple(_token_id(path, "eos_token_id", e, vocab) for e in (eos if isinstance(eos, list) else [eos])
                    if e is not None)
    pad = _token_id(path, "pad_token_id", raw.get("pad_token_id"), vocab)
    bos = _token_id(path, "bos_token_id", raw.get("bos_token_id"), vocab)
    tie = _flag(path, "tie_word_embeddings", raw.get("tie_word_embeddings", False))
    return ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm=norm,
        norm_eps=eps,
        rope_theta=theta,
        rotary_dim=rotary_dim,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        tie_embeddings=tie,
        bos_token_id=bos,
        eos_token_id=eos_ids[0] if eos_ids else None,
        pad_token_id=pad,
        eos_token_ids=eos_ids,
    )


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Reads `model_dir/config.json`; every problem is a UserError naming that file."""
    if not os.path.isdir(model_dir):
        raise UserError(model_dir, "model directory does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(path, "missing config.json (expected a Hugging Face model directory)")
    return config_from_dict(read_json_object(path, "config.json"), path)


def read_json_object(path: str, name: str) -> dict[str, Any]:
    """Parses the JSON object in `path`; UserError "cannot parse {name}: ..." or "{name} is not a
    JSON object" otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(path, f"cannot parse {name}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(path, f"{name} is not a JSON object")
    return raw
