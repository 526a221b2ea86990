"""Pure-function decoder for Llama / Qwen2 / StableLM with optional low-rank LoRA.

One `lax.scan` over the stacked layers (params["layers"] and the lora tree's layer axis are
scanned together). Matches transformers numerically: norms in float32, rotary in HF's
rotate-half layout (partial rotary, llama3 / linear frequency scaling), GQA, causal + key
padding mask, SiLU-gated MLP. LoRA: y += (x @ a.T) @ b.T, never materialising b @ a.
An optional KV cache (used by generate.py) shares the same layer code.
Shape legend: B batch, S query length, T key length (cache slots), L layers, D model dim,
F mlp dim, V vocab, R rank, H heads, K kv heads, G = H / K, Dh head dim, Dr rotary dim.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.models.config import ModelConfig
from d2c_jax.types import Lora, Params

_NEG = float(np.finfo(np.float32).min)  # finite: a fully masked row gives garbage, not NaN


# ---------------------------------------------------------------------------------------------
# Building blocks.


def rms_norm(x_bsd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x_bsd.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale_d * y.astype(x_bsd.dtype)


def layer_norm(x_bsd: jax.Array, scale_d: jax.Array, bias_d: jax.Array, eps: float) -> jax.Array:
    """torch.nn.LayerNorm (biased variance), computed in float32."""
    x32 = x_bsd.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(x_bsd.dtype)


def norm(p: dict, cfg: ModelConfig, x_bsd: jax.Array) -> jax.Array:
    if cfg.norm == "layer":
        return layer_norm(x_bsd, p["scale"], p["bias"], cfg.norm_eps)
    return rms_norm(x_bsd, p["scale"], cfg.norm_eps)


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [Dr/2] (float32, as HF computes them), with rope scaling."""
    dim = cfg.rotary_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / dim)))
    inv = inv.astype(np.float32)
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc[0] == "linear":
        return (inv / np.float32(sc[1])).astype(np.float32)
    if sc[0] == "llama3":
        _, factor, low, high, old_ctx = sc
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unknown rope scaling {sc!r}")


