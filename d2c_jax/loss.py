"""Per-task masked next-token cross-entropy, batched over candidates.

Shapes: C candidates, n examples, S sequence, V vocab, k example chunks of size b (n <= k*b).

The loss of a task is HF's for one batch of all its examples with prompt labels -100:
sum over response tokens of CE / number of response tokens, in float32. Logits are the biggest
array (Llama 3B: V = 128k), so the examples go through the model `example_chunk` at a time
(a `lax.map` over chunks) and each chunk is reduced to two scalars at once: under a vmap over C
the peak is [C, b, S, V], never [C, n, S, V].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from d2c_jax.models import decoder


def token_ce(logits_bsv: jax.Array, targets_bs: jax.Array) -> jax.Array:
    """Cross-entropy per position, float32: logsumexp(logits) - logit of the target."""
    logits_bsv = logits_bsv.astype(jnp.float32)
    lse_bs = jax.nn.logsumexp(logits_bsv, axis=-1)
    target_bs = jnp.take_along_axis(logits_bsv, targets_bs[..., None], axis=-1)[..., 0]
    return lse_bs - target_bs


def task_loss_sums(
    params: Any,
    cfg: Any,
    lora: Any,
    tokens_ns: jax.Array,
    targets_ns: jax.Array,
    weights_ns: jax.Array,
    attn_ns: jax.Array,
    *,
    example_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of CE * weight, sum of weight) over the task's examples, `example_chunk` at a time."""
    n, s = tokens_ns.shape
    b = n if example_chunk is None else max(1, min(int(example_chunk), n))
    k = -(-n // b)
    pad = k * b - n
    if pad:  # dummy rows: zero weight, one attended token (no fully masked attention row)
        tokens_ns = jnp.pad(tokens_ns, ((0, pad), (0, 0)))
        targets_ns = jnp.pad(targets_ns, ((0, pad), (0, 0)))
        weights_ns = jnp.pad(weights_ns, ((0, pad), (0, 0)))
        attn_ns = jnp.concatenate(
            [attn_ns, jnp.zeros((pad, s), attn_ns.dtype).at[:, 0].set(1)], axis=0
        )

    def chunk_sums(chunk):
        tokens_bs, targets_bs, weights_bs, attn_bs = chunk
        logits_bsv = decoder.forward(params, cfg, tokens_bs, attn_bs, lora=lora)
        ce_bs = token_ce(logits_bsv, targets_bs)
        w_bs = weights_bs.astype(jnp.float32)
        # where(): a dummy row's logits may be anything (even NaN); it must not reach the sum.
        return jnp.sum(jnp.where(w_bs > 0, ce_bs * w_bs, 0.0)), jnp.sum(w_bs)

    chunks = tuple(x.reshape(k, b, s) for x in (tokens_ns, targets_ns, weights_ns, attn_ns))
    if k == 1:
        return chunk_sums(tuple(x[0] for x in chunks))
    num_k, den_k = jax.lax.map(chunk_sums, chunks)
    return jnp.sum(num_k), jnp.sum(den_k)


def task_loss(
    params: Any,
    cfg: Any,
    lora: Any,
    tokens_ns: jax.Array,
    targets_ns: jax.Array,
    weights_ns: jax.Array,
    attn_ns: jax.Array,
    *,
    example_chunk: int | None = None,
) -> jax.Array:
    """Mean CE over the task's response tokens (float32 scalar); `lora` None = the base model."""
    num, den = task_loss_sums(params, cfg, lora, tokens_ns, targets_ns, weights_ns, attn_ns,
                              example_chunk=example_chunk)
    return num / den


def candidate_losses(
    params: Any,
    cfg: Any,
    lora_c: Any,
    tokens_cns: jax.Array,
    targets_cns: jax.Array,
    weights_cns: jax.Array,
    attn_cns: jax.Array,
    *,
    example_chunk: int | None = None,
) -> jax.Array:
    """task_loss for C (adapter, task) pairs at once: [C] float32. Every leaf of `lora_c` and
    every task array carries the leading candidate axis."""
    def one(lora, tokens_ns, targets_ns, weights_ns, attn_ns):
        return task_loss(params, cfg, lora, tokens_ns, targets_ns, weights_ns, attn_ns,
                         example_chunk=example_chunk)

    return jax.vmap(one)(lora_c, tokens_cns, targets_cns, weights_cns, attn_cns)
