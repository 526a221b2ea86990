"""Our JAX decoder's logits equal transformers' (torch float32) and PEFT's on tiny random models."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from d2c_jax.hf_io import load_model  # noqa: E402
from d2c_jax.models import decoder  # noqa: E402
from d2c_jax.models.config import LORA_MODULES  # noqa: E402
from fixtures_adapters import peft_lora_tree  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from tolerances import FORWARD_RTOL  # noqa: E402

LENGTHS = (12, 7, 4)  # right-padded batch of different lengths
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)
CASES = {
    "llama_gqa_untied": ("llama", {}),
    "llama_tied_rope_llama3": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "qwen2_qkv_bias": ("qwen2", {}),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "stablelm_partial025_bias": ("stablelm", dict(partial_rotary_factor=0.25, use_qkv_bias=True)),
    "stablelm_partial05_nobias": ("stablelm", dict(partial_rotary_factor=0.5, use_qkv_bias=False)),
}
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
_forward = jax.jit(decoder.forward, static_argnums=1)


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    s = max(LENGTHS)
    mask_bs = (np.arange(s)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    tokens_bs = np.where(mask_bs == 1, rng.integers(3, vocab, size=(len(LENGTHS), s)), 0)
    return tokens_bs, mask_bs


def _hf_logits(model, tokens_bs, mask_bs) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens_bs), attention_mask=torch.tensor(mask_bs))
    return out.logits.float().numpy()


def _max_err(ours_bsv, ref_bsv) -> float:
    """Max |difference| over the real (unpadded) positions only."""
    return max(float(np.abs(ours_bsv[b, :n] - ref_bsv[b, :n]).max()) for b, n in enumerate(LENGTHS))


def _tol(ref_bsv) -> float:
    """Two float32 forwards differ by FORWARD_RTOL (tolerances.py) of the largest real |logit|."""
    return FORWARD_RTOL * max(float(np.abs(ref_bsv[b, :n]).max()) for b, n in enumerate(LENGTHS))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds each case once per module, lazily: name -> (name, dir, hf model, cfg, params)."""
    cache = {}

    def get(name):
        if name not in cache:
            arch, overrides = CASES[name]
            d = make_tiny_model(tmp_path_factory.mktemp(name), arch, seed=1, **overrides)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            cfg, params = load_model(d, "float32")
            cache[name] = (name, d, model, cfg, params)
        return cache[name]

    return get


@pytest.fixture(params=sorted(CASES))
def tiny(request, built):
    return built(request.param)


def test_logits_match_transformers_on_padded_batch(tiny):
    name, _, model, cfg, params = tiny
    tokens_bs, mask_bs = _batch(cfg.vocab_size)
    ref = _hf_logits(model, tokens_bs, mask_bs)
    ours = np.asarray(_forward(params, cfg, jnp.asarray(tokens_bs), jnp.asarray(mask_bs)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = _max_err(ours, ref)
    print(f"[parity] {name}: max-abs logits error {err:.3g} (logit scale {np.abs(ref).max():.3g}, "
          f"tolerance {_tol(ref):.3g})")
    assert err < _tol(ref), f"{name}: max-abs error {err}"


def test_llama3_rope_scaling_is_exercised(built):
    """Guards the llama3 case: dropping the scaling must change logits far beyond the tolerance."""
    _, _, _, cfg, params = built("llama_tied_rope_llama3")
    assert cfg.rope_scaling is not None
    tokens_bs, mask_bs = _batch(cfg.vocab_size)
    a = np.asarray(_forward(params, cfg, jnp.asarray(tokens_bs), jnp.asarray(mask_bs)))
    plain = dataclasses.replace(cfg, rope_scaling=None)
    b = np.asarray(_forward(params, plain, jnp.asarray(tokens_bs), jnp.asarray(mask_bs)))
    assert _max_err(a, b) > 100 * _tol(a)


def test_padding_does_not_change_real_positions(tiny):
    """Right padding is invisible to real tokens: row alone == row in a padded batch."""
    _, _, _, cfg, params = tiny
    tokens_bs, mask_bs = _batch(cfg.vocab_size)
    full = np.asarray(_forward(params, cfg, jnp.asarray(tokens_bs), jnp.asarray(mask_bs)))
    n = LENGTHS[2]
    alone = np.asarray(_forward(params, cfg, jnp.asarray(tokens_bs[2:3, :n]), jnp.asarray(mask_bs[2:3, :n])))
    # two XLA programs (reductions over S = 12 vs 4 positions): FORWARD_RTOL of the largest |logit|
    np.testing.assert_allclose(full[2, :n], alone[0], atol=FORWARD_RTOL * np.abs(alone).max(), rtol=0)


# ---------------------------------------------------------------------------------------------
# LoRA parity against PEFT.


def _peft_model(model_dir: str, r: int, alpha: int, seed: int):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_MODULES))
    model = peft.get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # lora_B is zero at init: randomise both
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def test_lora_logits_match_peft(tiny):
    name, d, _, cfg, params = tiny
    r, alpha = 4, 12  # alpha != r: the scaling (3.0) must be folded into b
    model = _peft_model(d, r, alpha, seed=7)
    lora = peft_lora_tree(model, cfg, alpha / r)
    tokens_bs, mask_bs = _batch(cfg.vocab_size)
    ref = _hf_logits(model, tokens_bs, mask_bs)
    ours = np.asarray(_forward(params, cfg, jnp.asarray(tokens_bs), jnp.asarray(mask_bs), lora))
    err = _max_err(ours, ref)
    base = np.asarray(_forward(params, cfg, jnp.asarray(tokens_bs), jnp.asarray(mask_bs)))
    print(f"[parity] {name} + LoRA(r={r}, alpha={alpha}): max-abs logits error {err:.3g} (tolerance {_tol(ref):.3g})")
    assert _max_err(base, ref) > 100 * _tol(ref), "the LoRA must change the logits for the test to mean anything"
    assert err < _tol(ref), f"{name} LoRA: max-abs error {err}"


def test_forward_vmaps_over_candidate_loras(built):
    """A leading candidate axis on every lora leaf, vmapped: each slice equals its own forward."""
    _, d, _, cfg, params = built("llama_gqa_untied")
    lora1 = peft_lora_tree(_peft_model(d, 4, 8, seed=3), cfg, 2.0)
    lora2 = jax.tree.map(lambda x: -0.5 * x, lora1)
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), lora1, lora2)
    tokens_bs, mask_bs = (jnp.asarray(x) for x in _batch(cfg.vocab_size))
    many = jax.jit(jax.vmap(decoder.forward, in_axes=(None, None, None, None, 0)), static_argnums=1)
    out_cbsv = np.asarray(many(params, cfg, tokens_bs, mask_bs, stacked))
    for c, lo in enumerate((lora1, lora2)):
        one = np.asarray(_forward(params, cfg, tokens_bs, mask_bs, lo))
        # a vmapped (batched dot) vs an unbatched program: FORWARD_RTOL of the largest |logit|
        np.testing.assert_allclose(out_cbsv[c], one, atol=FORWARD_RTOL * np.abs(one).max(), rtol=0)
