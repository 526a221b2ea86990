"""Writes the suite's base model and adapters in the Hugging Face / PEFT on-disk formats.

The base model: `config.json` (LlamaForCausalLM), `model.safetensors` with HF tensor names (our
kernels [in, out] transposed to HF's [out, in]; the name table is hf_io's, so reading back is the
exact inverse), `generation_config.json`, tokenizer files. Adapters: PEFT LoRA directories.
Shape legend: L layers, V vocab, D model dim, F mlp dim, R rank, T tasks.
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


def _write_json(path: str, obj: Any) -> None:
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
    _write_json(os.path.join(out_dir, "config.json"), config_dict)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": config_dict["bos_token_id"],
        "eos_token_id": config_dict["eos_token_id"],
        "pad_token_id": config_dict["pad_token_id"],
        "do_sample": False,
    })


def peft_adapter_config(*, rank: int, alpha: int, modules: tuple[str, ...], base_model: str,
                        dropout: float = 0.05) -> dict[str, Any]:
    """adapter_config.json of a plain PEFT LoRA (the fields PEFT itself writes that matter)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(out_dir: str, lora_raw: dict, *, rank: int, alpha: int, base_model: str) -> None:
    """One PEFT adapter from raw factors {module: {"a": [L, R, d_in], "b": [L, d_out, R]}}:
    keys base_model.model.model.layers.{l}.self_attn.{module}.lora_{A,B}.weight."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for m, ab in lora_raw.items():
        sub = "self_attn" if m in ATTENTION_MODULES else "mlp"
        a_lrd, b_ldr = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for l in range(a_lrd.shape[0]):
            prefix = f"base_model.model.model.layers.{l}.{sub}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_lrd[l])
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_ldr[l])
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "adapter_config.json"),
                peft_adapter_config(rank=rank, alpha=alpha, modules=tuple(lora_raw), base_model=base_model))
