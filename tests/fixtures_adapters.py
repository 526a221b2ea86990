"""Real PEFT LoRA adapters on a tiny HF base model, for tests (torch + peft, offline).

`make_peft_adapters` builds each adapter with peft.get_peft_model + LoraConfig, overwrites both
lora_A and lora_B with random non-zero values (different per adapter; PEFT initialises B to 0),
and saves it with save_pretrained into out_dir/<name>/. `peft_deltas` and `peft_lora_tree` read a
loaded PEFT model's adapters back (as dense deltas, or as our lora pytree).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_peft_adapters(
    base_model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: Sequence[str],
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    seed: int = 0,
    use_rslora: bool = False,
    layers_to_transform: Sequence[int] | int | None = None,
    ranks: Sequence[int] | None = None,
    alphas: Sequence[float] | None = None,
    scale: float = 0.2,
) -> list[str]:
    """Saves one PEFT adapter per name into out_dir/<name>/ and returns their directories.

    ranks / alphas (one per name) override r / alpha. Factors ~ N(0, scale²), seeded by
    (seed, index), so different names and seeds give different adapters.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
        tm: Any = target_modules if isinstance(target_modules, str) else list(target_modules)
        ltt: Any = layers_to_transform
        if ltt is not None and not isinstance(ltt, int):
            ltt = list(ltt)
        config = LoraConfig(
            r=ranks[i] if ranks is not None else r,
            lora_alpha=alphas[i] if alphas is not None else alpha,
            target_modules=tm,
            layers_to_transform=ltt,
            use_rslora=use_rslora,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(1000 * seed + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        path = os.path.join(str(out_dir), name)
        peft_model.save_pretrained(path)
        out.append(path)
    return out


def peft_deltas(peft_model: Any, adapter_name: str, num_layers: int) -> dict[str, Any]:
    """{module: float64 numpy [L, d_out, d_in]} = scaling * lora_B @ lora_A of a loaded PEFT adapter
    (zeros where the adapter does not adapt the module/layer; only modules it adapts somewhere)."""
    import numpy as np
    import torch

    found: dict[str, dict[int, Any]] = {}
    for key, mod in peft_model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is None or not hasattr(lora_a, "keys") or adapter_name not in lora_a:
            continue
        parts = key.split(".")
        layer = int(parts[parts.index("layers") + 1])
        with torch.no_grad():
            a = mod.lora_A[adapter_name].weight.double()
            b = mod.lora_B[adapter_name].weight.double()
            d = (b @ a) * float(mod.scaling[adapter_name])
        found.setdefault(parts[-1], {})[layer] = d.numpy()
    out = {}
    for m, per_layer in found.items():
        shape = next(iter(per_layer.values())).shape
        arr = np.zeros((num_layers,) + shape)
        for layer, d in per_layer.items():
            arr[layer] = d
        out[m] = arr
    return out


def peft_lora_tree(peft_model: Any, cfg: Any, scaling: float, adapter_name: str = "default") -> dict[str, Any]:
    """A PEFT model's LoRA weights (adapter `adapter_name`, every module of LORA_MODULES in every
    layer) → our lora pytree {module: {"a": [L, R, d_in], "b": [L, d_out, R]}}, b scaled."""
    import jax.numpy as jnp
    import numpy as np

    from d2c_jax.models.config import LORA_MODULES

    state = {k: v.detach().float().numpy() for k, v in peft_model.state_dict().items()}
    tree = {}
    for m in LORA_MODULES:
        sub = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = "base_model.model.model.layers.{l}." + sub + "." + m + ".lora_{x}." + adapter_name + ".weight"
        a = np.stack([state[key.format(l=l, x="A")] for l in range(cfg.num_layers)])
        b = np.stack([state[key.format(l=l, x="B")] for l in range(cfg.num_layers)])
        tree[m] = {"a": jnp.asarray(a), "b": jnp.asarray(scaling * b)}
    return tree
