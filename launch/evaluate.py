"""Evaluates adapters on every task: single-task adapters, a partition's merged adapters, or none.

  python launch/evaluate.py --base_model=DIR --adapters_dir=DIR --data_dir=DIR \
      [--partition=WORKDIR/partition.json] [--metrics=loss,generation] [--zero_shot] --output=OUT.json

Modes: without --partition each task is scored with its own adapter; with --partition each task
is scored with the TIES (or --merge) merge of its cluster (method and density are read from
partition.json when it stores them, else taken from --merge/--density); --zero_shot scores the
bare base model (--adapters_dir is then optional and only fixes the task list).
Data: each task's `<task>.eval.jsonl` when it exists, else its search examples `<task>.jsonl`
(per task; the output records which file was used), all lines unless --examples_per_task=n
(then the first n).
Writes {"tasks": {task: {"loss": float, ...}}, "summary": {"mean_loss": float, ...}} atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2c_jax.errors import UserError, run_cli  # noqa: E402

METRIC_KINDS = ("loss", "generation")
DTYPES = ("bfloat16", "float32", "float16")


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
    flags.DEFINE_integer("seed", 0, "Seed for stochastic merges (dare_ties).")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The resolved flags."""

    base_model: str
    adapters_dir: str | None
    data_dir: str
    output: str
    partition: str | None = None
    metrics: tuple[str, ...] = ("loss",)
    zero_shot: bool = False
    dtype: str = "bfloat16"
    max_seq_len: int = 1024
    chat_template: bool = False
    examples_per_task: int | None = None
    merge: str = "ties"
    density: float = 0.5
    batch_size: int = 8
    example_chunk: int | None = 8
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("base_model", "data_dir", "output"):
            if not getattr(self, name):
                raise UserError(None, f"--{name} must be set")
        if not self.adapters_dir and not self.zero_shot:
            raise UserError(None, "--adapters_dir must be set (unless --zero_shot)")
        if self.zero_shot and self.partition:
            raise UserError(None, "--zero_shot and --partition exclude each other")
        bad = [m for m in self.metrics if m not in METRIC_KINDS]
        if bad or not self.metrics:
            raise UserError(None, f"--metrics={','.join(self.metrics)}: each must be one of "
                            f"{', '.join(METRIC_KINDS)}")
        if not 0.0 < self.density <= 1.0:
            raise UserError(None, f"--density={self.density}: must be in (0, 1]")
        if self.batch_size < 1:
            raise UserError(None, f"--batch_size={self.batch_size}: must be >= 1")


def config_from_flags(f: flags.FlagValues) -> EvalConfig:
    return EvalConfig(
        base_model=f.base_model, adapters_dir=f.adapters_dir, data_dir=f.data_dir,
        output=f.output, partition=f.partition, metrics=tuple(f.metrics), zero_shot=f.zero_shot,
        dtype=f.dtype, max_seq_len=f.max_seq_len, chat_template=f.chat_template,
        examples_per_task=f.examples_per_task or None, merge=f.merge, density=f.density,
        batch_size=f.batch_size, example_chunk=f.example_chunk or None,
        max_new_tokens=f.max_new_tokens, seed=f.seed,
    )


