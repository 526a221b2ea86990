"""Evaluates adapters on every task: single-task adapters, a partition's merged adapters, or none.

  python launch/evaluate.py --base_model=DIR --adapters_dir=DIR --data_dir=DIR \
      [--partition=WORKDIR/partition.json] [--metrics=loss,generation] [--zero_shot] --output=OUT.json

Modes: without --partition each task is scored with its own adapter; with --partition each task
is scored with the TIES (or --merge) merge of its cluster (method and density are read from
partition.json when it stores them, else taken from --merge/--density); --zero_shot scores the
bare base model (--adapters_dir is then optional and only fixes the task list).
Data: each task's `<task>.eval.jsonl` when it exists, else its search examples `<task>.jsonl`
(per task; the output records which file was used), all lines unless --examples_per_task=n
(then the first n). --metrics=generation decodes greedily (KV cache, all tasks' prompts batched
together, each row with its task's adapter) and scores each task with its tasks.json metric.
Writes {"tasks": {task: {"loss": float, ...}}, "summary": {"mean_loss": float, ...}} atomically.
The logic lives in d2c_jax/evaluation.py; this script only turns flags into an EvalConfig.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2c_jax.errors import run_cli  # noqa: E402
from d2c_jax.evaluation import DTYPES, METRIC_KINDS, EvalConfig  # noqa: E402


def define_flags() -> None:
    """Registers the flags (only when run as a script, so tests can import this module)."""
    flags.DEFINE_string("base_model", None, "Hugging Face base model directory.")
    flags.DEFINE_string("adapters_dir", None, "Directory of PEFT adapters, one sub-directory per task.")
    flags.DEFINE_string("data_dir", None, "Directory of <task>.jsonl / <task>.eval.jsonl examples.")
    flags.DEFINE_string("partition", None, "partition.json from launch/search.py: evaluate its merges.")
    flags.DEFINE_list("metrics", ["loss"], f"Any of {', '.join(METRIC_KINDS)}.")
    flags.DEFINE_bool("zero_shot", False, "Evaluate the base model without adapters.")
    flags.DEFINE_string("output", None, "Output JSON file.")
    flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Base weight dtype.")
    flags.DEFINE_integer("max_seq_len", 1024, "Longest example (prompt cut from the left to fit).")
    flags.DEFINE_bool("chat_template", False, "Wrap prompts in the tokenizer's chat template.")
    flags.DEFINE_integer("examples_per_task", 0, "First n examples of each task file (0: all).")
    flags.DEFINE_string("merge", "ties", "Merge method when partition.json does not store one.")
    flags.DEFINE_float("density", 0.5, "TIES density when partition.json does not store one.")
    flags.DEFINE_integer("batch_size", 8, "Requests scored per accelerator call.")
    flags.DEFINE_integer("example_chunk", 8, "Examples per forward pass (0: all at once); bounds "
                         "memory when tasks have many examples.")
    flags.DEFINE_integer("max_new_tokens", 128, "Generation metrics: longest generated response.")
    flags.DEFINE_integer("generation_batch_size", 64, "Generation metrics: prompts decoded per call "
                         "(rows of all tasks together, each with its own adapter).")
    flags.DEFINE_integer("seed", 0, "Seed for stochastic merges (dare_ties).")


def config_from_flags(f: flags.FlagValues) -> EvalConfig:
    return EvalConfig(
        base_model=f.base_model, adapters_dir=f.adapters_dir, data_dir=f.data_dir,
        output=f.output, partition=f.partition, metrics=tuple(f.metrics), zero_shot=f.zero_shot,
        dtype=f.dtype, max_seq_len=f.max_seq_len, chat_template=f.chat_template,
        examples_per_task=f.examples_per_task or None, merge=f.merge, density=f.density,
        batch_size=f.batch_size, example_chunk=f.example_chunk or None,
        max_new_tokens=f.max_new_tokens, generation_batch_size=f.generation_batch_size,
        seed=f.seed,
    )


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
        initialize_distributed()
        result = evaluate(cfg)
        if jax.process_index() == 0:
            write_json_atomic(cfg.output, result)
            print(f"mean loss {result['summary']['mean_loss']:.4f} over "
                  f"{result['summary']['num_tasks']} tasks -> {cfg.output}")

    sys.exit(run_cli(body))


if __name__ == "__main__":
    define_flags()
    app.run(main)
