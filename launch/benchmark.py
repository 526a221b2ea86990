"""Benchmarks whole commands: the plain transformers + PEFT loop vs launch/search.py (see
experiments/benchmark/commands.py for what each column runs and measures).

  python launch/benchmark.py [--iterations=40,200] [--fixture_dir=runs/bench_fixture]
      [--out_dir=runs/benchmark] [--output=bench.json] [--scaling] [--tiny]
  python launch/benchmark.py --preset=llama3b --dtype=bfloat16 --columns=default --iterations=200

Builds (once, cached in --fixture_dir) a random ~25M-parameter Llama (D 512, 8 layers, 8 heads /
4 KV heads, F 1408, V 8000) with --num_adapters random rank-32 q/k/v/o PEFT adapters (alpha 128)
and 10 random examples of 84-112 tokens per task, then runs, for each T, the torch + PEFT loop,
launch/search.py with the paper's flags and every other flag at its default (cold compilation
cache), and our best settings (no all-in-one reference, warm cache), one after the other in this
process tree, and prints one table. --scaling also measures seconds per evaluation at N = 40 vs
N = 200 adapters (K chosen so that clusters have about 8 members). --tiny: a seconds-long
configuration (smoke tests).
--preset=llama3b: Llama-3.2-3B's shapes in bfloat16 with 40 rank-32 adapters and 225-300-token
examples (fixture.llama3b_settings), the accelerator figure of docs/performance.md; run it with
--dtype=bfloat16 and without the torch column (the torch loop runs float32 on the CPU threads).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Sequence

# This process measures matmul peaks and FLOPs between the columns; on a GPU it must not take
# JAX's default 75 % of the memory from the commands it starts (they get the default back: _env).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if __name__ == "__main__":  # first: a signal during the imports below ends the command cleanly
    from d2c_jax import signals

    signals.install()

from absl import app, flags, logging  # noqa: E402

from d2c_jax import cli  # noqa: E402

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax.errors import UserError, run_cli  # noqa: E402

flags.DEFINE_string("fixture_dir", os.path.join("runs", "bench_fixture"), "Where the random fixtures are cached.")
flags.DEFINE_string("out_dir", os.path.join("runs", "benchmark"), "Work directories and logs of the commands.")
flags.DEFINE_string("output", None, "Also write every figure to this JSON file.")
flags.DEFINE_list("iterations", ["40", "200"], "T values; each runs every column.")
flags.DEFINE_list("columns", ["torch", "default", "best"], "Columns to run (torch, default, best).")
flags.DEFINE_bool("scaling", False, "Also measure seconds per evaluation at N=40 vs N=200.")
flags.DEFINE_bool("tiny", False, "A seconds-long configuration (smoke tests).")
flags.DEFINE_enum("preset", None, ["llama3b"], "A named fixture instead of the 25M one (llama3b: Llama-3.2-3B shapes).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--dtype of our columns (the torch loop: float32).")
flags.DEFINE_integer("num_adapters", 40, "N: adapters (= tasks).")
flags.DEFINE_integer("num_clusters", 5, "K.")
flags.DEFINE_integer("seq_len", 112, "Longest example in tokens (examples are 3/4 to all of it).")
flags.DEFINE_integer("seed", 0, "Seed of the fixture and of the searches.")


def fixture_settings(f: flags.FlagValues, num_adapters: int | None = None):
    from experiments.benchmark import fixture as bf

    n = num_adapters or f.num_adapters
    if f.preset == "llama3b":
        return dataclasses.replace(bf.llama3b_settings(f.seed), num_adapters=n)
    # Base weights saved in the run's dtype, as a user's checkpoint would be.
    if f.tiny:
        return dataclasses.replace(bf.tiny_settings(f.seed), num_adapters=n if num_adapters else 6,
                                   weights_dtype=f.dtype)
    return bf.FixtureSettings(num_adapters=n, hidden=512, layers=8, intermediate=1408, seq_len=f.seq_len,
                              seed=f.seed, weights_dtype=f.dtype)


_OUT_DIR_ENTRY = re.compile(r"(torch|default|best)-T\d+(\.json|\.log)?|partial\.json|cache-.*")


def check_outputs(f: flags.FlagValues) -> None:
    """--out_dir (whose run directories are replaced) and --output are new or a benchmark's own,
    never the fixture; --out_dir gets our marker."""
    from d2c_jax import output_guard

    out_dir = os.path.abspath(f.out_dir)
    legacy = lambda d: all(_OUT_DIR_ENTRY.fullmatch(n) for n in os.listdir(d))  # noqa: E731 - before the marker
    output_guard.claim_dir(out_dir, what="benchmark output directory", flag="--out_dir", command="benchmark",
                           inputs=[f.fixture_dir], ours=legacy)
    if f.output:
        output_guard.claim_file(os.path.abspath(f.output), what="benchmark result (JSON with rows)", flag="--output",
                                inputs=[f.fixture_dir], ours=output_guard.json_keys("rows", "fixture"))
    output_guard.mark_dir(out_dir, "benchmark")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS

    def body() -> int:
        import json

        from d2c_jax.atomic_io import write_json_atomic
        from experiments.benchmark import commands as bench
        from experiments.benchmark import fixture as bf

        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        iterations = [int(t) for t in f.iterations]
        if any(t < 1 for t in iterations) or f.num_clusters < 2:
            raise UserError(None, "--iterations must be >= 1 and --num_clusters >= 2")
        unknown = set(f.columns) - set(bench.COLUMNS)
        if unknown:
            raise UserError(None, f"--columns: unknown {sorted(unknown)}; choose from {bench.COLUMNS}")
        if f.dtype != "float32" and "torch" in f.columns:
            raise UserError(None, f"--dtype={f.dtype}: the torch loop runs float32 only; pass --columns=default,best")
        if f.preset and f.tiny:
            raise UserError(None, "--preset and --tiny are two different fixtures; pass one")
        k = 2 if f.tiny else f.num_clusters
        check_outputs(f)

        def fixture(n: int | None = None, clusters: int = k) -> bench.Fixture:
            paths = bf.ensure_fixture(f.fixture_dir, fixture_settings(f, n), log=log)
            return bench.Fixture(paths.base_model, paths.adapters_dir, paths.data_dir, num_clusters=clusters,
                                 examples_per_task=paths.settings.examples_per_task, seed=f.seed, dtype=f.dtype)

        result = bench.run_benchmark(fixture(), iterations, os.path.abspath(f.out_dir), f.columns, log=log)
        print(bench.table(result), flush=True)
        if f.scaling:
            small, large = (6, 12) if f.tiny else (40, 200)
            members = 3 if f.tiny else 8
            s = bench.seconds_per_evaluation([fixture(small, small // members), fixture(large, large // members)],
                                             members=members)
            result["scaling"] = {"num_adapters": [small, large], "members": members, "seconds_per_evaluation": s,
                                 "ratio": s[1] / s[0]}
            print(f"\nseconds per evaluation, clusters of {members}: N={small} {s[0]:.3f}, N={large} {s[1]:.3f} "
                  f"(ratio {s[1] / s[0]:.2f})", flush=True)
        if f.output:
            write_json_atomic(os.path.abspath(f.output), json.loads(json.dumps(result)), indent=1)
        return 0

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)  # --help exits 0; one-line flag errors
