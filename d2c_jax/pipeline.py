"""One search run, wired end to end: inputs → Scorer → search (or baseline) → outputs in workdir.

Order of work (every check before anything is written, so a bad input leaves nothing behind):
  1. workdir: new, empty or ours (`output_guard`: never an input, never a user's directory); a
     finished run (partition.json) with the same settings is reported (its location, exit 0: a
     retrying scheduler sees success); with other settings (OUTPUT_SETTINGS included) it is
     refused unless --overwrite;
  2. base model and adapters resolved (`inputs.resolve_sources`: Hub ids downloaded or found in
     the Hub cache, at the commits config.json recorded when resuming); adapters, task data, K,
     model config, tokenizer, examples, base weights: all read and checked; the run fingerprint
     (content hashes, Hub commits and templated prompts, `fingerprint.py`); free disk space;
  3. workdir created and locked (`workdir_lock`: one run per workdir), leftovers of interrupted
     writes removed; the checkpoint (if any) is resumed from the newest usable step, or refused
     when made from other inputs (--overwrite discards it);
  4. `search.run_search` (d2c; SIGTERM / SIGINT → checkpoint at the end of the iteration, exit 0 /
     130, see `signals`) or a baseline partition;
  5. outputs, each written atomically and by process 0 only: merged/cluster_<k>/ (PEFT),
     objective.png, assignment.png, metrics.jsonl, then partition.json last (its presence marks
     a finished run). config.json (the resolved flags and Hub commits) is written once the
     checkpoint is checked; --push_to_hub then uploads the result (`push.py`).

Multi-process (one process per host, `sharding.initialize_distributed` after the cheap checks):
every process loads the inputs and runs the same search on the global mesh; the losses come back
replicated, so every process takes the same decisions (checked at the end). --workdir must be on
storage that every host sees (NFS, a mounted bucket), or gs://: then every process works in a
staging copy of its own and process 0 pushes to the bucket (`gcs_workdir`). Checkpoints are saved and restored by all
processes together (Orbax: process 0 writes). Every other file is written by process 0 alone;
`_on_main` makes the other processes wait for it and fail with it. SIGTERM or SIGINT on any process
stops all of them at the same iteration (`sharding.any_process`).

Shapes: N adapters (= tasks), K clusters, P chains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from d2c_jax import budget as budget_lib
from d2c_jax import compilation_cache, data, hf_io, hub, lora, merge, output_guard, plots, push, signals, storage, tune
from d2c_jax.atomic_io import is_leftover, write_bytes_atomic, write_dir_atomic, write_text_atomic
from d2c_jax.atomic_io import remove_path as _remove
from d2c_jax.checkpoint import Checkpointer
from d2c_jax.metrics_log import jsonl_bytes
from d2c_jax.errors import UserError
from d2c_jax.fingerprint import run_fingerprint
from d2c_jax.gcs_workdir import GcsWorkdir
from d2c_jax.inputs import Inputs, load_inputs, resolve_sources
from d2c_jax.merge import Prepared
from d2c_jax.models.config import ModelConfig, load_config, module_shapes
from d2c_jax.run_config import SEARCH_STRATEGIES, RunConfig, default_cache_size
from d2c_jax.search import (LossCache, Scorer, SearchState, check_num_clusters, evaluate_partition,
                            find_partition)
from d2c_jax.strategies.baselines import random_baseline
from d2c_jax.scoring import device_memory_bytes, tree_bytes
from d2c_jax.sharding import (any_process, auto_model_shards, barrier, check_same_on_all_processes, from_main,
                              initialize_distributed, make_mesh)
from d2c_jax.signals import PreemptionFlag
from d2c_jax.suite import ensure_preset
from d2c_jax.types import Lora
from d2c_jax.workdir_lock import LOCK_NAME, WorkdirLock

PARTITION = "partition.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
MERGED = "merged"
CHECKPOINTS = "checkpoints"
OBJECTIVE_PNG = "objective.png"
ASSIGNMENT_PNG = "assignment.png"
OUTPUTS = (PARTITION, METRICS, OBJECTIVE_PNG, ASSIGNMENT_PNG, MERGED)


# Settings that change the outputs but not the search (so not in a checkpoint's fingerprint): a
# finished run given other values is refused, never reported as "already finished".
OUTPUT_SETTINGS = ("tune_weights", "tune_granularity", "tune_start", "tune_steps", "tune_holdout", "tune_learning_rate",
                   "tune_during_search", "all_in_one_reference", "track_every", "chat_template_date")

# ----------------------------------------------------------------------------- workdir


def is_workdir(path: str) -> bool:
    """A directory a search run of ours has used: its lock file, or our config.json."""
    lock = os.path.join(path, LOCK_NAME)
    return (os.path.isfile(lock) and not os.path.islink(lock)) or output_guard.json_keys(
        "strategy", "workdir", "num_clusters")(os.path.join(path, CONFIG))


def finished_run(workdir: str, cfg: RunConfig) -> str | None:
    """partition.json of a finished run of the same settings (None: not finished); a finished run
    of other settings is refused unless --overwrite (no side effects)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(workdir, "--workdir exists and is not a directory")
    output_guard.claim_dir(workdir, what="search workdir", flag="--workdir", ours=is_workdir, follow=True,
                           inputs=[cfg.base_model, cfg.adapters_dir, cfg.data_dir])
    for name in (*OUTPUTS, CHECKPOINTS, CONFIG, LOCK_NAME):  # never written through a link we did not make
        if os.path.islink(os.path.join(workdir, name)):
            raise UserError(os.path.join(workdir, name), "is a symbolic link, which d2c_jax never creates; refusing "
                            "to write through it — remove it (what it points to is not touched)")
    partition = os.path.join(workdir, PARTITION)
    if cfg.overwrite or not os.path.exists(partition):
        return None
    try:
        with open(os.path.join(workdir, CONFIG), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    flat = cfg.to_dict()
    wanted = {**cfg.result_settings(), "base_model": cfg.base_model, "adapters_dir": cfg.adapters_dir,
              "data_dir": cfg.data_dir, "adapters": list(cfg.adapters)}
    wanted.update({k: flat[k] for k in OUTPUT_SETTINGS if k in saved})  # (absent: written by an older version)
    for key, value in wanted.items():
        if key in ("base_model", "adapters_dir", "data_dir") and value is None:
            continue  # supplied by --suite
        if key == "chat_template_date" and not value:
            continue  # not given: the finished run's own
        if saved.get(key, [] if key == "adapters" else None) != value:
            raise UserError(workdir, f"holds a finished run with --{key}={saved.get(key)!r} (not {value!r}); "
                            "use --overwrite to replace it or choose another --workdir")
    return partition


def pin_template_date(cfg: RunConfig, workdir: str) -> RunConfig:
    """With --chat_template and no --chat_template_date: the date of the run's start, read back
    from the workdir's config.json on a resume, so that the prompts do not change with the day."""
    if not cfg.chat_template or cfg.chat_template_date:
        return cfg
    saved = None
    try:
        with open(os.path.join(workdir, CONFIG), encoding="utf-8") as f:
            saved = json.load(f).get("chat_template_date")
        datetime.date.fromisoformat(saved)
    except (OSError, ValueError, AttributeError, TypeError):
        saved = None
    return dataclasses.replace(cfg, chat_template_date=saved or data.today())


def check_disk(workdir: str, need_bytes: int) -> None:
    """Refuses a workdir on a file system without room for the outputs and checkpoints, or where
    it cannot be created (checked on the nearest existing ancestor, before anything is written)."""
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(workdir, f"cannot create --workdir: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(workdir, f"cannot create or write --workdir: {existing} is not writable")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise UserError(workdir, f"only {free / 2**20:.1f} MiB free on its file system; the outputs and "
                        f"checkpoints need about {need_bytes / 2**20:.1f} MiB")


def prepare_workdir(workdir: str, overwrite: bool, is_main: bool,
                    remote: GcsWorkdir | None = None) -> WorkdirLock | None:
    """Creates and locks the workdir (process 0), then removes leftovers of interrupted writes and,
    with --overwrite, a finished run's outputs and checkpoints. Returns the held lock (process 0).
    A gs:// workdir (`remote`, staged in `workdir`): its lock object is taken and the bucket's
    committed state pulled first (every process pulls its own copy), the result pushed back."""
    lock = WorkdirLock(workdir) if is_main else None

    def prepare() -> None:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise UserError(workdir, f"cannot create --workdir: {e.strerror}") from None
        if remote is not None:
            remote.acquire()
            remote.pull()
        lock.acquire()
        if overwrite and os.path.exists(os.path.join(workdir, PARTITION)):  # a finished run
            stale = _own_evaluation(workdir)  # of the partition about to be removed
            for name in OUTPUTS + (CHECKPOINTS,):
                _remove(os.path.join(workdir, name))
            for path in stale:
                _remove(path)
        for name in os.listdir(workdir):  # leftovers of atomic writes killed midway
            if is_leftover(name):
                _remove(os.path.join(workdir, name))
        if remote is not None:
            remote.push()  # before the other processes pull

    try:
        _on_main(prepare, "--workdir", is_main)
        if remote is not None and not is_main:
            os.makedirs(workdir, exist_ok=True)
            remote.pull()
    except BaseException:
        if lock is not None:
            lock.release()
        if remote is not None:
            remote.release()
        raise
    if any_process(not os.path.isdir(workdir)):
        raise UserError(workdir, "--workdir, created by process 0, is not visible on every host; it must be "
                        "on storage that all hosts share (NFS, a mounted bucket)")
    return lock


def _own_evaluation(workdir: str) -> list[str]:
    """The files launch/evaluate.py wrote into the run's directory (evaluation.json with its table
    and chart), each recognised as ours: by the evaluation beside it or its own content. A file of
    those names that is not ours is left alone."""
    from d2c_jax import comparison, output_guard, plots

    json_path, md_path, png_path = (os.path.join(workdir, n) for n in comparison.EVALUATION_FILES)
    ours_json = not os.path.islink(json_path) and output_guard.json_keys("tasks", "summary")(json_path)
    tests = ((json_path, lambda p: ours_json), (md_path, comparison.is_our_table), (png_path, plots.is_our_png))
    return [p for p, ours in tests if os.path.isfile(p) and not os.path.islink(p) and (ours_json or ours(p))]


def _is_main() -> bool:
    return jax.process_index() == 0


def _on_main(fn, what: str, is_main: bool) -> None:
    """Runs `fn` (a file write) on process 0 only; every process then learns whether it failed,
    so a failure ends all of them with an error instead of leaving the others waiting."""
    error = None
    if is_main:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others know
            error = e
    if any_process(error is not None):
        if error is not None:
            raise error
        raise UserError(None, f"process 0 failed to write {what}; see its output")


# ----------------------------------------------------------------------------- partition


def canonical(partition_n: np.ndarray, num_clusters: int) -> np.ndarray:
    """Relabels clusters in order of their first (lowest-index) member, so cluster 0 holds task 0."""
    partition_n = np.asarray(partition_n, np.int32)
    firsts = sorted(range(num_clusters), key=lambda k: int(np.flatnonzero(partition_n == k)[0]))
    relabel = np.empty(num_clusters, np.int32)
    relabel[firsts] = np.arange(num_clusters)
    return relabel[partition_n]


def clusters_of(partition_n: np.ndarray, names: Sequence[str], num_clusters: int) -> list[list[str]]:
    return [[names[i] for i in np.flatnonzero(partition_n == k)] for k in range(num_clusters)]


def final_table(doc: Mapping[str, Any]) -> str:
    """A short summary for the terminal, ending with what the search bought in one line."""
    lines = [f"{'cluster':>7}  {'size':>4}  {'loss sum':>10}  tasks"]
    for k, (tasks, loss) in enumerate(zip(doc["clusters"], doc["cluster_objectives"])):
        shown = ", ".join(tasks)
        if len(shown) > 70:
            shown = shown[:67] + "..."
        lines.append(f"{k:>7}  {len(tasks):>4}  {loss:>10.4f}  {shown}")
    lines.append(
        f"objective {doc['objective']:.4f} (summed loss of {sum(len(c) for c in doc['clusters'])} tasks), "
        f"strategy {doc['strategy']}, {doc['evaluations']} evaluations "
        f"({doc.get('evaluations_per_iteration', 0):.2f} per iteration), {doc['seconds']:.1f} s{_phases(doc)}"
    )
    lines.append(gain_line(doc))
    return "\n".join(lines)


def _phases(doc: Mapping[str, Any]) -> str:
    """' (load 3.1 s, search 10.2 s, ...)': where the run's seconds went (the suite build excluded)."""
    phases = doc.get("phase_seconds") or {}
    return " (" + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")" if phases else ""


def show(workdir: str, shown: Callable[[str], str] = os.path.abspath) -> int:
    """Prints a finished run's summary table and gain line again (launch/search.py --show);
    `shown`: how the workdir is named."""
    if storage.is_gcs(workdir):
        remote = GcsWorkdir(workdir)
        with remote.named(), remote.probe((PARTITION,)) as view:
            return show(view, remote.shown)
    path = os.path.join(workdir, PARTITION)
    if not os.path.isfile(path):
        ckpt = os.path.join(workdir, CHECKPOINTS)
        steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []
        where = (f"; its checkpoint of iteration {steps[-1]} is in {ckpt}: re-run the search's command to resume"
                 if steps else "")
        raise UserError(workdir, f"holds no finished run ({PARTITION}){where}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        print(final_table(doc))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(path, f"cannot read the run's summary: {e}") from None
    print(f"outputs in {shown(workdir)}")
    return 0


def gain_line(doc: Mapping[str, Any]) -> str:
    """'found X | random start Y (-d, -p %) | all-in-one Z (...)': the objective (lower is better)
    of the found partition next to the references in partition.json."""
    found = float(doc["objective"])
    parts = [f"found {found:.4f}"]
    for label, key in (("random start", "random_start_objective"), ("all-in-one", "all_in_one_objective")):
        ref = doc.get(key)
        if ref is not None:
            change = f", {100.0 * (found - ref) / ref:+.1f} %" if ref else ""
            parts.append(f"{label} {ref:.4f} ({found - ref:+.4f}{change})")
    return " | ".join(parts) + "   (summed loss, lower is better)"


def reference_objectives(scorer: Scorer, cache: LossCache, num_adapters: int, num_clusters: int,
                         seed: int, all_in_one: bool, start: str = "random") -> tuple[float, float | None, int]:
    """(random start's objective, all-in-one merge's objective or None, evaluations they cost).

    The random start is the partition the first D²C chain starts from (= --strategy=random with
    the same seed and --start); after a d2c run its losses are already in `cache`. The all-in-one
    merge costs N evaluations of one merged mask, in one scorer call."""
    start_objective, _, stats = evaluate_partition(
        scorer, random_baseline(num_adapters, num_clusters, seed, start), num_clusters, cache)
    evaluations = stats.evaluations
    merged_all = None
    if all_in_one:
        merged_all, _, stats = evaluate_partition(scorer, np.zeros(num_adapters, np.int32), 1, cache)
        evaluations += stats.evaluations
    return start_objective, merged_all, evaluations


# ----------------------------------------------------------------------------- the run


def _fingerprint(cfg: RunConfig, inputs: Inputs) -> dict[str, Any]:
    task_data = inputs.task_data
    examples = {name: list(zip(p, r)) for name, p, r in zip(task_data.names, task_data.prompts, task_data.responses)}
    return run_fingerprint(inputs.base_model, inputs.sources.adapter_dirs, examples, cfg.result_settings(),
                           revisions=inputs.sources.commits(),
                           prompt_ids=dict(zip(task_data.names, task_data.prompt_ids)))


def config_json(cfg: RunConfig, commits: Mapping[str, str]) -> str:
    """config.json: the resolved flags and the commit of every Hub input."""
    return json.dumps({**cfg.to_dict(), "hub_commits": dict(commits)}, indent=2, sort_keys=True) + "\n"


def _open_checkpointer(cfg: RunConfig, workdir: str, fp: Mapping[str, Any], num_adapters: int, is_main: bool,
                       subdir: str = "", shown: Callable[[str], str] = str):
    """The Checkpointer, after checking that the checkpoint there (if any) can be resumed by this run
    (--overwrite: discard one that cannot). `subdir`: one directory per (K, rank) of the budget mode,
    each with its own metrics log beside it; `shown`: how messages name a path."""
    directory = os.path.join(workdir, CHECKPOINTS, subdir) if subdir else os.path.join(workdir, CHECKPOINTS)
    metrics_path = os.path.join(workdir, CHECKPOINTS, f"{subdir}.{METRICS}") if subdir else os.path.join(workdir, METRICS)
    ckpt = Checkpointer(directory, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, fingerprint=fp,
                        metrics_path=metrics_path, name=shown(directory))
    error = None
    try:
        ckpt.restore(num_adapters)  # walks back to the newest usable step; kept for run_search
    except UserError as e:
        error = e
    if not any_process(error is not None):  # every process takes the same branch
        return ckpt
    ckpt.close()
    if not cfg.overwrite:
        raise error or UserError(directory, "another process cannot read the checkpoint; see its output")
    if is_main:
        print(f"--overwrite: discarding the checkpoints in {shown(directory)}", file=sys.stderr)
        _remove(directory)
    barrier("d2c_discard_checkpoints")
    return Checkpointer(directory, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, fingerprint=fp,
                        metrics_path=metrics_path, name=shown(directory))


def _need_bytes(adapters: lora.AdapterSet, num_clusters: int, cfg: RunConfig) -> int:
    """A generous estimate of what the run writes: K merged adapters (rank R, every adapted
    module), the plots and metrics, and keep_checkpoints + 1 checkpoints of the loss cache."""
    merged = sum(a.size + b.size for a, b in zip(adapters.a.values(), adapters.b.values())) // adapters.num_adapters
    cache = 64 * cfg.search.iterations * cfg.search.population * cfg.search.proposals * (adapters.num_adapters + 16)
    return 4 * merged * num_clusters + (cfg.keep_checkpoints + 1) * cache + (16 << 20)


def given_model_shards(cfg: RunConfig, num_devices: int) -> int | None:
    """A given --model_shards, checked against the devices before anything is read (None: auto)."""
    if cfg.model_shards == "auto":
        return None
    shards = int(cfg.model_shards)
    if num_devices % shards:  # one device included: the flag is refused, not ignored
        raise UserError(None, f"--model_shards={shards} must divide the {num_devices} devices")
    return shards


def model_shards(cfg: RunConfig, model_cfg: ModelConfig, num_adapters: int, modules: Sequence[str], rank: int,
                 num_devices: int, device_bytes: float) -> int:
    """--model_shards as given, or for `auto` the fewest devices per model replica whose share of
    the base weights (in --dtype) and the --merge's prepared adapters (N rank-R adapters on
    `modules`) fits a device (`sharding.auto_model_shards`; from shapes alone)."""
    if cfg.model_shards != "auto":
        return given_model_shards(cfg, num_devices)
    if num_devices == 1:
        return 1
    dims = module_shapes(model_cfg)
    prepared = merge.prepared_shapes({m: dims[m] for m in modules}, num_adapters, model_cfg.num_layers, rank,
                                     cfg.merge, out_rank=cfg.output_rank or None, density=cfg.density)
    return auto_model_shards(num_devices, device_bytes, tree_bytes(hf_io.param_shape_tree(model_cfg, cfg.dtype)),
                             tree_bytes(prepared))


def _mesh(cfg: RunConfig, inputs: Inputs):
    """The run's mesh (None on one device), from the loaded adapters' shapes."""
    if inputs.adapters is None:
        modules, rank, n = (), 0, 0
    else:
        modules, rank, n = tuple(inputs.adapters.a), inputs.adapters.rank, inputs.adapters.num_adapters
    shards = model_shards(cfg, inputs.model_cfg, n, modules, rank, jax.device_count(), device_memory_bytes())
    if jax.device_count() == 1:
        return None
    if cfg.model_shards == "auto" and _is_main():
        print(f"model shards (auto): {shards} device(s) per model replica, {jax.device_count() // shards} "
              "scoring candidates in parallel", flush=True)
    return make_mesh(num_candidate_shards=jax.device_count() // shards)


def resolve_suite(cfg: RunConfig) -> RunConfig:
    """Fills the paths that --suite supplies, building that suite on first use (cached after)."""
    if not cfg.suite:
        return cfg
    if cfg.base_model and (cfg.adapters_dir or cfg.adapters) and cfg.data_dir:  # --suite would have no effect
        raise UserError(None, f"--suite={cfg.suite} is not used: --base_model, --adapters_dir and --data_dir are all "
                        "given; drop --suite (--suite= clears one set in a flagfile)")
    print(f"suite {cfg.suite!r}: using (or building, on first use) {os.path.join(cfg.suite_root, cfg.suite)}",
          flush=True)
    paths = ensure_preset(cfg.suite, cfg.suite_root, log=lambda msg: print(f"  suite: {msg}", flush=True))
    return dataclasses.replace(
        cfg,
        base_model=cfg.base_model or paths.base_model,
        adapters_dir=cfg.adapters_dir or (None if cfg.adapters else paths.adapters_dir),
        data_dir=cfg.data_dir or paths.data_dir,
    )


def run(cfg: RunConfig) -> int:
    """Runs (or resumes) the search described by `cfg`; returns the exit status (0, also for a
    finished run found in the workdir and when SIGTERM stopped it after a checkpoint; 130 when
    SIGINT did). A gs:// workdir runs in its local staging directory (`gcs_workdir`)."""
    if not storage.is_gcs(cfg.workdir):
        return _run_in(cfg, os.path.abspath(cfg.workdir), None)
    remote = GcsWorkdir(cfg.workdir)
    with remote.named():
        return _run_in(cfg, remote.staging, remote)


@contextlib.contextmanager
def _view(workdir: str, remote: GcsWorkdir | None, inputs: Sequence[str | None]):
    """The directory the checks before the lock read (a gs:// workdir: its partition.json,
    config.json and lock object, fetched); a bucket path holding objects not of ours is refused."""
    if remote is None:
        yield workdir
        return
    output_guard.refuse_inputs(remote.url, inputs, "--workdir")
    with remote.probe((PARTITION, CONFIG, LOCK_NAME)) as view:
        if remote.found and not is_workdir(view):
            raise UserError(remote.url, "holds objects that are not a d2c_jax search run; choose a new path "
                            "for --workdir (nothing there is touched)")
        yield view


def _run_in(cfg: RunConfig, workdir: str, remote: GcsWorkdir | None) -> int:
    shown = remote.shown if remote is not None else (lambda p: p)
    if cfg.push_to_hub:
        push.check_token(cfg.push_to_hub)  # before any work
    cfg = resolve_suite(cfg)
    start = time.perf_counter()  # the run's seconds exclude the suite build
    with _view(workdir, remote, [cfg.base_model, cfg.adapters_dir, cfg.data_dir]) as view:
        done = finished_run(view, cfg)
        if done is not None:
            try:
                show(view, shown)
            except UserError:  # a partition.json without the summary (written by other tools): its path only
                pass
            print(f"already finished: {shown(done)} (use --overwrite to run again)")
            if cfg.push_to_hub and _is_main():
                if remote is not None:
                    remote.pull()  # merged/ too
                push_result(workdir, cfg)  # a push that failed before is tried again
            return 0
        cfg = pin_template_date(cfg, view)
        pinned = {} if cfg.overwrite else hub.recorded_commits(os.path.join(view, CONFIG))
    settings = cfg.engine_settings()

    # 1.-2. Every check, before anything is written (every process makes them on its own).
    sources = resolve_sources(cfg.base_model, cfg.adapters_dir, cfg.adapters, data_dir=cfg.data_dir,
                              pinned=pinned)
    names = list(sources.adapters)
    if not cfg.budget_mode:  # the budget mode chooses K itself (--num_clusters is refused with it)
        check_num_clusters(settings.num_clusters, len(names))
    data.check_tasks_match(sources.data_dir, names)
    model_cfg = load_config(sources.base_model.path)
    # Before anything touches a device: a multi-process job (when asked or auto-detected).
    initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    compilation_cache.enable(cfg.compilation_cache)  # before the first compilation (user cache dir)
    given_model_shards(cfg, jax.device_count())
    inputs = load_inputs(cfg.base_model, cfg.adapters_dir, cfg.data_dir, split="search",
                         examples_per_task=cfg.examples_per_task, max_seq_len=cfg.max_seq_len,
                         chat_template=cfg.chat_template, dtype=cfg.dtype, model_cfg=model_cfg,
                         sources=sources, template_date=cfg.chat_template_date or None)
    inputs.mesh = _mesh(cfg, inputs)  # before anything is placed (the base weights load into it)
    if inputs.names != tuple(names):
        raise UserError(cfg.adapters_dir, "the adapter directories changed while loading")
    # The budget mode has one checkpoint directory (and fingerprint) per way of filling the budget.
    fp = (_fingerprint(cfg, inputs)
          if cfg.strategy in SEARCH_STRATEGIES and not cfg.budget_mode else None)
    check_disk(workdir, _need_bytes(inputs.adapters, settings.num_clusters, cfg))
    inputs.params  # noqa: B018 - the base weights read and checked (shapes, NaN/Inf) before any write
    is_main = _is_main()

    # 3. The workdir, locked for the whole run; the checkpoint to resume.
    lock = prepare_workdir(workdir, cfg.overwrite, is_main, remote)
    ckpt = None
    try:
        if fp is not None:
            ckpt = _open_checkpointer(cfg, workdir, fp, len(names), is_main, shown=shown)
            step = ckpt.latest_step()
            if step is not None:
                if is_main:
                    print(f"resumed from iteration {step} of {settings.iterations} (checkpoint "
                          f"{shown(os.path.join(ckpt.directory, str(step)))})", flush=True)
                signals.set_note(f"the checkpoint of iteration {step} in {shown(ckpt.directory)} is kept; "
                                 "re-run the same command to resume")

        def write_config() -> None:  # after the checkpoint check: config.json always describes the checkpoints
            write_text_atomic(os.path.join(workdir, CONFIG), config_json(cfg, sources.commits()))
            if remote is not None:
                remote.push()  # and the checkpoint steps the check dropped

        _on_main(write_config, CONFIG, is_main)
        return _run(cfg, workdir, inputs, ckpt, start, is_main, loaded=time.perf_counter(), remote=remote)
    finally:
        if ckpt is not None:
            ckpt.close()
        if lock is not None:
            lock.release()
        if remote is not None and is_main:
            remote.release()


def canonical_order(partition_n: np.ndarray, num_clusters: int) -> np.ndarray:
    """int[K]: the label in `partition_n` of each cluster of `canonical(partition_n)`."""
    out = canonical(partition_n, num_clusters)
    return np.array([int(partition_n[np.flatnonzero(out == c)[0]]) for c in range(num_clusters)])


def _find(cfg: RunConfig, inputs: Inputs, ckpt: Checkpointer | None, workdir: str, is_main: bool,
          remote: GcsWorkdir | None = None):
    """(scorer, SearchResult, cfg) of the search (or baseline) at cfg's K and output rank, or the
    exit status (an int) when a signal stopped it after a checkpoint was saved (a gs:// workdir:
    each committed checkpoint is pushed to the bucket before the search goes on)."""
    shown = remote.shown if remote is not None else (lambda p: p)
    settings = dataclasses.replace(cfg.engine_settings(),
                                   cache_size=cfg.search.cache_size or default_cache_size(len(inputs.names)))
    scorer = inputs.scorer(cfg.merge, cfg.density, seed=cfg.search.seed, batch_size=cfg.scorer_batch_size,
                           rank=cfg.output_rank or None)

    def on_checkpoint(state: SearchState) -> None:  # metrics.jsonl: appended by the Checkpointer
        if remote is not None:
            _on_main(remote.push, "the checkpoint to the bucket", is_main)
        signals.set_note(f"the checkpoint of iteration {state.iteration} in {shown(ckpt.directory)} is kept; "
                         "re-run the same command to resume")

    if cfg.strategy in SEARCH_STRATEGIES:
        with PreemptionFlag() as flag:
            # A signal may reach the hosts at different iterations: they stop together at the first
            # iteration end after any of them saw it (a tiny collective per iteration).
            result = find_partition(scorer, cfg.strategy, settings, checkpointer=ckpt,
                                    should_stop=lambda: any_process(flag()), on_checkpoint=on_checkpoint,
                                    progress=cfg.progress and is_main)
        if result.preempted:
            if is_main:
                how = signals.name(flag.signum) if flag.signum else "preemption"
                print(f"stopped by {how}: checkpoint of iteration {result.state.iteration}/{settings.iterations} "
                      f"saved in {shown(ckpt.directory)}; re-run the same command to resume", flush=True)
            return signals.exit_code(flag.signum)
    else:
        # Process 0's partition for all: library k-means need not be bit-identical across hosts.
        result = find_partition(scorer, cfg.strategy, settings, inputs.adapters, agree=from_main)
    return scorer, result, cfg


def _run(cfg: RunConfig, workdir: str, inputs: Inputs, ckpt: Checkpointer | None, start: float,
         is_main: bool, loaded: float | None = None, remote: GcsWorkdir | None = None) -> int:
    names = inputs.names
    settings = cfg.engine_settings()

    # 4. Search or baseline: once, or once per (K, rank) way of filling the storage budget.
    if cfg.budget_mode:
        limit = budget_lib.budget_bytes(inputs.adapters, cfg.budget, cfg.budget_mb)
        ranks = cfg.budget_rank_list or budget_lib.default_ranks(inputs.adapters.rank,
                                                                 cfg.merge in merge.DELTA_METHODS)
        ways = budget_lib.candidates(inputs.adapters, limit, ranks)
    else:
        ways = [(settings.num_clusters, cfg.output_rank or inputs.adapters.rank)]
    found, budget_rows = None, []
    for k_way, r_way in ways:
        cfg_way = cfg if not cfg.budget_mode else dataclasses.replace(
            cfg, search=dataclasses.replace(cfg.search, num_clusters=k_way), output_rank=r_way, budget=None,
            budget_mb=None, budget_ranks="")
        if is_main and cfg.budget_mode:
            print(f"budget: K = {k_way} at rank {r_way}", flush=True)
        if cfg.budget_mode and cfg.strategy in SEARCH_STRATEGIES:
            ckpt = _open_checkpointer(cfg_way, workdir, _fingerprint(cfg_way, inputs), len(names),
                                      is_main, subdir=f"k{k_way}_r{r_way}",
                                      shown=remote.shown if remote is not None else str)
        try:
            outcome = _find(cfg_way, inputs, ckpt, workdir, is_main, remote)
        finally:
            if cfg.budget_mode and ckpt is not None:
                ckpt.close()
        if isinstance(outcome, int):  # stopped by a signal after saving a checkpoint
            return outcome
        if cfg.budget_mode:
            budget_rows.append({"num_clusters": k_way, "rank": r_way, "objective": outcome[1].objective,
                                "bytes": budget_lib.storage_bytes(inputs.adapters, k_way, r_way),
                                "evaluations": outcome[1].evaluations})
        if found is None or outcome[1].objective < found[1].objective:
            found = outcome
    searched = time.perf_counter()
    scorer, result, cfg_best = found
    settings = cfg_best.engine_settings()
    k = settings.num_clusters
    prepared = inputs.prepared(cfg_best.merge, cfg_best.density, cfg_best.search.seed, cfg_best.output_rank or None)
    partition_n, objective, task_losses_n = result.partition_n, result.objective, result.task_losses_n
    metrics, evaluations, chain = result.state.metrics, result.evaluations, result.chain
    random_start, all_in_one, reference_evaluations = reference_objectives(
        scorer, result.state.cache, len(names), k, settings.seed, cfg.all_in_one_reference, settings.start)

    referenced = time.perf_counter()
    # Learned merge weights (after the search; --tune_during_search: of every chain's partition).
    tuning, weights_k, loras_k = None, None, None
    if cfg.tune_weights or cfg.tune_during_search:
        chains = result.state.partitions_pn if cfg.tune_during_search else partition_n[None]
        res = tune.tune_partitions(inputs.params, inputs.model_cfg, prepared, inputs.task_data, chains, k, cfg.tune,
                                   example_chunk=scorer.example_chunk(len(names), inputs.task_data.tokens_tns.shape[-1]),
                                   mesh=scorer.mesh)
        best = int(np.argmin(res.chain_totals())) if cfg.tune_during_search else 0
        if cfg.tune_during_search and best != chain:  # tuning changed which chain is best
            partition_n, chain = chains[best], best
            objective, task_losses_n, _ = evaluate_partition(scorer, partition_n, k)
        # Clusters in the order of the written partition (canonical labels).
        kept = res.chain(best).clusters(canonical_order(partition_n, k))
        tuning = kept.summary()
        tuning.update(granularity=cfg.tune_granularity, during_search=cfg.tune_during_search,
                      chain_totals=[float(x) for x in res.chain_totals()])
        weights_k, loras_k = kept.weights, kept.lora  # loras_k: granularity "factors" (the tuned adapters)

    # 5. Outputs (process 0); a signal meanwhile waits until they are complete.
    partition_n = canonical(partition_n, k)
    check_same_on_all_processes((partition_n, np.float64(objective)), "the final partition")
    clusters = clusters_of(partition_n, names, k)
    doc = {
        "strategy": cfg.strategy,
        "num_clusters": k,
        "clusters": clusters,
        "objective": float(objective),
        "random_start_objective": float(random_start),
        "all_in_one_objective": None if all_in_one is None else float(all_in_one),
        "cluster_objectives": [float(sum(task_losses_n[i] for i in np.flatnonzero(partition_n == c))) for c in range(k)],
        "task_losses": {n: float(x) for n, x in zip(names, task_losses_n)},
        "search_objective": cfg.search.objective,
        "merge": cfg.merge,
        "density": cfg.density,
        "output_rank": int(prepared.rank),
        "seed": cfg.search.seed,
        "iterations": settings.iterations,
        "population": settings.population,
        "proposals": settings.proposals,
        "proposal": settings.proposal,
        "start": settings.start,
        "exchange_every": settings.exchange_every,
        "best_chain": int(chain),
        "evaluations": int(evaluations),
        "evaluations_per_iteration": round(evaluations / max(settings.iterations, 1), 3),
        "compile": compilation_cache.counts(),
        "reference_evaluations": int(reference_evaluations),
        "examples_per_task": cfg.examples_per_task,
        "max_seq_len": cfg.max_seq_len,
        "chat_template": cfg.chat_template,
        "chat_template_date": cfg.chat_template_date or None,
        "dtype": cfg.dtype,
        "base_model": cfg.base_model,
        "adapters_dir": cfg.adapters_dir,
        "adapters": list(cfg.adapters),
        "hub_commits": inputs.sources.commits(),
        "data_dir": cfg.data_dir,
        "seconds": round(time.perf_counter() - start, 3),
    }
    loaded = start if loaded is None else loaded
    phases = {"load": loaded - start, "search": searched - loaded, "references": referenced - searched}
    if tuning is not None:
        phases["tuning"] = time.perf_counter() - referenced
    doc["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
    if budget_rows:
        doc["budget"] = {"percent": cfg.budget, "mb": cfg.budget_mb, "ways": budget_rows,
                         "chosen": {"num_clusters": k, "rank": int(prepared.rank)}}
    if tuning is not None:
        doc["tuning"] = tuning
    def write() -> None:
        on_mesh = scorer.mesh is not None  # merged where the scorer placed the prepared inputs
        write_outputs(workdir, doc, partition_n, names, inputs.tags, metrics,
                      scorer.placed_prepared if on_mesh else prepared, inputs.sources.base_model.model_id, weights_k,
                      merge_fn=None if scorer.batched else scorer.merge, loras_k=loras_k,
                      mesh=scorer.mesh if on_mesh else None)
        if remote is not None:
            remote.push()  # partition.json last

    with PreemptionFlag() as flag:
        _on_main(write, "the outputs", is_main)
    if is_main:
        print(final_table(doc))
        print(f"outputs in {remote.url if remote is not None else workdir}")
        if cfg.push_to_hub:
            push_result(workdir, cfg)
    return signals.exit_code(flag.signum)


def push_result(workdir: str, cfg: RunConfig) -> None:
    """Uploads the finished run in workdir (merged/cluster_<k>/, partition.json, a model card) to
    --push_to_hub as one commit."""
    partition = os.path.join(workdir, PARTITION)
    with open(partition, encoding="utf-8") as f:
        doc = json.load(f)
    files = {PARTITION: partition}
    files.update({f"cluster_{k}": os.path.join(workdir, MERGED, f"cluster_{k}")
                  for k in range(int(doc["num_clusters"]))})
    url = push.push(cfg.push_to_hub, files, push.search_card(doc, cfg.push_to_hub, gain_line(doc)),
                    private=cfg.push_private, message=f"d2c_jax: {doc['num_clusters']} merged adapters "
                    f"({doc['strategy']}, {doc['merge']})")
    print(f"pushed to {cfg.push_to_hub}: {url}")


def write_outputs(
    workdir: str,
    doc: Mapping[str, Any],
    partition_n: np.ndarray,
    names: Sequence[str],
    tags: Mapping[str, Mapping[str, str]],
    metrics: Sequence[Mapping[str, Any]],
    prepared: Prepared,
    base_model: str,
    weights_k: Any = None,
    merge_fn: Callable[[np.ndarray], Lora] | None = None,
    loras_k: Lora | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> None:
    """merged/, plots, metrics.jsonl, then partition.json (last: it marks the run finished)."""
    write_merged(os.path.join(workdir, MERGED), partition_n, int(doc["num_clusters"]), prepared, base_model,
                 weights_k, merge_fn, loras_k, mesh)
    write_bytes_atomic(os.path.join(workdir, OBJECTIVE_PNG), plots.objective_png(
        metrics, f"{doc['strategy']} search", random_start=doc.get("random_start_objective"),
        all_in_one=doc.get("all_in_one_objective")))
    write_bytes_atomic(
        os.path.join(workdir, ASSIGNMENT_PNG),
        plots.assignment_png(partition_n, names, int(doc["num_clusters"]), tags, f"{doc['strategy']}: K={doc['num_clusters']}"),
    )
    write_bytes_atomic(os.path.join(workdir, METRICS), jsonl_bytes(metrics))
    write_text_atomic(os.path.join(workdir, PARTITION), json.dumps(doc, indent=2) + "\n")


def write_merged(out_dir: str, partition_n: np.ndarray, num_clusters: int, prepared: Prepared,
                 base_model: str, weights_k: Any = None,
                 merge_fn: Callable[[np.ndarray], Lora] | None = None, loras_k: Lora | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> None:
    """merged/cluster_<k>/ = the merge of cluster k as a PEFT adapter (with weights_k[k] when
    given: tuned merge weights); the whole directory is built beside out_dir and renamed into
    place, so no half-written merged/ is ever left. `merge_fn` (mask -> lora, e.g. the search's
    Scorer.merge, whose executables are compiled already) merges the unweighted clusters."""
    if loras_k is not None:  # tuned factors (tune.py, granularity "factors"): written as they are
        loras = jax.tree.map(np.asarray, loras_k)
    elif weights_k is None and merge_fn is not None:
        per_k = [merge_fn(partition_n == k) for k in range(num_clusters)]
        loras = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_k)
    else:
        loras = jax.tree.map(np.asarray, tune.merged_clusters(prepared, partition_n, num_clusters, weights_k, mesh))

    def write(tmp: str) -> None:
        for k in range(num_clusters):
            lora_k = jax.tree.map(lambda x: x[k], loras)
            lora.save_peft_adapter(os.path.join(tmp, f"cluster_{k}"), lora_k, rank=prepared.rank,
                                   alpha=prepared.rank, base_model_path=base_model)

    write_dir_atomic(out_dir, write, what="merged adapters")
