"""A complete tiny search input set (base model, PEFT adapters, data) for the launch tests.

Five tasks over a tiny random Llama and rank-4 adapters: small enough that launch/search.py runs
end to end in seconds, shared by the single-process and the two-process launch tests so both
search exactly the same problem.
"""

from __future__ import annotations

import json
import os

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
