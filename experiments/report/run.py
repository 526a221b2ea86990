"""Table 1's runs: the report's configuration, the inputs loaded once, every partition found
and evaluated.

Shapes: N adapters (= T tasks), K clusters, S seeds.

`run_report(cfg)` loads the suite's base model, adapters and data once, then for every seed finds a
K-way partition with each strategy (random, kmeans, svd_kmeans, D²C as in the paper, D²C with our
population/global setting) and scores it on the held-out split (`evaluation.Evaluator`: eval loss
and each task's generation metric); zero-shot, single-task and all-in-one are scored once (they do
not depend on the seed). Then: score vs the number of clusters, and a small investigation (oracle
partitions by family / by language, other merge methods). Every search uses the library
in-process (`search.run_search` with one `scoring.Scorer` per merge method), so the model and the
compiled functions are loaded once. `analysis.py` computes the findings, `render.py` writes them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from d2c_jax import evaluation, search
from d2c_jax.data import TaskData
from d2c_jax.config_flags import setting
from d2c_jax.errors import UserError
from d2c_jax.inputs import load_inputs
from d2c_jax.merge import METHODS, Prepared
from d2c_jax.run_config import OBJECTIVES, SEARCH_STRATEGIES, SearchSettings
from d2c_jax.scoring import Scorer
from d2c_jax.search import LossCache, evaluate_partition
from d2c_jax.suite import PRESETS, ensure_preset, read_manifest, suite_paths
from d2c_jax.types import DTYPES

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Method:
    """A way to pick a K-way partition: a one-shot baseline or a D²C search setting."""

    key: str
    label: str
    strategy: str  # "random" | "kmeans" | "svd_kmeans" | "d2c"
    objective: str = "local"
    population: int = 1
    proposals: int = 1
    exchange_every: int = 0


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The resolved flags of launch/report.py."""

    suite: str = setting("full", "Suite directory (launch/make_suite.py) or preset name.")
    output_dir: str = setting("docs", "Where results.md and the PNGs are written.")
    suite_root: str = setting("runs/suites", "Where presets are built/cached.")
    seeds: int = setting(3, "Seeds 0..S-1 for every strategy of Table 1.")
    num_clusters: int = setting(5, "K of Table 1.")
    iterations: int = setting(200, "T: D²C search iterations (the paper: 200).")
    cluster_counts: tuple[int, ...] = setting((1, 2, 3, 5, 8, 12), "K values of the score-vs-K analysis.")
    count_strategies: tuple[str, ...] = setting(
        ("d2c", "random"), "Strategies of the score-vs-K analysis (d2c = the paper's setting, d2c_ours, random, "
        "kmeans, svd_kmeans).")
    count_seeds: int = setting(3, "Seeds per point of the score-vs-K analysis.")
    population: int = setting(4, "D²C ours: P chains.")
    proposals: int = setting(4, "D²C ours: M proposals per chain per iteration.")
    objective: str = setting("global", "D²C ours: search objective.", choices=OBJECTIVES)
    exchange_every: int = setting(0, "D²C ours: replace the worst chains every k iterations (0: never).")
    merge: str = setting("ties", "Merge method of every run.")
    density: float = setting(0.5, "TIES density.")
    compare_merges: tuple[str, ...] = setting(
        ("ties_delta",), "Investigation: seed 0's partitions (and the oracles) merged with these methods too.")
    long_iterations: int = setting(1000, "Investigation: D²C (paper setting, seed 0) with this many iterations "
                                   "(0: off).")
    examples_per_task: int = setting(10, "n: search examples per task.")
    max_new_tokens: int = setting(0, "Generation length (0: longest eval response + 4).")
    dtype: str = setting("float32", "Base weight dtype.", choices=DTYPES)
    batch_size: int = setting(8, "Scoring requests / merged masks per call (does not change results): "
                              "evaluation and D²C with several chains or proposals.")
    small_batch_size: int = setting(2, "The same for D²C with one chain and one proposal.")
    generation_batch_size: int = setting(128, "Prompts decoded per call.")
    command: str = ""  # the command line, recorded in the markdown
    # Beyond the paper (merging.py): operators x {unit, tuned} weights, budget mode.
    operators: tuple[str, ...] = setting(("ties", "ties_delta", "knots_ties", "knots_linear", "iso_c", "core_ta",
                                          "core_ties", "core_tsv", "core_iso_cts"),
                                         "Merge operators applied to the D²C-ours and family-oracle partitions "
                                         "(empty: skip the section).")
    operator_seeds: int = setting(3, "Seeds of the operator section (at most --seeds).")
    tune_steps: int = setting(30, "Most steps of the merge-weight tuning (0: no tuned rows).")
    tune_operators: tuple[str, ...] = setting(("ties", "ties_delta"), "Operators that also get tuned-weight rows.")
    tune_granularity: str = setting("adapter", "Tuned weights per adapter or per layer.", choices=("adapter", "layer"))
    factor_steps: int = setting(100, "Most steps of the factor tuning (tune.py granularity factors; 0: no rows).")
    factor_operators: tuple[str, ...] = setting(("ties_delta",), "Operators that also get tuned-factor rows.")
    factor_best_core: bool = setting(True, "Also tune the factors of the best core-space operator (core_*, by "
                                     "its unit-weight score on the D²C-ours partitions).")
    controls: bool = setting(True, "Controls beside the best tuned-factor method: a fresh LoRA per cluster, tuned "
                             "factors on random partitions and on K = 1, one tuned scale per cluster.")
    fresh_long_steps: int = setting(300, "Controls: the larger step budget of the fresh LoRA (0: no such row).")
    fresh_long_patience: int = setting(100, "Controls: the held-out guard's patience of that larger budget (the "
                                       "other tuning stops after 15 steps without a held-out improvement).")
    scale_operator: str = setting("core_ta", "Controls: the operator given one tuned scale per cluster "
                                  "(core_ta: task arithmetic).")
    operator_search: bool = setting(True, "Also run D²C (paper setting) with the best operator.")
    budget: bool = setting(True, "Budget mode at the storage of K rank-R adapters (operator section).")
    budget_ranks: tuple[int, ...] = setting((), "The budget mode's candidate ranks (default: R/2 and R).")
    compilation_cache: str = setting("", "Persistent XLA compilation cache directory, so that a second report "
                                     "compiles nothing ('': $XDG_CACHE_HOME/d2c_jax/xla or ~/.cache/d2c_jax/xla; "
                                     "'none': off).")

    def __post_init__(self):
        def bad(flag: str, msg: str):
            raise UserError(None, f"--{flag}={getattr(self, flag)}: {msg}")

        if not self.suite:
            bad("suite", "must be set")
        if self.seeds < 1:
            bad("seeds", "must be >= 1")
        if self.count_seeds < 0:
            bad("count_seeds", "must be >= 0")
        if self.num_clusters < 1:
            bad("num_clusters", "must be >= 1")
        if self.iterations < 0:
            bad("iterations", "must be >= 0")
        if self.long_iterations < 0:
            bad("long_iterations", "must be >= 0")
        if any(k < 1 for k in self.cluster_counts):
            bad("cluster_counts", "each must be >= 1")
        unknown = [s for s in self.count_strategies if s not in ("d2c", "d2c_ours", "random", "kmeans",
                                                                 "svd_kmeans")]
        if unknown:
            bad("count_strategies", "each must be one of d2c, d2c_ours, random, kmeans, svd_kmeans")
        if self.objective not in ("local", "global"):
            bad("objective", "must be local or global")
        if self.population < 1 or self.proposals < 1:
            raise UserError(None, "--population and --proposals must be >= 1")
        if self.fresh_long_steps < 0:
            bad("fresh_long_steps", "must be >= 0")
        if self.fresh_long_patience < 1:
            bad("fresh_long_patience", "must be >= 1")
        for m in (self.merge, *self.compare_merges, *self.operators, self.scale_operator):
            if m not in METHODS:
                raise UserError(None, f"unknown merge method {m!r}; choose from {', '.join(METHODS)}")
        if not 0.0 < self.density <= 1.0:
            bad("density", "must be in (0, 1]")
        if self.examples_per_task < 1:
            bad("examples_per_task", "must be >= 1")
        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        for flag in ("batch_size", "small_batch_size", "generation_batch_size"):
            if getattr(self, flag) < 1:
                bad(flag, "must be >= 1")

    def methods(self) -> tuple[Method, ...]:
        """Table 1's partition strategies, in display order."""
        ours = (f"D²C ours (P={self.population}, M={self.proposals}, {self.objective})")
        return (
            Method("random", "Random clusters", "random"),
            Method("kmeans", "K-means (A, B)", "kmeans"),
            Method("svd_kmeans", "K-means (SVD, cosine)", "svd_kmeans"),
            Method("d2c", "D²C paper (P=1, M=1, local)", "d2c"),
            Method("d2c_ours", ours, "d2c", self.objective, self.population, self.proposals,
                   self.exchange_every),
        )


