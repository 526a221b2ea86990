"""What each engine change buys, in evaluations and scorer calls (exact counts, no timing).

  python experiments/benchmark/replay_counts.py --workdir=DIR [--old_batch=8]

Replays a finished `launch/search.py` run (d2c, one chain, no exchanges) from the loss cache in
its last checkpoint under other engine settings: the decisions depend only on the losses of the
move requests, which that cache holds, so every variant follows the same trajectory, and the
requests it adds (tracking, speculation) are counted without computing them. Prints, per
variant: evaluations, evaluations per iteration, scorer calls, and the request slots the old
fixed-batch scorer would have computed (every call padded to --old_batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from d2c_jax.checkpoint import Checkpointer
from d2c_jax.run_config import SearchSettings
from d2c_jax.search import run_search


class ReplayScorer:
    """Serves the losses of a finished run's cache; pairs it never scored get a placeholder
    (they can only be tracking or speculative requests, which never decide a move)."""

    def __init__(self, cache, num_tasks: int, exact_split: bool = True, batch_size: int = 64):
        self.cache, self.num_tasks = cache, num_tasks
        self.exact_split, self.batch_size = exact_split, batch_size
        self.calls: list[int] = []
        self.unknown = 0

    def losses(self, masks_cn, tasks_c):
        self.calls.append(len(tasks_c))
        out = []
        for m, t in zip(masks_cn, tasks_c):
            key = self.cache.key(m, int(t))
            if key in self.cache._losses:
                out.append(self.cache._losses[key])
            else:
                self.unknown += 1
                out.append(1e6)
        return np.array(out, np.float32)


def load_run(workdir: str):
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(workdir, "partition.json")) as f:
        doc = json.load(f)
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    with open(os.path.join(directory, str(steps[-1]), "meta", "metadata")) as f:
        fingerprint = json.load(f)["fingerprint"]  # the run's own: the restore below is not refused
    # The metrics log is restored to the step's rows: the finished run's file, unchanged.
    with Checkpointer(directory, every=1, keep=100, fingerprint=fingerprint,
                      metrics_path=os.path.join(workdir, "metrics.jsonl")) as ck:
        state = ck.restore(len(doc["task_losses"]))
    return cfg, doc, state


def replay(workdir: str, old_batch: int = 8) -> list[dict]:
    cfg, doc, state = load_run(workdir)
    n = len(doc["task_losses"])
    # (a config.json without proposal / start: written when task_uniform and random were the only ones)
    base = SearchSettings(num_clusters=cfg["num_clusters"], iterations=cfg["iterations"], seed=cfg["seed"],
                          proposal=cfg.get("proposal", "task_uniform"), start=cfg.get("start", "random"))
    variants = [
        ("this run (defaults)", base, True),
        ("old defaults: --track_every=10 (initial + every 10th)", dataclasses.replace(base, track_every=10), True),
        ("--track_every=1", dataclasses.replace(base, track_every=1), True),
        ("speculation, J <= 8 (accelerator)", dataclasses.replace(base, speculate=8), False),
        ("speculation, J <= 32 (accelerator)", dataclasses.replace(base, speculate=32), False),
    ]
    rows = []
    for name, settings, exact in variants:
        scorer = ReplayScorer(state.cache, n, exact_split=exact)
        result = run_search(scorer, settings)
        assert result.partition_n.tolist() == run_search(ReplayScorer(state.cache, n), base).partition_n.tolist()
        evals = sum(scorer.calls)
        rows.append({"variant": name, "evaluations": evals, "per_iteration": evals / settings.iterations,
                     "scorer_calls": len(scorer.calls),
                     "old_padded_slots": sum(-(-c // old_batch) * old_batch for c in scorer.calls),
                     "not_in_run_cache": scorer.unknown})
    return rows


def main(argv: list[str]) -> int:
    opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--"))
    rows = replay(opts["workdir"], int(opts.get("old_batch", 8)))
    print(f"| variant | evaluations | per iteration | scorer calls | slots at fixed batch {opts.get('old_batch', 8)} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['evaluations']} | {r['per_iteration']:.2f} | {r['scorer_calls']} | "
              f"{r['old_padded_slots']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
