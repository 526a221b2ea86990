"""Adapters arriving one at a time into K storage slots: K-Merge, K-Merge++ and our placement.

  python experiments/online.py [--suite=demo] [--seeds=2] [--ks=1,2,4,5,8] [--refine_iterations=5]
                               [--d2c_iterations=100] [--figure=docs/online.png]

Per seed, the suite's adapters arrive in a shuffled order. After every arrival, for each K:
  kmerge, kmerge_pp   data-free slots (d2c_jax.kmerge): the first K fill the slots (K-Merge++: a
                      new slot only below similarity 0.02), then the nearest slot by mean per-layer
                      cosine of ΔW, merged as the running average (linear, weights (n-1)/n and 1/n)
  kmerge+ties, kmerge_pp+ties   the same rules with each slot the TIES merge of its members
  placement           online.place: the arrival's search examples scored under every cluster's
                      TIES merge with it added (the local objective), no search
  placement+refine    the same, then online.refine: --refine_iterations of D²C from the new partition
  d2c                 (last arrival only: the task set is then the same for every order) a full
                      D²C search from scratch on all tasks, --d2c_iterations, the upper reference
and records the S-score (mean over the tasks seen of the held-out metric score with the task's slot
divided by the score with its own adapter; tasks whose own score is 0 left out), the mean held-out
score over the tasks seen, and the arrival's cost: scorer evaluations and seconds (placement and
search only; the held-out evaluation is measurement, not cost). Prints the final-step table and
the mean cost per arrival, draws S-score against arrivals into --figure, and writes every record
to --results (JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import jax
import numpy as np
from absl import app, flags

from d2c_jax import comparison, kmerge, merge, online
from d2c_jax.atomic_io import write_bytes_atomic, write_text_atomic
from d2c_jax.evaluation import Evaluator, longest_response_tokens
from d2c_jax.inputs import load_inputs
from d2c_jax.plots import png, pyplot
from d2c_jax.search import LossCache, find_partition
from d2c_jax.run_config import SearchSettings
from d2c_jax.suite import ensure_preset

flags.DEFINE_string("suite", "demo", "Built-in suite preset (demo: 12 tasks, full: 40), built on first use.")
flags.DEFINE_string("suite_root", "runs/suites", "Where built-in suites are cached.")
flags.DEFINE_integer("seeds", 2, "Arrival orders: seeds 0..S-1.")
flags.DEFINE_list("ks", ["1", "2", "4", "5", "8"], "Numbers of slots K.")
flags.DEFINE_integer("refine_iterations", 5, "D²C iterations after each placement (placement+refine).")
flags.DEFINE_integer("d2c_iterations", 100, "Iterations of the full D²C search at the last arrival.")
flags.DEFINE_integer("eval_examples", 12, "Held-out examples per task.")
flags.DEFINE_integer("record_every", 1, "Held-out evaluation after every r-th arrival (and the last).")
flags.DEFINE_enum("objective", "local", ["local", "global", "relative"],
                  "Objective of placement and refinement (relative: the global one with each task's loss "
                  "divided by its own adapter's loss, in placement; refinement then uses global).")
flags.DEFINE_list("methods", list(("kmerge", "kmerge_pp", "kmerge+ties", "kmerge_pp+ties", "placement",
                                   "placement+refine", "d2c")), "Methods to run.")
flags.DEFINE_string("figure", "docs/online.png", "S-score against arrivals.")
flags.DEFINE_string("results", "runs/online/results.json", "Every record, as JSON.")
FLAGS = flags.FLAGS

METHODS = ("kmerge", "kmerge_pp", "kmerge+ties", "kmerge_pp+ties", "placement", "placement+refine", "d2c")
MERGE, DENSITY = "ties", 0.5


class Held:
    """Held-out scores of slot assignments, each distinct assignment evaluated once."""

    def __init__(self, inputs, eval_examples: int):
        data = inputs.load_split("eval", eval_examples, 64)
        self.ev = Evaluator(inputs.params, inputs.model_cfg, inputs.tokenizer, data, inputs.task_metrics,
                            prepared=inputs.prepared("linear", 1.0),
                            max_new_tokens=longest_response_tokens(data, inputs.tokenizer))
        self.memo: dict = {}
        self.single = self.ev.single().scores_t

    def scores(self, key, loras: list, partition_n: np.ndarray) -> np.ndarray:
        """float64[N] held-out scores with slot loras[partition_n[t]] (absent tasks: slot 0, unused)."""
        if key not in self.memo:
            lora_k = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *loras)
            self.memo[key] = self.ev.clusters(lora_k, np.maximum(partition_n, 0), generation=True).scores_t
        return self.memo[key]


def _key(kind: str, partition_n: np.ndarray):
    return kind, frozenset(frozenset(np.flatnonzero(partition_n == c).tolist()) for c in online.labels(partition_n))


def _record(held: Held, kind: str, loras, partition_n: np.ndarray, seen: list[int]) -> dict:
    """S-score and mean held-out score of the tasks seen (NaN between --record_every arrivals);
    `loras`: the slot adapters in `online.compact` label order, or a function giving them."""
    n = len(partition_n)
    if len(seen) % FLAGS.record_every and len(seen) < n:
        return {"s_score": float("nan"), "score": float("nan")}
    loras = loras() if callable(loras) else loras
    compact = online.compact(partition_n)
    scores = held.scores(_key(kind, compact), loras, compact)
    s = comparison.s_score(scores[seen], held.single[seen])
    return {"s_score": float("nan") if s is None else s, "score": float(np.mean(scores[seen]))}


def _ties_loras(scorer, partition_n):
    p = online.compact(partition_n)
    return [scorer.merge(p == c) for c in online.labels(p)]


def run_kmerge(rule, order, k, prepared_linear, held, scorer=None):
    """K-Merge (or ++) over the arrival order: one record per arrival. With `scorer`, each slot is
    the TIES merge of its members (scorer.merge) instead of the running average."""
    n = len(order)
    slots = kmerge.Slots(k)
    slot_lora: dict[int, dict] = {}
    records = []
    for step, t in enumerate(order):
        start = time.perf_counter()
        mask = np.zeros(prepared_linear.num_adapters, bool)
        mask[t] = True
        own = jax.tree.map(np.asarray, merge.merge_mask(prepared_linear, mask))
        s, _ = kmerge.choose_slot(rule, slots, own, lambda c: slot_lora[c])
        slots.members[s].append(int(t))
        members = np.zeros(prepared_linear.num_adapters, bool)
        members[slots.members[s]] = True
        if scorer is not None:
            slot_lora[s] = jax.tree.map(np.asarray, scorer.merge(members))
        else:
            summed = jax.tree.map(np.asarray, merge.merge_mask(prepared_linear, members))
            slot_lora[s] = kmerge.running_average(summed, len(slots.members[s]))
        seconds = time.perf_counter() - start
        partition_n = np.full(n, -1, np.int32)
        for c, m in enumerate(slots.members):
            partition_n[m] = c
        compact = online.compact(partition_n)
        loras = [slot_lora[int(partition_n[np.flatnonzero(compact == c)[0]])] for c in online.labels(compact)]
        seen = [int(x) for x in order[:step + 1]]
        records.append({"step": step + 1, "evaluations": 0, "seconds": seconds,
                        **_record(held, "kmerge" if scorer is None else "ties", loras, partition_n, seen)})
    return records


def run_placement(order, k, scorer, held, refine_iterations, seed, objective="local"):
    """Our placement (refine_iterations 0) or placement + refinement over the arrival order."""
    n = len(order)
    partition_n = np.full(n, -1, np.int32)
    losses_n = np.full(n, np.nan)
    cache = LossCache(n)
    records = []
    relative = objective == "relative"
    objective = "global" if relative else objective
    weights_n = np.ones(n)
    for step, t in enumerate(order):
        start = time.perf_counter()
        evaluations = 0
        if relative:  # 1 / the arrival's loss with its own adapter (the singleton merge)
            (own,), stats = cache.resolve(scorer, [(np.arange(n) == t, int(t))])
            weights_n[t], evaluations = 1.0 / float(own), stats.evaluations
        partition_n, placement = online.place(scorer, cache, partition_n, int(t), objective=objective, max_clusters=k,
                                              weights_n=weights_n)
        evaluations += placement.evaluations
        losses_n, _ = online.task_losses(scorer, cache, partition_n)
        if refine_iterations and len(online.labels(partition_n)) < step + 1:  # some cluster has 2+ members
            partition_n, losses_n, result = online.refine(scorer, partition_n, losses_n, refine_iterations,
                                                          objective=objective, seed=seed * 1000 + step)
            evaluations += result.evaluations
            cache = online.seeded_cache(partition_n, losses_n)  # the refined clusters' losses, known
        seconds = time.perf_counter() - start
        seen = [int(x) for x in order[:step + 1]]
        records.append({"step": step + 1, "evaluations": int(evaluations), "seconds": seconds,
                        **_record(held, "ties", lambda: _ties_loras(scorer, partition_n), partition_n, seen)})
    return records


def run_d2c(k, scorer, held, iterations, objective="local"):
    """A full D²C search from scratch on every task (the last arrival's reference)."""
    n = scorer.num_tasks
    start = time.perf_counter()
    result = find_partition(scorer, "d2c", SearchSettings(num_clusters=k, iterations=iterations, seed=0,
                                                          objective=objective))
    seconds = time.perf_counter() - start
    return {"step": n, "evaluations": int(result.evaluations), "seconds": seconds,
            **_record(held, "ties", _ties_loras(scorer, result.partition_n), result.partition_n, list(range(n)))}


def table(results: dict, ks: list[int], n: int) -> str:
    """Final-step S-score / held-out score (means over seeds) and the mean cost per arrival."""
    lines = ["final step (all tasks arrived), mean over seeds: S-score | held-out score | seconds per arrival "
             "| evaluations per arrival (d2c: the whole search)",
             f"{'method':>17} " + " ".join(f"{'K=' + str(k):>30}" for k in ks)]
    for m in [m for m in METHODS if m in results[str(ks[0])]]:
        cells = []
        for k in ks:
            runs = results[str(k)][m]
            last = [r[-1] for r in runs]
            per = [x for r in runs for x in r] if m != "d2c" else last
            cells.append(f"{np.mean([x['s_score'] for x in last]):6.3f} {np.mean([x['score'] for x in last]):6.1f} "
                         f"{np.mean([x['seconds'] for x in per]):7.2f}s {np.mean([x['evaluations'] for x in per]):6.1f}")
        lines.append(f"{m:>17} " + " ".join(f"{c:>30}" for c in cells))
    return "\n".join(lines)


def figure(results: dict, ks: list[int], n: int) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ks), figsize=(3.2 * len(ks), 3.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for m in [m for m in METHODS if m in results[str(k)]]:
            runs = results[str(k)][m]
            if m == "d2c":
                ax.scatter([n], [np.mean([r[-1]["s_score"] for r in runs])], marker="*", s=90, color="k",
                           label="full D²C search", zorder=3)
                continue
            with warnings.catch_warnings():  # arrivals between records: NaN in every seed
                warnings.simplefilter("ignore", RuntimeWarning)
                curve = np.nanmean([[x["s_score"] for x in r] for r in runs], axis=0)
            steps = np.arange(1, n + 1)
            ax.plot(steps[np.isfinite(curve)], curve[np.isfinite(curve)], label=m)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("arrivals")
    axes[0][0].set_ylabel("S-score (held-out, tasks seen)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def main(argv) -> int:
    del argv
    wall = time.perf_counter()
    ks = [int(k) for k in FLAGS.ks]
    paths = ensure_preset(FLAGS.suite, FLAGS.suite_root, log=lambda msg: print(f"suite: {msg}", flush=True))
    inputs = load_inputs(paths.base_model, paths.adapters_dir, paths.data_dir, split="search", examples_per_task=10,
                         max_seq_len=64, dtype="float32")
    n = len(inputs.names)
    scorer = inputs.scorer(MERGE, DENSITY)
    prepared_linear = inputs.prepared("linear", 1.0)
    held = Held(inputs, FLAGS.eval_examples)
    print(f"{n} tasks; own-adapter held-out scores {np.round(held.single, 1).tolist()}", flush=True)
    methods = [m for m in METHODS if m in FLAGS.methods]
    results: dict = {str(k): {m: [] for m in methods} for k in ks}
    for k in ks:
        for seed in range(FLAGS.seeds):
            order = np.random.default_rng(seed).permutation(n)
            for rule in kmerge.RULES:
                if rule in methods:
                    results[str(k)][rule].append(run_kmerge(rule, order, k, prepared_linear, held))
                if f"{rule}+ties" in methods:
                    results[str(k)][f"{rule}+ties"].append(run_kmerge(rule, order, k, prepared_linear, held, scorer))
            for m, t in (("placement", 0), ("placement+refine", FLAGS.refine_iterations)):
                if m in methods:
                    results[str(k)][m].append(run_placement(order, k, scorer, held, t, seed, FLAGS.objective))
            print(f"K={k} seed={seed} done ({time.perf_counter() - wall:.0f} s)", flush=True)
        if "d2c" in methods:
            results[str(k)]["d2c"].append([run_d2c(k, scorer, held, FLAGS.d2c_iterations, FLAGS.objective)])
    print(table(results, ks, n))
    seconds = time.perf_counter() - wall
    print(f"{FLAGS.suite} suite, {n} tasks, seeds 0-{FLAGS.seeds - 1}, refine T={FLAGS.refine_iterations}, "
          f"d2c T={FLAGS.d2c_iterations}; wall time {seconds:.0f} s")
    write_bytes_atomic(FLAGS.figure, figure(results, ks, n))
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.results)), exist_ok=True)
    write_text_atomic(FLAGS.results, json.dumps({"suite": FLAGS.suite, "tasks": list(inputs.names),
                                                 "single": held.single.tolist(), "seconds": seconds,
                                                 "results": results}, indent=1) + "\n")
    print(f"figure: {FLAGS.figure}; records: {FLAGS.results}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