def rotary_tables(cfg: ModelConfig, positions_bs: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, Dr] in HF's layout (frequencies repeated twice), cast to `dtype`."""
    freqs_bsf = positions_bs.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
    emb = jnp.concatenate([freqs_bsf, freqs_bsf], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x_bshd: jax.Array, cos_bsr: jax.Array, sin_bsr: jax.Array) -> jax.Array:
    """Rotate-half rotary on the first Dr dims of each head; the rest pass through."""
    r = cos_bsr.shape[-1]
    x_rot, x_pass = x_bshd[..., :r], x_bshd[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_bsr[:, :, None, :], sin_bsr[:, :, None, :]
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


def linear(p: dict, x_bsi: jax.Array, lora_m: dict | None = None) -> jax.Array:
    """x @ kernel (+ bias) (+ (x @ a.T) @ b.T); a [R, in], b [out, R] for this layer.

    Rounds like torch + PEFT in low precision: x @ kernel + bias accumulated in float32 and
    rounded once (torch's addmm); the LoRA path in float32 (PEFT keeps adapter weights in float32
    and casts x up), added to the rounded base output in float32, then cast to x's dtype."""
    y = jnp.matmul(x_bsi, p["kernel"], preferred_element_type=jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    y = y.astype(x_bsi.dtype)
    if lora_m is not None:
        a_ri, b_or = lora_m["a"].astype(jnp.float32), lora_m["b"].astype(jnp.float32)
        delta = (x_bsi.astype(jnp.float32) @ a_ri.T) @ b_or.T
        y = (y.astype(jnp.float32) + delta).astype(x_bsi.dtype)
    return y


def attend(q_bshd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, mask_bst: jax.Array) -> jax.Array:
    """Grouped-query softmax attention; scores and softmax in float32. Returns [B, S, H*Dh].

    The G query heads that share a key/value head are stacked along the query axis, so each
    (example, kv head) is one [G*S, Dh] @ [Dh, T] product: on CPU a few larger dots run ~1.4x
    faster than B*H small ones."""
    b, s, h, dh = q_bshd.shape
    t, kv = k_btkd.shape[1], k_btkd.shape[2]
    g = h // kv
    q_bkqd = q_bshd.reshape(b, s, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, dh)
    k_bktd, v_bktd = k_btkd.transpose(0, 2, 1, 3), v_btkd.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bktd->bkqt", q_bkqd, k_bktd, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, s, t) * (1.0 / np.sqrt(dh))
    scores = jnp.where(mask_bst[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_btkd.dtype).reshape(b, kv, g * s, t)
    out_bkqd = jnp.einsum("bkqt,bktd->bkqd", probs, v_bktd)
    return out_bkqd.reshape(b, kv, g, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, h * dh)


def _lora_of(lora_l: Lora, name: str) -> dict | None:
    return None if lora_l is None else lora_l.get(name)


def block(
    lp: dict,
    lora_l: Lora,
    cfg: ModelConfig,
    x_bsd: jax.Array,
    cos_bsr: jax.Array,
    sin_bsr: jax.Array,
    mask_bst: jax.Array,
    cache_kv: tuple[jax.Array, jax.Array] | None = None,
    start: jax.Array | int = 0,
    attend_fn: Callable | None = None,
    rows: jax.Array | None = None,
):
    """One pre-norm decoder layer. With `cache_kv` ([B, T, K, Dh] each) the new keys/values
    are written at slots start..start+S-1 and attention runs over all T slots. `attend_fn`
    (q, k, v) -> [B, S, H*Dh] replaces `attend(q, k, v, mask_bst)` (packing.grid_attention).
    `rows` (int [Q]): return only these query rows ([B, Q, D]); keys and values still come from
    all S, so each kept row is exactly what the full layer gives it, and the output projection
    and MLP run on Q rows only (the last layer of a loss that reads Q positions)."""
    b, s, _ = x_bsd.shape
    h_bsd = norm(lp["input_norm"], cfg, x_bsd)
    q = linear(lp["q_proj"], h_bsd, _lora_of(lora_l, "q_proj")).reshape(b, s, cfg.num_heads, cfg.head_dim)
    k = linear(lp["k_proj"], h_bsd, _lora_of(lora_l, "k_proj")).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = linear(lp["v_proj"], h_bsd, _lora_of(lora_l, "v_proj")).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rotary(q, cos_bsr, sin_bsr), apply_rotary(k, cos_bsr, sin_bsr)
    if cache_kv is not None:
        ck, cv = cache_kv
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), start, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), start, axis=1)
        cache_kv = (k, v)
    attn_bsq = attend(q, k, v, mask_bst) if attend_fn is None else attend_fn(q, k, v)
    if rows is not None:
        x_bsd, attn_bsq = jnp.take(x_bsd, rows, axis=1), jnp.take(attn_bsq, rows, axis=1)
    x_bsd = x_bsd + linear(lp["o_proj"], attn_bsq, _lora_of(lora_l, "o_proj"))
    h_bsd = norm(lp["post_attn_norm"], cfg, x_bsd)
    gate = linear(lp["gate_proj"], h_bsd, _lora_of(lora_l, "gate_proj"))
    up = linear(lp["up_proj"], h_bsd, _lora_of(lora_l, "up_proj"))
    x_bsd = x_bsd + linear(lp["down_proj"], jax.nn.silu(gate) * up, _lora_of(lora_l, "down_proj"))
    return x_bsd, cache_kv


def positions_from_mask(attn_mask_bs: jax.Array) -> jax.Array:
    """HF's positions for padded batches: cumsum(mask) - 1, clipped at 0 (left pads)."""
    return jnp.maximum(jnp.cumsum(attn_mask_bs.astype(jnp.int32), axis=-1) - 1, 0)


def _check_lora(lora: Lora, cfg: ModelConfig) -> None:
    if lora is None:
        return
    for name, m in lora.items():
        if m["a"].ndim != 3 or m["a"].shape[0] != cfg.num_layers:
            raise ValueError(
                f"lora[{name!r}]['a'] has shape {m['a'].shape}; expected [L={cfg.num_layers}, R, d_in]"
                " (vmap over any leading candidate axis)"
            )