def read_partition(path: str, names: Sequence[str]) -> tuple[list[list[str]], dict[str, Any]]:
    """Clusters (lists of task names covering every task exactly once) and the stored settings."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise UserError(path, "partition file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(path, f"cannot read the partition: {e}") from None
    clusters = raw.get("clusters") if isinstance(raw, dict) else None
    if not isinstance(clusters, list) or not all(
        isinstance(c, list) and c and all(isinstance(t, str) for t in c) for c in clusters
    ):
        raise UserError(path, "expected {\"clusters\": [[task, ...], ...]} with non-empty clusters")
    seen = [t for c in clusters for t in c]
    unknown = sorted(set(seen) - set(names))
    if unknown:
        raise UserError(path, f"task(s) with no adapter: {', '.join(unknown)}")
    dup = sorted({t for t in seen if seen.count(t) > 1})
    if dup:
        raise UserError(path, f"task(s) in more than one cluster: {', '.join(dup)}")
    missing = sorted(set(names) - set(seen))
    if missing:
        raise UserError(path, f"adapter task(s) in no cluster: {', '.join(missing)}")
    return clusters, raw


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes into a temp file beside `path`, then renames it over `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    except OSError as e:
        raise UserError(path, f"cannot write the output: {e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def generation_modules():
    """(generate, metrics) modules, or a UserError when generation metrics are not available."""
    try:
        from d2c_jax import generate, metrics
    except ImportError as e:
        raise UserError(None, f"--metrics=generation needs d2c_jax.generate and d2c_jax.metrics, "
                        f"which are not available ({e})") from None
    return generate, metrics


def generation_scores(model, lora: Any, task_data, t: int, metric: str, cfg: EvalConfig) -> dict:
    """Hook for generation metrics: greedy responses to the task's prompts, scored by `metric`.

    Needs d2c_jax/generate.py providing
      generate_texts(params, model_cfg, tokenizer, lora, prompt_ids: list[list[int]], *,
                     max_new_tokens: int) -> list[str]
    and d2c_jax/metrics.py's score(metric, predictions, references) -> float (0-100).
    """
    generate, metrics = generation_modules()
    params, model_cfg, tokenizer = model
    prompts = [list(p) for p in task_data.prompt_ids[t]]
    predictions = generate.generate_texts(params, model_cfg, tokenizer, lora, prompts,
                                          max_new_tokens=cfg.max_new_tokens)
    return {metric: float(metrics.score(metric, predictions, list(task_data.responses[t])))}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Runs the evaluation and returns the output document (no files written)."""
    import jax
    import numpy as np

    from d2c_jax import data, hf_io, lora as lora_lib, merge as merge_lib
    from d2c_jax.models.config import load_config
    from d2c_jax.scoring import Scorer

    if "generation" in cfg.metrics:
        generation_modules()  # fail before any heavy work
    # Everything a user can get wrong is checked before the weights are loaded.
    model_cfg = load_config(cfg.base_model)
    adapters = None
    if cfg.adapters_dir:
        adapters = lora_lib.load_adapter_set(cfg.adapters_dir, model_cfg)
        names = adapters.names
    else:
        names = data.data_tasks(cfg.data_dir)
        if not names:
            raise UserError(cfg.data_dir, "no <task>.jsonl files")
    data.check_tasks_match(cfg.data_dir, names, split="eval")
    tokenizer = hf_io.load_tokenizer(cfg.base_model)
    task_data = data.load_task_data(
        cfg.data_dir, names, tokenizer, split="eval", examples_per_task=cfg.examples_per_task,
        max_seq_len=cfg.max_seq_len, chat_template=cfg.chat_template)
    meta = data.load_task_meta(cfg.data_dir, names)

    method, density, clusters = cfg.merge, cfg.density, None
    if cfg.partition:
        clusters, raw = read_partition(cfg.partition, names)
        method = raw.get("merge", raw.get("method", method))
        density = float(raw.get("density", density))
    prepared = None
    if clusters is not None:
        try:
            prepared = merge_lib.prepare_merge(adapters, method, density, seed=cfg.seed)
        except UserError as e:  # a bad method/density: name where it came from
            raise UserError(e.path or (cfg.partition if "merge" in raw or "method" in raw
                                       or "density" in raw else None), e.message) from None
    params = hf_io.load_params(cfg.base_model, model_cfg, cfg.dtype)
    scorer = Scorer(params, model_cfg, prepared, task_data, batch_size=cfg.batch_size,
                    example_chunk=cfg.example_chunk)

    n = len(names)
    lora_of: dict[int, Any] = {}
    if cfg.zero_shot:
        mode = "zero_shot"
        losses = [scorer.loss_of_lora(None, t) for t in range(n)]
        lora_of = {t: None for t in range(n)}
    elif clusters is None:
        mode = "single"
        lora_of = {t: lora_lib.effective_lora(adapters, t) for t in range(n)}
        losses = [scorer.loss_of_lora(lora_of[t], t) for t in range(n)]
    else:
        mode = "partition"
        cluster_of = {name: k for k, c in enumerate(clusters) for name in c}
        masks_kn = np.zeros((len(clusters), n), bool)
        for name, k in cluster_of.items():
            masks_kn[k, names.index(name)] = True
        masks_cn = np.stack([masks_kn[cluster_of[name]] for name in names])
        losses = [float(x) for x in scorer.losses(masks_cn, np.arange(n, dtype=np.int32))]
        if "generation" in cfg.metrics:
            merge_fn = jax.jit(merge_lib.merge_mask)
            merged = [merge_fn(prepared, masks_kn[k]) for k in range(len(clusters))]
            lora_of = {t: merged[cluster_of[name]] for t, name in enumerate(names)}

    tasks: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(names):
        entry: dict[str, Any] = {"loss": float(losses[t])}
        if "generation" in cfg.metrics:
            metric = meta[name].metric or "rouge_l"
            entry.update(generation_scores((params, model_cfg, tokenizer), lora_of[t],
                                           task_data, t, metric, cfg))
        entry["num_examples"] = int(task_data.num_examples[t])
        entry["data_file"] = os.path.basename(task_data.files[t])
        if clusters is not None:
            entry["cluster"] = cluster_of[name]
        tasks[name] = entry
        if not np.isfinite(entry["loss"]):
            raise UserError(task_data.files[t], f"loss of task {name!r} is not finite")

    summary: dict[str, Any] = {"mean_loss": float(np.mean(losses)), "num_tasks": n, "mode": mode}
    for metric in sorted({k for e in tasks.values() for k in e} & set(data.METRICS)):
        vals = [e[metric] for e in tasks.values() if metric in e]
        summary[f"mean_{metric}"] = float(np.mean(vals))
    if "generation" in cfg.metrics:
        summary["mean_score"] = float(np.mean(
            [e[m] for e in tasks.values() for m in data.METRICS if m in e]))
    if clusters is not None:
        summary.update(num_clusters=len(clusters), merge=method, density=density)
    summary.update(dtype=cfg.dtype, examples_per_task=cfg.examples_per_task,
                   chat_template=cfg.chat_template, max_seq_len=cfg.max_seq_len)
    return {"tasks": tasks, "summary": summary}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(1)

    def body() -> None:
        import jax

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
