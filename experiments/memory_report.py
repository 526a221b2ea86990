"""Per-device memory of the scorer's resident inputs, from shapes alone (no weights needed).

  python experiments/memory_report.py [--devices=8] [--adapters=40] [--rank=32] [--operators]
      [--merge_temps=G] [--tune_temps=K] [--methods=a,b]
  python experiments/memory_report.py --write_headers=DIR [--adapters=40] [--rank=32]
  python experiments/memory_report.py --write_weights=DIR [--adapters=8] [--examples=2]

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
from typing import Any

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
    return merge.prepared_shapes({m: module_shapes(cfg)[m] for m in MODULES}, n, cfg.num_layers, rank, "ties")


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


def write_header_only(path: str, tensors: dict[str, tuple[str, tuple[int, ...]]], rng: Any = None) -> None:
    """A safetensors file of `tensors` ({key: (dtype, shape)}) whose data are absent: the header
    (with the offsets the data would have) and nothing after it. With `rng`, the data too:
    normal(0, 0.02) values (norm scales 1), written one tensor at a time (a real-size model on disk
    without ever holding it in memory)."""
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
        if rng is not None:
            for key, (dtype, shape) in tensors.items():
                x = (np.ones(shape, np.float32) if "norm" in key
                     else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
                f.write((x.view(np.uint32) >> 16).astype("<u2").tobytes() if dtype == "BF16"
                        else x.astype("<f4").tobytes())


def write_header_inputs(root: str, n: int, rank: int, examples: int = 10, seed: int = 0,
                        weights: bool = False) -> dict[str, str]:
    """root/{base,adapters,data}: the Llama-3.2-3B shapes, header-only (see the module docstring);
    `weights`: with random tensor data (write_header_only) and short examples (prompts of 8-16
    words, responses of 3-6, and as many held-out ones), for a real run at this size."""
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
    data_rng = np.random.default_rng(seed + 1) if weights else None
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
        write_header_only(os.path.join(base, fname), {k: tensors[k] for k in ks}, rng=data_rng)
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
        write_header_only(os.path.join(d, "adapter_model.safetensors"), lora_tensors, rng=data_rng)
        lengths = ((8, 16), (3, 6)) if weights else ((120, 240), (20, 60))
        for split in ("", ".eval") if weights else ("",):
            with open(os.path.join(data, f"{name}{split}.jsonl"), "w", encoding="utf-8") as f:
                for _ in range(examples):
                    prompt = " ".join(rng.choice(words, int(rng.integers(*lengths[0]))))
                    response = " ".join(rng.choice(words, int(rng.integers(*lengths[1]))))
                    f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return {"base_model": base, "adapters_dir": adapters, "data_dir": data}


# ----------------------------------------------------------------------------- per operator

def _previous_layout(cfg: ModelConfig, n: int, rank: int, method: str) -> merge.Prepared:
    """The update-space operators' Prepared before they moved to factors only: the adapters as
    they are plus every adapter's dense update [N, L, d_out, d_in] (knots_ties also its basis
    factors [N, L, d_out, R]). None for operators that did not exist or did not change."""
    if method not in ("ties_delta", "knots_ties", "knots_linear", "iso_c"):
        return None
    dims = {m: module_shapes(cfg)[m] for m in MODULES}
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    L = cfg.num_layers
    single = {m: {"a": f32(n, L, rank, di), "b": f32(n, L, do, rank)} for m, (di, do) in dims.items()}
    task = {m: {"delta": f32(n, L, do, di)} for m, (di, do) in dims.items()}
    if method == "knots_ties":
        task = {m: dict(t, y=f32(n, L, dims[m][1], rank)) for m, t in task.items()}
    return merge.Prepared(single=single, task=task, weight_a=f32(n), weight_b=f32(n), method=method, rank=rank)


def operator_report(devices: int, n: int, rank: int) -> list[dict]:
    """Prepared memory of every --merge operator before / after (GiB in all, and per device with
    the prepared inputs over `devices` devices on the "model" axis), from shapes alone."""
    cfg = llama_3b_config()
    dims = {m: module_shapes(cfg)[m] for m in MODULES}
    mesh = sharding.make_mesh(num_candidate_shards=1, devices=jax.devices()[:devices])

    def sizes(tree):
        if tree is None:
            return None, None
        total = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(tree))
        return total / 2**30, sharding.per_device_bytes(tree, sharding.prepared_shardings(tree, mesh)) / 2**30

    rows = []
    for method in merge.METHODS:
        after = merge.prepared_shapes(dims, n, cfg.num_layers, rank, method)
        before = _previous_layout(cfg, n, rank, method)
        (b_all, b_dev), (a_all, a_dev) = sizes(before), sizes(after)
        if before is None and method in merge.CORE_METHODS:
            b_all = b_dev = float("nan")  # new operator
        elif before is None:
            b_all, b_dev = a_all, a_dev  # unchanged
        rows.append({"method": method, "before_gib": b_all, "before_dev_gib": b_dev, "after_gib": a_all,
                     "after_dev_gib": a_dev})
    return rows


def print_operator_report(devices: int, n: int, rank: int) -> None:
    print(f"Prepared memory per operator: Llama-3.2-3B shapes, {n} rank-{rank} q/k/v/o adapters (float32), "
          f"in all and per device over {devices} devices (\"model\" axis)")
    print(f"{'operator':<15}  {'before GiB':>10}  {'after GiB':>9}  {'before GiB/dev':>14}  {'after GiB/dev':>13}")
    for r in operator_report(devices, n, rank):
        def f(x):
            return "new" if x != x else f"{x:.2f}"
        print(f"{r['method']:<15}  {f(r['before_gib']):>10}  {f(r['after_gib']):>9}  {f(r['before_dev_gib']):>14}  "
              f"{f(r['after_dev_gib']):>13}")


def merge_temps(n: int, rank: int, slots: int, methods: tuple[str, ...]) -> list[dict]:
    """XLA:CPU's memory analysis of one merge of `slots` gathered members (merge.merge_gathered,
    the scorer's merge) at Llama-3.2-3B shapes: its temporaries, compiled from shapes only."""
    cfg = llama_3b_config()
    dims = {m: module_shapes(cfg)[m] for m in MODULES}
    rows = []
    for method in methods:
        prep = merge.prepared_shapes(dims, n, cfg.num_layers, rank, method)
        members = jax.ShapeDtypeStruct((slots,), jnp.int32)
        valid = jax.ShapeDtypeStruct((slots,), jnp.bool_)
        mem = jax.jit(merge.merge_gathered).lower(prep, members, valid).compile().memory_analysis()
        rows.append({"method": method, "temp_gib": mem.temp_size_in_bytes / 2**30,
                     "out_gib": mem.output_size_in_bytes / 2**30})
    return rows


