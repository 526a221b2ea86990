"""Held-out evaluation of single-task adapters, a partition's merges, or the bare base model.

Shapes: T tasks (= N adapters; adapter i is the adapter of task i), K clusters, A distinct
adapters of one evaluation (K for a partition, N for single-task), R generation rows (one per
(task, example)), B rows per generation call, P prompt slots, V vocab.

An `Evaluator` holds everything loaded once (weights, tokenizer, the eval split, each task's
metric, the prepared merge) and scores any per-task choice of adapters:
  - loss: `Scorer.losses` on the eval split (each distinct merge built once, fixed-shape batches);
  - generation: greedy decoding with the KV cache; the prompts of all tasks that share an adapter
    (a cluster's merge) are decoded together, B rows per call, the adapter picked on device from
    a table of the A distinct adapters; then each task is scored with its metric from tasks.json
    (rouge_l when tasks.json names none).
All calls of one Evaluator share shapes (P, max_new_tokens, the adapter table padded to N rounded
up to MERGE_BLOCK; B is a power of two up to generation_batch_size), so a report that evaluates
many partitions compiles the decoder only a few times.

`evaluate(EvalConfig) -> dict` is what `launch/evaluate.py` runs; the output document is
{"tasks": {task: {"loss", <metric>, "num_examples", "data_file", ["cluster"]}}, "summary": {...}}.
Library code: no flags are read here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax import hub, output_guard
from d2c_jax import metrics as metrics_lib
from d2c_jax import tune
from d2c_jax.config_flags import setting
from d2c_jax.data import METRICS, TaskData, response_token_ids
from d2c_jax.errors import UserError
from d2c_jax.generate import greedy_generate, pad_prompts, resolve_eos_pad, strip_generated
from d2c_jax.inputs import load_inputs
from d2c_jax.merge import Prepared
from d2c_jax.models.config import ModelConfig
from d2c_jax.scoring import Scorer
from d2c_jax.types import DTYPES, Lora, Params

METRIC_KINDS = ("loss", "generation")
DEFAULT_METRIC = "rouge_l"
_PROMPT_MULTIPLE = 16  # prompt slots rounded up to this (fewer distinct shapes)
MERGE_BLOCK = 8  # the generation adapter table has N rows rounded up to a multiple of this


REFERENCES = ("zero_shot", "single_task", "all_in_one", "random_start")
# What an evaluation without a run uses where a flag is unset (with a run: the run's values).
RUN_DEFAULTS = {"dtype": "bfloat16", "max_seq_len": 1024, "chat_template": False}
RUN_FILE = "partition.json"  # a finished search run's record (pipeline.PARTITION)
RUN_CONFIG = "config.json"  # its resolved flags (pipeline.CONFIG)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The resolved flags of launch/evaluate.py (`resolve` fills what a run supplies)."""

    workdir: str | None = setting(None, "A finished search run: evaluate its merged adapters against the "
                                  "references (--compare); its partition.json and config.json supply every path "
                                  "and setting.")
    partition: str | None = setting(None, "partition.json of a search run: evaluate its merges (alone, like "
                                    "--workdir=its directory, when no --base_model is given).")
    base_model: str | None = setting(None, "Hugging Face base model: a directory or a Hub id org/name[@revision] "
                                     "(default: the run's).")
    adapters_dir: str | None = setting(None, "Directory of PEFT adapters, one sub-directory per task (local or "
                                       "gs://bucket/prefix; default: the run's).")
    adapters: tuple[str, ...] = setting((), "PEFT adapters instead of --adapters_dir: directories (local or "
                                        "gs://) or Hub ids org/name[@revision][/sub/folder], each optionally "
                                        "task=ID.")
    data_dir: str | None = setting(None, "Directory of <task>.jsonl / <task>.eval.jsonl examples (local or "
                                   "gs://bucket/prefix; default: the run's).")
    output: str | None = setting(None, "Output JSON file (default with a run: RUN/evaluation.json, with "
                                 "evaluation.md and evaluation.png beside it).")
    compare: tuple[str, ...] | None = setting(None, f"References evaluated beside the run's merged adapters: any "
                                              f"of {', '.join(REFERENCES)}, or none (default with a run: all).")
    suite: str | None = setting(None, "A built-in synthetic suite (demo | full), built on first use into "
                                "--suite_root/<name>; it supplies --base_model/--adapters_dir/--data_dir when "
                                "they are unset.")
    suite_root: str = setting("runs/suites", "Where built-in suites are built and cached.")
    merged_adapters: bool = setting(True, "With --partition: score the adapters written in merged/ beside "
                                    "partition.json when they are there (what the search wrote: tuned weights or "
                                    "factors, its output rank); false: merge each cluster again.")
    metrics: tuple[str, ...] | None = setting(None, f"Any of {', '.join(METRIC_KINDS)} (default: both with a run, "
                                              "else loss).")
    zero_shot: bool = setting(False, "Evaluate the base model without adapters.")
    dtype: str | None = setting(None, "Base weight dtype (default: the run's, else bfloat16).", choices=DTYPES)
    max_seq_len: int | None = setting(None, "Longest example, prompt cut from the left to fit (default: the "
                                      "run's, else 1024).")
    chat_template: bool | None = setting(None, "Wrap prompts in the tokenizer's chat template (default: as the "
                                         "run did, else no).")
    chat_template_date: str | None = setting(None, "The date a chat template writes (YYYY-MM-DD; default: the "
                                             "run's pinned date, so the prompts are the search's; else today).")
    examples_per_task: int | None = setting(None, "First n examples of each task file (0 or unset: all).")
    merge: str = setting("ties", "Merge method when partition.json does not store one.")
    density: float = setting(0.5, "TIES density when partition.json does not store one.")
    batch_size: int = setting(8, "Requests scored per accelerator call.")
    example_chunk: int | None = setting(8, "Examples per forward pass (0: all at once); bounds memory when "
                                        "tasks have many examples.")
    max_new_tokens: int = setting(0, "Generation metrics: longest generated response (0: the longest "
                                  "reference response + 4 tokens).")
    generation_batch_size: int = setting(64, "Generation metrics: prompts decoded per call (rows of all tasks "
                                         "together, each with its own adapter).")
    seed: int = setting(0, "Seed for stochastic merges (dare_ties; default with a run: the run's).")
    compilation_cache: str = setting("", "Persistent XLA compilation cache directory, so that a second evaluation "
                                     "compiles nothing ('': $XDG_CACHE_HOME/d2c_jax/xla or ~/.cache/d2c_jax/xla; "
                                     "'none': off).")
    progress: bool = setting(True, "Show a progress bar.")

    def __post_init__(self):
        for name in ("examples_per_task", "example_chunk"):  # 0 (the flags' way to say "all"): None
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        if self.compare is not None and tuple(self.compare) in (("none",), ("",)):
            object.__setattr__(self, "compare", ())
        if self.adapters_dir and self.adapters:
            raise UserError(None, "give --adapters_dir or --adapters, not both")
        for name in ("workdir", "partition"):
            output_guard.refuse_bucket(getattr(self, name), f"--{name}", "launch/evaluate.py")
        if self.zero_shot and self.partition:
            raise UserError(None, "--zero_shot and --partition exclude each other")
        if self.zero_shot and self.workdir:
            raise UserError(None, "--zero_shot and --workdir exclude each other (a run compares with "
                            "zero-shot by default)")
        bad = [m for m in self.metrics or () if m not in METRIC_KINDS]
        if bad or self.metrics == ():
            raise UserError(None, f"--metrics={','.join(self.metrics)}: each must be one of "
                            f"{', '.join(METRIC_KINDS)}")
        bad = [m for m in self.compare or () if m not in REFERENCES]
        if bad:
            raise UserError(None, f"--compare={','.join(self.compare)}: each must be one of "
                            f"{', '.join(REFERENCES)} (or none)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(None, f"--dtype={self.dtype}: must be one of {', '.join(DTYPES)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise UserError(None, f"--max_seq_len={self.max_seq_len}: must be >= 2")
        if not 0.0 < self.density <= 1.0:
            raise UserError(None, f"--density={self.density}: must be in (0, 1]")
        if self.batch_size < 1:
            raise UserError(None, f"--batch_size={self.batch_size}: must be >= 1")
        if self.max_new_tokens < 0:
            raise UserError(None, f"--max_new_tokens={self.max_new_tokens}: must be >= 0")
        if self.generation_batch_size < 1:
            raise UserError(None, f"--generation_batch_size={self.generation_batch_size}: "
                            "must be >= 1")

    @property
    def run_dir(self) -> str | None:
        """The search run this evaluation reads its settings from: --workdir, or the directory of
        --partition when no --base_model is given."""
        if self.workdir:
            return self.workdir
        if self.partition and not self.base_model:
            return os.path.dirname(os.path.abspath(self.partition))
        return None


def read_run(run_dir: str) -> dict[str, Any]:
    """The run's settings: config.json (the resolved flags) under partition.json (the record of
    the finished run, whose paths and settings win)."""
    record = os.path.join(run_dir, RUN_FILE)
    if not os.path.isdir(run_dir):
        raise UserError(run_dir, "no such run directory")
    if not os.path.isfile(record):
        raise UserError(run_dir, f"holds no {RUN_FILE}: the search has not finished (re-run its command to "
                        "resume it)")
    out: dict[str, Any] = {}
    for name in (RUN_CONFIG, RUN_FILE):
        path = os.path.join(run_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(path, f"cannot read it: {e}") from None
        if not isinstance(doc, dict):
            raise UserError(path, "expected a JSON object")
        out.update({k: v for k, v in doc.items() if v is not None})
    return out


def resolve(cfg: EvalConfig) -> tuple[EvalConfig, list[str]]:
    """`cfg` with what the run (or --suite) supplies filled in, and the notes to print (each flag
    that overrides the run's value). Raises UserError for what is still missing."""
    notes: list[str] = []
    run_dir = cfg.run_dir
    run = read_run(run_dir) if run_dir else {}
    fill: dict[str, Any] = {}
    if run_dir:
        fill["partition"] = cfg.partition or os.path.join(run_dir, RUN_FILE)
        fill["output"] = cfg.output or os.path.join(run_dir, "evaluation.json")
        fill["compare"] = REFERENCES if cfg.compare is None else cfg.compare
        fill["metrics"] = cfg.metrics or METRIC_KINDS
        if "seed" in run and cfg.seed == 0:
            fill["seed"] = int(run["seed"])
    for name in ("base_model", "adapters_dir", "data_dir"):
        given, recorded = getattr(cfg, name), run.get(name)
        if given and recorded and os.path.abspath(given) != os.path.abspath(recorded):
            notes.append(f"note: --{name}={given} overrides the run's {recorded}")
        fill[name] = given or (None if name == "adapters_dir" and cfg.adapters else recorded)
    fill["chat_template_date"] = cfg.chat_template_date or run.get("chat_template_date")  # the search's prompts
    if not cfg.adapters and not cfg.adapters_dir and run.get("adapters"):  # the run named them by Hub id
        fill["adapters"] = tuple(run["adapters"])
    for name, default in RUN_DEFAULTS.items():
        given, recorded = getattr(cfg, name), run.get(name)
        if given is not None and recorded is not None and given != recorded:
            notes.append(f"note: --{name}={given} overrides the run's {recorded}")
        fill[name] = given if given is not None else (recorded if recorded is not None else default)
    suite = cfg.suite or run.get("suite")
    if suite and not (fill["base_model"] and fill["data_dir"] and (fill["adapters_dir"] or fill.get("adapters") or
                                                                   cfg.adapters or cfg.zero_shot)):
        from d2c_jax.suite import ensure_preset

        paths = ensure_preset(suite, cfg.suite_root if cfg.suite else run.get("suite_root", cfg.suite_root),
                              log=lambda msg: print(f"  suite: {msg}", file=sys.stderr, flush=True))
        for name in ("base_model", "adapters_dir", "data_dir"):
            fill[name] = fill[name] or getattr(paths, name)
    out = dataclasses.replace(cfg, **fill)
    if out.metrics is None:
        out = dataclasses.replace(out, metrics=("loss",))
    for name in ("base_model", "data_dir", "output"):
        if not getattr(out, name):
            raise UserError(None, f"--{name} must be set (or give --workdir=RUN, a finished search run)")
    if not out.adapters_dir and not out.adapters and not out.zero_shot:
        raise UserError(None, "--adapters_dir (or --adapters) must be set (unless --zero_shot)")
    return out, notes


# ----------------------------------------------------------------------------- files


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


def written_adapters(partition_path: str, num_clusters: int) -> list[str] | None:
    """merged/cluster_<k>/ beside partition.json, one per cluster, when the search wrote them
    (pipeline.write_merged, in partition.json's cluster order); None when any is missing."""
    merged = os.path.join(os.path.dirname(os.path.abspath(partition_path)), "merged")
    dirs = [os.path.join(merged, f"cluster_{c}") for c in range(num_clusters)]
    return dirs if all(os.path.isfile(os.path.join(d, "adapter_config.json")) for d in dirs) else None


def partition_from_clusters(clusters: Sequence[Sequence[str]], names: Sequence[str]) -> np.ndarray:
    """int32[N]: the cluster index of each task (names order)."""
    cluster_of = {name: k for k, c in enumerate(clusters) for name in c}
    return np.array([cluster_of[n] for n in names], np.int32)


# ----------------------------------------------------------------------------- scores


@dataclasses.dataclass(frozen=True)
class TaskScores:
    """One evaluation: per-task eval loss and (with generation) metric score in [0, 100]."""

    names: tuple[str, ...]
    losses_t: np.ndarray  # float64 [T]
    metrics: tuple[str, ...]  # [T] the metric of each task
    scores_t: np.ndarray | None = None  # float64 [T], None without generation
    predictions: tuple[tuple[str, ...], ...] | None = None  # [T][n] decoded responses

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses_t))

    @property
    def mean_score(self) -> float | None:
        return None if self.scores_t is None else float(np.mean(self.scores_t))


def _pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


class Evaluator:
    """Scores per-task adapter choices on the eval split; inputs loaded once, reused by every call."""

    def __init__(
        self,
        params: Params,
        model_cfg: ModelConfig,
        tokenizer: Any,
        task_data: TaskData,
        task_metrics: Sequence[str | None],
        *,
        prepared: Prepared | None = None,
        batch_size: int = 8,
        example_chunk: int | None = 8,
        max_new_tokens: int = 128,
        generation_batch_size: int = 64,
    ):
        """`task_data`: data.load_task_data(split="eval"); `task_metrics`: one per task (None →
        rouge_l); `prepared`: merge.prepare_merge of the adapters (None: zero-shot only)."""
        self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
        self.task_data = task_data
        self.names = tuple(task_data.names)
        self.metrics = tuple(m or DEFAULT_METRIC for m in task_metrics)
        if len(self.metrics) != len(self.names):
            raise ValueError("one metric per task expected")
        self.prepared = prepared
        self.max_new_tokens = int(max_new_tokens)
        self.generation_batch_size = int(generation_batch_size)
        self.scorer = Scorer(params, model_cfg, prepared, task_data, batch_size=batch_size,
                             example_chunk=example_chunk)
        self._gen = None
        n_adapters = None if prepared is None else int(prepared.num_adapters)
        self.table_size = 0 if n_adapters is None else -(-n_adapters // MERGE_BLOCK) * MERGE_BLOCK
        # The generation rows: every (task, example), in task order.
        self._row_task = np.array([t for t in range(len(self.names))
                                   for _ in range(int(task_data.num_examples[t]))], np.int32)
        prompts = [list(p) for t in range(len(self.names)) for p in task_data.prompt_ids[t]]

        self.eos_ids, self.pad_id = resolve_eos_pad(model_cfg, tokenizer)
        self._tokens_rp, self._mask_rp = pad_prompts(prompts, self.pad_id, side="left",
                                                     multiple=_PROMPT_MULTIPLE)

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    # -- adapters per task --------------------------------------------------------------------

    def _table(self, partition_n: np.ndarray, num_clusters: int) -> Lora:
        """The K merges of a partition as merged/ holds them (tune.merged_clusters: each cluster
        over its own members, O(G) not O(N)), padded to a table of fixed size (lora with leading
        axis `table_size`; rows past K are zeros), so decoding does not recompile when K changes."""
        if self.prepared is None:
            raise ValueError("this Evaluator was built without a prepared merge")
        table = tune.merged_clusters(self.prepared, partition_n, num_clusters)
        return jax.tree.map(lambda x: jnp.pad(x, [(0, self.table_size - num_clusters)] + [(0, 0)] * (x.ndim - 1)),
                            table)

    # -- public ---------------------------------------------------------------------------------

    def partition(self, partition_n: Sequence[int], num_clusters: int | None = None, *,
                  generation: bool = True) -> TaskScores:
        """Each task with the merge of its cluster (`partition_n`: int[N] in [0, K))."""
        partition_n = np.asarray(partition_n, np.int32)
        k = int(partition_n.max()) + 1 if num_clusters is None else int(num_clusters)
        if partition_n.shape != (self.num_tasks,) or partition_n.min() < 0 or partition_n.max() >= k:
            raise ValueError(f"partition of shape {partition_n.shape} does not fit {self.num_tasks} tasks, K={k}")
        if any(not np.any(partition_n == c) for c in range(k)):
            raise ValueError("every cluster needs at least one task")
        masks_tn = partition_n[:, None] == partition_n[None, :]
        losses = self.scorer.losses(masks_tn, np.arange(self.num_tasks, dtype=np.int32))
        scores = preds = None
        if generation:
            table = self._table(partition_n, k)
            scores, preds = self._generation(table, partition_n)
        return self._result(losses, scores, preds)

    def clusters(self, lora_k: Any, partition_n: Sequence[int], *, generation: bool = True) -> TaskScores:
        """Each task with its cluster's given adapter (`lora_k`: lora leaves with a leading K
        axis, e.g. merges with tuned weights, tune.merged_clusters)."""
        import jax
        import jax.numpy as jnp

        partition_n = np.asarray(partition_n, np.int32)
        k = int(jax.tree.leaves(lora_k)[0].shape[0])
        losses = [self.scorer.loss_of_lora(jax.tree.map(lambda x: x[c], lora_k), t)
                  for t, c in enumerate(partition_n)]
        scores = preds = None
        if generation:
            size = max(self.table_size, k)
            table = jax.tree.map(lambda x: jnp.pad(x, [(0, size - k)] + [(0, 0)] * (x.ndim - 1)), lora_k)
            scores, preds = self._generation(table, partition_n)
        return self._result(losses, scores, preds)

    def single(self, *, generation: bool = True) -> TaskScores:
        """Each task with its own adapter (a one-member merge is the adapter unchanged)."""
        n = self.num_tasks
        return self.partition(np.arange(n, dtype=np.int32), n, generation=generation)

    def zero_shot(self, *, generation: bool = True) -> TaskScores:
        """The base model without any adapter."""
        losses = [self.scorer.loss_of_lora(None, t) for t in range(self.num_tasks)]
        scores = preds = None
        if generation:
            scores, preds = self._generation(None, None)
        return self._result(losses, scores, preds)

    def _result(self, losses, scores, preds) -> TaskScores:
        losses_t = np.asarray(losses, np.float64)
        bad = np.flatnonzero(~np.isfinite(losses_t))
        if len(bad):
            t = int(bad[0])
            raise UserError(self.task_data.files[t], f"loss of task {self.names[t]!r} is not finite")
        return TaskScores(self.names, losses_t, self.metrics, scores, preds)

    # -- generation -----------------------------------------------------------------------------

    def _gen_fn(self):
        """jit: (params, tokens [b, P], mask [b, P], table [A, ...] or None, index) → ids
        [b, max_new]; every row decoded with adapter table[index] (None: the base model)."""
        if self._gen is None:
            self._gen = _generation_fn(self.model_cfg, self.max_new_tokens, self.eos_ids, self.pad_id)
        return self._gen

    def generate(self, table: Any, idx_t: np.ndarray | None) -> list[list[str]]:
        """Greedy responses [T][n]: task t's prompts decoded with adapter table[idx_t[t]] (table
        None: the base model). The rows of all tasks that share an adapter are decoded together,
        b = min(generation_batch_size, next power of two of their count) rows per call (one
        shared adapter per call is several times faster than one adapter per row)."""
        fn = self._gen_fn()
        group_r = np.zeros(len(self._row_task), np.int32) if table is None else \
            np.asarray(idx_t, np.int32)[self._row_task]
        pending = []
        for g in np.unique(group_r):
            rows = np.flatnonzero(group_r == g)
            b = min(self.generation_batch_size, _pow2(len(rows)))
            for r0 in range(0, len(rows), b):
                sl = rows[np.arange(r0, r0 + b) % len(rows)]  # the last call wraps around
                real = min(b, len(rows) - r0)
                pending.append((sl[:real], fn(self.params, self._tokens_rp[sl], self._mask_rp[sl],
                                              table, np.int32(g))))
        texts = [""] * len(self._row_task)
        for rows, out in pending:
            for r, ids in zip(rows, strip_generated(np.asarray(out)[:len(rows)], self.eos_ids)):
                texts[r] = self.tokenizer.decode(ids, skip_special_tokens=True)
        per_task: list[list[str]] = [[] for _ in self.names]
        for t, text in zip(self._row_task, texts):
            per_task[t].append(text)
        return per_task

    def _generation(self, table: Any, idx_t: np.ndarray | None) -> tuple[np.ndarray, tuple]:
        preds = self.generate(table, idx_t)
        scores = [metrics_lib.score(m, p, list(refs))
                  for m, p, refs in zip(self.metrics, preds, self.task_data.responses)]
        return np.asarray(scores, np.float64), tuple(tuple(p) for p in preds)


@functools.lru_cache(maxsize=16)
def _generation_fn(cfg: ModelConfig, max_new: int, eos: tuple[int, ...], pad: int) -> Any:
    """Evaluator._gen_fn's jitted decoder, one per (model, length, EOS, pad): Evaluators of other
    merge methods decode their tables (same shapes) with the executables already compiled."""

    @jax.jit
    def fn(params, tokens_bp, mask_bp, table, index):
        lora = None if table is None else jax.tree.map(lambda x: x[index], table)
        return greedy_generate(params, cfg, tokens_bp, mask_bp, max_new, eos, lora, pad_token_id=pad)

    return fn


def longest_response_tokens(task_data: TaskData, tokenizer: Any) -> int:
    """The longest reference response of the eval split in tokens, EOS included."""
    return max(len(response_token_ids(tokenizer, r)) for rs in task_data.responses for r in rs)


# ----------------------------------------------------------------------------- launch/evaluate.py


def _stacked(loras: Sequence[Any]) -> Any:
    """K adapter pytrees -> one with a leading K axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *loras)


def evaluate(cfg: EvalConfig, *, log: Any = None) -> dict[str, Any]:
    """Runs the evaluation described by `cfg` (resolved first: see `resolve`) and returns the
    output document (no files written). With a run (or --compare) the document's "comparison"
    holds every reference's result and the tables (`d2c_jax.comparison`). `log`: where the notes
    (flags overriding the run's values) go; default stderr."""
    from d2c_jax import comparison

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg, notes = resolve(cfg)
    for note in notes:
        log(note)
    generation = "generation" in cfg.metrics
    from d2c_jax import compilation_cache

    compilation_cache.enable(cfg.compilation_cache)  # before the first compilation (user cache dir)
    # Everything a user can get wrong is checked before the weights are loaded (inputs.params).
    inputs = load_inputs(cfg.base_model, cfg.adapters_dir, cfg.data_dir, split="eval", adapters=cfg.adapters,
                         pinned=hub.recorded_commits(cfg.partition) if cfg.partition else None,
                         examples_per_task=cfg.examples_per_task, max_seq_len=cfg.max_seq_len,
                         chat_template=cfg.chat_template, dtype=cfg.dtype, template_date=cfg.chat_template_date)
    names, task_data = inputs.names, inputs.task_data
    fallback = [n for n, f in zip(names, task_data.files) if not f.endswith(".eval.jsonl")]
    if fallback and cfg.run_dir:
        log(f"note: {len(fallback)} of {len(names)} tasks have no <task>.eval.jsonl; their search examples "
            f"are used (not held out): {', '.join(fallback[:5])}{', ...' if len(fallback) > 5 else ''}")

    method, density, clusters, rank, written, raw = cfg.merge, cfg.density, None, None, None, {}
    if cfg.partition:
        clusters, raw = read_partition(cfg.partition, names)
        method = raw.get("merge", raw.get("method", method))
        density = float(raw.get("density", density))
        rank = int(raw.get("output_rank") or 0) or None  # the rank the search merged at (budget mode)
        written = written_adapters(cfg.partition, len(clusters)) if cfg.merged_adapters else None
    compare = tuple(cfg.compare or ()) if not cfg.zero_shot else ()
    prepared = None
    if clusters is not None or {"all_in_one", "random_start"} & set(compare):
        try:
            prepared = inputs.prepared(method, density, seed=cfg.seed, rank=rank)
        except UserError as e:  # a bad method/density: name where it came from
            raise UserError(e.path or (cfg.partition if "merge" in raw or "method" in raw
                                       or "density" in raw else None), e.message) from None
    elif not cfg.zero_shot:
        # Single-task: one-member merges are the adapters unchanged; linear trims nothing.
        prepared = inputs.prepared("linear", 1.0)
    if cfg.max_new_tokens == 0:
        cfg = dataclasses.replace(cfg, max_new_tokens=longest_response_tokens(task_data, inputs.tokenizer) + 4)
    ev = Evaluator(inputs.params, inputs.model_cfg, inputs.tokenizer, task_data, inputs.task_metrics,
                   prepared=prepared, batch_size=cfg.batch_size, example_chunk=cfg.example_chunk,
                   max_new_tokens=cfg.max_new_tokens,
                   generation_batch_size=cfg.generation_batch_size)
    partition_n = None if clusters is None else partition_from_clusters(clusters, names)
    k = None if clusters is None else len(clusters)

    def primary() -> TaskScores:
        if cfg.zero_shot:
            return ev.zero_shot(generation=generation)
        if clusters is None:
            return ev.single(generation=generation)
        if written is not None:  # the adapters the search wrote, as they are
            from d2c_jax import lora as lora_lib

            aset = lora_lib.load_adapter_dirs(written, inputs.model_cfg)
            lora_k = _stacked([lora_lib.effective_lora(aset, c) for c in range(len(written))])
            return ev.clusters(lora_k, partition_n, generation=generation)
        return ev.partition(partition_n, k, generation=generation)

    mode = "zero_shot" if cfg.zero_shot else "single" if clusters is None else "partition"
    primary_key = {"partition": "merged", "single": "single_task", "zero_shot": "zero_shot"}[mode]
    jobs = {primary_key: primary}
    for ref in compare:
        if ref == primary_key:
            continue
        if ref == "zero_shot":
            jobs[ref] = lambda: ev.zero_shot(generation=generation)
        elif ref == "single_task":
            from d2c_jax import lora as lora_lib

            jobs[ref] = lambda: ev.clusters(
                _stacked([lora_lib.effective_lora(inputs.adapters, i) for i in range(len(names))]),
                np.arange(len(names), dtype=np.int32), generation=generation)
        elif ref == "all_in_one":
            jobs[ref] = lambda: ev.partition(np.zeros(len(names), np.int32), 1, generation=generation)
        elif ref == "random_start" and k is not None:
            from d2c_jax.strategies.baselines import random_baseline
            from d2c_jax.strategies.d2c import STARTS

            # The partition the run's first chain started from (= --strategy=random, same seed and
            # --start; a run written before --start existed started at random).
            start = read_run(cfg.run_dir).get("start", "random") if cfg.run_dir else "random"
            if start not in STARTS:
                raise UserError(os.path.join(cfg.run_dir, RUN_CONFIG), f"start={start!r}: must be one of {STARTS}")
            jobs[ref] = lambda: ev.partition(random_baseline(len(names), k, cfg.seed, start), k,
                                             generation=generation)
    results = comparison.run_jobs(jobs, progress=cfg.progress)
    result = results[primary_key]
    doc = result_document(result, task_data, mode, cfg, partition_n=partition_n, merge=method, density=density)
    if clusters is not None:
        doc["summary"]["adapters"] = os.path.dirname(written[0]) if written else "merged again"
    doc["summary"]["max_new_tokens"] = cfg.max_new_tokens if generation else None
    if cfg.run_dir:
        doc["summary"]["run"] = os.path.abspath(cfg.run_dir)
    # The tables (one row per method, also when there is one) and every method's result.
    docs = {m: result_document(r, task_data, m, cfg) for m, r in results.items() if m != primary_key}
    doc["comparison"] = comparison.comparison_document(
        {primary_key: {"tasks": doc["tasks"], "summary": dict(doc["summary"])}, **docs}, results, inputs.tags)
    overall = next(r for r in doc["comparison"]["groups"]["overall"]["rows"] if r["method"] == primary_key)
    doc["summary"]["gap_closed"] = overall["gap_closed"]
    doc["summary"]["s_score"] = overall["s_score"]  # None without generation or the single-task reference
    return doc


def result_document(result: TaskScores, task_data: TaskData, mode: str, cfg: EvalConfig, *,
                    partition_n: np.ndarray | None = None, merge: str | None = None,
                    density: float | None = None) -> dict[str, Any]:
    """The output JSON of launch/evaluate.py."""
    tasks: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(result.names):
        entry: dict[str, Any] = {"loss": float(result.losses_t[t])}
        if result.scores_t is not None:
            entry[result.metrics[t]] = float(result.scores_t[t])
        entry["num_examples"] = int(task_data.num_examples[t])
        entry["data_file"] = os.path.basename(task_data.files[t])
        if partition_n is not None:
            entry["cluster"] = int(partition_n[t])
        tasks[name] = entry
    summary: dict[str, Any] = {"mean_loss": result.mean_loss, "num_tasks": len(result.names),
                               "mode": mode}
    for metric in sorted({k for e in tasks.values() for k in e} & set(METRICS)):
        summary[f"mean_{metric}"] = float(np.mean([e[metric] for e in tasks.values() if metric in e]))
    if result.scores_t is not None:
        summary["mean_score"] = result.mean_score
    if partition_n is not None:
        summary.update(num_clusters=int(partition_n.max()) + 1, merge=merge, density=density)
    summary.update(dtype=cfg.dtype, examples_per_task=cfg.examples_per_task,
                   chat_template=cfg.chat_template, max_seq_len=cfg.max_seq_len)
    return {"tasks": tasks, "summary": summary}
