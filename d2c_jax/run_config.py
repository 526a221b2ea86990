"""Frozen dataclasses of the search settings, built from flags once at start-up.

`RunConfig` holds every setting of `launch/search.py` (the launch script turns its absl flags into
one); `SearchSettings` is the part the engine needs. Library code receives these, never FLAGS.
No arrays here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from d2c_jax.errors import UserError

STRATEGIES = ("d2c", "random", "kmeans", "svd_kmeans", "all_in_one")
SEARCH_STRATEGIES = ("d2c",)  # iterate with the engine; the others are one-shot baselines
OBJECTIVES = ("local", "global")
DTYPES = ("bfloat16", "float32")

# Settings that change the result of a run: a checkpoint made with other values is refused.
# (batch_size, checkpoint_every, keep_checkpoints, track_every, overwrite, progress and the
# multi-process settings do not change it.)
RESULT_SETTINGS = (
    "strategy", "objective", "num_clusters", "iterations", "population", "proposals",
    "exchange_every", "merge", "density", "examples_per_task", "max_seq_len", "chat_template",
    "dtype", "seed",
)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What the engine needs: partition size, search schedule, randomness."""

    num_clusters: int
    iterations: int = 200
    objective: str = "local"  # "local": loss of the moved task; "global": summed loss of both clusters
    population: int = 1  # P chains in lock-step
    proposals: int = 1  # M candidate moves per chain per iteration
    exchange_every: int = 0  # replace the worst chains by the best every k iterations (0: never)
    track_every: int = 10  # compute every chain's global objective every k iterations
    seed: int = 0

    def __post_init__(self):
        _check(self.num_clusters >= 1, "num_clusters", self.num_clusters, "must be >= 1")
        _check(self.iterations >= 0, "iterations", self.iterations, "must be >= 0")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"must be one of {OBJECTIVES}")
        _check(self.population >= 1, "population", self.population, "must be >= 1")
        _check(self.proposals >= 1, "proposals", self.proposals, "must be >= 1")
        _check(self.exchange_every >= 0, "exchange_every", self.exchange_every, "must be >= 0")
        _check(self.track_every >= 1, "track_every", self.track_every, "must be >= 1")
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one search run (the resolved flags), saved to workdir/config.json."""

    base_model: str | None
    adapters_dir: str | None
    data_dir: str | None
    workdir: str
    num_clusters: int = 5
    iterations: int = 200
    strategy: str = "d2c"
    objective: str = "local"
    population: int = 1
    proposals: int = 1
    exchange_every: int = 0
    track_every: int = 10
    merge: str = "ties"
    density: float = 0.5
    examples_per_task: int = 10
    max_seq_len: int = 1024
    chat_template: bool = False
    dtype: str = "bfloat16"
    seed: int = 0
    batch_size: int = 8
    model_shards: int = 1
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    overwrite: bool = False
    progress: bool = True
    # Multi-process (one process per host; unset: auto-detected, or a single process).
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # A built-in synthetic suite (d2c_jax.suite preset, built on first use) supplies whichever of
    # base_model / adapters_dir / data_dir are not given.
    suite: str | None = None
    suite_root: str = "runs/suites"

    def __post_init__(self):
        _check(bool(self.workdir), "workdir", self.workdir, "must be set")
        if not self.suite:
            for name in ("base_model", "adapters_dir", "data_dir"):
                _check(bool(getattr(self, name)), name, getattr(self, name), "must be set (or use --suite)")
        _check(self.strategy in STRATEGIES, "strategy", self.strategy, f"must be one of {STRATEGIES}")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        _check(0.0 < self.density <= 1.0, "density", self.density, "must be in (0, 1]")
        _check(self.examples_per_task >= 1, "examples_per_task", self.examples_per_task, "must be >= 1")
        _check(self.max_seq_len >= 2, "max_seq_len", self.max_seq_len, "must be >= 2")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.model_shards >= 1, "model_shards", self.model_shards, "must be >= 1")
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
        self.search  # validates the engine's part too

    @property
    def search(self) -> SearchSettings:
        """The engine's settings; all_in_one is K = 1 whatever --num_clusters says."""
        return SearchSettings(
            num_clusters=1 if self.strategy == "all_in_one" else self.num_clusters,
            iterations=self.iterations if self.strategy in SEARCH_STRATEGIES else 0,
            objective=self.objective,
            population=self.population,
            proposals=self.proposals,
            exchange_every=self.exchange_every,
            track_every=self.track_every,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def result_settings(self) -> dict[str, Any]:
        """The settings that a checkpoint must share with this run to be resumed by it."""
        return {name: getattr(self, name) for name in RESULT_SETTINGS}


def _check(ok: bool, flag: str, value: Any, message: str) -> None:
    if not ok:
        raise UserError(None, f"--{flag}={value}: {message}")