def run_layers(
    params: Params,
    cfg: ModelConfig,
    x_bsd: jax.Array,
    positions_bs: jax.Array,
    mask_bst: jax.Array,
    lora: Lora | None = None,
    cache: tuple[jax.Array, jax.Array] | None = None,
    start: jax.Array | int = 0,
    attend_fn: Callable | None = None,
    last_rows: jax.Array | None = None,
    remat: bool = False,
):
    """Scans the stacked layers. cache: (k_lbtkd, v_lbtkd) or None; returns (x, new cache).
    `last_rows` (int [Q], no cache): the last layer keeps only these rows (block's `rows`), so
    x comes back [B, Q, D]; the other layers are scanned as usual. `remat`: a gradient through
    the layers keeps only each layer's input [B, S, D] and recomputes the layer in the backward
    pass (tuning at a large model's size), the same values."""
    _check_lora(lora, cfg)
    cos, sin = rotary_tables(cfg, positions_bs, x_bsd.dtype)

    def body(x, xs):
        lp, lora_l, cache_l = xs
        x, cache_l = block(lp, lora_l, cfg, x, cos, sin, mask_bst, cache_l, start, attend_fn)
        return x, cache_l

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    if last_rows is None:
        return jax.lax.scan(body, x_bsd, (params["layers"], lora, cache))
    if cache is not None:
        raise ValueError("last_rows is for scoring (no KV cache)")
    layers = (params["layers"], lora)
    last = cfg.num_layers - 1

    def body_at(x, i):  # layer i of the stacked weights, sliced inside the loop as scan does
        lp, lora_l = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), layers)
        return body(x, (lp, lora_l, None))

    x_bsd, _ = jax.lax.scan(body_at, x_bsd, jnp.arange(last))
    lp, lora_l = jax.tree.map(lambda a: a[last], layers)
    return block(lp, lora_l, cfg, x_bsd, cos, sin, mask_bst, None, start, attend_fn, rows=last_rows)[0], None


def embed(params: Params, tokens_bs: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens_bs, axis=0)


def logits_from_hidden(params: Params, cfg: ModelConfig, h_bsd: jax.Array) -> jax.Array:
    """Final-normed hidden states → float32 logits [B, S, V] (float32 accumulation)."""
    if cfg.tie_embeddings:
        return jnp.einsum("bsd,vd->bsv", h_bsd, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("bsd,dv->bsv", h_bsd, params["lm_head"], preferred_element_type=jnp.float32)


def causal_padding_mask(attn_mask_bs: jax.Array) -> jax.Array:
    """[B, S, S] bool: query s may see key t iff t <= s and t is a real token."""
    s = attn_mask_bs.shape[-1]
    causal_st = jnp.tril(jnp.ones((s, s), dtype=bool))
    return causal_st[None] & (attn_mask_bs[:, None, :] != 0)


def hidden_states(
    params: Params, cfg: ModelConfig, tokens_bs: jax.Array, attn_mask_bs: jax.Array, lora: Lora | None = None,
    remat: bool = False,
) -> jax.Array:
    """Final-normed hidden states [B, S, D] in the params dtype (for memory-lean loss code)."""
    x_bsd = embed(params, tokens_bs)
    positions_bs = positions_from_mask(attn_mask_bs)
    x_bsd, _ = run_layers(params, cfg, x_bsd, positions_bs, causal_padding_mask(attn_mask_bs), lora, remat=remat)
    return norm(params["final_norm"], cfg, x_bsd)


def forward(
    params: Params, cfg: ModelConfig, tokens_bs: jax.Array, attn_mask_bs: jax.Array, lora: Lora | None = None
) -> jax.Array:
    """Logits [B, S, V] float32. Right padding (attn_mask 1 on real tokens); pure, jit-able
    (cfg static), vmappable over `lora` ({module: {"a": [L,R,d_in], "b": [L,d_out,R]}})."""
    chex.assert_rank(tokens_bs, 2)
    chex.assert_equal_shape([tokens_bs, attn_mask_bs])
    return logits_from_hidden(params, cfg, hidden_states(params, cfg, tokens_bs, attn_mask_bs, lora))


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Zero KV cache: (k, v) each [L, B, T, K, Dh]."""
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
