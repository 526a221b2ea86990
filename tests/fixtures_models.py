"""Tiny random Hugging Face models and a tiny tokenizer, built offline for tests.

`make_tokenizer(out_dir)` writes a byte-level BPE tokenizer (any text tokenizes, vocab ~300) with
<s>/</s>/<pad> specials and a small chat template; `make_tiny_model(out_dir, arch, ...)` writes a
float32 Llama / Qwen2 / StableLM with every weight (biases and norm weights included) randomised
away from HF's init, so that a wrong bias, norm or transpose changes the logits visibly.
"""

from __future__ import annotations

import os
from typing import Any

# A small fixed corpus: BPE training on it is deterministic, so every call builds the same vocab.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "translate the sentence into french and answer the question",
    "summarize the following text in one short sentence please",
    "what is the capital of the country where the river flows",
    "a tiny model learns to answer simple questions about numbers and words",
    "one two three four five six seven eight nine ten",
    "hello world this is a test of the tokenizer with lowercase words",
    "question: who wrote the book? answer: the author of the story.",
    "reverse the letters, count the vowels, copy the input, sort the words",
] * 4

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TOKENIZER_JSON_CACHE: list[str] = []


def _tokenizer_json() -> str:
    """Trains (once per process) the byte-level BPE and returns its JSON serialisation."""
    if _TOKENIZER_JSON_CACHE:
        return _TOKENIZER_JSON_CACHE[0]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    _TOKENIZER_JSON_CACHE.append(tok.to_str())
    return _TOKENIZER_JSON_CACHE[0]


def _build_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tokenizer(out_dir: str | os.PathLike) -> Any:
    """Saves the tiny tokenizer into `out_dir` (save_pretrained) and returns it."""
    tok = _build_tokenizer()
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def _config(arch: str, vocab_size: int, tok, overrides: dict[str, Any]):
    from transformers import LlamaConfig, Qwen2Config, StableLmConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**{**common, "rms_norm_eps": 1e-5, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**common, "rms_norm_eps": 1e-6, **overrides})
    if arch == "stablelm":
        base = {**common, "layer_norm_eps": 1e-5, "use_qkv_bias": True, "partial_rotary_factor": 0.25}
        return StableLmConfig(**{**base, **overrides})
    raise ValueError(f"unknown arch {arch!r}")


def _randomise(model, seed: int) -> None:
    """Overwrites every parameter: matrices ~ N(0, 0.15²), embeddings ~ N(0, 0.5²),
    norm weights ~ 1 + N(0, 0.1²), biases ~ N(0, 0.1²). HF zeroes biases / ones norms."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    seed: int = 0,
    max_shard_size: str | int | None = None,
    tokenizer: Any = None,
    **config_overrides: Any,
) -> str:
    """Builds a tiny random float32 HF causal LM + tokenizer and saves both into `out_dir`.

    `config_overrides` go to the transformers config (e.g. tie_word_embeddings=True,
    rope_parameters={...}, partial_rotary_factor=0.5, use_qkv_bias=False). `max_shard_size`
    (e.g. "20KB") makes save_pretrained write sharded safetensors with an index file.
    `tokenizer(out_dir) -> tokenizer` replaces make_tokenizer (it must save what it returns).
    Returns `str(out_dir)`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = str(out_dir)
    tok = (tokenizer or make_tokenizer)(out_dir)
    cfg = _config(arch, len(tok), tok, dict(config_overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomise(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir
