"""D²C (Algorithm 1) the way a user writes it with transformers + PEFT: the benchmark's reference.

  python experiments/benchmark/torch_loop.py --base_model=DIR --adapters_dir=DIR --data_dir=DIR \
      [--num_clusters=5] [--iterations=200] [--density=0.5] [--examples_per_task=10] [--seed=0] \
      [--proposal=paper] [--start=random] [--output=OUT.json]

Every evaluation is one `add_weighted_adapter(members, [1.0] * len(members), "merged",
combination_type="ties", density)` and one forward pass with the task's examples as one batch
(labels -100 on the prompt), then `delete_adapter`; no cache. Each iteration evaluates the source
cluster and the destination cluster with the task on the task (l and l'), keeps the move iff
l' < l, and at the end every task is evaluated under its final cluster's merge. The start and
the proposals (`--proposal=paper`: c uniform among the clusters with >= 2 members, t uniform in c,
c' uniform among the others, as Algorithm 1's text reads) come from the engine's random streams
(`d2c_jax.strategies.d2c`), so the decisions can be compared with `launch/search.py --seed=...`
with the same --proposal and --start; torch uses every core (`torch.set_num_threads(os.cpu_count())`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--"))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2c_jax.strategies import d2c

    torch.set_num_threads(os.cpu_count() or 1)
    k, iterations = int(opts.get("num_clusters", 5)), int(opts.get("iterations", 200))
    density, n_ex, seed = float(opts.get("density", 0.5)), int(opts.get("examples_per_task", 10)), int(opts.get("seed", 0))
    proposal, start_kind = opts.get("proposal", "paper"), opts.get("start", "random")
    names = sorted(d for d in os.listdir(opts["adapters_dir"]) if os.path.isdir(os.path.join(opts["adapters_dir"], d)))

    tok = AutoTokenizer.from_pretrained(opts["base_model"])
    model = AutoModelForCausalLM.from_pretrained(opts["base_model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, os.path.join(opts["adapters_dir"], names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.path.join(opts["adapters_dir"], name), adapter_name=name)
    model.eval()

    batches = []
    for name in names:
        with open(os.path.join(opts["data_dir"], f"{name}.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()][:n_ex]
        ids, labels = [], []
        for row in rows:
            p = tok(row["prompt"])["input_ids"]
            r = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        s = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batches.append({
            "input_ids": torch.tensor([x + [pad] * (s - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (s - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (s - len(x)) for x in labels]),
        })

    evaluations = 0
    eval_seconds = 0.0

    def loss(members: list[int], task: int) -> float:
        nonlocal evaluations, eval_seconds
        t0 = time.perf_counter()
        model.add_weighted_adapter([names[i] for i in members], [1.0] * len(members), "merged",
                                   combination_type="ties", density=density)
        model.set_adapter("merged")
        model.eval()
        with torch.no_grad():
            value = float(model(**batches[task]).loss)
        model.delete_adapter("merged")
        evaluations += 1
        eval_seconds += time.perf_counter() - t0
        return value

    setup_s = time.perf_counter() - start
    partition = d2c.initial_partitions(len(names), k, 1, seed, start_kind)[0]
    accepted = 0
    for it in range(1, iterations + 1):
        move = d2c.sample_move(d2c.stream(seed, d2c.STREAM_PROPOSE, it, 0), partition, k, proposal)
        src = [int(i) for i in np.flatnonzero(partition == move.src)]
        dst = [int(i) for i in np.flatnonzero(partition == move.dst)] + [move.task]
        if loss(sorted(dst), move.task) < loss(src, move.task):
            partition = d2c.apply_move(partition, move)
            accepted += 1
    task_losses = [loss([int(i) for i in np.flatnonzero(partition == partition[t])], t) for t in range(len(names))]
    doc = {
        "partition": [int(x) for x in partition],
        "objective": float(sum(task_losses)),
        "iterations": iterations,
        "accepted": accepted,
        "evaluations": evaluations,
        "evaluation_seconds": eval_seconds,
        "setup_seconds": setup_s,
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }
    if "output" in opts:
        with open(opts["output"], "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "partition"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
