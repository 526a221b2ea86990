"""Where does the paper's Algorithm 1 end, under both readings of its proposals and both starts?

  python experiments/search_variants.py [--suite=runs/suites/full] [--seeds=8] [--subsets=A,B]
  python experiments/search_variants.py --suite=runs/suites/warm_start --subsets=all  # every task

Algorithm 1's text reads "sample clusters c and c'; sample adapter t from c" (`--proposal=paper`:
c uniform among the clusters with >= 2 members, t uniform in c); the engine's earlier reading
draws t uniformly among the movable tasks (`--proposal=task_uniform`: c in proportion to its
size). The random start assigns the adapters after the first K independently (`--start=random`);
a transformers + PEFT implementation dealt the shuffled adapters round-robin
(`--start=round_robin`: equal sizes). This runs the four combinations through the engine on two
16-task subsets of the built-in suite (4 families x 4 languages), or on every task of a
suite (`--subsets=all`, e.g. the 16 tasks of the warm_start preset), K = 4, T = 200, ties at
density 0.5, the paper's local objective, seeds 0..S-1, and prints per variant the mean per-task
loss of the final partition on the search examples and on the held-out (.eval.jsonl) examples,
mean ± standard error over the seeds, and per start the paired difference paper - task_uniform
(same seed, so the same start partition).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("suite", "runs/suites/full", "A built suite (launch/make_suite.py).")
flags.DEFINE_integer("seeds", 8, "Seeds 0..S-1 per variant.")
flags.DEFINE_list("subsets", ["A", "B"], "Which of the task subsets of the full suite to run (A, B), or "
                  "all: every task of --suite.")
FLAGS = flags.FLAGS

SUBSETS = {
    "A": ("copy, dedup, shift, sort x l0-l3", [f"{f}_l{i}" for f in ("copy", "dedup", "shift", "sort")
                                               for i in range(4)]),
    "B": ("dedup, reverse, shift, sort x l4-l7", [f"{f}_l{i}" for f in ("dedup", "reverse", "shift", "sort")
                                                  for i in range(4, 8)]),
}
ALL = "all"  # every task of the suite, as it is
NUM_CLUSTERS, ITERATIONS = 4, 200


def subset_dir(root: str, suite: str, tasks: list[str]) -> str:
    """A directory of links to the suite's adapters and data of `tasks` only."""
    os.makedirs(os.path.join(root, "adapters"))
    os.makedirs(os.path.join(root, "data"))
    for t in tasks:
        os.symlink(os.path.abspath(os.path.join(suite, "adapters", t)), os.path.join(root, "adapters", t))
        for name in (f"{t}.jsonl", f"{t}.eval.jsonl"):
            os.symlink(os.path.abspath(os.path.join(suite, "data", name)), os.path.join(root, "data", name))
    return root


def mean_se(values) -> str:
    """'mean ± standard error' (sample standard deviation / sqrt(count))."""
    x = np.asarray(values, np.float64)
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return f"{np.mean(x):.4f} ± {se:.4f}"


def run_subset(suite: str, tasks: list[str], seeds: int) -> dict[tuple[str, str], dict[str, list[float]]]:
    """{(start, proposal): {"search": [...], "held": [...]}} per seed, for one subset."""
    from d2c_jax import search
    from d2c_jax.inputs import load_inputs
    from d2c_jax.run_config import SearchSettings
    from d2c_jax.strategies.d2c import PROPOSALS, STARTS

    base = os.path.join(suite, "base")
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = subset_dir(os.path.join(tmp, "subset"), suite, tasks)
        adapters, data = os.path.join(root, "adapters"), os.path.join(root, "data")
        found = load_inputs(base, adapters, data, dtype="float32")
        held = load_inputs(base, adapters, data, dtype="float32", split="eval", examples_per_task=None)
        scorer, held_scorer = found.scorer("ties", 0.5), held.scorer("ties", 0.5)
        n = len(found.names)
        for start, proposal in itertools.product(STARTS, PROPOSALS):
            rows = out.setdefault((start, proposal), {"search": [], "held": []})
            for seed in range(seeds):
                settings = SearchSettings(num_clusters=NUM_CLUSTERS, iterations=ITERATIONS, objective="local",
                                          seed=seed, proposal=proposal, start=start)
                res = search.find_partition(scorer, "d2c", settings, found.adapters)
                part = np.asarray(res.partition_n)
                masks = np.stack([part == part[t] for t in range(n)])
                rows["search"].append(float(res.objective) / n)
                rows["held"].append(float(np.mean(held_scorer.losses(masks, np.arange(n)))))
            print(f"  {start} / {proposal}: held-out {mean_se(rows['held'])}", file=sys.stderr, flush=True)
    return out


def main(argv) -> int:
    del argv
    suite = FLAGS.suite
    if not os.path.isdir(os.path.join(suite, "adapters")):
        print(f"{suite}: not a built suite (python launch/make_suite.py)", file=sys.stderr)
        return 2
    unknown = [s for s in FLAGS.subsets if s not in (*SUBSETS, ALL)]
    if unknown:
        print(f"--subsets: unknown {', '.join(unknown)} (one of {', '.join((*SUBSETS, ALL))})", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    lines, per_seed, diffs, starts = [], [], [], []
    for key in FLAGS.subsets:
        label, tasks = SUBSETS[key] if key != ALL else (
            f"every task of {suite}", sorted(os.listdir(os.path.join(suite, "adapters"))))
        results = run_subset(suite, tasks, FLAGS.seeds)
        for (start, proposal), r in results.items():
            lines.append(f"| {key} ({label}) | {start} | {proposal} | {mean_se(r['search'])} | {mean_se(r['held'])} |")
            per_seed.append(f"{key} {start} {proposal}: {' '.join(f'{x:.3f}' for x in r['held'])}")
        for start in sorted({s for s, _ in results}):
            d_search = np.subtract(results[start, "paper"]["search"], results[start, "task_uniform"]["search"])
            d_held = np.subtract(results[start, "paper"]["held"], results[start, "task_uniform"]["held"])
            counts = f"{int(np.sum(d_held < 0))} / {int(np.sum(d_held == 0))} / {int(np.sum(d_held > 0))}"
            diffs.append(f"| {key} | {start} | {mean_se(d_search)} | {mean_se(d_held)} | {counts} |")
        for proposal in sorted({p for _, p in results}):
            a, b = (np.asarray(results[s, proposal]["held"], np.float64) for s in ("round_robin", "random"))
            se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)) if len(a) > 1 else float("nan")
            starts.append(f"| {key} | {proposal} | {np.mean(a) - np.mean(b):.4f} ± {se:.4f} |")
    print(f"K = {NUM_CLUSTERS}, T = {ITERATIONS}, ties 0.5, local objective, seeds 0-{FLAGS.seeds - 1}; "
          f"losses: mean per task of the final partition, mean ± standard error over the seeds "
          f"({time.perf_counter() - t0:.0f} s)")
    print()
    print("| subset | start | proposal | search loss | held-out loss |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
    print()
    print("paper - task_uniform, paired by seed (the same start partition); negative: paper lower")
    print()
    print("| subset | start | search loss difference | held-out loss difference | seeds paper lower / equal / higher "
          "(held-out) |")
    print("|---|---|---|---|---|")
    print("\n".join(diffs))
    print()
    print("round_robin - random start, held-out loss (independent starts: standard error of a difference of means)")
    print()
    print("| subset | proposal | held-out loss difference |")
    print("|---|---|---|")
    print("\n".join(starts))
    print()
    print("held-out loss per seed:")
    print("\n".join(per_seed))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
