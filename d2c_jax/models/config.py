"""HF `config.json` → a frozen, hashable ModelConfig (usable as a jit static argument).

Supported: LlamaForCausalLM (GQA, tied embeddings, rope "default" | "linear" | "llama3"),
Qwen2ForCausalLM (qkv bias), StableLmForCausalLM (LayerNorm with bias, partial rotary, optional
qkv bias). Reads transformers-5 `rope_parameters` and the legacy `rope_theta` / `rope_scaling`.
Shape legend: D model dim, F mlp dim, H heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import json
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
    params = dict((raw.get("rope_scaling") or {}) if params is None else params)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None, partial
    try:
        if kind == "linear":
            return theta, ("linear", float(params["factor"])), partial
        if kind == "llama3":
            scaling = (
                "llama3",
                float(params["factor"]),
                float(params["low_freq_factor"]),
                float(params["high_freq_factor"]),
                int(params["original_max_position_embeddings"]),
            )
            return theta, scaling, partial
    except KeyError as e:
        raise UserError(path, f"rope_type {kind!r} is missing the field {e.args[0]!r}") from None
    raise UserError(path, f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


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
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        vocab = int(raw["vocab_size"])
        inter = int(raw["intermediate_size"])
        layers = int(raw["num_hidden_layers"])
    except KeyError as e:
        raise UserError(path, f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(path, f"bad size field: {e}") from None
    if heads % kv_heads:
        raise UserError(path, f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    theta, scaling, partial = _rope(raw, path)
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise UserError(path, f"partial_rotary_factor={partial} gives a bad rotary dim {rotary_dim}")
    if arch == "stablelm":
        norm, eps, qkv_bias = "layer", float(raw.get("layer_norm_eps", 1e-5)), bool(raw.get("use_qkv_bias", False))
    else:
        norm, eps, qkv_bias = "rms", float(raw.get("rms_norm_eps", 1e-6)), arch == "qwen2"
    eos = raw.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = raw.get("pad_token_id")
    bos = raw.get("bos_token_id")
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
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=eos_ids[0] if eos_ids else None,
        pad_token_id=None if pad is None else int(pad),
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
