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

from d2c_jax.atomic_io import write_json_atomic
from d2c_jax import config_flags
from d2c_jax.errors import run_cli
from experiments.benchmark import fixture, sessions, tables

flags.DEFINE_string("fixture_dir", os.path.join("runs", "bench_fixture"),
                    "Where the random model, adapters and examples are cached (one sub-directory per setting).")
flags.DEFINE_string("output", None, "Also write every figure to this JSON file.")
flags.DEFINE_bool("tiny", False, "A seconds-long configuration (smoke tests); flags given explicitly still apply.")
FIXTURE_FLAGS = ("num_adapters", "rank", "alpha", "hidden", "layers", "vocab", "seq_len", "examples_per_task", "seed")
BENCH_FLAGS = tuple(f.name for f in dataclasses.fields(sessions.BenchSettings) if f.name != "density")
# One flag per setting, defaults and help from the dataclasses (seed: one flag for both).
config_flags.define_flags(fixture.FixtureSettings,
                          skip=[f.name for f in dataclasses.fields(fixture.FixtureSettings) if f.name not in FIXTURE_FLAGS])
config_flags.define_flags(sessions.BenchSettings, skip=("density", "seed"))
flags.DEFINE_bool("isolate", True, "Run each column in its own process (separate peak RSS).")
TINY_BENCH = dict(num_clusters=2, reference_iterations=2, iterations=2, population=2, proposals=2, batch_size=4,
                  strategy_budget=8)


def settings_from_flags(f: flags.FlagValues):
    """(FixtureSettings, BenchSettings); with --tiny the tiny values replace the defaults, and flags
    given explicitly still win (an explicit --hidden re-derives heads and mlp width)."""
    if f.tiny:
        over = {name: f[name].value for name in FIXTURE_FLAGS if f[name].present}
        if "hidden" in over:
            over.update(heads=0, kv_heads=0, intermediate=0)
        fixture_settings = dataclasses.replace(fixture.tiny_settings(f.seed), **over)
    else:
        fixture_settings = fixture.FixtureSettings(**{name: f[name].value for name in FIXTURE_FLAGS})
    values = {name: f[name].value for name in BENCH_FLAGS}
    if f.tiny:
        values.update({k: v for k, v in TINY_BENCH.items() if not f[k].present})
    return fixture_settings, sessions.BenchSettings(**values)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)

    def body() -> int:
        fixture_settings, bench = settings_from_flags(flags.FLAGS)
        sessions.check_settings(fixture_settings, bench)
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        paths = fixture.ensure_fixture(flags.FLAGS.fixture_dir, fixture_settings, log=log)
        result = sessions.run_benchmark(paths, bench, isolate=flags.FLAGS.isolate)
        print(tables.report(result), flush=True)
        if flags.FLAGS.output:
            write_json_atomic(os.path.abspath(flags.FLAGS.output), result, indent=1)
        return 0

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main)
