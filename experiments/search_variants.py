"""Where does the paper's Algorithm 1 end, under other readings of its random start and proposals?

  python experiments/search_variants.py [--suite=runs/suites/full] [--seeds=8]

Issue 12, item 6: a transformers + PEFT implementation of Algorithm 1 dealt the shuffled adapters
round-robin (equal cluster sizes) and, as the paper's text reads ("sample clusters c and c';
sample adapter t from c"), drew the source cluster uniformly. Ours assigns the adapters after the
first K independently (`d2c.random_partition`) and draws t uniformly among the movable tasks
(`d2c.sample_move`: the source cluster in proportion to its size). This runs the four
combinations on two 16-task subsets of the built-in suite (4 families x 4 languages, as in the
issue), K = 4, T = 200, ties at density 0.5, seeds 0..S-1, and prints the mean per-task loss of
the final partition on the search examples and on the held-out (.eval.jsonl) examples.

The alternatives are swapped in by replacing the two functions of `d2c_jax.strategies.d2c` for
the duration of a run (the engine calls them through the module); nothing else changes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile

import numpy as np
from absl import app, flags

flags.DEFINE_string("suite", "runs/suites/full", "A built suite (launch/make_suite.py).")
flags.DEFINE_integer("seeds", 8, "Seeds 0..S-1 per variant.")
FLAGS = flags.FLAGS

SUBSETS = {
    "A (copy, dedup, shift, sort x l0-l3)": [f"{f}_l{i}" for f in ("copy", "dedup", "shift", "sort") for i in range(4)],
    "B (dedup, reverse, shift, sort x l4-l7)": [f"{f}_l{i}" for f in ("dedup", "reverse", "shift", "sort")
                                                for i in range(4, 8)],
}
STARTS = ("independent", "round_robin")
PROPOSALS = ("uniform_task", "uniform_cluster")


def round_robin(rng: np.random.Generator, num_adapters: int, num_clusters: int) -> np.ndarray:
    """The shuffled adapters dealt round-robin: cluster sizes differ by at most one."""
    partition_n = np.empty(num_adapters, np.int32)
    partition_n[rng.permutation(num_adapters)] = np.arange(num_adapters) % num_clusters
    return partition_n


def uniform_cluster(rng: np.random.Generator, partition_n: np.ndarray, num_clusters: int):
    """c uniform over the clusters that can give a member, t uniform in c, c' uniform != c."""
    from d2c_jax.strategies import d2c

    sizes_k = np.bincount(partition_n, minlength=num_clusters)
    sources = np.flatnonzero(sizes_k >= 2)
    src = int(sources[rng.integers(len(sources))])
    members = np.flatnonzero(partition_n == src)
    task = int(members[rng.integers(len(members))])
    dst = int(rng.integers(num_clusters - 1))
    dst += dst >= src
    return d2c.Move(task, src, dst)


@contextlib.contextmanager
def variant(start: str, proposals: str):
    from d2c_jax.strategies import d2c

    saved = d2c.random_partition, d2c.sample_move
    if start == "round_robin":
        d2c.random_partition = round_robin
    if proposals == "uniform_cluster":
        d2c.sample_move = uniform_cluster
    try:
        yield
    finally:
        d2c.random_partition, d2c.sample_move = saved


def subset_dir(root: str, suite: str, tasks: list[str]) -> str:
    """A directory of links to the suite's adapters and data of `tasks` only."""
    os.makedirs(os.path.join(root, "adapters"))
    os.makedirs(os.path.join(root, "data"))
    for t in tasks:
        os.symlink(os.path.abspath(os.path.join(suite, "adapters", t)), os.path.join(root, "adapters", t))
        for name in (f"{t}.jsonl", f"{t}.eval.jsonl"):
            os.symlink(os.path.abspath(os.path.join(suite, "data", name)), os.path.join(root, "data", name))
    return root


def main(argv) -> int:
    del argv
    from d2c_jax import search
    from d2c_jax.inputs import load_inputs
    from d2c_jax.run_config import SearchSettings

    suite = FLAGS.suite
    if not os.path.isdir(os.path.join(suite, "adapters")):
        print(f"{suite}: not a built suite (python launch/make_suite.py)", file=sys.stderr)
        return 2
    base = os.path.join(suite, "base")
    lines = []
    for label, tasks in SUBSETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = subset_dir(os.path.join(tmp, "subset"), suite, tasks)
            adapters, data = os.path.join(root, "adapters"), os.path.join(root, "data")
            found = load_inputs(base, adapters, data, dtype="float32")
            held = load_inputs(base, adapters, data, dtype="float32", split="eval", examples_per_task=None)
            scorer, held_scorer = found.scorer("ties", 0.5), held.scorer("ties", 0.5)
            n = len(found.names)
            for start, proposals in itertools.product(STARTS, PROPOSALS):
                search_l, held_l = [], []
                for seed in range(FLAGS.seeds):
                    settings = SearchSettings(num_clusters=4, iterations=200, objective="local", seed=seed)
                    with variant(start, proposals):
                        res = search.find_partition(scorer, "d2c", settings, found.adapters)
                    part = np.asarray(res.partition_n)
                    masks = np.stack([part == part[t] for t in range(n)])
                    search_l.append(float(res.objective) / n)
                    held_l.append(float(np.mean(held_scorer.losses(masks, np.arange(n)))))
                lines.append(f"| {label} | {start} | {proposals} | {np.mean(search_l):.4f} | "
                             f"{np.mean(held_l):.4f} ± {np.std(held_l, ddof=1):.4f} | "
                             f"{' '.join(f'{x:.3f}' for x in held_l)} |")
                print(lines[-1], flush=True)
    print()
    print(f"K = 4, T = 200, ties 0.5, seeds 0-{FLAGS.seeds - 1}; losses: mean per task of the final partition")
    print("| subset | start | proposals | search loss | held-out loss (mean ± sd) | held-out per seed |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
