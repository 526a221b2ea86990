"""Greedy KV-cache decoding equals transformers' generate(do_sample=False), token for token."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from d2c_jax.generate import generate_texts, greedy_generate, pad_prompts, resolve_eos_pad, strip_generated  # noqa: E402
from d2c_jax.hf_io import load_model, load_tokenizer  # noqa: E402
from d2c_jax.models.config import LORA_MODULES  # noqa: E402
from fixtures_adapters import peft_lora_tree  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["the quick brown fox", "hello", "what is the capital of the country"]
NEW = 10
# name -> (arch, config overrides). qwen2: q/k/v biases (also on the cached decode steps).
VARIANTS = {"llama": ("llama", {}), "stablelm": ("stablelm", {}), "qwen2": ("qwen2", {}),
            "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds each architecture once per module, lazily."""
    cache = {}

    def get(name):
        arch, overrides = VARIANTS[name]
        if name not in cache:
            d = make_tiny_model(tmp_path_factory.mktemp(name), arch, seed=4, **overrides)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None  # the tests pick EOS themselves
            cfg, params = load_model(d)
            tok = load_tokenizer(d)
            prompts = [tok(p)["input_ids"] for p in PROMPTS]
            cache[name] = (d, model, cfg, params, tok, prompts)
        return cache[name]

    return get


@pytest.fixture(params=["llama", "qwen2", "stablelm"])
def tiny(request, built):
    return built(request.param)


def _hf_generate(model, prompts, pad_id, eos_id, new=NEW) -> np.ndarray:
    """HF greedy generate on left-padded prompts → generated ids [B, new] padded with pad_id."""
    tokens, mask = pad_prompts(prompts, pad_id, side="left")
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id,
        ).numpy()[:, tokens.shape[1]:]
    full = np.full((len(prompts), new), pad_id, np.int64)
    full[:, : out.shape[1]] = out
    return full


def _ours(params, cfg, prompts, pad_id, eos_id, side, lora=None, **kw) -> np.ndarray:
    tokens, mask = pad_prompts(prompts, pad_id, side=side)
    return np.asarray(greedy_generate(params, cfg, tokens, mask, NEW, eos_id, lora, pad_token_id=pad_id, **kw))


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_matches_hf_without_eos(tiny, side):
    _, model, cfg, params, tok, prompts = tiny
    ref = _hf_generate(model, prompts, tok.pad_token_id, None)
    np.testing.assert_array_equal(_ours(params, cfg, prompts, tok.pad_token_id, None, side), ref)


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_stops_each_row_at_eos_like_hf(tiny, side):
    _, model, cfg, params, tok, prompts = tiny
    free = _hf_generate(model, prompts, tok.pad_token_id, None)
    eos = int(free[0, 3])  # a token row 0 really emits mid-way: rows stop at different steps
    ref = _hf_generate(model, prompts, tok.pad_token_id, eos)
    assert (ref == tok.pad_token_id).any(), "EOS must end at least one row early"
    ours = _ours(params, cfg, prompts, tok.pad_token_id, eos, side)
    np.testing.assert_array_equal(ours, ref)
    assert strip_generated(ours, eos)[0] == free[0, :3].tolist()


def _peft(model_dir, seeds):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = None
    for i, seed in enumerate(seeds):
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_MODULES))
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".a{i}." in name and ("lora_A" in name or "lora_B" in name):
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    model.generation_config.eos_token_id = None
    return model


