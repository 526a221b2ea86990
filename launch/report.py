"""The paper's Table 1 and its two analyses on a suite, written as markdown + PNGs.

  python launch/report.py --suite=full --seeds=3 [--iterations=T] [--output_dir=docs]

--suite is a suite directory built by launch/make_suite.py, or a preset name (demo, full) that is
built on first use under --suite_root. Runs random, kmeans, svd_kmeans, D²C as in the paper
(P=1, M=1, local) and D²C with --population/--proposals/--objective, plus zero-shot, single-task
and all-in-one, at K=--num_clusters; then score vs K over --cluster_counts, the adjusted Rand
index of the found clusters vs family / language tags, and a small investigation (oracle
partitions, --compare_merges). Writes OUTPUT_DIR/results.md (with this command line),
results_*.png and results.json. Everything runs in this process (d2c_jax/report.py).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Sequence

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2c_jax.errors import run_cli  # noqa: E402

flags.DEFINE_string("suite", "full", "Suite directory (launch/make_suite.py) or preset name.")
flags.DEFINE_string("suite_root", os.path.join("runs", "suites"), "Where presets are built/cached.")
flags.DEFINE_string("output_dir", "docs", "Where results.md and the PNGs are written.")
flags.DEFINE_integer("seeds", 3, "Seeds 0..S-1 for every strategy of Table 1.")
flags.DEFINE_integer("num_clusters", 5, "K of Table 1.")
flags.DEFINE_integer("iterations", 200, "T: D²C search iterations (the paper: 200).")
flags.DEFINE_list("cluster_counts", ["1", "2", "3", "5", "8", "12"], "K values of the score-vs-K analysis.")
flags.DEFINE_list("count_strategies", ["d2c", "random"],
                  "Strategies of the score-vs-K analysis (d2c = the paper's setting, d2c_ours, random, "
                  "kmeans, svd_kmeans).")
flags.DEFINE_integer("count_seeds", 3, "Seeds per point of the score-vs-K analysis.")
flags.DEFINE_integer("population", 4, "D²C ours: P chains.")
flags.DEFINE_integer("proposals", 4, "D²C ours: M proposals per chain per iteration.")
flags.DEFINE_enum("objective", "global", ["local", "global"], "D²C ours: search objective.")
flags.DEFINE_integer("exchange_every", 0, "D²C ours: replace the worst chains every k iterations (0: never).")
flags.DEFINE_string("merge", "ties", "Merge method of every run.")
flags.DEFINE_float("density", 0.5, "TIES density.")
flags.DEFINE_list("compare_merges", ["ties_delta"],
                  "Investigation: seed 0's partitions (and the oracles) merged with these methods too.")
flags.DEFINE_integer("long_iterations", 1000,
                     "Investigation: D²C (paper setting, seed 0) with this many iterations (0: off).")
flags.DEFINE_integer("examples_per_task", 10, "n: search examples per task.")
flags.DEFINE_integer("max_new_tokens", 0, "Generation length (0: longest eval response + 4).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Base weight dtype.")
flags.DEFINE_integer("batch_size", 8, "Scoring requests / merged masks per call (does not change "
                     "results): evaluation and D²C with several chains or proposals.")
flags.DEFINE_integer("small_batch_size", 2, "The same for D²C with one chain and one proposal.")
flags.DEFINE_integer("generation_batch_size", 128, "Prompts decoded per call.")


def config_from_flags(f: flags.FlagValues, command: str):
    from d2c_jax.errors import UserError
    from d2c_jax.report import ReportConfig

    try:
        counts = tuple(int(x) for x in f.cluster_counts)
    except ValueError:
        raise UserError(None, f"--cluster_counts={','.join(f.cluster_counts)}: must be integers") from None
    return ReportConfig(
        suite=f.suite, output_dir=f.output_dir, suite_root=f.suite_root, seeds=f.seeds,
        num_clusters=f.num_clusters, iterations=f.iterations, cluster_counts=counts,
        count_strategies=tuple(f.count_strategies), count_seeds=f.count_seeds,
        population=f.population, proposals=f.proposals, objective=f.objective,
        exchange_every=f.exchange_every, merge=f.merge, density=f.density,
        compare_merges=tuple(m for m in f.compare_merges if m), long_iterations=f.long_iterations,
        examples_per_task=f.examples_per_task,
        max_new_tokens=f.max_new_tokens, dtype=f.dtype, batch_size=f.batch_size,
        small_batch_size=f.small_batch_size,
        generation_batch_size=f.generation_batch_size, command=command,
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])

    def body() -> None:
        from d2c_jax import report

        cfg = config_from_flags(flags.FLAGS, command)
        print(command, flush=True)
        start = time.time()

        def log(msg: str) -> None:
            print(f"[report {time.time() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

        res = report.run_report(cfg, log)
        written = report.write_report(res, cfg.output_dir)
        print(f"wall time {res.seconds / 60:.1f} min; wrote {', '.join(written.values())}")

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main)