# ----------------------------------------------------------------------------- inputs


def resolve_suite(suite: str, suite_root: str, log: Log | None = None):
    """SuitePaths of a suite directory (base/, adapters/, data/), or of a preset built on demand."""
    if os.path.isdir(suite):
        paths = suite_paths(suite)
        missing = [p for p in (paths.base_model, paths.adapters_dir, paths.data_dir) if not os.path.isdir(p)]
        if missing:
            raise UserError(suite, f"not a suite directory: no {', '.join(os.path.basename(p) + '/' for p in missing)}"
                            " (build one with launch/make_suite.py, or name a preset: "
                            f"{', '.join(sorted(PRESETS))})")
        return paths
    if suite in PRESETS:
        return ensure_preset(suite, suite_root, log=log)
    raise UserError(suite, f"neither a suite directory nor a preset name ({', '.join(sorted(PRESETS))})")


def tag_labels(tags: Mapping[str, Mapping[str, str]], names: Sequence[str], tag: str) -> np.ndarray | None:
    """int[N] label of each task for a tag (family / language), None when a task lacks it."""
    vals = [tags[n].get(tag) for n in names]
    if any(v is None for v in vals):
        return None
    order = sorted(set(vals))
    return np.array([order.index(v) for v in vals], np.int32)



class Bench:
    """Everything loaded once (`inputs.load_inputs`): model, tokenizer, adapters, both splits,
    tags; one search Scorer per (merge method, batch size) and one Evaluator per merge method
    (built on first use)."""

    def __init__(self, paths, cfg: ReportConfig):
        self.paths, self.cfg = paths, cfg
        self.inputs = load_inputs(paths.base_model, paths.adapters_dir, paths.data_dir, split="search",
                                  examples_per_task=cfg.examples_per_task, max_seq_len=4096, dtype=cfg.dtype)
        self.model_cfg, self.adapters, self.names = self.inputs.model_cfg, self.inputs.adapters, self.inputs.names
        self.tokenizer = self.inputs.tokenizer
        self.search_data = _tight(self.inputs.task_data)
        self.eval_data = _tight(self.inputs.load_split("eval", None, max_seq_len=4096))
        self.tags = self.inputs.tags
        self.task_metrics = [m or evaluation.DEFAULT_METRIC for m in self.inputs.task_metrics]
        self.params = self.inputs.params
        self.max_new_tokens = cfg.max_new_tokens or (
            evaluation.longest_response_tokens(self.eval_data, self.tokenizer) + 4)
        self._scorers: dict[tuple[str, int], Scorer] = {}
        self._evaluators: dict[tuple[str, int], evaluation.Evaluator] = {}
        # Results that depend only on what is merged, remembered: seeds and sections that reach the
        # same partition (e.g. D²C ours, SVD K-means and the family oracle) score it once.
        # Keyed by the grouping (`grouping`), so a relabelled partition is one too.
        self.partition_scores: dict[tuple, Any] = {}  # (merge, rank, K, grouping) -> TaskScores
        self.search_losses: dict[tuple, float] = {}  # (merge, batch, rank, K, grouping) -> mean loss
        self.tuned: dict[tuple, Any] = {}  # merging._tuned_runs: (op, rank, settings, K, grouping) -> results

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def prepared(self, merge: str, rank: int = 0) -> Prepared:
        """The prepared merge of a method at an output rank (0: the adapters' rank)."""
        return self.inputs.prepared(merge, self.cfg.density, seed=0, rank=rank or None)

    def scorer(self, merge: str, batch_size: int | None = None, rank: int = 0) -> Scorer:
        """The search-split Scorer of a merge method. Small batches suit one chain with one
        proposal (each call merges `batch_size` masks, padding included); see ReportConfig."""
        key = (merge, batch_size or self.cfg.batch_size, rank)
        if key not in self._scorers:
            self._scorers[key] = self.inputs.scorer(merge, self.cfg.density, batch_size=key[1],
                                                    task_data=self.search_data, rank=rank or None)
        return self._scorers[key]

    def evaluator(self, merge: str, rank: int = 0) -> evaluation.Evaluator:
        """The eval-split Evaluator of a merge method (loss + generation metrics)."""
        if (merge, rank) not in self._evaluators:
            self._evaluators[(merge, rank)] = evaluation.Evaluator(
                self.params, self.model_cfg, self.tokenizer, self.eval_data, self.task_metrics,
                prepared=self.prepared(merge, rank), batch_size=self.cfg.batch_size, example_chunk=None,
                max_new_tokens=self.max_new_tokens,
                generation_batch_size=self.cfg.generation_batch_size)
        return self._evaluators[(merge, rank)]


