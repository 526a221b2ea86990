"""The paper's Table 1 and its two analyses, on a suite, in one process.

Shapes: N adapters (= T tasks), K clusters, S seeds, F families, G languages.

`run_report(cfg)` loads the suite's base model, adapters and data once, then for every seed finds a
K-way partition with each strategy (random, kmeans, svd_kmeans, D²C as in the paper, D²C with our
population/global setting) and scores it on the held-out split (`evaluation.Evaluator`: eval loss
and each task's generation metric); zero-shot, single-task and all-in-one are scored once (they do
not depend on the seed). Then: score vs the number of clusters, the adjusted Rand index of the
found partitions against the family and language tags, and a small investigation (oracle
partitions by family / by language, other merge methods). `render_markdown` and the PNG builders
turn the result into docs/results.md; `write_report` writes them atomically. Every search uses the
library in-process (`search.run_search` with one `scoring.Scorer` per merge method), so the model
and the compiled functions are loaded once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from d2c_jax.errors import UserError

Log = Callable[[str], None]
RESULTS_MD = "results.md"
TABLE_PNG = "results_table1.png"
CLUSTERS_PNG = "results_clusters.png"
ASSIGNMENT_PNG = "results_assignment.png"


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

    suite: str = "full"  # a suite directory, or a preset name (d2c_jax.suite.PRESETS)
    output_dir: str = "docs"
    suite_root: str = os.path.join("runs", "suites")  # where presets are built
    seeds: int = 3
    num_clusters: int = 5
    iterations: int = 200
    cluster_counts: tuple[int, ...] = (1, 2, 3, 5, 8, 12)
    count_strategies: tuple[str, ...] = ("d2c", "random")  # "d2c" = the paper's setting
    count_seeds: int = 3
    population: int = 4  # "ours": D²C with a population / global objective
    proposals: int = 4
    objective: str = "global"
    exchange_every: int = 0
    merge: str = "ties"
    density: float = 0.5
    compare_merges: tuple[str, ...] = ("ties_delta",)  # investigation: the partitions, merged otherwise
    long_iterations: int = 1000  # investigation: D²C (paper setting, seed 0) with more iterations (0: off)
    examples_per_task: int = 10
    max_new_tokens: int = 0  # 0: the longest reference response (tokens, EOS included) + 4
    dtype: str = "float32"
    batch_size: int = 8  # requests / merged masks per Scorer call (search with P*M > 1, evaluation)
    small_batch_size: int = 2  # the same for one chain with one proposal (the paper's setting)
    generation_batch_size: int = 128
    command: str = ""  # the command line, recorded in the markdown

    def __post_init__(self):
        from d2c_jax.merge import METHODS

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
        for m in (self.merge, *self.compare_merges):
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
    from d2c_jax.suite import PRESETS, ensure_preset, suite_paths

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


_TNS_FIELDS = ("tokens_tns", "targets_tns", "weights_tns", "attn_tns")  # TaskData's [T, n, S] arrays


def _tag_labels(tags: Mapping[str, Mapping[str, str]], names: Sequence[str], tag: str) -> np.ndarray | None:
    """int[N] label of each task for a tag (family / language), None when a task lacks it."""
    vals = [tags[n].get(tag) for n in names]
    if any(v is None for v in vals):
        return None
    order = sorted(set(vals))
    return np.array([order.index(v) for v in vals], np.int32)


class Bench:
    """Everything loaded once: model, tokenizer, adapters, both splits, tags; one search Scorer
    and one Evaluator per merge method (built on first use)."""

    def __init__(self, paths, cfg: ReportConfig):
        from d2c_jax import data, evaluation, hf_io, lora
        from d2c_jax.models.config import load_config

        self.paths, self.cfg = paths, cfg
        self.model_cfg = load_config(paths.base_model)
        self.adapters = lora.load_adapter_set(paths.adapters_dir, self.model_cfg)
        self.names = tuple(self.adapters.names)
        data.check_tasks_match(paths.data_dir, self.names)
        self.tokenizer = hf_io.load_tokenizer(paths.base_model)
        self.search_data = self._load(data, "search", cfg.examples_per_task)
        self.eval_data = self._load(data, "eval", None)
        meta = data.load_task_meta(paths.data_dir, self.names)
        self.tags = {n: dict(meta[n].tags) for n in self.names}
        self.task_metrics = [meta[n].metric or evaluation.DEFAULT_METRIC for n in self.names]
        self.params = hf_io.load_params(paths.base_model, self.model_cfg, cfg.dtype)
        self.max_new_tokens = cfg.max_new_tokens or (
            evaluation.longest_response_tokens(self.eval_data, self.tokenizer) + 4)
        self._prepared: dict[str, Any] = {}
        self._scorers: dict[tuple[str, int], Any] = {}
        self._evaluators: dict[str, Any] = {}

    def _load(self, data, split: str, examples_per_task: int | None):
        """The split's arrays with S = the longest example exactly (data.py rounds S up to a
        multiple of 16; short suite examples would otherwise be mostly padding). Nothing is cut:
        the longest example fits max_seq_len exactly."""
        td = data.load_task_data(self.paths.data_dir, self.names, self.tokenizer, max_seq_len=4096,
                                 split=split, examples_per_task=examples_per_task)
        longest = int(td.attn_tns.sum(axis=-1).max()) + 1  # inputs + the last target
        if longest < td.tokens_tns.shape[-1]:
            # Past `longest` every row is padding, so the slice is what a reload with
            # max_seq_len=longest would give (no prompt cut, same ids and texts).
            if td.attn_tns[..., longest:].any():
                raise AssertionError("tight max_seq_len truncated an example")
            td = dataclasses.replace(td, **{f: getattr(td, f)[..., :longest] for f in _TNS_FIELDS})
        return td

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def prepared(self, merge: str):
        if merge not in self._prepared:
            from d2c_jax import merge as merge_lib

            self._prepared[merge] = merge_lib.prepare_merge(self.adapters, merge, self.cfg.density, seed=0)
        return self._prepared[merge]

    def scorer(self, merge: str, batch_size: int | None = None):
        """The search-split Scorer of a merge method. Small batches suit one chain with one
        proposal (each call merges `batch_size` masks, padding included); see ReportConfig."""
        from d2c_jax.scoring import Scorer

        key = (merge, batch_size or self.cfg.batch_size)
        if key not in self._scorers:
            self._scorers[key] = Scorer(self.params, self.model_cfg, self.prepared(merge), self.search_data,
                                        batch_size=key[1])
        return self._scorers[key]

    def evaluator(self, merge: str):
        """The eval-split Evaluator of a merge method (loss + generation metrics)."""
        if merge not in self._evaluators:
            from d2c_jax import evaluation

            self._evaluators[merge] = evaluation.Evaluator(
                self.params, self.model_cfg, self.tokenizer, self.eval_data, self.task_metrics,
                prepared=self.prepared(merge), batch_size=self.cfg.batch_size, example_chunk=None,
                max_new_tokens=self.max_new_tokens,
                generation_batch_size=self.cfg.generation_batch_size)
        return self._evaluators[merge]


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


def find_partition(bench: Bench, method: Method, k: int, seed: int, merge: str,
                   iterations: int | None = None):
    """(partition int32[N], seconds, evaluations, mean search-split loss); D²C runs
    `iterations` (default: the config's) iterations."""
    from d2c_jax.run_config import SearchSettings
    from d2c_jax.search import run_search
    from d2c_jax.strategies.baselines import baseline_partition

    one_chain = method.population * method.proposals == 1
    batch = bench.cfg.small_batch_size if one_chain else None
    scorer = bench.scorer(merge, batch)
    n = bench.num_tasks
    start = time.perf_counter()
    if k == 1:
        partition_n, evals = np.zeros(n, np.int32), 0
    elif method.strategy == "d2c":
        settings = SearchSettings(num_clusters=k, iterations=iterations or bench.cfg.iterations,
                                  objective=method.objective,
                                  population=method.population, proposals=method.proposals,
                                  exchange_every=method.exchange_every, seed=seed)
        result = run_search(scorer, settings)
        seconds = time.perf_counter() - start
        return (np.asarray(result.partition_n, np.int32), seconds, int(result.evaluations),
                float(result.objective) / n)
    else:
        a, b = ((bench.adapters.a, bench.adapters.b) if method.strategy in ("kmeans", "svd_kmeans")
                else (None, None))
        partition_n, evals = baseline_partition(method.strategy, n, k, seed, a, b), 0
    seconds = time.perf_counter() - start
    return np.asarray(partition_n, np.int32), seconds, evals, _search_loss(bench, partition_n, k, merge, batch)


def evaluate_run(bench: Bench, key: str, partition_n: np.ndarray | None, k: int, seed: int | None,
                 merge: str, seconds: float = 0.0, evaluations: int = 0,
                 search_loss: float | None = None, single: bool = False) -> Run:
    ev = bench.evaluator(merge)
    if partition_n is None:
        res = ev.single() if single else ev.zero_shot()
    else:
        res = ev.partition(partition_n, k)
    return Run(key, k, seed, merge, None if partition_n is None else tuple(int(x) for x in partition_n),
               float(res.mean_score), float(res.mean_loss), search_loss, seconds, evaluations,
               tuple(float(x) for x in res.scores_t), tuple(float(x) for x in res.losses_t))


def ari(labels_n: np.ndarray | None, partition_n: Sequence[int]) -> float | None:
    from sklearn.metrics import adjusted_rand_score

    if labels_n is None:
        return None
    return float(adjusted_rand_score(labels_n, np.asarray(partition_n)))


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
    seconds: float = 0.0
    started: str = ""

    def select(self, key: str, k: int | None = None, merge: str | None = None,
               seeds: Sequence[int] | None = None) -> list[Run]:
        merge = merge or self.cfg.merge
        return [r for r in self.runs if r.key == key and r.merge == merge
                and (k is None or r.num_clusters == k) and (seeds is None or r.seed in seeds)]


def run_report(cfg: ReportConfig, log: Log | None = None) -> ReportResult:
    """Runs every experiment of the report (see the module docstring)."""
    from d2c_jax.suite import read_manifest

    log = log or (lambda msg: None)
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
        done[(run.key, run.num_clusters, run.seed, run.merge)] = run
        log(f"{run.key:>10} K={run.num_clusters:<2} seed={run.seed} merge={run.merge}: score "
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
        labels = _tag_labels(bench.tags, bench.names, tag)
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
        started=started,
    )
    result.seconds = time.perf_counter() - t_start
    return result


def _search_loss(bench: Bench, partition_n: np.ndarray, k: int, merge: str,
                 batch_size: int | None = None) -> float:
    """Mean loss per task on the search split (what D²C minimises) of a partition."""
    from d2c_jax.search import LossCache, evaluate_partition

    scorer = bench.scorer(merge, batch_size)
    return evaluate_partition(scorer, partition_n, k, LossCache(bench.num_tasks))[0] / bench.num_tasks


# ----------------------------------------------------------------------------- rendering


def _stats(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(xs, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _pm(xs: Sequence[float], digits: int) -> str:
    if not xs:
        return "—"
    m, s = _stats(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def _storage(k: int, n: int) -> str:
    return f"{100.0 * k / n:.1f}"


def table1_rows(res: ReportResult) -> list[dict[str, Any]]:
    """Rows of Table 1: label, K, runs (over seeds)."""
    n, k = len(res.names), res.cfg.num_clusters
    rows = [
        {"key": "zero_shot", "label": "Zero-shot (base model)", "k": 0, "runs": res.select("zero_shot")},
        {"key": "single", "label": "Single-task adapters (upper bound)", "k": n, "runs": res.select("single")},
        {"key": "all_in_one", "label": "All-in-one merge", "k": 1, "runs": res.select("all_in_one", 1)},
    ]
    for m in res.cfg.methods():
        rows.append({"key": m.key, "label": m.label, "k": k, "runs": res.select(m.key, k)})
    return rows


def _row_cells(row: Mapping[str, Any], n: int) -> list[str]:
    runs = row["runs"]
    sl = [r.search_loss for r in runs if r.search_loss is not None]
    searched = row["key"] in ("random", "kmeans", "svd_kmeans", "d2c", "d2c_ours")
    return [
        row["label"], str(row["k"]) if row["k"] else "—", _storage(row["k"], n),
        _pm([r.score for r in runs], 2), _pm([r.loss for r in runs], 4),
        _pm(sl, 4) if sl else "—",
        f"{np.mean([r.seconds for r in runs]):.1f}" if searched and runs else "—",
        f"{np.mean([r.evaluations for r in runs]):.0f}" if searched and runs else "—",
        str(len(runs)),
    ]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _families(res: ReportResult) -> list[str]:
    return sorted({res.tags[n].get("family", "?") for n in res.names})


def _per_family(res: ReportResult, runs: Sequence[Run]) -> list[str]:
    fams = _families(res)
    out = []
    for fam in fams:
        idx = [i for i, n in enumerate(res.names) if res.tags[n].get("family", "?") == fam]
        out.append(f"{np.mean([np.mean([r.task_scores[i] for i in idx]) for r in runs]):.1f}"
                   if runs else "—")
    return out


def _mean(runs: Sequence[Run], attr: str) -> float:
    return float(np.mean([getattr(r, attr) for r in runs])) if runs else float("nan")


def findings(res: ReportResult) -> list[str]:
    """The honest outcome, in sentences computed from the numbers."""
    k = res.cfg.num_clusters
    out = []
    d2c = res.select("d2c", k)
    ours = res.select("d2c_ours", k)
    for label, runs in (("D²C (paper setting)", d2c), ("D²C (ours)", ours)):
        if not runs:
            continue
        for base_key, base_label in (("random", "random clusters"), ("kmeans", "K-means"),
                                     ("svd_kmeans", "SVD K-means")):
            base = res.select(base_key, k)
            if not base:
                continue
            diffs = [r.score - b.score for r, b in zip(sorted(runs, key=lambda r: r.seed),
                                                       sorted(base, key=lambda r: r.seed))]
            m, s = _stats(diffs)
            wins = sum(d > 0 for d in diffs)
            verdict = "beats" if m > 0 and wins == len(diffs) else (
                "does not reliably beat" if m > 0 else "does not beat")
            out.append(f"{label} {verdict} {base_label}: score difference {m:+.2f} ± {s:.2f} points "
                       f"(higher in {wins} of {len(diffs)} seeds); eval loss {_mean(runs, 'loss'):.4f} "
                       f"vs {_mean(base, 'loss'):.4f}.")
    single, zero, aio = res.select("single"), res.select("zero_shot"), res.select("all_in_one", 1)
    if single and zero and aio and d2c:
        out.append(f"Reference points: single-task {single[0].score:.2f}, zero-shot {zero[0].score:.2f}, "
                   f"all-in-one {aio[0].score:.2f}; D²C (paper setting) {_mean(d2c, 'score'):.2f} closes "
                   f"{_gap(_mean(d2c, 'score'), aio[0].score, single[0].score)} of the gap between "
                   "all-in-one and single-task adapters.")
    if d2c:
        base = res.select("random", k)
        if base:
            out.append(f"Search-split loss (what D²C minimises, mean per task): D²C paper "
                       f"{np.mean([r.search_loss for r in d2c]):.4f} vs random {np.mean([r.search_loss for r in base]):.4f}"
                       + (f", D²C ours {np.mean([r.search_loss for r in ours]):.4f}" if ours else "") + ".")
    return out


def explanations(res: ReportResult) -> list[str]:
    """Why D²C (paper setting) lands where it does, in sentences computed from the numbers:
    search budget (converged or not), whether the weights alone reveal the grouping, and whether
    the merge method changes the ranking of partitions."""
    cfg, k = res.cfg, res.cfg.num_clusters
    out: list[str] = []
    d2c, ours = res.select("d2c", k), res.select("d2c_ours", k)
    candidates = [r for r in res.runs if r.merge == cfg.merge and r.num_clusters == k
                  and r.search_loss is not None and r.partition is not None]
    if d2c and candidates:
        best = min(candidates, key=lambda r: r.search_loss)
        d2c_sl = float(np.mean([r.search_loss for r in d2c]))
        gap = d2c_sl - best.search_loss
        text = (f"Search budget: after T = {cfg.iterations} iterations D²C (paper setting) reaches a "
                f"search loss of {d2c_sl:.4f} (mean over seeds), while the lowest search loss of any "
                f"partition evaluated at K = {k} is {best.search_loss:.4f} ({best.key}"
                + (f", seed {best.seed}" if best.seed is not None else "") + "). ")
        if gap > 1e-3:
            text += ("The paper's search has not converged within this budget: each iteration tries "
                     "one random move and judges it by the moved task's loss alone.")
        else:
            text += "The paper's search has converged to (near) the best partition found."
        long_runs = res.select("d2c_long", k)
        if long_runs:
            text += (f" With T = {cfg.long_iterations} (seed 0) it reaches {long_runs[0].search_loss:.4f}.")
        if ours:
            text += (f" Our setting (P = {cfg.population} chains × M = {cfg.proposals} proposals, "
                     f"{cfg.objective} objective) reaches {np.mean([r.search_loss for r in ours]):.4f} "
                     f"in the same T.")
        out.append(text)
    fam = _tag_labels(res.tags, res.names, "family")
    svd = res.select("svd_kmeans", k)
    if fam is not None and svd:
        a = [ari(fam, r.partition) for r in svd]
        if all(x is not None for x in a):
            oracle = res.select("by_family")
            out.append(
                f"What the weights reveal: SVD K-means, which never looks at data, groups the tasks by "
                f"family with ARI {np.mean(a):.3f} and a search loss of {np.mean([r.search_loss for r in svd]):.4f}"
                + (f" (the family oracle: {oracle[0].search_loss:.4f})" if oracle and oracle[0].search_loss is not None
                   else "")
                + ". On this suite the adapters of one family are alike in weight space, so the partition "
                  "the data-driven objective prefers is already visible in the weights and a "
                  "data-driven search has little room to beat it; it can win only where weight "
                  "similarity and mergeability disagree.")
    for other in cfg.compare_merges:
        pairs = []
        for r in res.runs:
            if r.merge != cfg.merge or r.partition is None or r.seed not in (None, 0):
                continue
            o = [x for x in res.select(r.key, r.num_clusters, merge=other) if x.partition == r.partition]
            if o:
                pairs.append((r.score, o[0].score))
        if len(pairs) >= 3:
            x = np.asarray(pairs, np.float64)
            rho = _spearman(x[:, 0], x[:, 1])
            out.append(
                f"Merge method: the same {len(pairs)} partitions merged with {other} instead of {cfg.merge} "
                f"score {np.mean(x[:, 1] - x[:, 0]):+.2f} points on average (from {np.min(x[:, 1] - x[:, 0]):+.2f} "
                f"to {np.max(x[:, 1] - x[:, 0]):+.2f}); Spearman ρ between the two scorings of the partitions "
                f"= {'n/a' if rho is None else f'{rho:+.2f}'}" + (", so the merge method shifts the scores but hardly changes which "
                                  "partition is best." if rho is not None and rho > 0.8 else "."))
    return out


def loss_score_correlations(res: ReportResult) -> dict[str, Any]:
    """Spearman correlations over the distinct partitions evaluated at K (main merge): does a
    lower (search / eval) loss go with a higher score?"""
    k = res.cfg.num_clusters
    seen, rows = set(), []
    for r in res.runs:
        if r.merge == res.cfg.merge and r.num_clusters == k and r.partition is not None \
                and r.search_loss is not None and r.partition not in seen:
            seen.add(r.partition)
            rows.append((r.search_loss, r.loss, r.score))
    out: dict[str, Any] = {"partitions": len(rows)}
    if len(rows) >= 3:
        x = np.asarray(rows, np.float64)
        for name, (i, j) in {"search_loss_vs_score": (0, 2), "eval_loss_vs_score": (1, 2),
                             "search_loss_vs_eval_loss": (0, 1)}.items():
            out[name] = _spearman(x[:, i], x[:, j])
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho, None where it is undefined (a constant input)."""
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = float(spearmanr(x, y).statistic)
    return rho if np.isfinite(rho) else None


def _gap(x: float, lo: float, hi: float) -> str:
    if not math.isfinite(hi - lo) or abs(hi - lo) < 1e-9:
        return "n/a"
    return f"{100.0 * (x - lo) / (hi - lo):.0f} %"


def render_markdown(res: ReportResult, images: Mapping[str, str] | None = None) -> str:
    """docs/results.md. `images`: {role: file name} of the PNGs written beside it."""
    images = images or {}
    cfg, n, k = res.cfg, len(res.names), res.cfg.num_clusters
    fams = _families(res)
    langs = sorted({res.tags[t].get("language", "?") for t in res.names})
    metric_of_family = {}
    for t, m in zip(res.names, res.task_metrics):
        metric_of_family.setdefault(res.tags[t].get("family", "?"), m)
    out = ["# D²C on the synthetic suite: Table 1 and the paper's analyses", ""]
    out += ["Generated by (working directory: the repository root):", "", "```bash",
            cfg.command or "python launch/report.py", "```", ""]
    out += [f"Started {res.started}; wall time **{res.seconds / 60:.1f} min** "
            f"({', '.join(f'{k_}: {v:.0f}s' for k_, v in res.stage_seconds.items())}), in one process "
            "on this machine's CPU (JAX)."]
    out += ["", "## Setup", ""]
    out += [
        f"- Suite: `{_rel(res.suite.root)}`"
        + (f" (suite.json settings hash {res.suite_hash})" if res.suite_hash else "")
        + f": {len(fams)} task families × {len(langs)} languages = "
        f"{n} tasks, one LoRA adapter per task (rank {res.adapters['rank']}, scaling "
        f"{res.adapters['scaling']:g}, modules {', '.join(res.adapters['modules'])}); base model "
        f"{res.model['arch']} with hidden size {res.model['hidden_size']}, {res.model['num_layers']} "
        f"layers, vocabulary {res.model['vocab_size']}.",
        "- Metrics per family (tasks.json): "
        + ", ".join(f"{f}: {metric_of_family[f]}" for f in fams) + ". "
        f"Score = the mean over tasks of the metric (0–100) of greedy decoding (KV cache, at most "
        f"{res.max_new_tokens} new tokens) on each task's {res.data['eval_examples']} held-out "
        "examples; eval loss = the mean over tasks of the response-token cross-entropy on the same "
        "examples; search loss = the same loss on the n search examples per task that D²C sees.",
        f"- Merge: {cfg.merge} (density {cfg.density}), factor-wise as PEFT's add_weighted_adapter. "
        f"K = {k} (storage {_storage(k, n)} % of the {n} adapters). n = {res.data['search_examples']} "
        f"search examples per task. **Search budget: T = {cfg.iterations} iterations** (the paper "
        f"uses T = 200); {cfg.seeds} seed(s): the seed fixes the initial partition (the random "
        "baseline is exactly D²C's starting point), the search's proposals and K-means' init.",
        "- Mean ± sample standard deviation over the seeds; zero-shot, single-task and all-in-one do "
        "not depend on the seed. Storage % = K / N × 100.",
    ]
    if res.manifest_quality:
        q = res.manifest_quality
        out += [f"- Suite difficulty (suite.json, eval loss): zero-shot {q.get('zero_shot_loss')}, "
                f"own adapter {q.get('own_adapter_loss')}, adapter of the same family in another "
                f"language {q.get('same_family_other_language_loss')}, same language other family "
                f"{q.get('same_language_other_family_loss')}, other family {q.get('other_family_loss')}."]

    out += ["", f"## Table 1 (K = {k}, storage {_storage(k, n)} %)", ""]
    header = ["Method", "K", "Storage %", "Avg score ↑", "Eval loss ↓", "Search loss ↓",
              "Search time (s)", "Evaluations", "Seeds"]
    rows = table1_rows(res)
    out.append(_md_table(header, [_row_cells(r, n) for r in rows]))
    if "table" in images:
        out += ["", f"![Table 1: average score per method]({images['table']})"]
    out += ["", "Average score per family (mean over seeds):", ""]
    out.append(_md_table(["Method", *fams], [[r["label"], *_per_family(res, r["runs"])] for r in rows]))

    out += ["", "## Findings", ""]
    out += [f"- {s}" for s in findings(res)]

    out += ["", "## Score vs number of clusters", ""]
    counts = [kk for kk in cfg.cluster_counts if kk < n]
    strategies = list(cfg.count_strategies)
    labels = {m.key: m.label for m in cfg.methods()}
    seeds = list(range(cfg.count_seeds))
    header = ["K", "Storage %"] + [f"{labels[s]}: score" for s in strategies] + \
        [f"{labels[s]}: eval loss" for s in strategies]
    rows_k = []
    for kk in counts:
        cells = [str(kk), _storage(kk, n)]
        runs_of = {s: _count_runs(res, s, kk, seeds) for s in strategies}
        cells += [_pm([r.score for r in runs_of[s]], 2) for s in strategies]
        cells += [_pm([r.loss for r in runs_of[s]], 4) for s in strategies]
        rows_k.append(cells)
    out.append(_md_table(header, rows_k))
    out += ["", f"Seeds per point: {cfg.count_seeds}; K = 1 is the all-in-one merge; the single-task "
            f"adapters (K = N = {n}, storage 100 %) score {_mean(res.select('single'), 'score'):.2f}."]
    if "clusters" in images:
        out += ["", f"![Score vs number of clusters]({images['clusters']})"]

    out += ["", "## Do the clusters group tasks by family or by language?", ""]
    fam_l, lang_l = (_tag_labels(res.tags, res.names, tag) for tag in ("family", "language"))
    rows_a = []
    for m in cfg.methods():
        runs = res.select(m.key, k)
        if not runs:
            continue
        af = [ari(fam_l, r.partition) for r in runs]
        al = [ari(lang_l, r.partition) for r in runs]
        rows_a.append([m.label, _pm([x for x in af if x is not None], 3),
                       _pm([x for x in al if x is not None], 3)])
    out.append(_md_table(["Method (K = %d)" % k, "ARI vs family", "ARI vs language"], rows_a))
    out += ["", "Adjusted Rand index (sklearn) between the found partition and the tasks' family / "
            "language labels from tasks.json: 1 = identical grouping, ~0 = unrelated (chance level)."]
    run = _best_d2c(res)
    if run is not None:
        out += ["", f"Clusters found by D²C (paper setting, seed {run.seed}, the seed with the lowest "
                "search loss):", ""]
        for c in range(k):
            members = [res.names[i] for i in range(n) if run.partition[i] == c]
            out.append(f"- cluster {c}: {', '.join(members)}")
        if "assignment" in images:
            out += ["", f"![D²C cluster assignment]({images['assignment']})"]

    out += ["", "## Investigation", ""]
    merges = [cfg.merge, *cfg.compare_merges]
    out += [f"Seed 0's partitions, partitions built from the tags (oracles, no search), and a longer "
            f"D²C search, all scored the same way. Under {', '.join(merges[1:]) or 'no other merge'}, "
            f"the partitions are the ones found with {cfg.merge} (no new search), merged with that "
            "method instead.", ""]
    header = ["Partition", "K"] + [f"{mg}: score / eval loss / search loss" for mg in merges]
    inv = [("by_family", "Group by family (oracle)"), ("by_language", "Group by language (oracle)"),
           ("all_in_one", "All-in-one"), *[(m.key, m.label) for m in cfg.methods()],
           ("d2c_long", f"D²C paper setting, T = {cfg.long_iterations}")]
    rows_i = []
    for key, label in inv:
        cells, kk = [label, "—"], None
        for mg in merges:
            runs = [r for r in res.select(key, merge=mg) if r.seed in (None, 0)
                    and (key.startswith("by_") or r.num_clusters == (1 if key == "all_in_one" else k))]
            if runs:
                r = runs[0]
                kk = r.num_clusters
                sl = f"{r.search_loss:.4f}" if r.search_loss is not None else "—"
                cells.append(f"{r.score:.2f} / {r.loss:.4f} / {sl}")
            else:
                cells.append("—")
        if kk is not None:
            cells[1] = str(kk)
            rows_i.append(cells)
    out.append(_md_table(header, rows_i))
    long_runs, short = res.select("d2c_long", k), res.select("d2c", k, seeds=[0])
    if long_runs and short:
        lr, sr = long_runs[0], short[0]
        out += ["", f"A longer search (paper setting, seed 0): T = {cfg.iterations} → {cfg.long_iterations} "
                f"iterations moves the search loss {sr.search_loss:.4f} → {lr.search_loss:.4f}, the eval "
                f"loss {sr.loss:.4f} → {lr.loss:.4f} and the score {sr.score:.2f} → {lr.score:.2f} "
                f"({lr.evaluations} evaluations, {lr.seconds:.0f} s); ARI vs family "
                f"{_fmt_ari(ari(fam_l, sr.partition))} → {_fmt_ari(ari(fam_l, lr.partition))}."]
    corr = loss_score_correlations(res)
    if corr["partitions"] >= 3:
        def fmt(key: str) -> str:
            v = corr.get(key)
            return "n/a" if v is None else f"{v:+.2f}"

        out += ["", f"Does a lower loss mean a higher score? Over the {corr['partitions']} distinct "
                f"partitions evaluated at K = {k} with {cfg.merge} (every strategy and seed, oracles "
                f"with K = {k} included), Spearman ρ(search loss, score) = {fmt('search_loss_vs_score')}, "
                f"ρ(eval loss, score) = {fmt('eval_loss_vs_score')}, ρ(search loss, eval loss) = "
                f"{fmt('search_loss_vs_eval_loss')} (a loss that predicts the score gives ρ near −1 "
                "with it; a search loss that predicts the eval loss gives ρ near +1)."]
    why = explanations(res)
    if why:
        out += ["", "### What explains the outcome", ""] + [f"- {line}" for line in why]
    out.append("")
    return "\n".join(out)


def _count_runs(res: ReportResult, key: str, k: int, seeds: Sequence[int]) -> list[Run]:
    """A strategy's runs at K clusters for the cluster-count section (K = 1: the all-in-one merge)."""
    return res.select("all_in_one", 1) if k == 1 else res.select(key, k, seeds=seeds)


def _best_d2c(res: ReportResult) -> Run | None:
    """The D²C (paper setting) run at K with the lowest search loss, None when there is none."""
    runs = res.select("d2c", res.cfg.num_clusters)
    return min(runs, key=lambda r: (r.search_loss if r.search_loss is not None else 0.0)) if runs else None


def _fmt_ari(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _rel(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


# ----------------------------------------------------------------------------- figures


from d2c_jax.plots import _png, _pyplot  # noqa: E402  (one Agg set-up for every figure)


def table_png(res: ReportResult) -> bytes:
    """Bar chart of Table 1: mean score ± std per method, and eval loss."""
    plt = _pyplot()
    rows = [r for r in table1_rows(res) if r["runs"]]
    labels = [r["label"].replace(" (", "\n(") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, attr, title in ((axes[0], "score", "average task score ↑ (eval split)"),
                            (axes[1], "loss", "eval loss ↓")):
        stats = [_stats([getattr(x, attr) for x in r["runs"]]) for r in rows]
        colours = ["0.6" if r["key"] in ("zero_shot", "single", "all_in_one") else
                   ("tab:red" if r["key"].startswith("d2c") else "tab:blue") for r in rows]
        ax.bar(range(len(rows)), [m for m, _ in stats], yerr=[s for _, s in stats], color=colours,
               capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if attr == "loss":
            lo = min(m - s for m, s in stats)
            hi = max(m + s for m, s in stats)
            ax.set_ylim(max(0.0, lo - 0.1 * (hi - lo)), hi + 0.05 * (hi - lo))
    fig.suptitle(f"Table 1 on the suite: K = {res.cfg.num_clusters}, {res.cfg.seeds} seed(s), "
                 f"T = {res.cfg.iterations}")
    return _png(fig)


def clusters_png(res: ReportResult) -> bytes:
    """Score vs K (storage %) per strategy, with the single-task and zero-shot levels."""
    plt = _pyplot()
    n = len(res.names)
    counts = [kk for kk in res.cfg.cluster_counts if kk < n]
    labels = {m.key: m.label for m in res.cfg.methods()}
    seeds = list(range(res.cfg.count_seeds))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in res.cfg.count_strategies:
        xs, ms, ss = [], [], []
        for kk in counts:
            runs = _count_runs(res, s, kk, seeds)
            if runs:
                m, sd = _stats([r.score for r in runs])
                xs.append(kk), ms.append(m), ss.append(sd)
        if xs:
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=labels[s])
    for key, style, text in (("single", "--", "single-task"), ("zero_shot", ":", "zero-shot")):
        runs = res.select(key)
        if runs:
            ax.axhline(runs[0].score, ls=style, color="0.4", lw=1)
            ax.text(counts[-1] if counts else 1, runs[0].score, f" {text}", va="bottom", ha="right",
                    fontsize=8, color="0.3")
    ax.set_xticks(counts, [f"{kk}\n{100 * kk / n:.1f}%" for kk in counts])
    ax.set_xlabel("number of clusters K (storage %)")
    ax.set_ylabel("average task score")
    ax.set_title("Score vs number of clusters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def assignment_png(res: ReportResult) -> bytes | None:
    from d2c_jax import plots

    run = _best_d2c(res)
    if run is None:
        return None
    return plots.assignment_png(np.asarray(run.partition), res.names, res.cfg.num_clusters, res.tags,
                                f"D²C (paper setting), K={res.cfg.num_clusters}, seed {run.seed}")


def write_report(res: ReportResult, output_dir: str) -> dict[str, str]:
    """Writes results.md and the PNGs into output_dir (each atomically); returns {role: path}."""
    from d2c_jax.atomic_io import write_bytes_atomic, write_text_atomic

    images = {"table": TABLE_PNG, "clusters": CLUSTERS_PNG, "assignment": ASSIGNMENT_PNG}
    pngs = {"table": table_png(res), "clusters": clusters_png(res), "assignment": assignment_png(res)}
    images = {r: f for r, f in images.items() if pngs[r] is not None}
    written = {}
    for role, fname in images.items():
        path = os.path.join(output_dir, fname)
        write_bytes_atomic(path, pngs[role])
        written[role] = path
    path = os.path.join(output_dir, RESULTS_MD)
    write_text_atomic(path, render_markdown(res, images))
    written["markdown"] = path
    raw = os.path.join(output_dir, "results.json")
    write_text_atomic(raw, json.dumps(result_json(res), indent=1) + "\n")
    written["json"] = raw
    return written


def result_json(res: ReportResult) -> dict[str, Any]:
    """Every run's numbers (the markdown's source), for later analysis."""
    return {
        "command": res.cfg.command,
        "suite": res.suite.root,
        "suite_settings_hash": res.suite_hash,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(res.cfg).items()},
        "seconds": res.seconds,
        "stage_seconds": res.stage_seconds,
        "tasks": list(res.names),
        "tags": res.tags,
        "metrics": list(res.task_metrics),
        "max_new_tokens": res.max_new_tokens,
        "loss_score_correlations": loss_score_correlations(res),
        "runs": [{**dataclasses.asdict(r), "partition": None if r.partition is None else list(r.partition),
                  "task_scores": list(r.task_scores), "task_losses": list(r.task_losses)} for r in res.runs],
    }