def tune_temps(n: int, rank: int, clusters: int, methods: tuple[str, ...]) -> list[dict]:
    """XLA:CPU's memory analysis of the merge part of one weight-tuning step (tune.py: the
    gradient in the weights [K, N] of K clusters' merges, vmapped merge_mask over all N slots) at
    Llama-3.2-3B shapes, compiled from shapes only."""
    cfg = llama_3b_config()
    dims = {m: module_shapes(cfg)[m] for m in MODULES}
    rows = []
    for method in methods:
        def grad(prep, w_kn, masks_kn):
            def total(w):
                out = jax.vmap(lambda wk, mk: merge.merge_mask(merge.with_weights(prep, wk), mk))(w, masks_kn)
                return sum(jnp.sum(x) for x in jax.tree.leaves(out))
            return jax.grad(total)(w_kn)

        prep = merge.prepared_shapes(dims, n, cfg.num_layers, rank, method)
        args = (prep, jax.ShapeDtypeStruct((clusters, n), jnp.float32), jax.ShapeDtypeStruct((clusters, n), jnp.bool_))
        mem = jax.jit(grad).lower(*args).compile().memory_analysis()
        rows.append({"method": method, "temp_gib": mem.temp_size_in_bytes / 2**30})
    return rows


def main(argv: list[str]) -> int:
    opts = dict(a.lstrip("-").partition("=")[::2] for a in argv[1:])
    devices, n, rank = int(opts.get("devices", 8)), int(opts.get("adapters", 40)), int(opts.get("rank", 32))
    if "write_weights" in opts:  # a real-size run on a CPU: random weights, short examples
        paths = write_header_inputs(opts["write_weights"], n, rank, examples=int(opts.get("examples", 2)),
                                    weights=True)
        print(" ".join(f"--{k}={v}" for k, v in paths.items()))
        return 0
    if "write_headers" in opts:
        paths = write_header_inputs(opts["write_headers"], n, rank)
        print(" ".join(f"--{k}={v}" for k, v in paths.items()))
        return 0
    print(f"Llama-3.2-3B shape, bfloat16 base, {n} rank-{rank} q/k/v/o adapters prepared for TIES (float32)")
    print(f"{'devices':>7}  {'base GiB/dev':>12}  {'prepared GiB/dev':>16}  {'total GiB/dev':>13}")
    for r in report(devices, n, rank):
        print(f"{r['devices']:>7}  {r['params_gib']:>12.2f}  {r['prepared_gib']:>16.2f}  {r['total_gib']:>13.2f}")
    if "operators" in opts:
        print()
        print_operator_report(devices, n, rank)
    if "merge_temps" in opts:
        slots = int(opts["merge_temps"] or 8)
        methods = tuple(opts.get("methods", "").split(",")) if opts.get("methods") else merge.METHODS
        print(f"\nOne merge of {slots} gathered members (merge_gathered), XLA:CPU memory analysis")
        print(f"{'operator':<15}  {'temporaries GiB':>15}  {'output GiB':>10}")
        for r in merge_temps(n, rank, slots, methods):
            print(f"{r['method']:<15}  {r['temp_gib']:>15.3f}  {r['out_gib']:>10.3f}")
    if "tune_temps" in opts:
        k = int(opts["tune_temps"] or 5)
        methods = tuple(opts.get("methods", "").split(",")) if opts.get("methods") else merge.METHODS
        print(f"\nMerge part of one weight-tuning step ({k} clusters, gradient over all {n} slots), "
              "XLA:CPU memory analysis")
        print(f"{'operator':<15}  {'temporaries GiB':>15}")
        for r in tune_temps(n, rank, k, methods):
            print(f"{r['method']:<15}  {r['temp_gib']:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

