"""The benchmark's fixture: a random base model, N PEFT LoRA adapters and task examples.

Shapes: N adapters (= tasks), L layers, R rank, D model dim, F mlp dim, V vocab, n examples per
task, S sequence.

`ensure_fixture` returns the cached fixture of a FixtureSettings, building it first: a random Llama
(`LlamaForCausalLM` built with transformers and saved with save_pretrained, plus a word-level
tokenizer whose vocabulary is exactly V), N PEFT LoRA adapters (get_peft_model, lora_A and lora_B
overwritten with random non-zero values, save_pretrained) and n random-text examples per task.
Adapters come in `families` (like the paper's 5 task types x 8 languages): each factor is a family
component plus an adapter's own, so weight-space clustering has something to find. It is
deterministic in its settings and cached in `fixture_dir/<tag>/` (`cached_dir`: built in a temp
dir, then renamed, never half-written). torch and peft (the `test` extra) are imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable

import numpy as np

from d2c_jax.cached_dir import ensure_dir, file_hashes, files_present, read_manifest, write_manifest
from d2c_jax.config_flags import setting
from d2c_jax.errors import UserError
from d2c_jax.suite import tokenizer as tok_lib

FAMILIES = ("gec", "reply", "summ", "tone", "qa")
LANGUAGES = ("en", "es", "fr", "de", "it", "zh", "ko", "ja")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MANIFEST = "manifest.json"
FIXTURE_VERSION = 1


def default_heads(hidden: int) -> int:
    """Llama-like head count: head dim 64, at least 2 heads."""
    return max(2, hidden // 64)


def default_intermediate(hidden: int) -> int:
    """Llama's 8/3 * D, rounded up to a multiple of 32 (512 -> 1376)."""
    return -(-(8 * hidden) // (3 * 32)) * 32


@dataclasses.dataclass(frozen=True)
class FixtureSettings:
    """Everything the fixture depends on (its cache key)."""

    num_adapters: int = setting(40, "N: adapters (= tasks).")
    rank: int = setting(32, "LoRA rank r.")
    alpha: int = setting(128, "LoRA alpha.")
    hidden: int = setting(512, "Model width; heads = hidden / 64, kv heads = heads / 2, mlp = 8/3 hidden.")
    layers: int = setting(8, "Decoder layers.")
    heads: int = setting(0, "Attention heads (0: default_heads(hidden)).")
    kv_heads: int = setting(0, "Key/value heads (0: heads // 2).")
    intermediate: int = setting(0, "MLP width (0: default_intermediate(hidden)).")
    vocab: int = setting(8000, "Vocabulary size.")
    seq_len: int = setting(64, "Longest example in tokens (examples are 3/4 to all of it).")
    examples_per_task: int = setting(10, "n: examples per task.")
    families: int = setting(5, "Adapter families (each factor: a family component plus the adapter's own).")
    family_share: float = setting(0.5, "Variance fraction of each factor shared within a family.")
    b_scale: float = setting(0.01, "Std of lora_B entries (trained adapters: small but not zero).")
    seed: int = setting(0, "Seed of the fixture and of the searches.")
    weights_dtype: str = setting("float32", "dtype of the saved base weights (float32 or bfloat16).")

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
            (self.weights_dtype in ("float32", "bfloat16"), "weights_dtype", "must be float32 or bfloat16"),
        ]
        for ok, flag, msg in checks:
            if not ok:
                raise UserError(None, f"--{flag}={getattr(self, flag)}: {msg}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tag(self) -> str:
        """Directory name: readable settings + a hash of all of them."""
        fields = dataclasses.asdict(self)
        if fields["weights_dtype"] == "float32":  # the default: the tags of fixtures built before it
            del fields["weights_dtype"]
        digest = hashlib.sha256(json.dumps(
            {"version": FIXTURE_VERSION, **fields}, sort_keys=True).encode()).hexdigest()
        return (f"n{self.num_adapters}-r{self.rank}-d{self.hidden}-l{self.layers}-v{self.vocab}"
                f"-s{self.seq_len}-seed{self.seed}-{digest[:10]}")


def tiny_settings(seed: int = 0) -> FixtureSettings:
    """A seconds-long configuration (smoke tests)."""
    return FixtureSettings(num_adapters=6, rank=4, alpha=16, hidden=32, layers=2, heads=4, kv_heads=2,
                           intermediate=64, vocab=64, seq_len=16, examples_per_task=3, families=2,
                           b_scale=0.05, seed=seed)


def llama3b_settings(seed: int = 0) -> FixtureSettings:
    """Llama-3.2-3B's shapes (D 3072, 28 layers, 24 heads / 8 KV heads of 128, F 8192, V 128256,
    tied embeddings: 3.21 B parameters) in bfloat16, 40 rank-32 q/k/v/o adapters and 10 examples
    of 225-300 tokens per task: the accelerator figure of docs/performance.md."""
    return FixtureSettings(num_adapters=40, hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192,
                           vocab=128256, seq_len=300, weights_dtype="bfloat16", seed=seed)


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
    settings = dataclasses.asdict(s)

    def is_complete(root: str) -> bool:
        m = read_manifest(root, MANIFEST)
        return bool(m) and m.get("settings") == settings and files_present(root, m.get("files"))

    def write(tmp: str) -> None:
        log(f"building fixture {paths.root} (one-off; cached for later runs)")
        start = time.perf_counter()
        build_fixture(tmp, s)
        write_manifest(tmp, MANIFEST, {"settings": settings, "param_count": param_count(s),
                                       "names": list(paths.names), "files": file_hashes(tmp)})
        log(f"fixture built in {time.perf_counter() - start:.1f} s")

    ensure_dir(paths.root, write, manifest=MANIFEST, parts=("base", "adapters", "data"),
               is_complete=is_complete, what="fixture")
    return paths


def require_torch():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise UserError(None, f"the benchmark needs torch and peft ({e}); install the test extra: "
                        "pip install -e '.[test]'") from None


def build_fixture(out_dir: str, s: FixtureSettings) -> None:
    """Writes base/ (HF Llama + tokenizer), adapters/<task>/ (PEFT) and data/<task>.jsonl."""
    require_torch()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

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
    # HF init: N(0, 0.02²); on a GPU when there is one (a 3B model initialises in seconds there).
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, s.weights_dtype)).eval()
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
