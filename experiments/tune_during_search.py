"""Does --tune_during_search pay? (issue 12, item 4)

  python experiments/tune_during_search.py [--suite=runs/suites/full] [--seeds=3]

On the built-in suite, K = 5: 4 chains of the paper's Algorithm 1 (P = 4, M = 1, local objective,
T = 200) searched with ties_delta; every chain's final partition is tuned as the report tunes
(granularity "factors", 100 steps, 7 of 10 search examples fitted, 3 held out; tune.py), and each
chain's kept adapters are scored on the held-out .eval.jsonl split as the report scores them.
Printed per seed: which chain each rule picks and its score:
  after      the chain with the lowest unit-weight search objective, tuned afterwards (what
             --tune_weights does);
  during     the lowest tuned total, fitted + held-out examples (what --tune_during_search does:
             tune.TuneResult.chain_totals);
  held-out   the lowest tuned total on the held-out examples only (a candidate rule);
  oracle     the best eval score of the four (what no rule can know).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("suite", "runs/suites/full", "A built suite (launch/make_suite.py).")
flags.DEFINE_integer("seeds", 3, "Seeds 0..S-1.")
FLAGS = flags.FLAGS


def main(argv) -> int:
    del argv
    from d2c_jax import search, tune
    from d2c_jax.run_config import SearchSettings
    from experiments.report import run as report

    cfg = report.ReportConfig()
    bench = report.Bench(report.resolve_suite(FLAGS.suite, cfg.suite_root), cfg)
    k, op = 5, "ties_delta"
    prepared = bench.prepared(op, 0)
    scorer = bench.scorer(op)
    chunk = scorer.example_chunk(len(bench.search_data.names), bench.search_data.tokens_tns.shape[-1])
    picked: dict[str, list[float]] = {"after": [], "during": [], "held-out": [], "oracle": []}
    for seed in range(FLAGS.seeds):
        settings = SearchSettings(num_clusters=k, iterations=200, objective="local", population=4, seed=seed)
        t0 = time.perf_counter()
        result = search.find_partition(scorer, "d2c", settings, bench.adapters)
        parts = np.asarray(result.state.partitions_pn, np.int32)
        t1 = time.perf_counter()
        res = tune.tune_partitions(bench.params, bench.model_cfg, prepared, bench.search_data, parts, k,
                                   tune.TuneSettings(granularity="factors", steps=100), example_chunk=chunk)
        t2 = time.perf_counter()
        scores, held = [], []
        for i, part in enumerate(parts):
            c = res.chain(i)
            held.append(float(np.where(c.kept_k, c.tuned_heldout_k, c.unit_heldout_k).sum()))
            scores.append(float(bench.evaluator(op).clusters(c.lora, part).mean_score))
        rule = {"after": int(result.chain), "during": int(np.argmin(res.chain_totals())),
                "held-out": int(np.argmin(held)), "oracle": int(np.argmax(scores))}
        for name, i in rule.items():
            picked[name].append(scores[i])
        print(f"seed {seed}: chain scores {[round(s, 2) for s in scores]}; picked "
              + ", ".join(f"{name} {i} ({scores[i]:.2f})" for name, i in rule.items())
              + f"; search {t1 - t0:.0f} s, tuning the 4 chains {t2 - t1:.0f} s", flush=True)
    for name, s in picked.items():
        print(f"{name:<9} score {np.mean(s):.2f} ± {np.std(s, ddof=1) if len(s) > 1 else 0.0:.2f}  "
              f"{[round(x, 2) for x in s]}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
