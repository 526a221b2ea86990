r"""Evaluates a search run's merged adapters against the references, or any adapters on their own.

  python launch/evaluate.py --workdir=runs/demo-d2c-k3        # or --partition=RUN/partition.json
  python launch/evaluate.py --base_model=DIR --adapters_dir=DIR --data_dir=DIR \
      [--partition=partition.json] [--metrics=loss,generation] [--zero_shot] --output=OUT.json

A run (--workdir, or --partition without --base_model) needs nothing else: its partition.json and
config.json give the paths and settings (dtype, max_seq_len, chat template, seed, --suite); a
flag given as well overrides the run's value, with a note. It scores, on the held-out examples,
the run's merged adapters and the references (--compare: zero-shot, single-task, all-in-one,
the random start), loss and generation metrics, prints one table per task family and overall
(with the gap closed between all-in-one and single-task) and writes RUN/evaluation.json,
evaluation.md and evaluation.png (a bar chart).

Without a run: each task with its own adapter; with --partition each task with its cluster's
adapter from merged/ beside partition.json (what the search wrote), or, when merged/ is absent or
with --nomerged_adapters, the --merge merge of its cluster (method, density and output rank read
from partition.json when it stores them); --zero_shot scores the bare base model.
Data: each task's `<task>.eval.jsonl` when it exists, else its search examples `<task>.jsonl`
(the output records which file was used), all lines unless --examples_per_task=n. Generation
decodes greedily (KV cache, all tasks' prompts batched together, each row with its task's
adapter) and scores each task with its tasks.json metric.
Writes {"tasks": {task: {"loss": float, ...}}, "summary": {"mean_loss": float, ...},
"comparison": {...}} atomically. The logic lives in d2c_jax/evaluation.py and comparison.py.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

if __name__ == "__main__":  # first: a signal during the imports below ends the command cleanly
    from d2c_jax import signals

    signals.install()

from absl import app, flags

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax import config_flags  # noqa: E402
from d2c_jax.errors import run_cli  # noqa: E402
from d2c_jax.evaluation import EvalConfig  # noqa: E402

# --help: these first, by group; every other flag below them as "advanced".
HELP_GROUPS = {
    "inputs": ("workdir", "partition", "base_model", "adapters_dir", "data_dir", "suite", "flagfile"),
    "evaluation": ("compare", "metrics", "zero_shot", "examples_per_task", "max_new_tokens"),
    "settings (default: the run's)": ("dtype", "max_seq_len", "chat_template"),
    "outputs": ("output",),
    "run control": ("progress", "batch_size", "generation_batch_size"),
}


def define_flags() -> None:
    """Registers the flags, one per EvalConfig field (only when run as a script, so tests can
    import this module)."""
    config_flags.define_flags(EvalConfig)


def config_from_flags(f: flags.FlagValues) -> EvalConfig:
    return config_flags.from_flags(EvalConfig, f)


def check_output(cfg: EvalConfig) -> None:
    """--output is a new file or an earlier evaluation of ours, never an input or a user's file;
    so are the table and chart written beside it (OUT.md, OUT.png) with a run or --compare: ours
    when the evaluation beside them is, or by their content (a killed run may have written them
    and not the evaluation)."""
    from d2c_jax import comparison, output_guard, plots

    merged = os.path.join(os.path.dirname(cfg.partition), "merged") if cfg.partition else None
    inputs = [cfg.base_model, cfg.adapters_dir, cfg.data_dir, cfg.partition, merged]
    evaluation = output_guard.json_keys("tasks", "summary")
    output_guard.claim_file(cfg.output, what="evaluation (JSON with tasks and summary)", flag="--output",
                            inputs=inputs, ours=evaluation)
    if cfg.run_dir or (cfg.compare and not cfg.zero_shot):  # charts may be written beside it
        earlier = evaluation(cfg.output)
        stem = os.path.splitext(cfg.output)[0]
        for path, ours in ((stem + ".md", comparison.is_our_table), (stem + ".png", plots.is_our_png)):
            output_guard.claim_file(path, what="evaluation table or chart", flag="--output", inputs=inputs,
                                    ours=lambda p, ours=ours: earlier or ours(p))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(1)

    def body() -> None:
        import jax

        from d2c_jax import comparison, plots
        from d2c_jax.atomic_io import write_bytes_atomic, write_json_atomic, write_text_atomic
        from d2c_jax.evaluation import evaluate, resolve
        from d2c_jax.sharding import initialize_distributed

        cfg = config_from_flags(flags.FLAGS)
        check_output(resolve(cfg)[0])  # the output the run's directory supplies, too
        initialize_distributed()
        result = evaluate(cfg)
        if jax.process_index() != 0:
            return
        output = resolve(cfg)[0].output
        summary = result["summary"]
        comp = result["comparison"]
        print(comparison.text_tables(comp))
        charts = bool(summary.get("run")) or len(comp["methods"]) > 1  # beside a lone output JSON: nothing else
        stem = os.path.splitext(output)[0]
        if charts:
            title = f"{comparison.EVALUATION_TITLE} {summary.get('run') or output}"
            write_text_atomic(stem + ".md", comparison.markdown(comp, title))
            groups, methods, values, what = comparison.chart_values(comp)
            write_bytes_atomic(stem + ".png", plots.comparison_png(groups, methods, values, what,
                                                                   comparison.LABELS, title="held-out evaluation"))
        write_json_atomic(output, result)
        score = f", mean score {summary['mean_score']:.2f}" if "mean_score" in summary else ""
        if summary.get("s_score") is not None:
            score += f", S-score {summary['s_score']:.3f}"
        extra = f" (+ {os.path.basename(stem)}.md, .png)" if charts else ""
        print(f"{summary['mode']}: mean loss {summary['mean_loss']:.4f}{score} over "
              f"{summary['num_tasks']} tasks -> {output}{extra}")

    sys.exit(run_cli(body))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parser(HELP_GROUPS))
