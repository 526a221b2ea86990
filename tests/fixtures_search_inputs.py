"""A complete tiny search input set (base model, PEFT adapters, data) for the launch tests.

Five tasks over a tiny random Llama and rank-4 adapters: small enough that launch/search.py runs
end to end in seconds, shared by the single-process and the two-process launch tests so both
search exactly the same problem. Also their common helpers: the command line of a search, the
environment of a child process, and readers of a run's partition.json / metrics.jsonl.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

NAMES = [f"task_{i}" for i in range(5)]
WORDS = ["one two three", "the quick fox", "hello world", "answer the question", "sort the words"]
# Search flags common to the launch tests: several chains and proposals, checkpoints every 2.
SEARCH = dict(num_clusters=2, iterations=6, population=2, proposals=2, objective="global", examples_per_task=3,
              max_seq_len=64, dtype="float32", checkpoint_every=2, track_every=2, seed=1)


def make_search_inputs(root: str | os.PathLike, *, tags: bool = False) -> dict[str, str]:
    """Writes root/{base,adapters,data}; returns the --base_model/--adapters_dir/--data_dir flags."""
    from fixtures_adapters import make_peft_adapters
    from fixtures_models import make_tiny_model

    root = os.fspath(root)
    base = make_tiny_model(os.path.join(root, "base"), "llama")
    adapters = os.path.join(root, "adapters")
    make_peft_adapters(base, adapters, NAMES, r=4, alpha=8, scale=0.3)
    data = os.path.join(root, "data")
    os.makedirs(data)
    for i, name in enumerate(NAMES):
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            for j in range(3):
                f.write(json.dumps({"prompt": f"{WORDS[i]} {j}", "response": WORDS[(i + j) % 5]}) + "\n")
    if tags:
        doc = {n: {"tags": {"family": "ab"[i % 2], "language": "en"}} for i, n in enumerate(NAMES)}
        with open(os.path.join(data, "tasks.json"), "w") as f:
            json.dump(doc, f)
    return {"base_model": str(base), "adapters_dir": adapters, "data_dir": data}


def load_search_inputs(root: str | os.PathLike) -> dict[str, Any]:
    """make_search_inputs, loaded in-process as the engine loads them (3 search examples per task,
    float32 weights): paths, model config, adapter set, task data and params."""
    from d2c_jax import data, hf_io, lora
    from d2c_jax.models.config import load_config

    paths = make_search_inputs(root)
    cfg = load_config(paths["base_model"])
    aset = lora.load_adapter_set(paths["adapters_dir"], cfg)
    td = data.load_task_data(paths["data_dir"], aset.names, hf_io.load_tokenizer(paths["base_model"]),
                             examples_per_task=3, max_seq_len=64)
    return dict(paths=paths, cfg=cfg, aset=aset, td=td, params=hf_io.load_params(paths["base_model"], cfg, "float32"))


def search_argv(inputs: dict[str, str], workdir: str | os.PathLike, **over: Any) -> list[str]:
    """launch/search.py flags: the inputs, SEARCH and --workdir, then `over` (overrides or extra)."""
    flags = {**inputs, **SEARCH, "workdir": str(workdir), **over}
    return [f"--{k}={v}" for k, v in flags.items()]


DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def child_env(devices: int | None = None, *, xla_flags: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """os.environ for a child process, with any XLA device-count flag dropped (so one CPU device),
    then `xla_flags` and, when `devices` is given, --xla_force_host_platform_device_count=devices
    appended to XLA_FLAGS (unset when empty); `extra` variables set last."""
    env = dict(os.environ)
    xla = [f for f in env.pop("XLA_FLAGS", "").split() if DEVICE_COUNT_FLAG not in f] + list(xla_flags)
    if devices is not None:
        xla.append(f"--{DEVICE_COUNT_FLAG}={devices}")
    if xla:
        env["XLA_FLAGS"] = " ".join(xla)
    env.update(extra)
    return env


def read_partition(workdir: str | os.PathLike) -> dict[str, Any]:
    with open(os.path.join(workdir, "partition.json")) as f:
        return json.load(f)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl: one row per line."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f.read().splitlines()]
