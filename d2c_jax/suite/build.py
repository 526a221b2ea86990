"""Builds (or reuses) a complete synthetic suite: base model, one adapter per task, task data.

Layout of a suite directory:
  base/                      HF LlamaForCausalLM checkpoint + tokenizer (word-level)
  adapters/<task>/           PEFT LoRA adapters (r, alpha as in the paper by default: 32, 128)
  data/<task>.jsonl          search examples; data/<task>.eval.jsonl held-out; data/tasks.json
  suite.json                 manifest: settings, their hash, every file's sha256, measured losses
The manifest is written last; the whole suite is built in a temp dir beside the target and swapped
in (atomic_io.write_dir_atomic), so a directory holding a suite.json always holds a complete suite.
The trainings checkpoint into a stage directory beside it (`resume`): Ctrl-C stops the build
after a checkpoint, removes the temp dir, and the same command continues from there.
Shape legend: T tasks, n examples, S sequence, F families, L languages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from d2c_jax import cached_dir
from d2c_jax.errors import UserError
from d2c_jax import signals
from d2c_jax.suite import checkpoint, resume, tasks, train
from d2c_jax.suite import tokenizer as tok_lib
from d2c_jax.types import TokenBatch

SUITE_VERSION = 3  # 3: trained in a pinned child process with BUILD_XLA_FLAGS (other weights than 2)
MANIFEST = "suite.json"
PARTS = ("base", "adapters", "data")  # a leftover of only these may be replaced
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """Everything that determines a suite's files (all of it goes into the cache key)."""

    families: int = 5
    languages: int = 8
    seed: int = 0
    # The world and the task data.
    concepts: int = 16
    min_words: int = 3
    max_words: int = 5
    search_examples: int = 10
    eval_examples: int = 24
    train_examples: int = 512
    # The base model (Llama architecture, tied embeddings, float32).
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    # Pre-training: rows are concept-chain sentences, a `task_mix` fraction are task examples.
    pretrain_steps: int = 400
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    task_mix: float = 0.4
    repeat_mix: float = 0.4  # rows that repeat a word sequence: teaches copying (induction heads)
    # Adapters (paper: r 32, alpha 128 on q/k/v/o).
    rank: int = 32
    alpha: int = 128
    adapter_steps: int = 300
    adapter_batch: int = 8
    adapter_lr: float = 7e-4
    # Fields below were added after version 3; each enters the settings hash only when it differs
    # from its default (settings_dict), so the suites built before keep their hash.
    # The suite's families by name (empty: the first `families` of tasks.FAMILIES).
    family_list: tuple[str, ...] = ()
    # Warm start: first one LoRA per language is trained for `warm_start_steps` on that language's
    # pooled examples of `warm_start_families`; then every task's adapter is fine-tuned from its
    # language's warm start (as users fine-tune from a shared language adapter). Same-language
    # adapters then share a large weight component without sharing their skill.
    warm_start_families: tuple[str, ...] = ()
    warm_start_steps: int = 0

    def __post_init__(self):  # JSON gives lists: keep the fields hashable tuples
        for name in ("family_list", "warm_start_families"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def seq_len(self) -> int:
        """Inputs of the longest example: bos fam lang : w.. = | w.. eos, minus the last token."""
        return 2 * self.max_words + 5

    def family_names(self) -> tuple[str, ...]:
        return self.family_list or tasks.FAMILIES[: self.families]

    def task_list(self) -> list[tuple[str, str, int]]:
        """(task name, family, language index), sorted by task name (the adapter order)."""
        out = [(tasks.task_name(f, j), f, j) for f in self.family_names() for j in range(self.languages)]
        return sorted(out)

    def validate(self) -> None:
        def bad(msg: str):
            raise UserError(None, f"suite settings: {msg}")

        if not 1 <= self.families <= len(tasks.FAMILIES):
            bad(f"families={self.families}; must be in [1, {len(tasks.FAMILIES)}]")
        if not 1 <= self.languages <= tasks.MAX_LANGUAGES:
            bad(f"languages={self.languages}; must be in [1, {tasks.MAX_LANGUAGES}]")
        if self.families * self.languages < 2:
            bad("a suite needs at least 2 tasks")
        if not 2 <= self.min_words <= self.max_words <= self.concepts // 2:
            bad(f"need 2 <= min_words <= max_words <= concepts/2 (got {self.min_words}, "
                f"{self.max_words}, {self.concepts})")
        for name in ("search_examples", "eval_examples", "train_examples", "pretrain_steps",
                     "pretrain_batch", "adapter_steps", "adapter_batch", "rank", "hidden_size",
                     "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            bad("hidden_size must be a multiple of num_heads, num_heads of num_kv_heads")
        if (self.hidden_size // self.num_heads) % 2:
            bad("head_dim must be even (rotary)")
        if self.family_list and len(self.family_list) != self.families:
            bad(f"family_list has {len(self.family_list)} names but families={self.families}")
        for name in (*self.family_list, *self.warm_start_families):
            if name not in tasks.FAMILIES:
                bad(f"unknown family {name!r}; known: {', '.join(tasks.FAMILIES)}")
        if len(set(self.family_list)) != len(self.family_list):
            bad("family_list names a family twice")
        if self.warm_start_steps < 0:
            bad("warm_start_steps must be >= 0")
        if bool(self.warm_start_steps) != bool(self.warm_start_families):
            bad("warm_start_steps and warm_start_families go together (both set or neither)")
        if not (0.0 <= self.task_mix and 0.0 <= self.repeat_mix and self.task_mix + self.repeat_mix <= 1.0):
            bad("task_mix and repeat_mix must be >= 0 with a sum <= 1")


# Named presets: `demo` for the quick start (configs/demo.flags), `full` as in the paper (5 × 8),
# `warm_start` a second suite made differently (docs/second_suite.md): 4 other families × 4
# languages whose adapters are fine-tuned from one warm-start LoRA per language, so that
# same-language adapters are alike in weights but not in what they do.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"families": 3, "languages": 4},
    "full": {"families": 5, "languages": 8},
    "warm_start": {"families": 4, "languages": 4, "family_list": ("rotate", "swap", "skip", "shift"),
                   "warm_start_families": ("reverse", "sort", "dedup", "copy"), "warm_start_steps": 300},
}


class SuitePaths(NamedTuple):
    """Where a suite's parts are; unpacks as (base_model, adapters_dir, data_dir, root)."""

    base_model: str
    adapters_dir: str
    data_dir: str
    root: str


def suite_paths(output_dir: str | os.PathLike) -> SuitePaths:
    root = os.path.abspath(str(output_dir))
    return SuitePaths(os.path.join(root, "base"), os.path.join(root, "adapters"),
                      os.path.join(root, "data"), root)


_LATER_FIELDS = ("family_list", "warm_start_families", "warm_start_steps")  # hashed only when set


def settings_dict(settings: SuiteSettings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    for f in dataclasses.fields(SuiteSettings):
        if f.name in _LATER_FIELDS and d[f.name] == f.default:
            del d[f.name]
    return {"version": SUITE_VERSION, **d}


def settings_hash(settings: SuiteSettings) -> str:
    blob = json.dumps(settings_dict(settings), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def read_manifest(output_dir: str | os.PathLike) -> dict | None:
    """The suite.json of `output_dir`, or None when there is none or it is unreadable."""
    return cached_dir.read_manifest(output_dir, MANIFEST)


def is_complete(output_dir: str | os.PathLike, settings: SuiteSettings) -> bool:
    """True when output_dir holds a suite of exactly these settings with every file present
    at its recorded size (cheap: no re-hashing)."""
    m = read_manifest(output_dir)
    return bool(m) and m.get("settings_hash") == settings_hash(settings) and \
        cached_dir.files_present(output_dir, m.get("files"))


def make_settings(families: int = 5, languages: int = 8, seed: int = 0, **overrides: Any) -> SuiteSettings:
    names = {f.name for f in dataclasses.fields(SuiteSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(None, f"unknown suite setting(s): {', '.join(unknown)}")
    s = SuiteSettings(families=families, languages=languages, seed=seed, **overrides)
    s.validate()
    return s


def ensure_suite(output_dir: str | os.PathLike, families: int = 5, languages: int = 8, seed: int = 0, *,
                 force: bool = False, log: Log | None = None, **overrides: Any) -> SuitePaths:
    """Returns the suite's paths, building it first unless `output_dir` already holds a complete
    suite of the same settings (then it returns at once). `overrides` are SuiteSettings fields."""
    settings = make_settings(families, languages, seed, **overrides)
    return _ensure(output_dir, settings, log, force=force)


def ensure_preset(name: str, root: str | os.PathLike = os.path.join("runs", "suites"), *,
                  log: Log | None = None) -> SuitePaths:
    """ensure_suite for a named preset ("demo", "full", "warm_start") in `root/<name>`."""
    if name not in PRESETS:
        raise UserError(None, f"unknown suite preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ensure_suite(os.path.join(str(root), name), log=log, **PRESETS[name])


# ---------------------------------------------------------------------------------------------
# Building.


def _default_log(msg: str) -> None:
    from absl import logging

    logging.info("suite: %s", msg)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_suite(output_dir: str | os.PathLike, settings: SuiteSettings, *,
                log: Log | None = None) -> SuitePaths:
    """Builds the suite into a temp dir beside `output_dir` and moves it in (always builds)."""
    return _ensure(output_dir, settings, log, force=True)


def _ensure(output_dir: str | os.PathLike, settings: SuiteSettings, log: Log | None, force: bool) -> SuitePaths:
    """A complete suite of `settings` in output_dir (cached_dir: built atomically, a suite of
    these settings that a concurrent builder installed meanwhile is kept)."""
    log = log or _default_log
    settings.validate()
    final = suite_paths(output_dir)
    built = cached_dir.ensure_dir(final.root, lambda tmp: _build_in_child(tmp, final, settings, log),
                                  manifest=MANIFEST, parts=PARTS, is_complete=lambda d: is_complete(d, settings),
                                  what="suite", force=force)
    if built:  # the checkpoints of the trainings are no longer needed
        shutil.rmtree(resume.stage_dir(final.root, settings_hash(settings)), ignore_errors=True)
    return final


class SuiteInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM stopped the suite build after its trainings were checkpointed."""


# XLA CPU settings of every suite build, whatever the caller's environment. Measured (docs/results.md,
# "Across machines"): with XLA's defaults the weights change with the number of CPUs the process may
# use (the intra-op thread count); these make the build single-threaded inside each op and keep
# every dot on XLA's own (Eigen) kernels instead of a library that picks kernels per CPU.
BUILD_XLA_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_experimental_ynn_fusion_type=-individual_dot",
)


def build_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the caller's without any XLA_* / JAX_* variable (device counts,
    matmul precision, x64, platforms...), then CPU only, BUILD_XLA_FLAGS, and this d2c_jax first
    on PYTHONPATH."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if not k.startswith(("XLA_", "JAX_"))}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(BUILD_XLA_FLAGS))
    return env


def _build_in_child(tmp: str, final: SuitePaths, s: SuiteSettings, log: Log) -> None:
    """Builds into `tmp` in a fresh Python process (`d2c_jax.suite.worker`) whose XLA runs with
    build_env(): XLA reads its flags once per process, so the caller's own (maybe already
    initialised) JAX cannot fix them. The child's output lines are passed to `log`.

    A SIGINT / SIGTERM meanwhile (the terminal sends Ctrl-C to both processes; one sent to this
    process alone is passed on) lets the child checkpoint its training and stop; then this
    raises SuiteInterrupted, and write_dir_atomic removes `tmp` on the way out."""
    stage = resume.stage_dir(final.root, settings_hash(s))
    cmd = [sys.executable, "-m", "d2c_jax.suite.worker", tmp, final.base_model,
           json.dumps(dataclasses.asdict(s)), stage]
    tail: list[str] = []
    with signals.PreemptionFlag() as flag:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=build_env()) as proc:
            done = threading.Event()

            def forward() -> None:  # a signal that reached this process only
                while not done.wait(0.2):
                    if flag() and proc.poll() is None:
                        proc.send_signal(flag.signum)
                        return

            threading.Thread(target=forward, daemon=True).start()
            try:
                for line in proc.stdout:
                    tail = (tail + [line.rstrip()])[-20:]
                    log(line.rstrip())
            finally:
                done.set()
        if flag() or proc.returncode == EXIT_STOPPED:
            log(f"stopped; the trainings' checkpoints are kept in {stage}: re-run the same command to continue "
                "from them")
            raise SuiteInterrupted(f"suite build stopped; its checkpoints are kept in {stage}: re-run the same "
                                   "command to continue from them")
    if proc.returncode != 0:
        raise RuntimeError(f"suite build process failed (exit {proc.returncode}):\n" + "\n".join(tail))


@dataclasses.dataclass(frozen=True)
class _World:
    """What every build step shares: the world, the vocabulary, the tasks and their examples."""

    world: tasks.World
    vocab: tok_lib.Vocab
    task_list: list  # (task name, family, language index), sorted by name
    splits: dict  # task name -> {"eval" | "search" | "train": [{"prompt", "response"}]}

    @property
    def names(self) -> list[str]:
        return [t[0] for t in self.task_list]


def _make_world(s: SuiteSettings) -> _World:
    world = tasks.make_world(s.seed, s.languages, s.concepts)
    vocab = tok_lib.make_vocab(tasks.reserved_words(s.languages) + [w for lex in world.words for w in lex])
    task_list = s.task_list()
    sizes = {"eval": s.eval_examples, "search": s.search_examples, "train": s.train_examples}
    splits = {name: tasks.task_splits(world, fam, lang, sizes, min_words=s.min_words,
                                      max_words=s.max_words) for name, fam, lang in task_list}
    return _World(world, vocab, task_list, splits)


EXIT_STOPPED = 130  # the worker's exit status after a signal stopped it (checkpoint saved)


def build_into(tmp: str, base_model: str, s: SuiteSettings, log: Log, stage: str | None = None,
               stop: Callable[[], bool] = lambda: False) -> None:
    """Writes the whole suite into `tmp` (the adapters name `base_model` as their base), in this
    process: `d2c_jax.suite.worker` runs it under build_env(). With `stage` the trainings
    checkpoint there and continue from there; `stop()` true: checkpoint and raise resume.Stopped."""
    t_start = time.time()
    w = _make_world(s)
    paths = suite_paths(tmp)
    _write_data(paths.data_dir, w)
    hooks: dict[str, Any] = {}
    if stage is not None:
        os.makedirs(stage, exist_ok=True)
        resume.remove_leftovers(stage)
        hooks = {part: os.path.join(stage, f"{part}.npz") for part in ("pretrain", "warm_start", "adapters")}
    log(f"data ready; pre-training {s.pretrain_steps} steps, {len(w.names)} tasks, vocab {w.vocab.size}")

    t0 = time.time()
    cfg, params, pre_losses = _pretrain_base(s, w, log, hooks.get("pretrain"), stop)
    t_pre = time.time() - t0
    config_dict = _config_dict(s, w.vocab)
    checkpoint.save_base_model(paths.base_model, params, config_dict)
    tok_lib.save_tokenizer(w.vocab, paths.base_model)

    t0 = time.time()
    scaling = s.alpha / s.rank
    lora = train.init_lora(cfg, checkpoint.ATTENTION_MODULES, s.rank, len(w.names),
                           np.random.default_rng([s.seed, 7402]))
    if s.warm_start_steps:
        lora = _warm_start(cfg, params, s, w, lora, scaling, log, hooks.get("warm_start"), stop)
    kw = _resumable(hooks.get("adapters"), lora, train.adapter_state(cfg, lora, scaling, s.adapter_lr,
                                                                     s.adapter_steps), s.adapter_steps, stop, log,
                    "adapter training")
    lora, ad_losses = train.train_adapters(cfg, params, lora, _adapter_batches(s, w), scaling=scaling,
                                           lr=s.adapter_lr, log=log, **kw)
    t_ad = time.time() - t0
    _save_adapters(paths.adapters_dir, lora, w.names, s, base_model)

    # How good is it: zero-shot vs own adapter vs the others, on the held-out split.
    ev = train.stack_batches([_task_batch(w.vocab, w.splits[n]["eval"], s.seq_len) for n in w.names])
    loss, acc = train.cross_losses(cfg, params, lora, ev, scaling=scaling)
    quality = _quality(w.task_list, loss[0], acc[0], loss[1:], acc[1:])
    quality["pretrain_final_loss"] = round(float(np.mean(pre_losses[-10:])), 4)
    quality["adapter_final_loss"] = round(float(np.mean(ad_losses[-10:])), 4)
    log(f"quality: {quality_sentence(quality['summary'])}")
    _write_manifest(tmp, s, w.names, quality)
    log(f"built {len(w.names)} tasks in {time.time() - t_start:.1f}s "
        f"(pre-training {t_pre:.1f}s, adapters {t_ad:.1f}s)")


def _write_data(data_dir: str, w: _World) -> None:
    """<task>.jsonl (search), <task>.eval.jsonl (held-out) and tasks.json."""
    os.makedirs(data_dir)
    meta = {}
    for name, fam, lang in w.task_list:
        _write_jsonl(os.path.join(data_dir, f"{name}.jsonl"), w.splits[name]["search"])
        _write_jsonl(os.path.join(data_dir, f"{name}.eval.jsonl"), w.splits[name]["eval"])
        meta[name] = {"metric": tasks.FAMILY_METRICS[fam],
                      "tags": {"family": fam, "language": tasks.language_name(lang)}}
    checkpoint.write_json(os.path.join(data_dir, "tasks.json"), meta)


def _config_dict(s: SuiteSettings, vocab: tok_lib.Vocab) -> dict[str, Any]:
    return checkpoint.llama_config_dict(
        vocab_size=vocab.size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_layers=s.num_layers, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
        max_positions=max(128, 4 * s.seq_len), bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id)


def _pretrain_base(s: SuiteSettings, w: _World, log: Log, ckpt: str | None = None,
                   stop: Callable[[], bool] = lambda: False):
    """(cfg, trained params, losses): the base model, initialised with concept-structured
    embeddings and pre-trained on the mixture of _pretrain_batches (continued from `ckpt` when
    it holds a checkpoint)."""
    cfg = checkpoint.model_config(_config_dict(s, w.vocab))
    params = train.init_params(cfg, np.random.default_rng([s.seed, 7400]))
    word_ids_lc = np.array([[w.vocab.id(x) for x in lex] for lex in w.world.words], np.int64)
    params["embed"] = train.concept_embeddings(word_ids_lc, w.vocab.size, s.hidden_size,
                                               np.random.default_rng([s.seed, 7401]))
    kw = _resumable(ckpt, params, train.pretrain_state(cfg, params, s.pretrain_lr, s.pretrain_steps),
                    s.pretrain_steps, stop, log, "pre-training")
    params, losses = train.pretrain(cfg, params, _pretrain_batches(s, w), lr=s.pretrain_lr, log=log, **kw)
    return cfg, params, losses


def _resumable(ckpt: str | None, tree: Any, state: Any, steps: int, stop: Callable[[], bool], log: Log,
               what: str) -> dict[str, Any]:
    """The resume / on_step arguments of a training that checkpoints into `ckpt` (None: none)."""
    if ckpt is None:
        return {}
    previous = resume.load(ckpt, tree, state)
    if previous is not None:
        log(f"{what}: continuing from the checkpoint of step {previous[0]}/{steps}")
    return {"resume": previous, "on_step": resume.hook(ckpt, steps, stop, log, what)}


def _save_adapters(adapters_dir: str, lora: dict, names: list[str], s: SuiteSettings,
                   base_model: str) -> None:
    """One PEFT adapter per task from the stacked raw factors {module: {"a": [T, L, R, d_in], ...}}."""
    from d2c_jax import lora as lora_lib

    os.makedirs(adapters_dir)
    lora_np = jax.tree_util.tree_map(np.asarray, lora)
    for i, name in enumerate(names):
        lora_lib.save_peft_adapter(os.path.join(adapters_dir, name),
                                   {m: {"a": v["a"][i], "b": v["b"][i]} for m, v in lora_np.items()},
                                   rank=s.rank, alpha=s.alpha, base_model_path=base_model)


def weights_hash(files: dict[str, dict[str, Any]]) -> str:
    """sha256 of the sorted {path: sha256} of the weight files (base model and adapters, the
    `*.safetensors` of the manifest's `files`): two builds trained the same weights iff it is equal
    (their other files hold absolute paths)."""
    weights = {rel: info["sha256"] for rel, info in files.items() if rel.endswith(".safetensors")}
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()


def _write_manifest(tmp: str, s: SuiteSettings, names: list[str], quality: dict) -> None:
    """suite.json, written last (the temp dir is swapped in whole): settings, hashes of every
    file, quality."""
    files = cached_dir.file_hashes(tmp)
    manifest = {
        "format": "d2c_jax.suite",
        "settings": settings_dict(s),
        "settings_hash": settings_hash(s),
        "content_hash": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        "weights_hash": weights_hash(files),
        "build": {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "paths": {"base_model": "base", "adapters_dir": "adapters", "data_dir": "data"},
        "tasks": names,
        "quality": quality,
        "files": files,
    }
    cached_dir.write_manifest(tmp, MANIFEST, manifest)


def _task_batch(vocab: tok_lib.Vocab, examples: list[dict], seq_len: int, prompt_weight: float = 0.0):
    rows = [train.example_row(vocab.prompt_ids(e["prompt"]), vocab.response_ids(e["response"]), prompt_weight)
            for e in examples]
    return train.pack_rows(rows, seq_len, vocab.pad_id)


def _pretrain_batches(s: SuiteSettings, w: _World) -> TokenBatch:
    """[steps, B, S] rows: concept-chain sentences in a random language; a `task_mix` fraction
    are task examples (loss on every token) from a pool disjoint from the search/eval data and a
    `repeat_mix` fraction are sentences said twice (copying from context: the circuit that the
    reverse / shift / copy / ... skills build on forms early and reliably)."""
    world, vocab, task_list, splits = w.world, w.vocab, w.task_list, w.splits
    rng = np.random.default_rng([s.seed, 7200])
    n = s.pretrain_steps * s.pretrain_batch
    seq = s.seq_len
    kind_u_n = rng.random(n)
    is_task_n = kind_u_n < s.task_mix
    is_repeat_n = (kind_u_n >= s.task_mix) & (kind_u_n < s.task_mix + s.repeat_mix)
    per_task = max(1, -(-int(is_task_n.sum()) // len(task_list)))
    pools = []
    for name, fam, lang in task_list:
        taken = {e["prompt"] for sp in ("eval", "search") for e in splits[name][sp]}
        pool = tasks.task_examples(world, fam, lang, "pretrain", per_task, min_words=s.min_words,
                                   max_words=s.max_words, exclude=taken)
        pools.append(_task_batch(vocab, pool, seq, prompt_weight=1.0))
    pool_b = train.stack_batches(pools)  # [T, per_task, S]
    # Sentences: bos, `length` words of a concept walk in one language, eos; then right padding.
    # A repeated sentence is its first half said twice.
    lex_ids_lc = np.array([[vocab.id(w) for w in lex] for lex in world.words], np.int64)
    walks_nw = tasks.concept_walks(world, n, seq - 1, rng)
    lengths_n = rng.integers(4, seq, size=n)  # words; + bos + eos = length + 2 <= seq + 1
    half_n = lengths_n // 2
    lengths_n = np.where(is_repeat_n, 2 * half_n, lengths_n)
    word_w = np.arange(seq - 1)[None, :]
    src_nw = np.where(is_repeat_n[:, None] & (word_w >= half_n[:, None]), word_w - half_n[:, None], word_w)
    walks_nw = np.take_along_axis(walks_nw, src_nw, axis=1)
    langs_n = rng.integers(s.languages, size=n)
    task_pick_n = rng.integers(len(task_list), size=n)
    ex_pick_n = rng.integers(per_task, size=n)
    ids_nx = np.full((n, seq + 1), vocab.pad_id, np.int64)
    ids_nx[:, 0] = vocab.bos_id
    ids_nx[:, 1:seq] = lex_ids_lc[langs_n[:, None], walks_nw]
    pos_x = np.arange(seq + 1)[None, :]
    ids_nx[pos_x == lengths_n[:, None] + 1] = vocab.eos_id
    ids_nx[pos_x > lengths_n[:, None] + 1] = vocab.pad_id
    real_nx = pos_x <= lengths_n[:, None] + 1
    inputs_ns = np.where(real_nx[:, 1:], ids_nx[:, :-1], vocab.pad_id)  # the last eos is no input
    sent = TokenBatch(inputs_ns.astype(np.int32), ids_nx[:, 1:].astype(np.int32),
                       real_nx[:, 1:].astype(np.float32), real_nx[:, 1:].astype(np.int32))
    mix = [np.where(is_task_n[:, None], getattr(pool_b, f)[task_pick_n, ex_pick_n], getattr(sent, f))
           for f in ("tokens", "targets", "weights", "attn")]
    shape = (s.pretrain_steps, s.pretrain_batch, seq)
    return TokenBatch(*(x.reshape(shape) for x in mix))


def _adapter_batches(s: SuiteSettings, w: _World) -> TokenBatch:
    """[steps, T, B, S]: each task's own training examples, response-only loss."""
    rng = np.random.default_rng([s.seed, 7300])
    per_task = train.stack_batches([_task_batch(w.vocab, w.splits[n]["train"], s.seq_len) for n in w.names])
    idx = rng.integers(s.train_examples, size=(s.adapter_steps, len(w.names), s.adapter_batch))
    t_idx = np.arange(len(w.names))[None, :, None]
    return jax.tree.map(lambda x: x[t_idx, idx], per_task)


def _warm_start_batches(s: SuiteSettings, w: _World) -> TokenBatch:
    """[steps, L, B, S]: each language's pooled training examples of the warm-start families
    (tasks that are not in the suite), response-only loss."""
    rng = np.random.default_rng([s.seed, 7500])
    sizes = {"eval": 0, "search": 0, "train": s.train_examples}
    per_lang = []
    for lang in range(s.languages):
        rows = [e for fam in s.warm_start_families
                for e in tasks.task_splits(w.world, fam, lang, sizes, min_words=s.min_words,
                                           max_words=s.max_words)["train"]]
        per_lang.append(_task_batch(w.vocab, rows, s.seq_len))
    pooled = train.stack_batches(per_lang)  # [L, n, S]
    n = pooled.tokens.shape[1]
    idx = rng.integers(n, size=(s.warm_start_steps, s.languages, s.adapter_batch))
    l_idx = np.arange(s.languages)[None, :, None]
    return jax.tree.map(lambda x: x[l_idx, idx], pooled)


def _warm_start(cfg, params, s: SuiteSettings, w: _World, lora: dict, scaling: float, log: Log,
                ckpt: str | None, stop: Callable[[], bool]) -> dict:
    """Every task's starting factors: its language's warm-start LoRA, trained from the shared
    init (the first L rows of `lora`) with the adapters' optimiser on _warm_start_batches."""
    init = jax.tree.map(lambda x: x[: s.languages], lora)
    kw = _resumable(ckpt, init, train.adapter_state(cfg, init, scaling, s.adapter_lr, s.warm_start_steps),
                    s.warm_start_steps, stop, log, "warm-start training")
    warm, _ = train.train_adapters(cfg, params, init, _warm_start_batches(s, w), scaling=scaling,
                                   lr=s.adapter_lr, log=log, **kw)
    lang_t = np.array([lang for _, _, lang in w.task_list])
    return jax.tree.map(lambda x: x[lang_t], warm)


def quality_sentence(summary: dict[str, Any]) -> str:
    """The quality summary in one short line for the terminal."""
    n = summary.get("num_tasks")
    beats = summary["tasks_where_own_beats_zero_shot"]
    of = f" of {n}" if n else ""
    return (f"own adapter beats zero-shot on {beats}{of} tasks; held-out loss {summary['own_adapter_loss']:.2f} "
            f"vs {summary['zero_shot_loss']:.2f}")


def _quality(task_list, zs_loss_t, zs_acc_t, loss_at, acc_at) -> dict[str, Any]:
    """Mean eval losses: zero-shot, own adapter, and other adapters grouped by relation."""
    fam = np.array([f for _, f, _ in task_list])
    lang = np.array([l for _, _, l in task_list])
    same_f = fam[:, None] == fam[None, :]
    same_l = lang[:, None] == lang[None, :]
    eye = np.eye(len(task_list), dtype=bool)

    def mean(mat, mask):
        return round(float(mat[mask].mean()), 4) if mask.any() else None

    summary = {
        "zero_shot_loss": round(float(zs_loss_t.mean()), 4),
        "own_adapter_loss": mean(loss_at, eye),
        "same_family_other_language_loss": mean(loss_at, same_f & ~same_l),
        "same_language_other_family_loss": mean(loss_at, ~same_f & same_l),
        "other_family_loss": mean(loss_at, ~same_f),
        "zero_shot_token_accuracy": round(float(zs_acc_t.mean()), 4),
        "own_adapter_token_accuracy": mean(acc_at, eye),
        "other_family_token_accuracy": mean(acc_at, ~same_f),
        "tasks_where_own_beats_zero_shot": int((np.diag(loss_at) < zs_loss_t).sum()),
        "num_tasks": len(task_list),
    }
    return {
        "summary": summary,
        "zero_shot_loss": [round(float(x), 4) for x in zs_loss_t],
        "loss_matrix_adapter_by_task": [[round(float(x), 4) for x in row] for row in loss_at],
    }
