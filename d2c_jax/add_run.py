"""launch/add.py: new adapters (or a removed task) for a finished run, as a new version of its outputs.

Shapes: N adapters (the run's, then the new ones stacked after them), K clusters.

Order of work (every check before anything is written):
  1. the run (RUN/partition.json: its tasks, their adapter and data directories, merge settings);
     the request's fingerprint (the new adapters' files and examples, the flags): a run whose
     last change had this fingerprint is reported (exit 0);
  2. each new adapter read and checked against the base model and the run (same base model, rank
     at most the run's, only modules the run adapts, a task name not in the run); its examples;
  3. RUN locked; leftovers of killed writes removed; the current version kept as
     RUN/versions/<v>/ (partition.json, merged/, assignment.png), once;
  4. each new adapter placed in order (`online.place`), then `--remove`, then the optional
     refinement search; progress saved in RUN/adding/ after every step (`state.json`, the
     refinement's checkpoints), so SIGTERM / SIGINT / a crash resumes there on the same command;
  5. RUN/versions/<v+1>/ written whole, then published: merged/, assignment.png and partition.json
     (last) replaced atomically at the top of RUN. A crash before the last rename leaves version v
     in place; the same command then publishes v+1.
Clusters whose members did not change keep their merged adapters (hard links to the previous
version's files: tuned weights or factors stay as they were); changed clusters are merged again
with the run's operator and, in a run with tuned merges (partition.json "tuning"), tuned again with
the run's tuning settings (config.json's tune_* flags) on that cluster alone: its adapters and its
tasks' search examples, each task loaded on its own and stacked (`tune_cluster`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from d2c_jax import budget as budget_lib
from d2c_jax import compilation_cache, data, hf_io, lora, merge, online, output_guard, plots, signals, tune
from d2c_jax.atomic_io import is_leftover, remove_path, write_bytes_atomic, write_dir_atomic, write_text_atomic
from d2c_jax.checkpoint import Checkpointer
from d2c_jax.config_flags import setting
from d2c_jax.errors import UserError
from d2c_jax.fingerprint import run_fingerprint
from d2c_jax.models.config import load_config
from d2c_jax.run_config import OBJECTIVES
from d2c_jax.scoring import Scorer
from d2c_jax.signals import PreemptionFlag
from d2c_jax.workdir_lock import WorkdirLock

PARTITION, MERGED, ASSIGNMENT_PNG = "partition.json", "merged", "assignment.png"
VERSIONS, ADDING, STATE = "versions", "adding", "state.json"


@dataclasses.dataclass(frozen=True)
class AddConfig:
    """The settings of launch/add.py (its flags are generated from these fields)."""

    workdir: str = setting(help="A finished run's --workdir (holds partition.json and merged/).", required=True)
    adapters: tuple[str, ...] = setting((), "New PEFT adapter directories, comma-separated, placed in this order "
                                        "(each directory's name is its task name).")
    data_dir: str | None = setting(None, "Directory with <task>.jsonl examples of the new tasks (may hold other "
                                   "tasks' files too).")
    remove: str = setting("", "A task to take out of the run: its cluster is merged again without it.")
    refine_iterations: int = setting(0, "After placing, this many D²C search iterations from the new partition "
                                     "(any task may move; 0: none).")
    objective: str = setting("", "Placement objective (local | global; default: the run's).")
    batch_size: str = setting("auto", "Largest number of evaluation requests per accelerator call.")
    compilation_cache: str = setting("", "Persistent XLA compilation cache directory ('': the run's "
                                     "--compilation_cache, so that the add reuses what the search compiled; "
                                     "'none': off).")
    progress: bool = setting(True, "Show a progress bar during refinement.")

    def __post_init__(self):
        if not self.workdir:
            raise UserError(None, "--workdir must be set")
        output_guard.refuse_bucket(self.workdir, "--workdir", "launch/add.py")
        if not self.adapters and not self.remove:
            raise UserError(None, "nothing to do: give --adapters (with --data_dir) and/or --remove")
        if self.adapters and not self.data_dir:
            raise UserError(None, "--data_dir must be set with --adapters (the new tasks' examples)")
        if self.refine_iterations < 0:
            raise UserError(None, f"--refine_iterations={self.refine_iterations}: must be >= 0")
        if self.objective not in ("",) + OBJECTIVES:
            raise UserError(None, f"--objective={self.objective}: must be one of {OBJECTIVES}")


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run as partition.json describes its current version."""

    workdir: str
    doc: dict[str, Any]
    names: tuple[str, ...]  # the run's tasks, in partition.json's task_losses order
    adapter_dirs: dict[str, str]
    data_dirs: dict[str, str]

    @property
    def version(self) -> int:
        return int(self.doc.get("version", 0))

    @property
    def partition_n(self) -> np.ndarray:
        where = {t: k for k, tasks in enumerate(self.doc["clusters"]) for t in tasks}
        return np.array([where[n] for n in self.names], np.int32)

    @property
    def max_clusters(self) -> int:
        return int(self.doc.get("max_clusters", self.doc["num_clusters"]))

    def cluster_limit(self, adapters: lora.AdapterSet) -> int:
        """The most clusters a change may leave: the run's K or, for a run of the budget mode, as
        many merged adapters of its rank as its budget holds over `adapters` (a percentage budget
        grows with N)."""
        budget = self.doc.get("budget")
        if not budget:
            return self.max_clusters
        limit = budget_lib.budget_bytes(adapters, budget.get("percent"), budget.get("mb"))
        rank = int(self.doc.get("output_rank") or adapters.rank)
        fits = limit // budget_lib.storage_bytes(adapters, 1, rank)
        return max(self.max_clusters, int(min(fits, adapters.num_adapters - 1)))


