"""Per-device memory of the scorer's resident inputs, from shapes alone (no weights needed).

  python experiments/memory_report.py [--devices=8] [--adapters=40] [--rank=32]
  python experiments/memory_report.py --write_headers=DIR [--adapters=40] [--rank=32]

--write_headers writes a Llama-3.2-3B-shaped base model (config.json, two safetensors shards and
model.safetensors.index.json, as the Hub ships it), N rank-r q/k/v/o PEFT adapters and 10
examples per task of 150-300 tokens, with safetensors HEADERS ONLY (no tensor data: a few MB in
all), for `launch/search.py --dry_run=...` at the paper's scale:

  python launch/search.py --flagfile=configs/llama.flags --base_model=DIR/base \
      --adapters_dir=DIR/adapters --data_dir=DIR/data --dry_run=v5e-8

A Llama-3.2-3B-shaped model (28 layers, D 3072, F 8192, 24 heads / 8 KV heads, V 128256, tied
embeddings) in bfloat16 and N rank-r q/k/v/o adapters prepared for TIES (float32: the adapters as
they are plus their trimmed factors), laid out as `scoring.Scorer` lays them out on a mesh of 1
device and of --devices devices all on the "model" axis (the base weights by
sharding.PARAM_RULES, the prepared merge inputs by sharding.prepared_spec). Host CPU devices stand
in for the accelerators (only the shapes and the shardings matter).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from d2c_jax import hf_io, merge, sharding  # noqa: E402
from d2c_jax.models.config import ModelConfig, module_shapes  # noqa: E402

LLAMA_3B = dict(arch="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
                num_heads=24, num_kv_heads=8, head_dim=128, norm="rms", norm_eps=1e-5, rope_theta=500000.0,
                rotary_dim=128, rope_scaling=None, qkv_bias=False, tie_embeddings=True, bos_token_id=0,
                eos_token_id=1, pad_token_id=None)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_3b_config() -> ModelConfig:
    import dataclasses

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in LLAMA_3B.items() if k in names})


def param_shapes(cfg: ModelConfig, dtype=jnp.bfloat16):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), hf_io.param_shape_tree(cfg))


def prepared_shapes(cfg: ModelConfig, n: int, rank: int) -> merge.Prepared:
    """The shapes of merge.prepare_merge(..., "ties") for n adapters of `rank` on MODULES."""
    dims = module_shapes(cfg)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    factors = {m: {"a": f32(n, cfg.num_layers, rank, dims[m][0]), "b": f32(n, cfg.num_layers, dims[m][1], rank)}
               for m in MODULES}
    return merge.Prepared(single=factors, task=factors, weight_a=f32(n), weight_b=f32(n), method="ties", rank=rank)


def report(devices: int, n: int, rank: int) -> list[dict]:
    cfg = llama_3b_config()
    params, prepared = param_shapes(cfg), prepared_shapes(cfg, n, rank)
    rows = []
    for d in (1, devices):
        mesh = sharding.make_mesh(num_candidate_shards=1, devices=jax.devices()[:d])
        p = sharding.per_device_bytes(params, sharding.param_shardings(params, mesh))
        q = sharding.per_device_bytes(prepared, sharding.prepared_shardings(prepared, mesh))
        rows.append({"devices": d, "params_gib": p / 2**30, "prepared_gib": q / 2**30, "total_gib": (p + q) / 2**30})
    return rows


def write_header_only(path: str, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file of `tensors` ({key: (dtype, shape)}) whose data are absent: the header
    (with the offsets the data would have) and nothing after it."""
    import json
    import struct

    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        n = sizes[dtype] * int(np.prod(shape))
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)


def write_header_inputs(root: str, n: int, rank: int, examples: int = 10, seed: int = 0) -> dict[str, str]:
    """root/{base,adapters,data}: the Llama-3.2-3B shapes, header-only (see the module docstring)."""
    import json

    from d2c_jax import hf_io
    from d2c_jax.suite import checkpoint, tokenizer

    cfg = llama_3b_config()
    base, adapters, data = (os.path.join(root, d) for d in ("base", "adapters", "data"))
    for d in (base, adapters, data):
        os.makedirs(d, exist_ok=True)
    words = [f"w{i}" for i in range(2000)]
    vocab = tokenizer.make_vocab(words)
    tokenizer.save_tokenizer(vocab, base)
    doc = checkpoint.llama_config_dict(vocab_size=LLAMA_3B["vocab_size"], hidden_size=3072, intermediate_size=8192,
                                       num_layers=28, num_heads=24, num_kv_heads=8, max_positions=131072,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=500000.0)
    doc["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
    doc["torch_dtype"] = "bfloat16"
    checkpoint.write_json(os.path.join(base, "config.json"), doc)
    shapes = hf_io.param_shapes(cfg)
    tensors = {}
    for e in hf_io.entries(cfg):
        shape = shapes[e.path][1:] if "{l}" in e.hf else shapes[e.path]
        shape = tuple(reversed(shape)) if e.transpose else shape
        for i in range(cfg.num_layers if "{l}" in e.hf else 1):
            tensors[e.hf.format(l=i)] = ("BF16", shape)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        write_header_only(os.path.join(base, fname), {k: tensors[k] for k in ks})
    checkpoint.write_json(os.path.join(base, hf_io.INDEX_FILE),
                          {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
    dims = module_shapes(cfg)
    rng = np.random.default_rng(seed)
    for t in range(n):
        name = f"task_{t:02d}"
        d = os.path.join(adapters, name)
        os.makedirs(d, exist_ok=True)
        checkpoint.write_json(os.path.join(d, "adapter_config.json"), {
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
            "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": base})
        lora_tensors = {}
        for layer in range(cfg.num_layers):
            for m in MODULES:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                lora_tensors[f"{prefix}.lora_A.weight"] = ("F32", (rank, dims[m][0]))
                lora_tensors[f"{prefix}.lora_B.weight"] = ("F32", (dims[m][1], rank))
        write_header_only(os.path.join(d, "adapter_model.safetensors"), lora_tensors)
        with open(os.path.join(data, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(examples):
                prompt = " ".join(rng.choice(words, int(rng.integers(120, 240))))
                response = " ".join(rng.choice(words, int(rng.integers(20, 60))))
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return {"base_model": base, "adapters_dir": adapters, "data_dir": data}


def main(argv: list[str]) -> int:
    opts = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
    devices, n, rank = int(opts.get("devices", 8)), int(opts.get("adapters", 40)), int(opts.get("rank", 32))
    if "write_headers" in opts:
        paths = write_header_inputs(opts["write_headers"], n, rank)
        print(" ".join(f"--{k}={v}" for k, v in paths.items()))
        return 0
    print(f"Llama-3.2-3B shape, bfloat16 base, {n} rank-{rank} q/k/v/o adapters prepared for TIES (float32)")
    print(f"{'devices':>7}  {'base GiB/dev':>12}  {'prepared GiB/dev':>16}  {'total GiB/dev':>13}")
    for r in report(devices, n, rank):
        print(f"{r['devices']:>7}  {r['params_gib']:>12.2f}  {r['prepared_gib']:>16.2f}  {r['total_gib']:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
