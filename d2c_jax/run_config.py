"""Frozen dataclasses of the search settings, built from flags once at start-up.

`RunConfig` holds every setting of `launch/search.py`, whose flags are generated from its fields
(`config_flags`: one default and one help text per setting, here); its `search` field is the
`SearchSettings` the engine needs. Library code receives these, never FLAGS. No arrays here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Any

from d2c_jax.config_flags import setting
from d2c_jax.errors import UserError
from d2c_jax.merge import METHODS as MERGE_METHODS
from d2c_jax.strategies.d2c import PROPOSALS, STARTS
from d2c_jax.types import DTYPES

STRATEGIES = ("d2c", "random", "kmeans", "svd_kmeans", "all_in_one")
SEARCH_STRATEGIES = ("d2c",)  # iterate with the engine; the others are one-shot baselines
OBJECTIVES = ("local", "global")

# Settings that change the result of a run: a checkpoint made with other values is refused.
# (batch_size, speculate, compilation_cache, checkpoint_every, keep_checkpoints, track_every,
# cache_size, overwrite, progress, all_in_one_reference and the multi-process settings do not
# change it.)
RESULT_SETTINGS = (
    "strategy", "objective", "proposal", "start", "num_clusters", "iterations", "population", "proposals",
    "exchange_every", "merge", "density", "examples_per_task", "max_seq_len", "chat_template",
    "dtype", "seed", "output_rank", "budget", "budget_mb", "budget_ranks",
)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What the engine needs: partition size, search schedule, randomness."""

    num_clusters: int = setting(5, "K: number of merged adapters (1 <= K < N).")
    iterations: int = setting(200, "T: search iterations.")
    objective: str = setting("local", "local: loss of the moved task (the paper); global: summed loss of both "
                             "clusters.", choices=OBJECTIVES)
    proposal: str = setting("paper", "How a move is drawn. paper: a cluster c uniformly among those with >= 2 "
                            "members, then t uniformly in c (Algorithm 1's text); task_uniform: t uniformly "
                            "among all tasks whose cluster has >= 2 members (c in proportion to its size). "
                            "Then c' uniformly among the other clusters.", choices=PROPOSALS)
    start: str = setting("random", "Each chain's first partition. random: one adapter per cluster, the others "
                         "uniformly random; round_robin: the shuffled adapters dealt in turn (equal sizes).",
                         choices=STARTS)
    population: int = setting(1, "P: search chains run in lock-step.")
    proposals: int = setting(1, "M: candidate moves per chain per iteration (best improving kept).")
    exchange_every: int = setting(0, "Every k iterations copy the best quarter of the chains over the worst "
                                  "(0: never).")
    track_every: int = setting(0, "Compute every chain's global objective (metrics, plot) every k iterations, at "
                               "exchanges and at the end (0: at the end only). Only clusters changed since they "
                               "were last scored cost evaluations, but with --objective=local those are extra.")
    seed: int = setting(0, "Seed of every random choice.")
    speculate: int = setting(0, "Exact speculation: score up to J iterations ahead in one call, assuming "
                             "rejections, and replay them in order (same result for any J; J follows the "
                             "acceptance rate). 0: auto (the largest request bucket's worth on accelerators, "
                             "1 on CPU).")
    cache_size: int = setting(0, "Loss cache entries kept in memory and in checkpoints, least recently used "
                              "evicted (an evicted one is scored again when needed); 0: 5% of the machine's "
                              "memory (the engine alone: unbounded).")

    def __post_init__(self):
        _check(self.num_clusters >= 1, "num_clusters", self.num_clusters, "must be >= 1")
        _check(self.iterations >= 0, "iterations", self.iterations, "must be >= 0")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"must be one of {OBJECTIVES}")
        _check(self.proposal in PROPOSALS, "proposal", self.proposal, f"must be one of {PROPOSALS}")
        _check(self.start in STARTS, "start", self.start, f"must be one of {STARTS}")
        _check(self.population >= 1, "population", self.population, "must be >= 1")
        _check(self.proposals >= 1, "proposals", self.proposals, "must be >= 1")
        _check(self.exchange_every >= 0, "exchange_every", self.exchange_every, "must be >= 0")
        _check(self.track_every >= 0, "track_every", self.track_every, "must be >= 0")
        _check(self.speculate >= 0, "speculate", self.speculate, "must be >= 0")
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _check(self.cache_size >= 0, "cache_size", self.cache_size, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one search run (the resolved flags of launch/search.py, which generates
    its flags from these fields); saved flat to workdir/config.json."""

    workdir: str = setting(help="Output and checkpoint directory, or gs://BUCKET/PATH (the run in a bucket).",
                           required=True)
    base_model: str | None = setting(None, "Hugging Face base model: a directory, or a Hub id org/name[@revision] "
                                     "(downloaded into the Hub cache; HF_HUB_OFFLINE=1: the cache only).")
    adapters_dir: str | None = setting(None, "Directory of PEFT LoRA adapters, one sub-directory per task "
                                       "(local or gs://bucket/prefix).")
    adapters: tuple[str, ...] = setting((), "PEFT LoRA adapters instead of --adapters_dir, comma-separated: "
                                        "directories (local or gs://) or Hub ids org/name[@revision][/sub/folder], "
                                        "each optionally task=ID (default task name: the last path component).")
    data_dir: str | None = setting(None, "Directory of <task>.jsonl examples (and optional tasks.json; "
                                   "local or gs://bucket/prefix).")
    strategy: str = setting("d2c", "d2c search, or a baseline.", choices=STRATEGIES)
    search: SearchSettings = dataclasses.field(default_factory=SearchSettings)
    merge: str = setting("ties", "Merge method.", choices=MERGE_METHODS)
    density: float = setting(0.5, "Fraction of entries kept when trimming (TIES).")
    examples_per_task: int = setting(10, "n: examples per task used to score merges.")
    max_seq_len: int = setting(1024, "Longest example in tokens (prompts cut from the left).")
    chat_template: bool = setting(False, "Wrap prompts in the tokenizer's chat template.")
    chat_template_date: str = setting("", "The date a chat template writes (Llama 3's 'Today Date'), YYYY-MM-DD "
                                      "('': the day the run started, kept in config.json so that a resumed run "
                                      "sees the same prompts).")
    dtype: str = setting("bfloat16", "Base weight dtype.", choices=DTYPES)
    batch_size: str = setting("auto", "Largest number of evaluation requests per accelerator call; calls use "
                              "power-of-two buckets up to it (auto: the largest that fits device memory; does "
                              "not change results).")
    compilation_cache: str = setting("", "Persistent XLA compilation cache directory, so that a second run "
                                     "compiles nothing ('': $XDG_CACHE_HOME/d2c_jax/xla or ~/.cache/d2c_jax/xla; "
                                     "'none': off).")
    model_shards: str = setting("auto", "Devices per model replica (tensor parallel, a divisor of the device "
                                "count); the rest score candidates (auto: the fewest whose share of the base "
                                "weights and prepared adapters fits a device).")
    checkpoint_every: int = setting(10, "Save a checkpoint every k iterations.")
    keep_checkpoints: int = setting(2, "Checkpoints kept.")
    overwrite: bool = setting(False, "Replace a finished run, or a checkpoint of other inputs, in --workdir.")
    progress: bool = setting(True, "Show a progress bar.")
    all_in_one_reference: bool = setting(
        True, "Also score the merge of all N adapters (N evaluations in one batch) and show its objective "
        "next to the found partition's and the random start's (--noall_in_one_reference: skip).")
    # Multi-process (one process per host; unset: auto-detected, or a single process).
    coordinator_address: str | None = setting(
        None, "Multi-host: host:port of process 0, the same on every host (default: auto-detected on TPU VMs, "
        "SLURM, Open MPI or from JAX_COORDINATOR_ADDRESS; none: one process).")
    num_processes: int | None = setting(None, "Multi-host: number of processes, one per host (default: "
                                        "auto-detected).")
    process_id: int | None = setting(None, "Multi-host: this host's process index in [0, --num_processes) "
                                     "(default: auto-detected); process 0 writes the outputs.")
    # A built-in synthetic suite (d2c_jax.suite preset, built on first use) supplies whichever of
    # base_model / adapters_dir / data_dir are not given.
    suite: str | None = setting(None, "A built-in synthetic suite (demo | full | warm_start), built on first use into "
                                "--suite_root/<name>; it supplies --base_model/--adapters_dir/--data_dir when "
                                "they are unset.")
    suite_root: str = setting("runs/suites", "Where built-in suites are built and cached.")
    # Beyond the paper's merge (issue 12).
    output_rank: int = setting(0, "Rank of the merged adapters (0: the adapters' rank).")
    budget: float | None = setting(None, "Storage budget in percent of storing all N adapters, instead of "
                                   "--num_clusters: every (K, rank) way to fill it is searched, the lowest "
                                   "objective kept.")
    budget_mb: float | None = setting(None, "Storage budget in MB (10^6 bytes, float32 factors), instead of --budget.")
    budget_ranks: str = setting("", "Candidate ranks of the budget mode, comma-separated (default: R/4, R/2, R, "
                                "and 2R for delta-space merges).")
    tune_weights: bool = setting(False, "After the search, tune each cluster's merge weights on its tasks' search "
                                 "examples (part held out; kept only where they beat unit weights).")
    tune_granularity: str = setting("adapter", "One weight per adapter, per adapter and layer, per cluster "
                                    "(scale: searched over a log grid, not trained), or the merged adapter's factors themselves (a few-shot fine-tune "
                                    "from the merge).", choices=("adapter", "layer", "scale", "factors"))
    tune_start: str = setting("merge", "With --tune_granularity=factors: start from the unit-weight merge, or "
                              "from a fresh LoRA (PEFT's initialisation, B = 0): the fine-tune-only control.",
                              choices=("merge", "fresh"))
    tune_steps: int = setting(60, "Most optimiser steps of the weight tuning (Adam).")
    tune_holdout: float = setting(0.3, "Fraction of each task's search examples held out for early stopping.")
    tune_learning_rate: float | None = setting(None, "Adam learning rate of the tuning (default: 0.05 for "
                                               "weights, 0.001 for factors).")
    push_to_hub: str | None = setting(None, "After the run, upload the K merged adapters, partition.json and a "
                                      "model card to this Hub repo (org/name; created if absent).")
    push_private: bool = setting(True, "Create the --push_to_hub repo private (--nopush_private: public).")
    tune_during_search: bool = setting(False, "Tune the final partition of every chain and keep the chain with "
                                       "the lowest tuned loss (instead of the lowest unit-weight objective).")

    def __post_init__(self):
        for name in ("batch_size", "model_shards"):  # "8" from a flag or config.json: the number
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().isdigit():
                object.__setattr__(self, name, int(value))
        _check(bool(self.workdir), "workdir", self.workdir, "must be set")
        if not self.suite:
            for name in ("base_model", "data_dir"):
                _check(bool(getattr(self, name)), name, getattr(self, name), "must be set (or use --suite)")
            _check(bool(self.adapters_dir or self.adapters), "adapters_dir", self.adapters_dir,
                   "must be set (or --adapters, or --suite)")
        _check(not (self.adapters_dir and self.adapters), "adapters", ",".join(self.adapters),
               "give --adapters_dir or --adapters, not both")
        if self.push_to_hub:
            _check(bool(re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to_hub)), "push_to_hub", self.push_to_hub,
                   "must be a Hub repo id org/name")
        _check(self.strategy in STRATEGIES, "strategy", self.strategy, f"must be one of {STRATEGIES}")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        _check(0.0 < self.density <= 1.0, "density", self.density, "must be in (0, 1]")
        _check(self.examples_per_task >= 1, "examples_per_task", self.examples_per_task, "must be >= 1")
        _check(self.max_seq_len >= 2, "max_seq_len", self.max_seq_len, "must be >= 2")
        _check(self.batch_size == "auto" or (str(self.batch_size).isdigit() and int(self.batch_size) >= 1),
               "batch_size", self.batch_size, "must be auto or an integer >= 1")
        _check(self.model_shards == "auto" or (str(self.model_shards).isdigit() and int(self.model_shards) >= 1),
               "model_shards", self.model_shards, "must be auto or an integer >= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            _check(bool(host) and port.isdigit(), "coordinator_address", self.coordinator_address,
                   "must be host:port")
        if self.num_processes is not None:
            _check(self.num_processes >= 1, "num_processes", self.num_processes, "must be >= 1")
        if self.process_id is not None:
            limit = "" if self.num_processes is None else f" and < --num_processes={self.num_processes}"
            _check(0 <= self.process_id < (self.num_processes or self.process_id + 1), "process_id",
                   self.process_id, f"must be >= 0{limit}")
        if self.chat_template_date:
            try:
                datetime.date.fromisoformat(self.chat_template_date)
            except ValueError:
                _check(False, "chat_template_date", self.chat_template_date, "must be a date YYYY-MM-DD")
        _check(self.output_rank >= 0, "output_rank", self.output_rank, "must be >= 0 (0: the adapters' rank)")
        _check(self.budget is None or self.budget_mb is None, "budget_mb", self.budget_mb,
               "give --budget (percent) or --budget_mb, not both")
        _check(self.budget is None or 0 < self.budget <= 100, "budget", self.budget, "must be in (0, 100]")
        _check(self.budget_mb is None or self.budget_mb > 0, "budget_mb", self.budget_mb, "must be > 0")
        _check(not self.budget_mode or not self.output_rank, "output_rank", self.output_rank,
               "is chosen by the budget mode; leave it 0 with --budget/--budget_mb")
        self.budget_rank_list  # validates --budget_ranks
        if self.tune_weights or self.tune_during_search:
            self.tune  # validates the tuning settings
        self.engine_settings()  # validates the engine's part too

    @property
    def budget_mode(self) -> bool:
        return self.budget is not None or self.budget_mb is not None

    @property
    def budget_rank_list(self) -> tuple[int, ...]:
        try:
            ranks = tuple(int(x) for x in self.budget_ranks.split(",") if x.strip())
        except ValueError:
            raise UserError(None, f"--budget_ranks={self.budget_ranks}: must be comma-separated integers") from None
        _check(all(r >= 1 for r in ranks), "budget_ranks", self.budget_ranks, "each must be >= 1")
        return ranks

    @property
    def tune(self):
        """The weight-tuning settings (d2c_jax.tune.TuneSettings)."""
        from d2c_jax.tune import TuneSettings

        return TuneSettings(granularity=self.tune_granularity, steps=self.tune_steps,
                            learning_rate=self.tune_learning_rate, holdout=self.tune_holdout,
                            start=self.tune_start, seed=self.search.seed)

    @classmethod
    def from_flat(cls, **settings: Any) -> RunConfig:
        """A RunConfig from flat keyword settings (config.json's form): the SearchSettings fields
        go to `search`."""
        names = {f.name for f in dataclasses.fields(SearchSettings)}
        search = SearchSettings(**{k: v for k, v in settings.items() if k in names})
        return cls(search=search, **{k: v for k, v in settings.items() if k not in names})

    @property
    def scorer_batch_size(self) -> int | str:
        """--batch_size as the Scorer takes it: "auto" or an int."""
        return "auto" if self.batch_size == "auto" else int(self.batch_size)

    def engine_settings(self) -> SearchSettings:
        """The engine's settings: all_in_one is K = 1 whatever --num_clusters says, a one-shot
        baseline runs no iterations."""
        return dataclasses.replace(
            self.search,
            num_clusters=1 if self.strategy == "all_in_one" else self.search.num_clusters,
            iterations=self.search.iterations if self.strategy in SEARCH_STRATEGIES else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its flag name (flat: the search settings beside the others)."""
        out = dataclasses.asdict(self)
        return {**out.pop("search"), **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def result_settings(self) -> dict[str, Any]:
        """The settings that a checkpoint must share with this run to be resumed by it."""
        flat = self.to_dict()
        return {name: flat[name] for name in RESULT_SETTINGS}


def _check(ok: bool, flag: str, value: Any, message: str) -> None:
    if not ok:
        raise UserError(None, f"--{flag}={value}: {message}")


def default_cache_size(num_adapters: int, memory_fraction: float = 0.05) -> int:
    """Loss cache entries that fit in `memory_fraction` of the machine's memory (an entry costs
    about 200 bytes of Python objects plus its packed mask), at least 100,000."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return max(100_000, int(memory * memory_fraction) // (200 + (num_adapters + 7) // 8))