def read_run(workdir: str) -> Run:
    path = os.path.join(workdir, PARTITION)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UserError(workdir, "holds no finished run (no partition.json); run launch/search.py first") from None
    except (OSError, ValueError) as e:
        raise UserError(path, f"cannot read it: {e}") from None
    need = ("clusters", "num_clusters", "task_losses", "merge", "density", "base_model")
    missing = [k for k in need if k not in doc]
    if missing:
        raise UserError(path, f"has no {', '.join(missing)} (written by an older version?)")
    names = tuple(doc["task_losses"])
    if sorted(names) != sorted(t for c in doc["clusters"] for t in c):
        raise UserError(path, "its clusters and task_losses name different tasks")
    adapter_dirs = doc.get("adapter_dirs") or {n: os.path.join(doc["adapters_dir"], n) for n in names}
    data_dirs = doc.get("data_dirs") or {n: doc["data_dir"] for n in names}
    return Run(os.path.abspath(workdir), doc, names, dict(adapter_dirs), dict(data_dirs))


def _new_names(cfg: AddConfig) -> list[str]:
    dirs = [os.path.abspath(d) for d in cfg.adapters]
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(d, "adapter directory does not exist")
    seen = set()
    for d, n in zip(dirs, names):
        if n in seen:
            raise UserError(d, f"task {n!r} is given twice in --adapters")
        seen.add(n)
    return names


def _request_fingerprint(run: Run, cfg: AddConfig, names: Sequence[str]) -> str:
    """sha256 of what decides the outcome: the new adapters' files, their examples, the flags."""
    dirs = {n: os.path.abspath(d) for n, d in zip(names, cfg.adapters)}
    examples = {}
    for n in names:
        path = data.data_file(cfg.data_dir, n, "search")
        if not os.path.isfile(path):
            raise UserError(cfg.data_dir, f"no search examples for new task {n} (expected {n}.jsonl)")
        examples[n] = [(p, r) for _, p, r in data.read_examples(path, run.doc.get("examples_per_task"))]
    settings = {"adapters": [dirs[n] for n in names], "remove": cfg.remove,
                "refine_iterations": cfg.refine_iterations, "objective": cfg.objective}
    fp = run_fingerprint(run.doc["base_model"], dirs, examples, settings)
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def check_new_adapter(adapter: lora.Adapter, run_set: lora.AdapterSet) -> None:
    """A new adapter must fit the run: same base model (adapter_config.json), rank at most the run's,
    only modules the run adapts."""
    cfg_path = os.path.join(adapter.path, lora.CONFIG_NAME)
    lora.check_same_base([_adapter_of(run_set, 0), adapter])
    if adapter.rank > run_set.rank:
        raise UserError(cfg_path, f"rank r={adapter.rank} is larger than the run's adapters' rank {run_set.rank}; "
                        "its merges would not fit the run's merged adapters")
    extra = sorted(set(adapter.a) - set(run_set.a))
    if extra:
        raise UserError(cfg_path, f"adapts {', '.join(extra)}, which the run's adapters do not "
                        f"(they adapt {', '.join(run_set.a)})")


