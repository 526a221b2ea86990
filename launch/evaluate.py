"""Evaluates adapters on every task: single-task adapters, a partition's merged adapters, or none.

  python launch/evaluate.py --base_model=DIR --adapters_dir=DIR --data_dir=DIR \
      [--partition=WORKDIR/partition.json] [--metrics=loss,generation] [--zero_shot] --output=OUT.json

Modes: without --partition each task is scored with its own adapter; with --partition each task
is scored with its cluster's adapter written in merged/ beside partition.json (what the search
wrote: tuned weights or factors included, at its output rank), or, when merged/ is absent or with
--nomerged_adapters, with the TIES (or --merge) merge of its cluster (method, density and output
rank are read from partition.json when it stores them, else taken from --merge/--density);
--zero_shot scores the bare base model (--adapters_dir is then optional and only fixes the task
list).
Data: each task's `<task>.eval.jsonl` when it exists, else its search examples `<task>.jsonl`
(per task; the output records which file was used), all lines unless --examples_per_task=n
(then the first n). --metrics=generation decodes greedily (KV cache, all tasks' prompts batched
together, each row with its task's adapter) and scores each task with its tasks.json metric.
Writes {"tasks": {task: {"loss": float, ...}}, "summary": {"mean_loss": float, ...}} atomically.
The logic lives in d2c_jax/evaluation.py; this script only turns flags into an EvalConfig.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax import config_flags  # noqa: E402
from d2c_jax.errors import run_cli  # noqa: E402
from d2c_jax.evaluation import EvalConfig  # noqa: E402


def define_flags() -> None:
    """Registers the flags, one per EvalConfig field (only when run as a script, so tests can
    import this module)."""
    config_flags.define_flags(EvalConfig)


def config_from_flags(f: flags.FlagValues) -> EvalConfig:
    return config_flags.from_flags(EvalConfig, f)


def check_output(cfg: EvalConfig) -> None:
    """--output is a new file or an earlier evaluation of ours, never an input or a user's file."""
    import os

    from d2c_jax import output_guard

    merged = os.path.join(os.path.dirname(cfg.partition), "merged") if cfg.partition else None
    output_guard.claim_file(cfg.output, what="evaluation (JSON with tasks and summary)", flag="--output",
                            inputs=[cfg.base_model, cfg.adapters_dir, cfg.data_dir, cfg.partition, merged],
                            ours=output_guard.json_keys("tasks", "summary"))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(1)

    def body() -> None:
        import jax

        from d2c_jax.atomic_io import write_json_atomic
        from d2c_jax.evaluation import evaluate
        from d2c_jax.sharding import initialize_distributed

        cfg = config_from_flags(flags.FLAGS)
        check_output(cfg)
        initialize_distributed()
        result = evaluate(cfg)
        if jax.process_index() == 0:
            write_json_atomic(cfg.output, result)
            print(f"mean loss {result['summary']['mean_loss']:.4f} over "
                  f"{result['summary']['num_tasks']} tasks -> {cfg.output}")

    sys.exit(run_cli(body))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