def test_lora_generation_matches_peft_including_one_adapter_per_row(built):
    d, base_model, cfg, params, tok, prompts = built("llama")
    model = _peft(d, seeds=(11, 12))
    loras, refs = [], []
    for i in range(2):
        model.set_adapter(f"a{i}")
        refs.append(_hf_generate(model, prompts, tok.pad_token_id, None))
        loras.append(peft_lora_tree(model, cfg, 2.0, adapter_name=f"a{i}"))
    base_ref = _hf_generate(base_model, prompts, tok.pad_token_id, None)
    assert not np.array_equal(refs[0], base_ref) and not np.array_equal(refs[0], refs[1])
    # One adapter for the whole batch.
    np.testing.assert_array_equal(_ours(params, cfg, prompts, tok.pad_token_id, None, "left", loras[0]), refs[0])
    # A different adapter per row: rows 0, 2 use a0, row 1 uses a1.
    pick = [0, 1, 0]
    per_row = jax.tree.map(lambda *xs: jnp.stack([xs[i] for i in pick]), *loras)
    ours = _ours(params, cfg, prompts, tok.pad_token_id, None, "right", per_row, lora_per_row=True)
    np.testing.assert_array_equal(ours, np.stack([refs[i][b] for b, i in enumerate(pick)]))


def test_generate_texts_decodes_like_hf(built):
    _, model, cfg, params, tok, prompts = built("llama")
    ref = _hf_generate(model, prompts, tok.pad_token_id, tok.eos_token_id)
    want = [tok.decode([t for t in row if t != tok.pad_token_id], skip_special_tokens=True) for row in ref.tolist()]
    got = generate_texts(params, cfg, tok, None, prompts, max_new_tokens=NEW, batch_size=2)
    assert got == want and all(got)


def test_tied_embedding_qwen2_greedy_matches_hf(built):
    _, model, cfg, params, tok, prompts = built("qwen2_tied")
    assert cfg.tie_embeddings and "lm_head" not in params
    ref = _hf_generate(model, prompts, tok.pad_token_id, None)
    np.testing.assert_array_equal(_ours(params, cfg, prompts, tok.pad_token_id, None, "left"), ref)


def test_a_list_of_eos_ids_in_config_stops_rows_like_hf(tmp_path):
    """Llama 3 instruct configs list several EOS ids (eos_token_id: [128001, 128008, 128009]);
    HF's generate stops a row at any of them, and so does generate_texts (config EOS ids plus the
    tokenizer's) — each row at a different one of the listed ids."""
    from transformers import GenerationConfig

    probe_dir = make_tiny_model(tmp_path / "probe", "llama", seed=4)
    probe = AutoModelForCausalLM.from_pretrained(probe_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(probe_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    free = _hf_generate(probe, prompts, tok.pad_token_id, None)
    eos_list = sorted({int(free[0, 2]), int(free[1, 4])} - {tok.eos_token_id}) + [tok.eos_token_id]
    assert len(eos_list) == 3
    d = make_tiny_model(tmp_path / "llama3", "llama", seed=4, eos_token_id=eos_list)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert list(GenerationConfig.from_pretrained(d).eos_token_id) == eos_list
    cfg, params = load_model(d)
    assert cfg.eos_token_ids == tuple(eos_list)
    with torch.no_grad():
        tokens, mask = pad_prompts(prompts, tok.pad_token_id, side="left")
        ref = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=tok.pad_token_id).numpy()[:, tokens.shape[1]:]
    full = np.full((len(prompts), NEW), tok.pad_token_id, np.int64)
    full[:, :ref.shape[1]] = ref
    assert (full == tok.pad_token_id).any()  # some rows stopped early
    eos_ids, pad_id = resolve_eos_pad(cfg, tok)
    assert set(eos_ids) == set(eos_list)
    ours = greedy_generate(params, cfg, tokens, mask, NEW, eos_ids, pad_token_id=pad_id)
    np.testing.assert_array_equal(np.asarray(ours), full)
    want = [tok.decode(ids, skip_special_tokens=True) for ids in strip_generated(full, eos_list)]
    assert generate_texts(params, cfg, tok, None, prompts, max_new_tokens=NEW, batch_size=4) == want
    stops = strip_generated(free, eos_list)
    assert len(stops[0]) == 2 and len(stops[1]) <= 4  # rows end at different ids of the list
