"""Greedy decoding with a KV cache, batched, jit-compiled (lax.while_loop), LoRA-aware.

Cache layout: slots 0..P-1 hold the (left- or right-padded) prompt, slot P+j the j-th generated
token; a per-row key-validity mask hides pad slots, so any padding pattern works. Positions follow
HF: prompt cumsum(mask)-1, generated token j at n_real_b + j. Each row stops at its first EOS
(kept in the output); later slots hold pad_token_id, as HF's generate pads finished rows.
Shape legend: B batch, P prompt length, N max new tokens, T = P + N cache slots, L layers,
K kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.models import decoder
from d2c_jax.models.config import ModelConfig
from d2c_jax.types import Lora, Params


def _eos_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def _greedy_core(params, cfg: ModelConfig, tokens_bp, mask_bp, lora, max_new: int,
                 eos_ids: tuple[int, ...], pad_id: int):
    b, p = tokens_bp.shape
    t = p + max_new
    dtype = params["embed"].dtype
    mask_bp = mask_bp.astype(jnp.int32)
    valid_bt = jnp.concatenate([mask_bp, jnp.zeros((b, max_new), jnp.int32)], axis=1) != 0
    cache = decoder.init_cache(cfg, b, t, dtype)

    # Prefill: the prompt attends causally over its own valid slots.
    slots_t = jnp.arange(t)
    mask_bpt = (slots_t[None, :] <= jnp.arange(p)[:, None])[None] & valid_bt[:, None, :]
    x_bpd = decoder.embed(params, tokens_bp)
    h_bpd, cache = decoder.run_layers(params, cfg, x_bpd, decoder.positions_from_mask(mask_bp),
                                      mask_bpt, lora, cache, 0)
    last_b = (p - 1) - jnp.argmax(mask_bp[:, ::-1], axis=1)  # index of the last real token
    h_b1d = jnp.take_along_axis(h_bpd, last_b[:, None, None], axis=1)
    n_real_b = mask_bp.sum(axis=1)
    eos_arr = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def next_token(h_b1d):
        h_b1d = decoder.norm(params["final_norm"], cfg, h_b1d)
        return jnp.argmax(decoder.logits_from_hidden(params, cfg, h_b1d)[:, 0], axis=-1).astype(jnp.int32)

    def cond(state):
        j, _, done_b, _, _, _ = state
        return (j < max_new) & ~jnp.all(done_b)

    def body(state):
        j, tok_b, done_b, out_bn, cache, valid_bt = state
        out_bn = out_bn.at[:, j].set(jnp.where(done_b, pad_id, tok_b))
        done_b = done_b | jnp.isin(tok_b, eos_arr)
        slot = p + j
        valid_bt = valid_bt.at[:, slot].set(True)
        x_b1d = decoder.embed(params, tok_b[:, None])
        pos_b1 = (n_real_b + j)[:, None]
        h_b1d, cache = decoder.run_layers(params, cfg, x_b1d, pos_b1, valid_bt[:, None, :], lora, cache, slot)
        return j + 1, next_token(h_b1d), done_b, out_bn, cache, valid_bt

    out_bn = jnp.full((b, max_new), pad_id, jnp.int32)
    state = (jnp.int32(0), next_token(h_b1d), jnp.zeros((b,), bool), out_bn, cache, valid_bt)
    return jax.lax.while_loop(cond, body, state)[3]


@partial(jax.jit, static_argnames=("cfg", "max_new", "eos_ids", "pad_id", "lora_per_row"))
def _generate_jit(params, cfg, tokens_bp, mask_bp, lora, max_new, eos_ids, pad_id, lora_per_row):
    if not lora_per_row:
        return _greedy_core(params, cfg, tokens_bp, mask_bp, lora, max_new, eos_ids, pad_id)

    def one(tok_p, mask_p, lora_row):
        return _greedy_core(params, cfg, tok_p[None], mask_p[None], lora_row, max_new, eos_ids, pad_id)[0]

    return jax.vmap(one)(tokens_bp, mask_bp, lora)


def greedy_generate(
    params: Params,
    cfg: ModelConfig,
    prompt_tokens_bs: jax.Array,
    prompt_mask_bs: jax.Array,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    lora: Lora | None = None,
    *,
    pad_token_id: int | None = None,
    lora_per_row: bool = False,
) -> jax.Array:
    """Greedy continuation of a batch of padded prompts → int32 [B, max_new_tokens].

    Prompts may be left- or right-padded (mask 1 on real tokens; each row needs at least one).
    A row's output ends with its first EOS token; later entries are `pad_token_id` (default:
    cfg.pad_token_id, else the first EOS, else 0). `lora` is one adapter for every row, or,
    with lora_per_row=True, carries a leading axis B (row b decoded with adapter b).
    """
    eos_ids = _eos_tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    tokens = jnp.asarray(prompt_tokens_bs, jnp.int32)
    mask = jnp.asarray(prompt_mask_bs, jnp.int32)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape([tokens, mask])
    return _generate_jit(params, cfg, tokens, mask, lora, int(max_new_tokens), eos_ids,
                         int(pad_token_id), bool(lora_per_row))


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, *, side: str = "left", multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (tokens [B, P] int32, mask [B, P] int32), P rounded up to `multiple`
    (fewer distinct shapes → fewer recompilations)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    longest = max(len(x) for x in prompts)
    p = -(-longest // multiple) * multiple
    tokens = np.full((len(prompts), p), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), p), np.int32)
    for i, ids in enumerate(prompts):
        sl = slice(p - len(ids), p) if side == "left" else slice(0, len(ids))
        tokens[i, sl], mask[i, sl] = ids, 1
    return tokens, mask


def strip_generated(tokens_bn: np.ndarray, eos_token_id: int | Sequence[int] | None) -> list[list[int]]:
    """Each row's generated ids up to (excluding) its first EOS."""
    eos = set(_eos_tuple(eos_token_id))
    out = []
    for row in np.asarray(tokens_bn).tolist():
        ids = []
        for tok in row:
            if tok in eos:
                break
            ids.append(tok)
        out.append(ids)
    return out


def resolve_eos_pad(cfg: ModelConfig, tokenizer, eos_token_id: int | Sequence[int] | None = None
                    ) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) for decoding: EOS = `eos_token_id` if given, else the config's EOS ids
    plus the tokenizer's (sorted); pad = the tokenizer's pad id, else the first EOS, else 0."""
    if eos_token_id is None:
        eos = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        eos_ids = tuple(sorted(eos))
    else:
        eos_ids = _eos_tuple(eos_token_id)
    pad = tokenizer.pad_token_id
    return eos_ids, int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def generate_texts(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    lora: dict | None,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[str]:
    """Greedy responses (decoded, special tokens skipped) to tokenised prompts.

    All batches share one shape (B = batch_size, P = longest prompt rounded up to 16), so the
    decoding loop compiles once. EOS: `eos_token_id` if given, else the config's EOS ids plus
    the tokenizer's."""
    if not prompt_ids:
        return []
    eos_ids, pad_id = resolve_eos_pad(cfg, tokenizer, eos_token_id)
    longest = -(-max(len(p) for p in prompt_ids) // 16) * 16
    texts: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)  # fixed batch shape
        tokens, mask = pad_prompts(chunk, pad_id, side="left", multiple=longest)
        out = greedy_generate(params, cfg, tokens, mask, max_new_tokens, eos_ids, lora, pad_token_id=pad_id)
        for ids in strip_generated(np.asarray(out)[:real], eos_ids):
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
