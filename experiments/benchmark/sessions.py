"""The benchmark's sessions and the whole run: the torch + PEFT reference and d2c_jax side by side.

Shapes: N adapters (= tasks), K clusters, P chains, M proposals, C requests.

`ReferenceSession` runs D²C Algorithm 1, one evaluation at a time, each a PEFT
`add_weighted_adapter(..., "ties", density)` + `set_adapter` + forward loss + `delete_adapter`;
`D2cJaxSession` runs our engine's `search.search_step` over the batched `scoring.Scorer`. Both use
the same proposals (the engine's random streams), so their losses and decisions can be compared;
a D2cJaxSession also measures the global objective every strategy reaches at an equal budget of
scorer evaluations. `run_benchmark` puts each session in its own spawned process (its own peak
RSS), loads them one after the other and interleaves their timed iterations round by round, so
that every column sees the same background load of a shared machine. torch and peft are
imported lazily (the `test` extra).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import resource
import sys
import time
from typing import Any, Sequence

import numpy as np

import jax

from d2c_jax.data import data_file, read_examples
from d2c_jax.config_flags import setting
from d2c_jax.errors import UserError
from d2c_jax.inputs import load_inputs
from d2c_jax.run_config import SearchSettings
from d2c_jax.scoring import Scorer
from d2c_jax.search import (LossCache, check_num_clusters, evaluate_partition, initial_state, objectives,
                            partition_losses, search_step)
from d2c_jax.strategies import d2c
from d2c_jax.strategies.baselines import baseline_partition
from d2c_jax.types import DTYPES
from experiments.benchmark.fixture import (FixturePaths, FixtureSettings, adapter_param_count, param_count,
                                           require_torch)

MERGED = "d2c_merged"  # the reference's temporary merged adapter

NEVER = 10**9  # iterations / track_every for engine steps driven here (no built-in tracking)
STALL_ITERATIONS = 200  # a budgeted search stops after this many iterations without a new evaluation


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """One D²C search configuration of the engine."""

    label: str
    population: int = 1
    proposals: int = 1
    objective: str = "local"
    exchange_every: int = 0

    def settings(self, num_clusters: int, seed: int) -> Any:
        return SearchSettings(num_clusters=num_clusters, iterations=NEVER, objective=self.objective,
                              population=self.population, proposals=self.proposals,
                              exchange_every=self.exchange_every, track_every=NEVER, seed=seed)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What the benchmark runs (the fixture is separate: FixtureSettings)."""

    num_clusters: int = setting(5, "K.")
    reference_iterations: int = setting(4, "Iterations of the torch + PEFT reference timed.")
    iterations: int = setting(4, "Engine iterations timed in each d2c_jax column.")
    population: int = setting(4, "P of the third column (and of the population strategies).")
    proposals: int = setting(4, "M of the third column.")
    batch_size: int = setting(8, "Requests per scorer call (the paper column uses min(this, 2)).")
    strategy_budget: int = setting(64, "Scorer evaluations given to every search strategy (0: skip).")
    density: float = setting(0.5, "TIES density of both sides.")
    dtype: str = setting("float32", "d2c_jax base weight dtype (reference: float32).", choices=DTYPES)
    seed: int = setting(0, "Seed of the fixture and of the searches.")

    def __post_init__(self):
        for name in ("num_clusters", "reference_iterations", "iterations", "population", "proposals",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(None, f"--{name}={getattr(self, name)}: must be >= 1")
        if self.strategy_budget < 0:
            raise UserError(None, f"--strategy_budget={self.strategy_budget}: must be >= 0")

    @property
    def paper(self) -> ChainSpec:
        return ChainSpec("d2c paper (P=1 M=1 local)")

    @property
    def population_local(self) -> ChainSpec:
        return ChainSpec(f"d2c P={self.population} M={self.proposals} local", self.population, self.proposals)

    @property
    def population_global(self) -> ChainSpec:
        """Population + global objective + exchange; one proposal per chain keeps an iteration
        (every member of both clusters scored) within reach of small budgets."""
        return ChainSpec(f"d2c P={self.population} M=1 global, exchange/2", self.population, 1, "global", 2)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _log(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def reference_batch(tokenizer: Any, examples: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """One right-padded torch batch of a task's examples, labels -100 on prompt and padding
    (HF's loss of this batch is the pinned task loss)."""
    import torch

    ids, labels = [], []
    for prompt, response in examples:
        p = list(tokenizer(prompt)["input_ids"])
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    s = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (s - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (s - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (s - len(x)) for x in labels]),
    }


class ReferenceSession:
    """The paper's way: Algorithm 1, one PEFT merge + forward at a time, on the engine's proposals
    (chain 0 of seed `bench.seed`), so its decisions can be compared with d2c_jax's. Constructing
    it loads everything (timed as setup); `step()` runs one iteration; `finish()` the column."""

    def __init__(self, paths: FixturePaths, bench: BenchSettings):
        require_torch()
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer


        torch.set_num_threads(os.cpu_count() or 1)
        start = time.perf_counter()
        self.bench, self.names, self._torch, self._d2c = bench, paths.names, torch, d2c
        base = AutoModelForCausalLM.from_pretrained(paths.base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, os.path.join(paths.adapters_dir, self.names[0]),
                                          adapter_name=self.names[0])
        for name in self.names[1:]:
            model.load_adapter(os.path.join(paths.adapters_dir, name), adapter_name=name)
        self.model = model.eval()
        tok = AutoTokenizer.from_pretrained(paths.base_model, local_files_only=True)
        n = paths.settings.examples_per_task
        examples = [read_examples(data_file(paths.data_dir, t, "search"), n) for t in self.names]
        self.batches = [reference_batch(tok, [(p, r) for _, p, r in rows]) for rows in examples]
        self.setup_s = time.perf_counter() - start
        self.partition_n = d2c.initial_partitions(len(self.names), bench.num_clusters, 1, bench.seed)[0]
        self.iteration = 0
        self.timing = {"merge_s": 0.0, "forward_s": 0.0, "delete_s": 0.0}
        self.pairs: list[tuple[list[bool], int, float]] = []
        self.decisions: list[bool] = []
        self.step_s: list[float] = []
        self.cpu_s: list[float] = []

    def _loss(self, mask_n: np.ndarray, task: int) -> float:
        members = [self.names[i] for i in np.flatnonzero(mask_n)]
        t0 = time.perf_counter()
        self.model.add_weighted_adapter(members, [1.0] * len(members), MERGED, combination_type="ties",
                                        density=self.bench.density)
        self.model.set_adapter(MERGED)
        self.model.eval()  # the merged adapter's new lora_dropout modules start in training mode
        t1 = time.perf_counter()
        with self._torch.no_grad():
            value = float(self.model(**self.batches[task]).loss)
        t2 = time.perf_counter()
        self.model.delete_adapter(MERGED)
        t3 = time.perf_counter()
        self.timing["merge_s"] += t1 - t0
        self.timing["forward_s"] += t2 - t1
        self.timing["delete_s"] += t3 - t2
        return value

    def step(self) -> dict[str, Any]:
        d2c, k = self._d2c, self.bench.num_clusters
        t0, c0 = time.perf_counter(), time.process_time()
        it = self.iteration + 1
        move = d2c.sample_move(d2c.stream(self.bench.seed, d2c.STREAM_PROPOSE, it, 0), self.partition_n, k)
        (before,), (after,) = d2c.move_requests(self.partition_n, move, "local")
        l_before = self._loss(*before)
        l_after = self._loss(*after)
        accept = l_after < l_before
        if accept:
            self.partition_n = d2c.apply_move(self.partition_n, move)
        self.iteration = it
        self.step_s.append(time.perf_counter() - t0)
        self.cpu_s.append(time.process_time() - c0)
        self.pairs += [(before[0].tolist(), int(before[1]), l_before), (after[0].tolist(), int(after[1]), l_after)]
        self.decisions.append(bool(accept))
        return {"iteration": it, "evaluations": 2, "seconds": self.step_s[-1]}

    def finish(self) -> dict[str, Any]:
        evaluations = 2 * len(self.step_s)
        return {
            "column": "reference",
            "settings": "P=1 M=1 local",
            "batch_size": 1,
            **_step_stats(self.step_s, self.cpu_s, [2] * len(self.step_s), [1] * len(self.step_s)),
            "cache_hit_rate": None,
            "compile_s": None,
            "setup_s": self.setup_s,
            "per_eval_breakdown_s": {key: v / max(evaluations, 1) for key, v in self.timing.items()},
            "peak_rss_mb": peak_rss_mb(),
            "device_memory": None,
            "torch_threads": self._torch.get_num_threads(),
            "pairs": self.pairs,
            "decisions": self.decisions,
        }


def _step_stats(step_s: Sequence[float], cpu_s: Sequence[float], evaluations: Sequence[int],
                proposals: Sequence[int]) -> dict[str, Any]:
    """Timing figures of a column from its per-iteration wall and CPU seconds and counts."""
    seconds = float(sum(step_s))
    return {
        "cpu_seconds_per_iteration": float(sum(cpu_s)) / max(len(cpu_s), 1),
        "iterations": len(step_s),
        "proposals": int(sum(proposals)),
        "evaluations": int(sum(evaluations)),
        "seconds": seconds,
        "step_s": [float(x) for x in step_s],
        "seconds_per_iteration": seconds / max(len(step_s), 1),
        "median_seconds_per_iteration": float(np.median(step_s)) if len(step_s) else None,
        "best_seconds_per_iteration": float(min(step_s)) if len(step_s) else None,
        "evals_per_s": sum(evaluations) / seconds if seconds > 0 else None,
        # The least disturbed iteration (a shared machine's load only ever slows one down).
        "best_evals_per_s": max((e / t for e, t in zip(evaluations, step_s) if t > 0), default=None),
    }


def _load_scorer(paths: FixturePaths, bench: BenchSettings, batch_size: int) -> tuple[Scorer, Any]:
    inputs = load_inputs(paths.base_model, paths.adapters_dir, paths.data_dir, split="search",
                         examples_per_task=paths.settings.examples_per_task, max_seq_len=paths.settings.seq_len,
                         dtype=bench.dtype)
    return inputs.scorer("ties", bench.density, batch_size=batch_size), inputs.adapters


def _warm_up(scorer: Any, num_adapters: int, seed: int) -> tuple[float, float]:
    """(first call, second call) seconds of one full batch of fresh requests: the first includes
    the compilation of the merge and score functions, the second does not."""
    rng = np.random.default_rng([seed, 99])
    times = []
    for _ in range(2):
        masks_cn = rng.random((scorer.batch_size, num_adapters)) < 0.5
        masks_cn[:, 0] = True
        tasks_c = rng.integers(0, num_adapters, scorer.batch_size)
        t0 = time.perf_counter()
        scorer.losses(masks_cn, tasks_c)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def _device_memory() -> dict[str, Any] | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend implements it
        return None
    if not stats:
        return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(v) for k, v in stats.items() if k in keep}


@dataclasses.dataclass
class _ChainRun:
    """A search driven step by step; `snapshot` = (partitions, evaluations, iteration) when the
    budget was first reached."""

    spec: ChainSpec
    state: Any
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    snapshot: tuple[np.ndarray, int, int] | None = None

    @property
    def evaluations(self) -> int:
        return sum(int(r["evaluations"]) for r in self.rows)


def _drive(scorer: Any, run: _ChainRun, bench: BenchSettings, *, min_iterations: int, budget: int,
           tag: str) -> None:
    """Engine steps until at least `min_iterations` were run and `budget` evaluations were used
    (or the chains stopped asking for new evaluations: every neighbour of a local optimum cached)."""
    settings = run.spec.settings(bench.num_clusters, bench.seed)
    idle = 0
    while len(run.rows) < min_iterations or (run.evaluations < budget and idle < STALL_ITERATIONS):
        row = search_step(scorer, run.state, settings)
        run.rows.append(row)
        idle = idle + 1 if row["evaluations"] == 0 else 0
        if budget > 0 and run.snapshot is None and run.evaluations >= budget:
            run.snapshot = (run.state.partitions_pn.copy(), run.evaluations, run.state.iteration)
        _log(tag, f"{run.spec.label}: iteration {run.state.iteration}, {row['evaluations']} evaluations, "
                  f"{row['seconds']:.2f} s (total {run.evaluations} evaluations)")


def _pooled_cache(runs: Sequence[_ChainRun], num_adapters: int) -> Any:
    """One loss cache holding every run's entries: the scorer is a pure function of (mask, task),
    so measuring final partitions through it only saves repeated evaluations."""
    parts = [r.state.cache.to_arrays() for r in runs]
    if not parts:
        return LossCache(num_adapters)
    return LossCache.from_arrays(num_adapters, *(np.concatenate(x) for x in zip(*parts)))


def _final_objective(scorer: Any, run: _ChainRun, num_clusters: int, cache: Any) -> dict[str, Any]:
    """Global objective of the partitions at the budget (best chain); the evaluations this needs
    are measurement, not search."""
    if run.snapshot is not None:
        partitions_pn, evaluations, iterations = run.snapshot
    else:
        partitions_pn, evaluations, iterations = run.state.partitions_pn, run.evaluations, run.state.iteration
    losses_pn, stats = partition_losses(scorer, cache, partitions_pn, num_clusters)
    obj_p = objectives(losses_pn)
    best = int(np.argmin(obj_p))
    return {
        "strategy": run.spec.label,
        "search_evaluations": evaluations,
        "iterations": iterations,
        "objective": float(obj_p[best]),
        "measure_evaluations": stats.evaluations,
        "partition": partitions_pn[best].tolist(),
    }


class D2cJaxSession:
    """One d2c_jax column. Constructing it loads and compiles (timed apart); `step()` runs one
    engine iteration of the `timed` chain; `finish()` (if `strategies`) continues that chain to
    the budget, runs the `more` chains and the `baselines` to the same budget, measures each one's
    global objective, and returns the column."""

    def __init__(self, paths: FixturePaths, bench: BenchSettings, *, column: str, timed: ChainSpec,
                 batch_size: int, more: Sequence[ChainSpec] = (), baselines: Sequence[str] = ()):

        self.bench, self.column, self.more, self.baselines = bench, column, tuple(more), tuple(baselines)
        start = time.perf_counter()
        self.scorer, self.adapters = _load_scorer(paths, bench, batch_size)
        self.setup_s = time.perf_counter() - start
        self.first_s, self.second_s = _warm_up(self.scorer, self.adapters.num_adapters, bench.seed)
        _log(column, f"setup {self.setup_s:.1f} s, first call {self.first_s:.1f} s, "
                     f"second call {self.second_s:.1f} s")
        self.run = _ChainRun(timed, initial_state(timed.settings(bench.num_clusters, bench.seed),
                                                  self.adapters.num_adapters))
        self.cpu_s: list[float] = []
        self.rss_timed = peak_rss_mb()

    def step(self) -> dict[str, Any]:
        c0 = time.process_time()
        _drive(self.scorer, self.run, self.bench, min_iterations=len(self.run.rows) + 1, budget=0, tag=self.column)
        self.cpu_s.append(time.process_time() - c0)
        self.rss_timed = peak_rss_mb()
        return self.run.rows[-1]

    def finish(self, strategies: bool = True,
               reference_pairs: Sequence[tuple[list[bool], int, float]] = ()) -> dict[str, Any]:

        rows, timed = list(self.run.rows), self.run.spec  # the step() rows (a copy: finish drives on)
        unique = sum(r["unique_requests"] for r in rows)
        out: dict[str, Any] = {
            "column": self.column,
            "settings": f"P={timed.population} M={timed.proposals} {timed.objective}",
            "batch_size": self.scorer.batch_size,
            **_step_stats([r["seconds"] for r in rows], self.cpu_s, [r["evaluations"] for r in rows],
                          [r["proposals"] for r in rows]),
            "cache_hit_rate": sum(r["cache_hits"] for r in rows) / unique if unique else None,
            "compile_s": max(self.first_s - self.second_s, 0.0),
            "first_call_s": self.first_s,
            "setup_s": self.setup_s,
            "peak_rss_mb": self.rss_timed,
            "device_memory": _device_memory(),
            "cache_size": len(self.run.state.cache),
            "rows": rows,
        }
        scorer, run, n, k = self.scorer, self.run, self.adapters.num_adapters, self.bench.num_clusters
        if reference_pairs:  # the reference's (mask, task) pairs, scored here (cache or scorer)
            requests = [(np.array(m, bool), int(t)) for m, t, _ in reference_pairs]
            ours_c, stats = run.state.cache.resolve(scorer, requests)
            out["reference_pairs"] = {"ours": ours_c.tolist(), "unique": stats.unique,
                                      "from_search_cache": stats.hits}
        if strategies and self.bench.strategy_budget > 0:
            budget = self.bench.strategy_budget
            _drive(scorer, run, self.bench, min_iterations=0, budget=budget, tag=self.column)
            runs = [run]
            for spec in self.more:
                other = _ChainRun(spec, initial_state(spec.settings(k, self.bench.seed), n))
                _drive(scorer, other, self.bench, min_iterations=0, budget=budget, tag=self.column)
                runs.append(other)
            table = []
            measure = _pooled_cache(runs, n)
            for name in self.baselines:
                partition_n = baseline_partition(name, n, k, self.bench.seed, self.adapters.a, self.adapters.b)
                objective, _, stats = evaluate_partition(scorer, partition_n, k, cache=measure)
                table.append({"strategy": name, "search_evaluations": 0, "iterations": 0, "objective": objective,
                              "measure_evaluations": stats.evaluations, "partition": partition_n.tolist()})
                _log(self.column, f"{name}: objective {objective:.4f}")
            for r in runs:
                table.append(_final_objective(scorer, r, k, measure))
                _log(self.column, f"{r.spec.label}: objective {table[-1]['objective']:.4f}")
            out["strategies"] = table
        out["decisions"] = [bool(r["accepted"]) for r in run.rows]  # chain 0 (P = 1: the only one)
        out["peak_rss_mb_end"] = peak_rss_mb()
        return out


# ---------------------------------------------------------------------------------------------
# 3. Isolation, the whole benchmark, the tables
# ---------------------------------------------------------------------------------------------

SESSIONS = {"reference": ReferenceSession, "d2c_jax": D2cJaxSession}


def _worker(conn: Any, kind: str, kwargs: dict[str, Any]) -> None:
    """A session in a spawned process, driven by (method, kwargs) messages until `finish`."""
    import traceback

    try:
        session = SESSIONS[kind](**kwargs)
        conn.send(("ok", None))
        while True:
            method, args = conn.recv()
            conn.send(("ok", getattr(session, method)(**args)))
            if method == "finish":
                return
    except UserError as e:  # its constructor does not unpickle: send it as data
        conn.send(("user_error", (e.path, e.message)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


class Session:
    """A ReferenceSession / D2cJaxSession in its own spawned process (`isolate`: its own peak RSS
    and thread pools) or in this one; `call(method, **kwargs)` runs one of its methods."""

    def __init__(self, kind: str, isolate: bool, **kwargs: Any):
        self.kind, self._proc, self._conn, self._local = kind, None, None, None
        if not isolate:
            self._local = SESSIONS[kind](**kwargs)
            return
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, kind, kwargs), daemon=True)
        self._proc.start()
        child.close()
        self._receive()

    def _receive(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the {self.kind} process died (exit code {self._proc.exitcode}; out of memory?)")
        if status == "user_error":
            raise UserError(*value)
        if status == "error":
            raise RuntimeError(f"the {self.kind} process failed:\n{value}")
        return value

    def call(self, method: str, **kwargs: Any) -> Any:
        if self._local is not None:
            return getattr(self._local, method)(**kwargs)
        self._conn.send((method, kwargs))
        value = self._receive()
        if method == "finish":
            self.close()
        return value

    def close(self) -> None:
        """Waits for (or, after an error, stops) this session's own process."""
        self._local = None
        if self._proc is not None:
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()
            self._proc = None


def machine_info() -> dict[str, Any]:
    import platform
    from importlib import metadata

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for pkg in ("jax", "torch", "transformers", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(), "versions": versions}


def check_settings(fixture: FixtureSettings, bench: BenchSettings) -> None:
    """Cheap checks of the combination, before anything is built."""
    check_num_clusters(bench.num_clusters, fixture.num_adapters)


def run_benchmark(paths: FixturePaths, bench: BenchSettings, *, isolate: bool = True) -> dict[str, Any]:
    """Reference column, d2c_jax paper column, d2c_jax P/M column, strategy table: one dict.

    The three columns are loaded first (one after the other), then their timed iterations are
    interleaved round by round (the order rotating), so that all three see the same background load
    of a shared machine; then each finishes on its own."""
    check_settings(paths.settings, bench)
    info = machine_info()
    info["loadavg_start"] = list(os.getloadavg())
    sessions: list[Session] = []
    try:
        sessions.append(Session("reference", isolate, paths=paths, bench=bench))
        sessions.append(Session("d2c_jax", isolate, paths=paths, bench=bench, column="d2c_jax paper",
                                timed=bench.paper, batch_size=min(bench.batch_size, 2)))
        sessions.append(Session("d2c_jax", isolate, paths=paths, bench=bench,
                                column=f"d2c_jax P={bench.population} M={bench.proposals}",
                                timed=bench.population_local, batch_size=bench.batch_size,
                                more=[bench.population_global], baselines=("random", "kmeans", "svd_kmeans")))
        counts = [bench.reference_iterations, bench.iterations, bench.iterations]
        for r in range(max(counts)):
            for i in np.roll(np.arange(len(sessions)), -r):
                if r < counts[i]:
                    row = sessions[i].call("step")
                    if sessions[i].kind == "reference":
                        _log("reference", f"iteration {row['iteration']}/{counts[i]}: {row['seconds']:.2f} s")
        ref = sessions[0].call("finish")
        paper = sessions[1].call("finish", reference_pairs=ref["pairs"])
        pop = sessions[2].call("finish")
    finally:
        for s in sessions:
            s.close()
    info["loadavg_end"] = list(os.getloadavg())

    ref_losses = np.array([loss for _, _, loss in ref["pairs"]])
    ours_losses = np.array(paper["reference_pairs"]["ours"])
    ours_decisions = paper.get("decisions", [])
    common = min(len(ref["decisions"]), len(ours_decisions))
    parity = {
        "pairs": len(ref_losses),
        "max_abs_loss_diff": float(np.max(np.abs(ref_losses - ours_losses))) if len(ref_losses) else None,
        "decisions_compared": common,
        "decisions_agree": int(sum(a == b for a, b in zip(ref["decisions"][:common], ours_decisions[:common]))),
    }
    strategies = []
    if "strategies" in pop:
        strategies = pop["strategies"][:3] + paper.get("strategies", []) + pop["strategies"][3:]
    s = paths.settings
    return {
        "fixture": {**dataclasses.asdict(s), "param_count": param_count(s),
                    "adapter_param_count": adapter_param_count(s), "path": paths.root},
        "bench": dataclasses.asdict(bench),
        "machine": info,
        "columns": [ref, paper, pop],
        "parity": parity,
        "strategies": strategies,
    }