def _tight(td: TaskData) -> TaskData:
    """The split's arrays with S = the longest example exactly (data.py rounds S up to a
    multiple of 16; short suite examples would otherwise be mostly padding). Nothing is cut:
    the split was loaded with a max_seq_len that every example fits."""
    longest = int(td.attn_tns.sum(axis=-1).max()) + 1  # inputs + the last target
    if longest < td.tokens_tns.shape[-1]:
        # Past `longest` every row is padding, so the slice is what a reload with
        # max_seq_len=longest would give (no prompt cut, same ids and texts).
        if td.attn_tns[..., longest:].any():
            raise AssertionError("tight max_seq_len truncated an example")
        td = dataclasses.replace(td, batch=jax.tree.map(lambda x: x[..., :longest], td.batch))
    return td


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One evaluated partition (or reference point)."""

    key: str
    num_clusters: int  # 0 for zero-shot, N for single-task
    seed: int | None
    merge: str
    partition: tuple[int, ...] | None
    score: float  # mean over tasks of the generation metric (eval split), 0-100
    loss: float  # mean eval loss over tasks
    search_loss: float | None  # mean loss over tasks on the search examples (what D²C minimises)
    seconds: float  # time to find the partition (search or baseline), evaluation excluded
    evaluations: int  # scorer evaluations spent finding it
    task_scores: tuple[float, ...]
    task_losses: tuple[float, ...]
    variant: str = ""  # "" unit weights; merging.py: "tuned", "searched", "budget", ...
    rank: int = 0  # output rank of the merges (0: the adapters' rank)
    extra: dict[str, Any] | None = None


def find_partition(bench: Bench, method: Method, k: int, seed: int, merge: str,
                   iterations: int | None = None, rank: int = 0):
    """(partition int32[N], seconds, evaluations, mean search-split loss); D²C runs
    `iterations` (default: the config's) iterations; K = 1 is the all-in-one merge. A baseline
    spends no evaluations finding its partition (its one scoring measures it)."""
    one_chain = method.population * method.proposals == 1
    batch = bench.cfg.small_batch_size if one_chain else None
    strategy = "all_in_one" if k == 1 else method.strategy
    settings = SearchSettings(num_clusters=k, iterations=iterations or bench.cfg.iterations,
                              objective=method.objective, population=method.population,
                              proposals=method.proposals, exchange_every=method.exchange_every, seed=seed)
    start = time.perf_counter()
    result = search.find_partition(bench.scorer(merge, batch, rank), strategy, settings, bench.adapters)
    seconds = time.perf_counter() - start
    evaluations = int(result.evaluations) if strategy in SEARCH_STRATEGIES else 0
    return np.asarray(result.partition_n, np.int32), seconds, evaluations, result.objective / bench.num_tasks


def evaluate_run(bench: Bench, key: str, partition_n: np.ndarray | None, k: int, seed: int | None,
                 merge: str, seconds: float = 0.0, evaluations: int = 0,
                 search_loss: float | None = None, single: bool = False, rank: int = 0) -> Run:
    ev = bench.evaluator(merge, rank)
    if partition_n is None:
        res = ev.single() if single else ev.zero_shot()
    else:
        key_m = (merge, rank, k, grouping(partition_n))
        if key_m not in bench.partition_scores:
            bench.partition_scores[key_m] = ev.partition(partition_n, k)
        res = bench.partition_scores[key_m]
    return Run(key, k, seed, merge, None if partition_n is None else tuple(int(x) for x in partition_n),
               float(res.mean_score), float(res.mean_loss), search_loss, seconds, evaluations,
               tuple(float(x) for x in res.scores_t), tuple(float(x) for x in res.losses_t), rank=rank)


@dataclasses.dataclass
class ReportResult:
    cfg: ReportConfig
    suite: Any  # SuitePaths
    names: tuple[str, ...]
    tags: dict[str, dict[str, str]]
    task_metrics: tuple[str, ...]
    max_new_tokens: int
    model: dict[str, Any]
    adapters: dict[str, Any]
    data: dict[str, Any]
    runs: list[Run]
    stage_seconds: dict[str, float]
    manifest_quality: dict[str, Any] | None
    suite_hash: str | None = None  # suite.json's settings hash (which suite build this was)
    weights_hash: str | None = None  # suite.json's weights hash (which weights that build trained)
    seconds: float = 0.0
    started: str = ""

    def select(self, key: str, k: int | None = None, merge: str | None = None,
               seeds: Sequence[int] | None = None, variant: str = "") -> list[Run]:
        merge = merge or self.cfg.merge
        return [r for r in self.runs if r.key == key and r.merge == merge and r.variant == variant
                and (k is None or r.num_clusters == k) and (seeds is None or r.seed in seeds)]


def run_report(cfg: ReportConfig, log: Log | None = None) -> ReportResult:
    """Runs every experiment of the report (see the module docstring)."""
    log = log or (lambda msg: None)
    from d2c_jax import compilation_cache

    compilation_cache.enable(cfg.compilation_cache)  # before the first compilation
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    stage: dict[str, float] = {}

    t0 = time.perf_counter()
    paths = resolve_suite(cfg.suite, cfg.suite_root, log)
    stage["suite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bench = Bench(paths, cfg)
    n, k = bench.num_tasks, cfg.num_clusters
    if not 1 <= k < n:
        raise UserError(None, f"--num_clusters={k} must be between 1 and {n - 1} (the suite has {n} tasks)")
    bench.evaluator(cfg.merge)
    for batch in (cfg.small_batch_size, cfg.batch_size):  # compile now, not inside a timed search
        bench.scorer(cfg.merge, batch).losses(np.eye(n, dtype=bool)[:1], np.zeros(1, np.int32))
    stage["load"] = time.perf_counter() - t0
    runs: list[Run] = []
    done: dict[tuple, Run] = {}

    def record(run: Run) -> Run:
        runs.append(run)
        if not run.variant and not run.rank:  # the unit-weight, rank-R run of (key, K, seed, merge)
            done[(run.key, run.num_clusters, run.seed, run.merge)] = run
        log(f"{run.key:>10} K={run.num_clusters:<2} seed={run.seed} merge={run.merge}"
            + (f" {run.variant}" if run.variant else "") + (f" rank={run.rank}" if run.rank else "") + ": score "
            f"{run.score:6.2f}  eval loss {run.loss:.4f}"
            + (f"  search loss {run.search_loss:.4f}" if run.search_loss is not None else "")
            + f"  ({run.seconds:.1f}s, {run.evaluations} evaluations)")
        return run

    def partition_run(method: Method, kk: int, seed: int, merge: str, iterations: int | None = None) -> Run:
        key = (method.key, kk, seed, merge)
        if key in done:
            return done[key]
        part, secs, evals, sloss = find_partition(bench, method, kk, seed, merge, iterations)
        return record(evaluate_run(bench, method.key, part, kk, seed, merge, secs, evals, sloss))

    # Reference points (seed-independent).
    t0 = time.perf_counter()
    record(evaluate_run(bench, "zero_shot", None, 0, None, cfg.merge))
    record(evaluate_run(bench, "single", None, n, None, cfg.merge, single=True))
    all_in_one = Method("all_in_one", "All-in-one", "all_in_one")
    record(evaluate_run(bench, "all_in_one", np.zeros(n, np.int32), 1, None, cfg.merge,
                        search_loss=find_partition(bench, all_in_one, 1, 0, cfg.merge)[3]))
    stage["references"] = time.perf_counter() - t0

    # Table 1.
    t0 = time.perf_counter()
    methods = {m.key: m for m in cfg.methods()}
    for seed in range(cfg.seeds):
        for method in methods.values():
            partition_run(method, k, seed, cfg.merge)
    stage["table1"] = time.perf_counter() - t0

    # Score vs number of clusters.
    t0 = time.perf_counter()
    for kk in cfg.cluster_counts:
        if kk >= n:
            log(f"skipping K={kk}: the suite has only {n} tasks")
            continue
        for seed in range(cfg.count_seeds):
            for key in cfg.count_strategies:
                if kk == 1:
                    continue  # K = 1 is the all-in-one merge for every strategy
                partition_run(methods[key], kk, seed, cfg.merge)
    stage["cluster_counts"] = time.perf_counter() - t0

    # Investigation: a longer search, oracle partitions, the same partitions under other merges.
    t0 = time.perf_counter()
    if cfg.long_iterations:
        partition_run(dataclasses.replace(methods["d2c"], key="d2c_long"), k, 0, cfg.merge,
                      iterations=cfg.long_iterations)
    fixed: list[tuple[str, np.ndarray, int, int | None]] = []  # (key, partition, K, seed)
    for tag in ("family", "language"):
        labels = tag_labels(bench.tags, bench.names, tag)
        if labels is not None and 1 < labels.max() + 1 < n:
            fixed.append((f"by_{tag}", labels, int(labels.max()) + 1, None))
            record(evaluate_run(bench, f"by_{tag}", labels, fixed[-1][2], None, cfg.merge,
                                search_loss=_search_loss(bench, labels, fixed[-1][2], cfg.merge)))
    fixed.append(("all_in_one", np.zeros(n, np.int32), 1, None))
    for key in methods:
        if (key, k, 0, cfg.merge) in done:
            fixed.append((key, np.asarray(done[(key, k, 0, cfg.merge)].partition, np.int32), k, 0))
    for merge in cfg.compare_merges:  # the partitions found above (with cfg.merge), merged otherwise
        for key, part, kk, seed in fixed:
            record(evaluate_run(bench, key, part, kk, seed, merge,
                                search_loss=_search_loss(bench, part, kk, merge)))
    stage["investigation"] = time.perf_counter() - t0

    # Beyond the paper: merge operators, learned weights, the budget mode (merging.py).
    t0 = time.perf_counter()
    if cfg.operators:
        from experiments.report.merging import run_merging

        run_merging(bench, cfg, done, record, log)
    stage["merging"] = time.perf_counter() - t0

    a = bench.adapters
    manifest = read_manifest(paths.root)
    result = ReportResult(
        cfg=cfg, suite=paths, names=bench.names, tags=bench.tags, task_metrics=tuple(bench.task_metrics),
        max_new_tokens=bench.max_new_tokens,
        model={"arch": bench.model_cfg.arch, "hidden_size": bench.model_cfg.hidden_size,
               "num_layers": bench.model_cfg.num_layers, "vocab_size": bench.model_cfg.vocab_size},
        adapters={"rank": int(a.rank), "modules": sorted(a.a), "scaling": float(np.mean(a.scaling))},
        data={"search_examples": int(bench.search_data.tokens_tns.shape[1]),
              "eval_examples": int(np.min(bench.eval_data.num_examples))},
        runs=runs, stage_seconds=stage,
        manifest_quality=(manifest or {}).get("quality", {}).get("summary"),
        suite_hash=str((manifest or {}).get("settings_hash", ""))[:12] or None,
        weights_hash=str((manifest or {}).get("weights_hash", ""))[:12] or None,
        started=started,
    )
    result.seconds = time.perf_counter() - t_start
    return result


def grouping(partition_n: Any) -> tuple[int, ...]:
    """The partition's clusters numbered by first appearance: equal for two labellings of the same
    grouping, whose per-task merges, losses and scores are the same (the report's caches' key)."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(int(x), len(first)) for x in partition_n)


def _search_loss(bench: Bench, partition_n: np.ndarray, k: int, merge: str,
                 batch_size: int | None = None, rank: int = 0) -> float:
    """Mean loss per task on the search split (what D²C minimises) of a partition."""
    key = (merge, batch_size, rank, k, grouping(partition_n))
    if key not in bench.search_losses:
        scorer = bench.scorer(merge, batch_size, rank)
        bench.search_losses[key] = evaluate_partition(scorer, partition_n, k, LossCache(bench.num_tasks))[0] / \
            bench.num_tasks
    return bench.search_losses[key]