# ----------------------------------------------------------------------------- tuned merges


def tune_settings(run: Run) -> tune.TuneSettings | None:
    """The run's tuning settings, None for a run with unit-weight merges: partition.json's
    tuning.settings (a version written by this module), else the search's config.json flags."""
    tuning = run.doc.get("tuning")
    if not tuning:
        return None
    settings = tuning.get("settings")
    if settings is None:
        need = "the run tuned its merges but its tuning settings cannot be read"
        flags = search_flags(run, need)
        try:
            settings = {f: flags[f"tune_{f}"] for f in ("granularity", "steps", "learning_rate", "holdout")}
        except KeyError as e:
            raise UserError(os.path.join(run.workdir, "config.json"), f"{need}: no flag {e}") from None
    return tune.TuneSettings(**settings)


def search_flags(run: Run, need: str | None = None) -> dict[str, Any]:
    """The run's search flags (config.json). Unreadable: {} where the caller has defaults (`need`
    None), else one line naming the file and what the flags were needed for."""
    path = os.path.join(run.workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            flags = json.load(f)
        if not isinstance(flags, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if need is None:
            return {}
        raise UserError(path, f"{need}: {e}") from None
    return flags


def _data_kw(doc: Mapping[str, Any]) -> dict[str, Any]:
    """load_task_data's settings of the run's search examples."""
    return dict(split="search", examples_per_task=doc.get("examples_per_task", 10),
                max_seq_len=doc.get("max_seq_len", 1024), chat_template=bool(doc.get("chat_template", False)),
                extra_ok=True)


def tune_cluster(params: Any, model_cfg: Any, tokenizer: Any, doc: Mapping[str, Any], members: Sequence[str],
                 adapter_dirs: Mapping[str, str], data_dirs: Mapping[str, str], settings: tune.TuneSettings,
                 example_chunk: int | None) -> tuple[Any, tune.TuneResult]:
    """(merged lora without a K axis, TuneResult of K = 1): one cluster tuned alone with `settings`,
    as the search tunes each cluster (`tune.tune_partition`), on the cluster's adapters prepared
    with the run's operator, density, seed and output rank, and its tasks' search examples (each
    task read on its own, stacked in `members` order)."""
    aset = lora.load_adapter_dirs([adapter_dirs[t] for t in members], model_cfg)
    prepared = merge.prepare_merge(aset, doc["merge"], float(doc["density"]), seed=int(doc.get("seed", 0)),
                                   rank=int(doc.get("output_rank") or 0) or None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    task_data = data.concat_task_data([data.load_task_data(data_dirs[t], [t], tokenizer, **_data_kw(doc))
                                       for t in members], pad_id)
    part_n = np.zeros(len(members), np.int32)
    res = tune.tune_partition(params, model_cfg, prepared, task_data, part_n, 1, settings, example_chunk=example_chunk)
    lora_k = res.lora if res.lora is not None else tune.merged_clusters(prepared, part_n, 1, res.weights)
    import jax

    return jax.tree.map(lambda x: np.asarray(x)[0], lora_k), res


def tuning_doc(run: Run, clusters: Sequence[Sequence[str]], names: Sequence[str], tuned: Mapping[int, tune.TuneResult],
               settings: tune.TuneSettings, example_chunk: int | None) -> dict[str, Any]:
    """partition.json's "tuning" of a changed tuned run: per cluster the previous version's numbers
    (a kept cluster) or its new tuning's (`tuned`: {cluster: result}); weights [K, N(, L)] over
    `names` (1 outside a cluster)."""
    old = run.doc["tuning"]
    old_index = {frozenset(c): k for k, c in enumerate(run.doc["clusters"])}
    old_names = list(run.doc["task_losses"])
    per = {f: [] for f in ("kept", "unit_heldout", "tuned_heldout", "unit_fit", "tuned_fit", "best_step")}
    layers = None
    rows = []
    for k, members in enumerate(clusters):
        if k in tuned:
            res = tuned[k]
            vals = {f: x[0] for f, x in res.summary().items() if f in per}
            w = {t: np.asarray(res.weights[0][i]) for i, t in enumerate(members)}
        else:
            ko = old_index[frozenset(members)]
            vals = {f: old[f][ko] for f in per}
            w = {t: np.asarray(old["weights"][ko][old_names.index(t)]) for t in members}
        for f in per:
            per[f].append(vals[f])
        layers = layers if layers is not None else next(iter(w.values())).shape
        rows.append([w.get(t, np.ones(layers, np.float32)).tolist() for t in names])
    kept_heldout = [t if kp else u for kp, t, u in zip(per["kept"], per["tuned_heldout"], per["unit_heldout"])]
    some = next(iter(tuned.values()), None)
    return {
        **per,
        "heldout_unit_total": float(sum(per["unit_heldout"])),
        "heldout_kept_total": float(sum(kept_heldout)),
        "steps": max([int(old.get("steps", 0))] + [int(r.steps) for r in tuned.values()]),
        "seconds": round(sum(float(r.seconds) for r in tuned.values()), 3),
        "examples_fit": some.num_fit if some else old.get("examples_fit"),
        "examples_heldout": some.num_heldout if some else old.get("examples_heldout"),
        "weights": rows,
        "granularity": settings.granularity,
        "during_search": bool(old.get("during_search", False)),
        "settings": dataclasses.asdict(settings),
        "retuned": sorted(int(k) for k in tuned),
        "example_chunk": example_chunk,
    }


# ----------------------------------------------------------------------------- versions


def _link_or_copy(src: str, dst: str) -> None:
    """Files of a version never change in place (every write is a rename), so a hard link is a copy."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            _link_or_copy(os.path.join(src, name), os.path.join(dst, name))
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def archive_version(run: Run) -> None:
    """RUN/versions/<v>/ = the current version's partition.json, merged/, assignment.png (once)."""
    out = os.path.join(run.workdir, VERSIONS, str(run.version))
    if os.path.isdir(out):
        return

    def write(tmp: str) -> None:
        for name in (PARTITION, MERGED, ASSIGNMENT_PNG):
            if os.path.exists(os.path.join(run.workdir, name)):
                _link_or_copy(os.path.join(run.workdir, name), os.path.join(tmp, name))

    write_dir_atomic(out, write, what=f"version {run.version} copy")


def publish(workdir: str, version_dir: str) -> None:
    """The top of RUN becomes version_dir's outputs: merged/ and the figure, then partition.json last."""
    write_dir_atomic(os.path.join(workdir, MERGED), lambda tmp: _link_or_copy(os.path.join(version_dir, MERGED), tmp),
                     what="merged adapters")
    with open(os.path.join(version_dir, ASSIGNMENT_PNG), "rb") as f:
        write_bytes_atomic(os.path.join(workdir, ASSIGNMENT_PNG), f.read())
    with open(os.path.join(version_dir, PARTITION), encoding="utf-8") as f:
        write_text_atomic(os.path.join(workdir, PARTITION), f.read())


def _remove_leftovers(*dirs: str) -> None:
    for d in dirs:
        if os.path.isdir(d):
            for name in os.listdir(d):
                if is_leftover(name):
                    remove_path(os.path.join(d, name))


# ----------------------------------------------------------------------------- the command


def add(cfg: AddConfig) -> int:
    """Runs (or resumes, or reports as done) the change `cfg` asks of a finished run; the exit status."""
    start = time.perf_counter()
    run = read_run(cfg.workdir)
    new_names = _new_names(cfg)
    fp = _request_fingerprint(run, cfg, new_names)
    if (run.doc.get("change") or {}).get("fingerprint") == fp:
        print(f"already done: {os.path.join(run.workdir, PARTITION)} is version {run.version}, made by this "
              f"command from version {run.doc['change']['from_version']}")
        return 0
    for d, n in zip(cfg.adapters, new_names):
        if n in run.names:
            raise UserError(d, f"task {n!r} is already in the run (remove it first with --remove={n})")
    if cfg.remove and cfg.remove not in run.names:
        raise UserError(run.workdir, f"--remove={cfg.remove}: no such task in the run")
    if cfg.remove and len(run.names) + len(new_names) <= 1:
        raise UserError(run.workdir, f"--remove={cfg.remove} would leave the run without tasks")

    # Every input read and checked before anything is written.
    doc = run.doc
    # Before the first compilation: the search's cache, whose scorer executables fit this Scorer
    # too (scoring.slots: the padded N and T are the same unless they cross a multiple of 8).
    compilation_cache.enable(cfg.compilation_cache or search_flags(run).get("compilation_cache", "") or "")
    model_cfg = load_config(doc["base_model"])
    run_set = lora.load_adapter_dirs([run.adapter_dirs[n] for n in run.names], model_cfg)
    new_adapters = [lora.load_adapter(os.path.abspath(d), model_cfg, name=n) for d, n in zip(cfg.adapters, new_names)]
    for ad in new_adapters:
        check_new_adapter(ad, run_set)
    names = run.names + tuple(new_names)
    aset = lora.stack_adapters([_adapter_of(run_set, i) for i in range(run_set.num_adapters)] + new_adapters) \
        if new_adapters else run_set
    tokenizer = hf_io.load_tokenizer(doc["base_model"])
    task_data = _task_data(run, cfg, new_names, tokenizer)
    objective = cfg.objective or doc.get("search_objective", "local")
    prepared = merge.prepare_merge(aset, doc["merge"], float(doc["density"]), seed=int(doc.get("seed", 0)),
                                   rank=int(doc.get("output_rank") or 0) or None)
    params = hf_io.load_params(doc["base_model"], model_cfg, doc.get("dtype", "float32"))
    scorer = Scorer(params, model_cfg, prepared, task_data,
                    batch_size="auto" if cfg.batch_size == "auto" else int(cfg.batch_size))

    settings = tune_settings(run)  # a tuned run's settings, read before anything is written
    lock = WorkdirLock(run.workdir)
    lock.acquire()
    try:
        _remove_leftovers(run.workdir, os.path.join(run.workdir, VERSIONS))
        archive_version(run)
        retune = None
        if settings is not None:
            def retune(members: Sequence[str], adapter_dirs: Mapping[str, str], data_dirs: Mapping[str, str]):
                chunk = scorer.example_chunk(len(members), task_data.tokens_tns.shape[-1])
                return tune_cluster(params, model_cfg, tokenizer, doc, members, adapter_dirs, data_dirs, settings,
                                    chunk) + (chunk,)
        return _apply(cfg, run, names, new_names, objective, scorer, prepared, fp, start, run.cluster_limit(aset),
                      retune, settings)
    finally:
        lock.release()


def _adapter_of(aset: lora.AdapterSet, i: int) -> lora.Adapter:
    r = int(aset.ranks[i])
    return lora.Adapter(name=aset.names[i], path=aset.paths[i], a={m: x[i][:, :r] for m, x in aset.a.items()},
                        b={m: x[i][:, :, :r] for m, x in aset.b.items()}, rank=r, scaling=float(aset.scaling[i]),
                        base_model_path=(aset.base_model_paths or (None,) * aset.num_adapters)[i])


def _task_data(run: Run, cfg: AddConfig, new_names: Sequence[str], tokenizer: Any) -> data.TaskData:
    """The run's tasks' examples from their data directories, then the new tasks' from --data_dir."""
    kw = _data_kw(run.doc)
    groups: dict[str, list[str]] = {}
    for n in run.names:
        groups.setdefault(run.data_dirs[n], []).append(n)
    loaded = {}
    for d, tasks in groups.items():
        td = data.load_task_data(d, tasks, tokenizer, **kw)
        for t in tasks:
            loaded[t] = (td, td.index(t))
    if new_names:
        td = data.load_task_data(cfg.data_dir, list(new_names), tokenizer, **kw)
        for t in new_names:
            loaded[t] = (td, td.index(t))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts = [_one_task(*loaded[t]) for t in list(run.names) + list(new_names)]
    return data.concat_task_data(parts, pad_id)


def _one_task(td: data.TaskData, i: int) -> data.TaskData:
    import jax

    return dataclasses.replace(
        td, names=(td.names[i],), batch=jax.tree.map(lambda x: x[i:i + 1], td.batch),
        num_examples=td.num_examples[i:i + 1], num_truncated=td.num_truncated[i:i + 1], files=(td.files[i],),
        prompts=(td.prompts[i],), responses=(td.responses[i],), prompt_ids=(td.prompt_ids[i],))


def _load_state(path: str, fp: str, version: int) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if state.get("fingerprint") == fp and state.get("from_version") == version else None


def _apply(cfg: AddConfig, run: Run, names: tuple[str, ...], new_names: Sequence[str], objective: str,
           scorer: Scorer, prepared: merge.Prepared, fp: str, start: float, max_clusters: int,
           retune: Any = None, settings: tune.TuneSettings | None = None) -> int:
    workdir, doc = run.workdir, run.doc
    staging = os.path.join(workdir, ADDING)
    state_path = os.path.join(staging, STATE)
    target = os.path.join(workdir, VERSIONS, str(run.version + 1))
    state = _load_state(state_path, fp, run.version)
    if state is None and os.path.isdir(staging):
        print(f"discarding {staging}: an interrupted change of other inputs", file=sys.stderr)
        remove_path(staging)
    n_run = len(run.names)
    if state is None:
        partition_n = np.concatenate([run.partition_n, np.full(len(new_names), -1, np.int32)])
        losses = [float(doc["task_losses"][n]) for n in run.names] + [float("nan")] * len(new_names)
        state = {"fingerprint": fp, "from_version": run.version, "partition": partition_n.tolist(),
                 "losses": losses, "placements": [], "removed": None, "evaluations": 0, "seconds": 0.0}
    partition_n = np.array(state["partition"], np.int32)
    losses_n = np.array(state["losses"], np.float64)
    cache = online.seeded_cache(partition_n, losses_n)

    def save() -> None:
        state.update(partition=partition_n.tolist(), losses=[float(x) for x in losses_n])
        os.makedirs(staging, exist_ok=True)
        write_text_atomic(state_path, json.dumps(state) + "\n")

    with PreemptionFlag() as flag:
        for j, name in enumerate(new_names):
            if j < len(state["placements"]):
                continue
            t = n_run + j
            before = compilation_cache.counts()
            partition_n, placement = online.place(scorer, cache, partition_n, t, objective=objective,
                                                  max_clusters=max_clusters)
            losses_n, _ = online.task_losses(scorer, cache, partition_n)  # cached: no evaluation
            # The scorer's executables this placement compiled or read from the persistent cache.
            compiled = {k: v - before[k] for k, v in compilation_cache.counts().items()}
            state["placements"].append({"task": name, **_placement_doc(placement, partition_n), "compile": compiled})
            state["evaluations"] += placement.evaluations
            print(f"{name}: cluster {placement.cluster}{' (new)' if placement.opened else ''}, "
                  f"{placement.evaluations} evaluations, {placement.seconds:.1f} s", flush=True)
            save()
            if flag() and j + 1 < len(new_names):
                print(f"stopped by {signals.name(flag.signum)}: {j + 1} of {len(new_names)} placed, saved in "
                      f"{staging}; re-run the same command to go on", flush=True)
                return signals.exit_code(flag.signum)
        if cfg.remove and state["removed"] is None:
            t = names.index(cfg.remove)
            partition_n, evals = online.remove(scorer, cache, partition_n, t)
            losses_n[t] = np.nan
            losses_n, _ = online.task_losses(scorer, cache, partition_n)
            state["removed"] = cfg.remove
            state["evaluations"] += evals
            save()
        refined = None
        present = int(np.sum(partition_n >= 0))
        if cfg.refine_iterations and len(online.labels(partition_n)) < present:  # else no move is possible
            ckpt = Checkpointer(os.path.join(staging, "checkpoints"), every=10, keep=2,
                                fingerprint={"add": fp}, metrics_path=os.path.join(staging, "metrics.jsonl"))
            try:
                partition_n, losses_n, refined = online.refine(
                    scorer, partition_n, losses_n, cfg.refine_iterations, objective=objective,
                    seed=int(doc.get("seed", 0)) + run.version + 1, checkpointer=ckpt, should_stop=flag,
                    progress=cfg.progress)
            finally:
                ckpt.close()
            if refined.preempted:
                print(f"stopped by {signals.name(flag.signum or 15)}: refinement checkpoint saved in {staging}; "
                      "re-run the same command to resume", flush=True)
                return signals.exit_code(flag.signum)
            state["evaluations"] += refined.evaluations
        new_doc = _new_doc(run, cfg, names, new_names, partition_n, losses_n, state, fp, objective,
                           time.perf_counter() - start, max_clusters)
        tuned_loras: dict[int, Any] = {}
        if retune is not None:  # the changed clusters of a tuned run, each tuned alone
            results, chunk = {}, None
            for k in _changed_clusters(run, new_doc["clusters"]):
                members = new_doc["clusters"][k]
                print(f"tuning cluster {k} ({len(members)} tasks) with the run's settings", flush=True)
                tuned_loras[k], results[k], chunk = retune(members, new_doc["adapter_dirs"], new_doc["data_dirs"])
            new_doc["tuning"] = tuning_doc(run, new_doc["clusters"], list(new_doc["task_losses"]), results, settings,
                                           chunk)
        write_dir_atomic(target, lambda tmp: _write_version(tmp, run, new_doc, names, partition_n, prepared, scorer,
                                                            tuned_loras),
                         what=f"version {run.version + 1}")
        publish(workdir, target)
        remove_path(staging)
    print(version_line(new_doc))
    print(f"outputs in {workdir} (version {run.version} kept in {os.path.join(workdir, VERSIONS, str(run.version))})")
    return signals.exit_code(flag.signum)


def _placement_doc(p: online.Placement, partition_n: np.ndarray) -> dict[str, Any]:
    return {"cluster_label": p.cluster, "opened": p.opened, "candidates": list(p.candidates),
            "changes": list(p.changes), "evaluations": p.evaluations, "seconds": round(p.seconds, 3),
            "cluster_size": int(np.sum(partition_n == p.cluster))}


def _new_doc(run: Run, cfg: AddConfig, names: Sequence[str], new_names: Sequence[str], partition_n: np.ndarray,
             losses_n: np.ndarray, state: Mapping[str, Any], fp: str, objective: str, seconds: float,
             max_clusters: int) -> dict[str, Any]:
    partition_n = online.compact(partition_n)
    present = [i for i in range(len(names)) if partition_n[i] >= 0]
    k = len(online.labels(partition_n))
    doc = dict(run.doc)
    summ = online.summary(partition_n, losses_n)
    labels_of = {p["task"]: int(partition_n[names.index(p["task"])]) for p in state["placements"]}
    doc.update(
        version=run.version + 1,
        num_clusters=k,
        max_clusters=max_clusters,
        clusters=[[names[i] for i in np.flatnonzero(partition_n == c)] for c in range(k)],
        objective=summ["objective"],
        cluster_objectives=summ["cluster_objectives"],
        task_losses={names[i]: float(losses_n[i]) for i in present},
        adapter_dirs={**{n: run.adapter_dirs[n] for n in run.names},
                      **{n: os.path.abspath(d) for n, d in zip(new_names, cfg.adapters)}},
        data_dirs={**run.data_dirs, **{n: os.path.abspath(cfg.data_dir) for n in new_names}},
        change={
            "fingerprint": fp,
            "from_version": run.version,
            "previous_objective": float(run.doc["objective"]),
            "previous_num_tasks": len(run.names),
            "added": [{**p, "cluster": labels_of[p["task"]]} for p in state["placements"]],
            "removed": state["removed"],
            "objective": objective,
            "refine_iterations": cfg.refine_iterations,
            "evaluations": int(state["evaluations"]),
            "seconds": round(seconds, 3),
        },
        random_start_objective=None,
        all_in_one_objective=None,
    )
    for key in ("adapter_dirs", "data_dirs"):
        doc[key] = {n: doc[key][n] for n in names if partition_n[names.index(n)] >= 0}
    # Clusters whose members did not change keep their written adapters (tuned ones stay tuned);
    # the others are merged (and, in a tuned run, tuned: `_apply` replaces "tuning") again.
    changed = _changed_clusters(run, doc["clusters"])
    doc["change"]["kept_clusters"] = [k for k in range(len(doc["clusters"])) if k not in changed]
    doc.pop("tuning", None)
    return doc


def _changed_clusters(run: Run, clusters: Sequence[Sequence[str]]) -> list[int]:
    """The clusters whose members are not those of a cluster of the previous version."""
    old = {frozenset(c) for c in run.doc["clusters"]}
    return [k for k, c in enumerate(clusters) if frozenset(c) not in old]


def version_line(doc: Mapping[str, Any]) -> str:
    """The gain line of a changed run: the new objective next to the previous version's."""
    ch = doc["change"]
    n_now, n_before = len(doc["task_losses"]), ch["previous_num_tasks"]
    what = ", ".join([f"+{a['task']} -> cluster {a['cluster']}" for a in ch["added"]]
                     + ([f"-{ch['removed']}"] if ch["removed"] else []))
    return (f"version {doc['version']}: objective {doc['objective']:.4f} over {n_now} tasks "
            f"(mean {doc['objective'] / max(n_now, 1):.4f}) | version {ch['from_version']} "
            f"{ch['previous_objective']:.4f} over {n_before} tasks (mean {ch['previous_objective'] / max(n_before, 1):.4f})"
            f" | {what}; {ch['evaluations']} evaluations, {ch['seconds']:.1f} s   (summed loss, lower is better)")


def _write_version(tmp: str, run: Run, doc: Mapping[str, Any], names: Sequence[str], partition_n: np.ndarray,
                   prepared: merge.Prepared, scorer: Scorer, tuned: Mapping[int, Any]) -> None:
    """partition.json, merged/ (unchanged clusters linked from the previous version, `tuned`
    {cluster: lora} written as they are, the others merged at unit weights), assignment.png."""
    import jax

    partition_n = online.compact(partition_n)
    old = {frozenset(c): k for k, c in enumerate(run.doc["clusters"])}
    os.makedirs(os.path.join(tmp, MERGED))
    for k, members in enumerate(doc["clusters"]):
        out = os.path.join(tmp, MERGED, f"cluster_{k}")
        was = old.get(frozenset(members))
        src = os.path.join(run.workdir, MERGED, f"cluster_{was}")
        if was is not None and os.path.isdir(src):
            _link_or_copy(src, out)
            continue
        if k in tuned:
            lora_k = tuned[k]
        else:
            lora_k = jax.tree.map(np.asarray, scorer.merge(partition_n == k) if not scorer.batched
                                  else merge.merge_mask(prepared, partition_n == k))
        lora.save_peft_adapter(out, lora_k, rank=prepared.rank, alpha=prepared.rank,
                               base_model_path=run.doc["base_model"])
    idx = [i for i in range(len(names)) if partition_n[i] >= 0]
    tags = {}
    write_bytes_atomic(os.path.join(tmp, ASSIGNMENT_PNG), plots.assignment_png(
        partition_n[idx], [names[i] for i in idx], int(doc["num_clusters"]), tags,
        f"version {doc['version']}: K={doc['num_clusters']}"))
    # What this process compiled (the merges above included) and read from the persistent cache.
    doc = {**doc, "change": {**doc["change"], "compile": compilation_cache.counts()}}
    write_text_atomic(os.path.join(tmp, PARTITION), json.dumps(doc, indent=2) + "\n")
