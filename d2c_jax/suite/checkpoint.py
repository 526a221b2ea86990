"""Writes the suite's base model in the Hugging Face on-disk format (adapters: lora.save_peft_adapter).

`config.json` (LlamaForCausalLM), `model.safetensors` with HF tensor names (our kernels [in, out]
transposed to HF's [out, in]; the name table is hf_io's, so reading back is the exact inverse),
`generation_config.json`; the tokenizer files come from suite.tokenizer.
Shape legend: L layers, V vocab, D model dim, F mlp dim.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from d2c_jax import hf_io
from d2c_jax.models.config import ModelConfig, config_from_dict

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_config_dict(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                      num_heads: int, num_kv_heads: int, max_positions: int, bos_token_id: int,
                      eos_token_id: int, pad_token_id: int, tie_embeddings: bool = True,
                      rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5) -> dict[str, Any]:
    """A complete LlamaForCausalLM config.json (float32, legacy rope fields as on the Hub)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": 0.02,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
    }


def model_config(config_dict: dict[str, Any]) -> ModelConfig:
    return config_from_dict(config_dict, "config.json")


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_base_model(out_dir: str, params: dict, config_dict: dict[str, Any]) -> None:
    """Writes config.json, generation_config.json and model.safetensors (float32) into out_dir.

    The tokenizer is written separately (tokenizer.save_tokenizer)."""
    from safetensors.numpy import save_file

    cfg = model_config(config_dict)
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for e in hf_io.entries(cfg):
        node: Any = params
        for p in e.path:
            node = node[p]
        arr = np.asarray(node, np.float32)
        if "{l}" in e.hf:
            for i in range(cfg.num_layers):
                t = arr[i].T if e.transpose else arr[i]
                tensors[e.hf.format(l=i)] = np.ascontiguousarray(t)
        else:
            tensors[e.hf] = np.ascontiguousarray(arr.T if e.transpose else arr)
    save_file(tensors, os.path.join(out_dir, hf_io.SINGLE_FILE), metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), config_dict)
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": config_dict["bos_token_id"],
        "eos_token_id": config_dict["eos_token_id"],
        "pad_token_id": config_dict["pad_token_id"],
        "do_sample": False,
    })

