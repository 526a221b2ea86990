"""Benchmarks d2c_jax against the paper's way of working (torch + PEFT, one merge at a time).

  python launch/benchmark.py [--fixture_dir=runs/bench_fixture] [--output=bench.json] [--tiny]

Builds (once, cached in --fixture_dir) a random ~25M-parameter Llama with --num_adapters PEFT LoRA
adapters and random task examples, then prints one table side by side: the reference (D²C
Algorithm 1 with PEFT add_weighted_adapter(ties) + forward per evaluation), d2c_jax with the
paper's settings and d2c_jax with --population / --proposals; then the global objective every
strategy reaches with --strategy_budget scorer evaluations. Each column runs in its own process
(its peak RSS is its own) and their timed iterations are interleaved, so that all see the same
background load (same machine, same run). --tiny: a seconds-long configuration.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2c_jax.errors import run_cli  # noqa: E402

flags.DEFINE_string("fixture_dir", os.path.join("runs", "bench_fixture"),
                    "Where the random model, adapters and examples are cached (one sub-directory per setting).")
flags.DEFINE_string("output", None, "Also write every figure to this JSON file.")
flags.DEFINE_bool("tiny", False, "A seconds-long configuration (smoke tests); flags given explicitly still apply.")
flags.DEFINE_integer("num_adapters", 40, "N: adapters (= tasks).")
flags.DEFINE_integer("rank", 32, "LoRA rank r.")
flags.DEFINE_integer("alpha", 128, "LoRA alpha.")
flags.DEFINE_integer("hidden", 512, "Model width; heads = hidden / 64, kv heads = heads / 2, mlp = 8/3 hidden.")
flags.DEFINE_integer("layers", 8, "Decoder layers.")
flags.DEFINE_integer("vocab", 8000, "Vocabulary size.")
flags.DEFINE_integer("seq_len", 64, "Longest example in tokens (examples are 3/4 to all of it).")
flags.DEFINE_integer("examples_per_task", 10, "n: examples per task.")
flags.DEFINE_integer("num_clusters", 5, "K.")
flags.DEFINE_integer("reference_iterations", 4, "Iterations of the torch + PEFT reference timed.")
flags.DEFINE_integer("iterations", 4, "Engine iterations timed in each d2c_jax column.")
flags.DEFINE_integer("population", 4, "P of the third column (and of the population strategies).")
flags.DEFINE_integer("proposals", 4, "M of the third column.")
flags.DEFINE_integer("batch_size", 8, "Requests per scorer call (the paper column uses min(this, 2)).")
flags.DEFINE_integer("strategy_budget", 64, "Scorer evaluations given to every search strategy (0: skip).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "d2c_jax base weight dtype (reference: float32).")
flags.DEFINE_integer("seed", 0, "Seed of the fixture and of the searches.")
flags.DEFINE_bool("isolate", True, "Run each column in its own process (separate peak RSS).")

FIXTURE_FLAGS = ("num_adapters", "rank", "alpha", "hidden", "layers", "vocab", "seq_len", "examples_per_task", "seed")
BENCH_FLAGS = ("num_clusters", "reference_iterations", "iterations", "population", "proposals", "batch_size",
               "strategy_budget", "dtype", "seed")
TINY_BENCH = dict(num_clusters=2, reference_iterations=2, iterations=2, population=2, proposals=2, batch_size=4,
                  strategy_budget=8)


def settings_from_flags(f: flags.FlagValues):
    """(FixtureSettings, BenchSettings); with --tiny the tiny values replace the defaults, and flags
    given explicitly still win (an explicit --hidden re-derives heads and mlp width)."""
    from d2c_jax import bench_fixture as bf

    if f.tiny:
        over = {name: f[name].value for name in FIXTURE_FLAGS if f[name].present}
        if "hidden" in over:
            over.update(heads=0, kv_heads=0, intermediate=0)
        fixture = dataclasses.replace(bf.tiny_settings(f.seed), **over)
    else:
        fixture = bf.FixtureSettings(**{name: f[name].value for name in FIXTURE_FLAGS})
    values = {name: f[name].value for name in BENCH_FLAGS}
    if f.tiny:
        values.update({k: v for k, v in TINY_BENCH.items() if not f[k].present})
    return fixture, bf.BenchSettings(**values)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)

    def body() -> int:
        from d2c_jax import bench_fixture as bf
        from d2c_jax.atomic_io import write_json_atomic

        fixture, bench = settings_from_flags(flags.FLAGS)
        bf.check_settings(fixture, bench)
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        paths = bf.ensure_fixture(flags.FLAGS.fixture_dir, fixture, log=log)
        result = bf.run_benchmark(paths, bench, isolate=flags.FLAGS.isolate)
        print(bf.report(result), flush=True)
        if flags.FLAGS.output:
            write_json_atomic(os.path.abspath(flags.FLAGS.output), result, indent=1)
        return 0

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main)
