"""Speed/memory benchmark of d2c_jax against the paper's way of working (torch + PEFT), and the
random base model + PEFT adapters + task examples it runs on.

Shapes: N adapters (= tasks), K clusters, L layers, R rank, D model dim, F mlp dim, V vocab,
n examples per task, S sequence, P chains, M proposals, C requests.

Three parts, used by `launch/benchmark.py`:

1. The fixture (`ensure_fixture`): a random Llama (`LlamaForCausalLM` built with transformers and
   saved with save_pretrained, plus a word-level tokenizer whose vocabulary is exactly V), N PEFT
   LoRA adapters (get_peft_model, lora_A and lora_B overwritten with random non-zero values,
   save_pretrained) and n random-text examples per task. Adapters come in `families` (like the
   paper's 5 task types x 8 languages): each factor is a family component plus an adapter's own,
   so weight-space clustering has something to find. It is deterministic in its settings and
   cached in `fixture_dir/<tag>/` (built in a temp dir, then renamed: never half-written).
2. The sessions: `ReferenceSession` (D²C Algorithm 1, one evaluation at a time, each a PEFT
   `add_weighted_adapter(..., "ties", density)` + `set_adapter` + forward loss + `delete_adapter`)
   and `D2cJaxSession` (our engine's `search.search_step` over the batched `scoring.Scorer`), both
   on the same proposals (the engine's random streams), so their losses and decisions can be
   compared; a D2cJaxSession also measures the global objective every strategy reaches at an
   equal budget of scorer evaluations.
3. `run_benchmark`: each session in its own spawned process (its own peak RSS), loaded one after
   the other, their timed iterations interleaved round by round so that every column sees the
   same background load of a shared machine; then the tables (`report`).

torch and peft are needed only here (the `test` extra); they are imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from d2c_jax.atomic_io import write_dir_atomic
from d2c_jax.errors import UserError

FAMILIES = ("gec", "reply", "summ", "tone", "qa")
LANGUAGES = ("en", "es", "fr", "de", "it", "zh", "ko", "ja")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MANIFEST = "manifest.json"
FIXTURE_VERSION = 1
MERGED = "d2c_merged"  # the reference's temporary merged adapter


# ---------------------------------------------------------------------------------------------
# 1. The fixture
# ---------------------------------------------------------------------------------------------


def default_heads(hidden: int) -> int:
    """Llama-like head count: head dim 64, at least 2 heads."""
    return max(2, hidden // 64)


def default_intermediate(hidden: int) -> int:
    """Llama's 8/3 * D, rounded up to a multiple of 32 (512 -> 1376)."""
    return -(-(8 * hidden) // (3 * 32)) * 32


@dataclasses.dataclass(frozen=True)
class FixtureSettings:
    """Everything the fixture depends on (its cache key)."""

    num_adapters: int = 40
    rank: int = 32
    alpha: int = 128
    hidden: int = 512
    layers: int = 8
    heads: int = 0  # 0: default_heads(hidden)
    kv_heads: int = 0  # 0: heads // 2
    intermediate: int = 0  # 0: default_intermediate(hidden)
    vocab: int = 8000
    seq_len: int = 64  # longest example in tokens (bos + prompt + response + eos)
    examples_per_task: int = 10
    families: int = 5
    family_share: float = 0.5  # variance fraction of each factor shared within a family
    b_scale: float = 0.01  # std of lora_B entries (trained adapters: small but not zero)
    seed: int = 0

    def __post_init__(self):
        if self.heads == 0:
            object.__setattr__(self, "heads", default_heads(self.hidden))
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", max(1, self.heads // 2))
        if self.intermediate == 0:
            object.__setattr__(self, "intermediate", default_intermediate(self.hidden))
        checks = [
            (self.num_adapters >= 2, "num_adapters", "must be >= 2"),
            (self.rank >= 1, "rank", "must be >= 1"),
            (self.layers >= 1, "layers", "must be >= 1"),
            (self.hidden % self.heads == 0, "hidden", f"must be a multiple of the {self.heads} heads"),
            (self.heads % self.kv_heads == 0, "kv_heads", f"must divide the {self.heads} heads"),
            (self.vocab >= 16, "vocab", "must be >= 16"),
            (self.seq_len >= 8, "seq_len", "must be >= 8"),
            (self.examples_per_task >= 1, "examples_per_task", "must be >= 1"),
            (self.families >= 1, "families", "must be >= 1"),
        ]
        for ok, flag, msg in checks:
            if not ok:
                raise UserError(None, f"--{flag}={getattr(self, flag)}: {msg}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tag(self) -> str:
        """Directory name: readable settings + a hash of all of them."""
        digest = hashlib.sha256(json.dumps(
            {"version": FIXTURE_VERSION, **dataclasses.asdict(self)}, sort_keys=True).encode()).hexdigest()
        return (f"n{self.num_adapters}-r{self.rank}-d{self.hidden}-l{self.layers}-v{self.vocab}"
                f"-s{self.seq_len}-seed{self.seed}-{digest[:10]}")


def tiny_settings(seed: int = 0) -> FixtureSettings:
    """A seconds-long configuration (smoke tests)."""
    return FixtureSettings(num_adapters=6, rank=4, alpha=16, hidden=32, layers=2, heads=4, kv_heads=2,
                           intermediate=64, vocab=64, seq_len=16, examples_per_task=3, families=2,
                           b_scale=0.05, seed=seed)


def param_count(s: FixtureSettings) -> int:
    """Parameters of the base model (tied embeddings, counted once)."""
    d, f, dh = s.hidden, s.intermediate, s.head_dim
    attn = d * s.heads * dh * 2 + d * s.kv_heads * dh * 2  # q, o + k, v
    mlp = 3 * d * f
    per_layer = attn + mlp + 2 * d  # + two RMSNorm scales
    return s.vocab * d + s.layers * per_layer + d


def adapter_param_count(s: FixtureSettings) -> int:
    """LoRA parameters of one adapter (q, k, v, o in every layer)."""
    d, kv = s.hidden, s.kv_heads * s.head_dim
    per_layer = sum(s.rank * (d + d_out) for d_out in (s.heads * s.head_dim, kv, kv, d))
    return s.layers * per_layer


def task_names(num_adapters: int, families: int) -> list[str]:
    """Adapter i is family i % F, language i // F: "gec_en", "reply_en", ... (paper-like)."""
    out = []
    for i in range(num_adapters):
        f, j = i % families, i // families
        fam = FAMILIES[f] if f < len(FAMILIES) else f"fam{f}"
        lang = LANGUAGES[j] if j < len(LANGUAGES) else f"lang{j}"
        out.append(f"{fam}_{lang}")
    return out


@dataclasses.dataclass(frozen=True)
class FixturePaths:
    root: str
    base_model: str
    adapters_dir: str
    data_dir: str
    names: tuple[str, ...]  # sorted, as load_adapter_set orders them
    settings: FixtureSettings


def fixture_paths(fixture_dir: str | os.PathLike, s: FixtureSettings) -> FixturePaths:
    root = os.path.join(os.path.abspath(str(fixture_dir)), s.tag())
    return FixturePaths(root, os.path.join(root, "base"), os.path.join(root, "adapters"),
                        os.path.join(root, "data"), tuple(sorted(task_names(s.num_adapters, s.families))), s)


def ensure_fixture(fixture_dir: str | os.PathLike, s: FixtureSettings,
                   log: Callable[[str], None] = print) -> FixturePaths:
    """The cached fixture for `s`, built first if missing (or left incomplete by a crash)."""
    paths = fixture_paths(fixture_dir, s)
    manifest = os.path.join(paths.root, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                if json.load(f).get("settings") == dataclasses.asdict(s):
                    return paths
        except (OSError, ValueError):
            pass
        raise UserError(manifest, "fixture manifest does not match its settings; delete the directory")
    if os.path.exists(paths.root):
        raise UserError(paths.root, f"exists without {MANIFEST} (incomplete fixture?); delete it")
    parent = os.path.dirname(paths.root)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(parent, f"cannot create the fixture directory: {e.strerror}") from None
    log(f"building fixture {paths.root} (one-off; cached for later runs)")
    start = time.perf_counter()

    def write(tmp: str) -> None:
        build_fixture(tmp, s)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"settings": dataclasses.asdict(s), "param_count": param_count(s),
                       "names": list(paths.names)}, f, indent=1)

    write_dir_atomic(paths.root, write, what="fixture")
    log(f"fixture built in {time.perf_counter() - start:.1f} s")
    return paths


def _require_torch():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise UserError(None, f"the benchmark needs torch and peft ({e}); install the test extra: "
                        "pip install -e '.[test]'") from None


def build_fixture(out_dir: str, s: FixtureSettings) -> None:
    """Writes base/ (HF Llama + tokenizer), adapters/<task>/ (PEFT) and data/<task>.jsonl."""
    _require_torch()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from d2c_jax.suite import tokenizer as tok_lib

    base_dir = os.path.join(out_dir, "base")
    words = [f"w{i}" for i in range(s.vocab - len(tok_lib.SPECIALS))]
    vocab = tok_lib.make_vocab(words)
    tok_lib.save_tokenizer(vocab, base_dir)

    config = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim, max_position_embeddings=max(256, s.seq_len), rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id, initializer_range=0.02,
    )
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()  # HF init: N(0, 0.02²)
    count = sum(p.numel() for p in model.parameters())
    if count != param_count(s):
        raise AssertionError(f"param_count {param_count(s)} != torch's {count}")
    model.save_pretrained(base_dir)

    # Adapters: one PeftModel; its LoRA factors are overwritten and saved once per task.
    lcfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(TARGET_MODULES),
                      lora_dropout=0.05, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    lora_params = {n: p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    rng = np.random.default_rng([s.seed, 1])
    shared = {n: rng.standard_normal((s.families,) + tuple(p.shape)).astype(np.float32)
              for n, p in lora_params.items()}
    names = task_names(s.num_adapters, s.families)
    adapters_dir = os.path.join(out_dir, "adapters")
    for i, name in enumerate(names):
        arng = np.random.default_rng([s.seed, 2, i])
        with torch.no_grad():
            for n, p in lora_params.items():
                own = arng.standard_normal(tuple(p.shape)).astype(np.float32)
                x = math.sqrt(s.family_share) * shared[n][i % s.families] + math.sqrt(1 - s.family_share) * own
                # A: PEFT's kaiming-uniform init scale, 1/sqrt(3 d_in); B: b_scale.
                std = 1.0 / math.sqrt(3 * p.shape[1]) if ".lora_A." in n else s.b_scale
                p.copy_(torch.from_numpy(std * x))
        peft_model.save_pretrained(os.path.join(adapters_dir, name))

    # Task examples: random words; total length (bos + prompt + response + eos) in [3/4 S, S].
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir)
    meta = {}
    for i, name in enumerate(names):
        drng = np.random.default_rng([s.seed, 3, i])
        with open(os.path.join(data_dir, f"{name}.jsonl"), "w") as f:
            for _ in range(s.examples_per_task):
                total = int(drng.integers((3 * s.seq_len) // 4, s.seq_len + 1))
                n_resp = max(1, (total - 2) // 3)
                n_prompt = max(1, total - 2 - n_resp)
                ids = drng.integers(0, len(words), n_prompt + n_resp)
                f.write(json.dumps({"prompt": " ".join(words[j] for j in ids[:n_prompt]),
                                    "response": " ".join(words[j] for j in ids[n_prompt:])}) + "\n")
        fam, lang = name.split("_", 1)
        meta[name] = {"metric": "rouge_l", "tags": {"family": fam, "language": lang}}
    with open(os.path.join(data_dir, "tasks.json"), "w") as f:
        json.dump(meta, f, indent=1)


# ---------------------------------------------------------------------------------------------
# 2. The runners
# ---------------------------------------------------------------------------------------------

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
        from d2c_jax.run_config import SearchSettings

        return SearchSettings(num_clusters=num_clusters, iterations=NEVER, objective=self.objective,
                              population=self.population, proposals=self.proposals,
                              exchange_every=self.exchange_every, track_every=NEVER, seed=seed)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What the benchmark runs (the fixture is separate: FixtureSettings)."""

    num_clusters: int = 5
    reference_iterations: int = 4
    iterations: int = 4  # timed engine iterations of each d2c_jax column
    population: int = 4
    proposals: int = 4
    batch_size: int = 8
    strategy_budget: int = 64  # scorer evaluations given to every search strategy
    density: float = 0.5
    dtype: str = "float32"
    seed: int = 0

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
        _require_torch()
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from d2c_jax.data import data_file, read_examples
        from d2c_jax.strategies import d2c

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


def _load_scorer(paths: FixturePaths, bench: BenchSettings, batch_size: int):
    from d2c_jax import data, hf_io, lora, merge
    from d2c_jax.scoring import Scorer

    cfg, params = hf_io.load_model(paths.base_model, bench.dtype)
    adapters = lora.load_adapter_set(paths.adapters_dir, cfg)
    tok = hf_io.load_tokenizer(paths.base_model)
    task_data = data.load_task_data(paths.data_dir, adapters.names, tok, split="search",
                                    examples_per_task=paths.settings.examples_per_task,
                                    max_seq_len=paths.settings.seq_len)
    prepared = merge.prepare_merge(adapters, "ties", bench.density)
    return Scorer(params, cfg, prepared, task_data, batch_size=batch_size, mesh=None), adapters


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
    import jax

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
    from d2c_jax.search import search_step

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
    from d2c_jax.search import LossCache

    parts = [r.state.cache.to_arrays() for r in runs]
    if not parts:
        return LossCache(num_adapters)
    return LossCache.from_arrays(num_adapters, *(np.concatenate(x) for x in zip(*parts)))


def _final_objective(scorer: Any, run: _ChainRun, num_clusters: int, cache: Any) -> dict[str, Any]:
    """Global objective of the partitions at the budget (best chain); the evaluations this needs
    are measurement, not search."""
    from d2c_jax.search import objectives, partition_losses

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
        from d2c_jax.search import initial_state

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
        from d2c_jax.search import evaluate_partition, initial_state
        from d2c_jax.strategies.baselines import baseline_partition

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
    from d2c_jax.search import check_num_clusters

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


def _fmt(x: Any, spec: str = ".3g", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, spec)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _text_table(table: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned, a
    dash line under the head row."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def speed_table(result: dict[str, Any]) -> str:
    """The side-by-side table: reference | d2c_jax paper | d2c_jax P/M."""
    cols = result["columns"]
    ref_eps, ref_best = cols[0]["evals_per_s"], cols[0]["best_evals_per_s"]
    ref_pps = cols[0]["proposals"] / cols[0]["seconds"] if cols[0]["seconds"] else None

    def per_s(c: dict[str, Any], key: str) -> float | None:
        return c[key] / c["seconds"] if c["seconds"] else None

    def dev(c: dict[str, Any]) -> str:
        m = c.get("device_memory")
        if not m or "peak_bytes_in_use" not in m:
            return "n/a (CPU)" if c["column"] != "reference" else "-"
        return f"{m['peak_bytes_in_use'] / 2**20:.0f}"

    rows = [
        ("settings", [c["settings"] for c in cols]),
        ("batch size (requests / call)", [str(c["batch_size"]) for c in cols]),
        ("iterations timed", [str(c["iterations"]) for c in cols]),
        ("proposals (moves) timed", [str(c["proposals"]) for c in cols]),
        ("scorer evaluations", [str(c["evaluations"]) for c in cols]),
        ("loss-cache hit rate", [_fmt(c["cache_hit_rate"], ".1%", "- (no cache)") for c in cols]),
        ("seconds / iteration (mean)", [_fmt(c["seconds_per_iteration"], ".2f") for c in cols]),
        ("seconds / iteration (median; best)", [f"{c['median_seconds_per_iteration']:.2f}; "
                                                f"{c['best_seconds_per_iteration']:.2f}" for c in cols]),
        ("CPU seconds / iteration (all threads)", [_fmt(c["cpu_seconds_per_iteration"], ".2f") for c in cols]),
        ("evaluations / s", [_fmt(c["evals_per_s"], ".3f") for c in cols]),
        ("speed-up, evaluations / s", [_fmt(c["evals_per_s"] / ref_eps if c["evals_per_s"] and ref_eps else None,
                                            ".2f") + "x" for c in cols]),
        ("best iteration: evaluations / s", [_fmt(c["best_evals_per_s"], ".3f") for c in cols]),
        ("speed-up, best iteration", [_fmt(c["best_evals_per_s"] / ref_best if c["best_evals_per_s"] and ref_best
                                           else None, ".2f") + "x" for c in cols]),
        ("proposals / s", [_fmt(per_s(c, "proposals"), ".3f") for c in cols]),
        ("speed-up, proposals / s", [_fmt(per_s(c, "proposals") / ref_pps if ref_pps else None, ".2f") + "x"
                                     for c in cols]),
        ("projected 200 iterations", [_minutes(200 * c["seconds_per_iteration"]) for c in cols]),
        ("first-call compile (s)", [_fmt(c["compile_s"], ".1f") for c in cols]),
        ("setup: load model+adapters+data (s)", [_fmt(c["setup_s"], ".1f") for c in cols]),
        ("peak RSS (MB)", [_fmt(c["peak_rss_mb"], ".0f") for c in cols]),
        ("device peak memory (MB)", [dev(c) for c in cols]),
    ]
    head = ["", "reference (torch+PEFT)"] + [c["column"] for c in cols[1:]]
    lines = _text_table([head] + [[name] + vals for name, vals in rows])
    b = cols[0]["per_eval_breakdown_s"]
    p = result["parity"]
    lines += [
        "",
        f"reference per evaluation: add_weighted_adapter(ties) {b['merge_s']:.2f} s + forward "
        f"{b['forward_s']:.2f} s + delete_adapter {b['delete_s']:.2f} s; torch threads {cols[0]['torch_threads']}",
        f"same (mask, task) pairs, reference vs d2c_jax paper: {p['pairs']} losses, max |diff| "
        f"{_fmt(p['max_abs_loss_diff'], '.2e')}; accept/reject decisions agree "
        f"{p['decisions_agree']}/{p['decisions_compared']}",
        "timed iterations interleaved round by round across the three columns (same background load); "
        "projections: 200 x the mean seconds / iteration (the cache hit rate grows over a real run, so "
        "d2c_jax's are upper bounds); d2c_jax's run_search also scores the initial and final partitions "
        f"(up to 2 x {result['fixture']['num_adapters']} x P evaluations), not included",
    ]
    return "\n".join(lines)


def strategy_table(result: dict[str, Any]) -> str:
    rows = result["strategies"]
    if not rows:
        return "(strategy comparison skipped: --strategy_budget=0)"
    n = result["fixture"]["num_adapters"]
    rand = next((r["objective"] for r in rows if r["strategy"] == "random"), None)
    head = ["strategy", "search evals", "iterations", "global objective", "mean task loss", "vs random"]
    table = [head]
    for r in rows:
        table.append([r["strategy"], str(r["search_evaluations"]), str(r["iterations"]), f"{r['objective']:.4f}",
                      f"{r['objective'] / n:.5f}",
                      f"{r['objective'] - rand:+.4f}" if rand is not None else "-"])
    lines = _text_table(table)
    lines.append(f"global objective = summed loss of the {n} tasks, each under its cluster's TIES merge "
                 f"(lower is better); every search strategy stopped at the first iteration reaching "
                 f"{result['bench']['strategy_budget']} scorer evaluations (or after {STALL_ITERATIONS} "
                 f"iterations without a new one); the objective's own evaluations are not counted")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    f, m = result["fixture"], result["machine"]
    return "\n".join([
        f"fixture: random Llama, {f['param_count']:,} parameters (hidden {f['hidden']}, {f['layers']} layers, "
        f"{f['heads']} heads / {f['kv_heads']} kv, mlp {f['intermediate']}, vocab {f['vocab']}, tied embeddings); "
        f"{f['num_adapters']} PEFT LoRA adapters r={f['rank']} alpha={f['alpha']} on q/k/v/o "
        f"({f['adapter_param_count']:,} parameters each); {f['examples_per_task']} examples per task, "
        f"<= {f['seq_len']} tokens; K={result['bench']['num_clusters']}, TIES density {result['bench']['density']}, "
        f"{result['bench']['dtype']}",
        f"machine: {m['cpus']} CPU(s), {m['cpu_model']}; load average {m['loadavg_start'][0]:.1f} at start, "
        f"{m['loadavg_end'][0]:.1f} at end (shared machine: timings are noisy); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ])


def report(result: dict[str, Any]) -> str:
    return "\n\n".join([header(result), speed_table(result), strategy_table(result)])
