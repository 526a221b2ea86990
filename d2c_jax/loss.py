"""Per-task masked next-token cross-entropy, batched over candidates.

Shapes: C candidates, n examples, S sequence, V vocab, k example chunks of size b (n <= k*b).

The loss of a task is HF's for one batch of all its examples with prompt labels -100:
sum over response tokens of CE / number of response tokens, in float32. Logits are the biggest
array (Llama 3B: V = 128k), so the examples go through the model `example_chunk` at a time
(a `lax.map` over chunks) and each chunk is reduced to two scalars at once: under a vmap over C
the peak is [C, b, S, V], never [C, n, S, V].
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp

from d2c_jax import packing
from d2c_jax.models import decoder
from d2c_jax.models.config import ModelConfig
from d2c_jax.types import Lora, Params, TokenBatch


def token_ce(logits_bsv: jax.Array, targets_bs: jax.Array) -> jax.Array:
    """Cross-entropy per position, float32: logsumexp(logits) - logit of the target."""
    logits_bsv = logits_bsv.astype(jnp.float32)
    lse_bs = jax.nn.logsumexp(logits_bsv, axis=-1)
    target_bs = jnp.take_along_axis(logits_bsv, targets_bs[..., None], axis=-1)[..., 0]
    return lse_bs - target_bs


def task_loss_sums(
    params: Params, cfg: ModelConfig, lora: Lora | None, batch_ns: TokenBatch, *,
    example_chunk: int | None = None, remat: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(sum of CE * weight, sum of weight) over the task's examples, `example_chunk` at a time.

    `remat` (for a gradient at a large model's size, tune.py): the same sums, but the backward
    pass keeps only each example chunk's inputs and recomputes the chunk (so the gradient is
    accumulated chunk by chunk), inside it keeps only each layer's input, and the LM head runs
    REMAT_HEAD_POSITIONS positions at a time, so the float32 logits never exceed
    [example_chunk, REMAT_HEAD_POSITIONS, V] per task.

    Args:
      batch_ns: one task's examples, every leaf [n, S].
    """
    chex.assert_rank(batch_ns.tokens, 2)
    chex.assert_equal_shape([batch_ns.tokens, batch_ns.targets, batch_ns.weights, batch_ns.attn])
    n, s = batch_ns.tokens.shape
    b = n if example_chunk is None else max(1, min(int(example_chunk), n))
    k = -(-n // b)
    pad = k * b - n
    if pad:  # dummy rows: zero weight, one attended token (no fully masked attention row)
        rows = jax.tree.map(lambda x: jnp.pad(x, ((0, pad), (0, 0))), batch_ns)
        batch_ns = dataclasses.replace(rows, attn=rows.attn.at[n:, 0].set(1))

    def chunk_sums(chunk: TokenBatch):
        w_bs = chunk.weights.astype(jnp.float32)
        if remat:
            return _remat_ce_sum(params, cfg, lora, chunk, w_bs), jnp.sum(w_bs)
        logits_bsv = decoder.forward(params, cfg, chunk.tokens, chunk.attn, lora=lora)
        ce_bs = token_ce(logits_bsv, chunk.targets)
        # where(): a dummy row's logits may be anything (even NaN); it must not reach the sum.
        return jnp.sum(jnp.where(w_bs > 0, ce_bs * w_bs, 0.0)), jnp.sum(w_bs)

    if remat:
        chunk_sums = jax.checkpoint(chunk_sums, prevent_cse=False)

    chunks = jax.tree.map(lambda x: x.reshape(k, b, s), batch_ns)
    if k == 1:
        return chunk_sums(jax.tree.map(lambda x: x[0], chunks))
    num_k, den_k = jax.lax.map(chunk_sums, chunks)
    return jnp.sum(num_k), jnp.sum(den_k)


REMAT_HEAD_POSITIONS = 64  # positions per LM-head call under remat (task_loss_sums)


def _remat_ce_sum(params: Params, cfg: ModelConfig, lora: Lora | None, chunk: TokenBatch, w_bs: jax.Array) -> jax.Array:
    """sum(CE * weight) of one example chunk, the layers rematerialised and the LM head
    REMAT_HEAD_POSITIONS positions at a time (each position block recomputed in the backward)."""
    h_bsd = decoder.hidden_states(params, cfg, chunk.tokens, chunk.attn, lora, remat=True)
    b, s = w_bs.shape
    p = min(REMAT_HEAD_POSITIONS, s)
    k = -(-s // p)
    pad = k * p - s
    tgt_bs = chunk.targets
    if pad:
        h_bsd = jnp.pad(h_bsd, ((0, 0), (0, pad), (0, 0)))
        tgt_bs, w_bs = jnp.pad(tgt_bs, ((0, 0), (0, pad))), jnp.pad(w_bs, ((0, 0), (0, pad)))

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block_sum(args):
        h_bpd, tgt_bp, w_bp = args
        ce_bp = token_ce(decoder.logits_from_hidden(params, cfg, h_bpd), tgt_bp)
        return jnp.sum(jnp.where(w_bp > 0, ce_bp * w_bp, 0.0))

    blocks = (h_bsd.reshape(b, k, p, -1).swapaxes(0, 1), tgt_bs.reshape(b, k, p).swapaxes(0, 1),
              w_bs.reshape(b, k, p).swapaxes(0, 1))
    return jnp.sum(jax.lax.map(block_sum, blocks))


def task_loss(
    params: Params, cfg: ModelConfig, lora: Lora | None, batch_ns: TokenBatch, *,
    example_chunk: int | None = None, remat: bool = False,
) -> jax.Array:
    """Mean CE over the task's response tokens (float32 scalar); `lora` None = the base model."""
    num, den = task_loss_sums(params, cfg, lora, batch_ns, example_chunk=example_chunk, remat=remat)
    return num / den


def packed_task_loss(
    params: Params, cfg: ModelConfig, lora: Lora | None, pb: packing.PackedBatch, *,
    loss_chunk: int | None = None, example_chunk: int | None = None,
) -> jax.Array:
    """task_loss of one task's packed examples (packing.py): the same mean CE over its response
    tokens, with the dense layers on real tokens only and the last layer's output projection and
    MLP, the final norm and the LM head on the Q loss positions only, `loss_chunk` positions at a
    time (a lax.map over chunks bounds the logits), attention `example_chunk` examples at a time."""
    h_qd = packing.loss_residual(params, cfg, pb, lora, example_chunk)
    q = h_qd.shape[0]
    b = q if loss_chunk is None else max(1, min(int(loss_chunk), q))
    k = -(-q // b)
    pad = k * b - q
    tgt_q, w_q = pb.targets, pb.weights.astype(jnp.float32)
    if pad:
        h_qd = jnp.pad(h_qd, ((0, pad), (0, 0)))
        tgt_q, w_q = jnp.pad(tgt_q, (0, pad)), jnp.pad(w_q, (0, pad))

    def chunk_sum(args):
        h_bd, tgt_b, w_b = args
        h_bd = decoder.norm(params["final_norm"], cfg, h_bd)
        ce_b = token_ce(decoder.logits_from_hidden(params, cfg, h_bd[None])[0], tgt_b)
        return jnp.sum(jnp.where(w_b > 0, ce_b * w_b, 0.0))

    args = (h_qd.reshape(k, b, -1), tgt_q.reshape(k, b), w_q.reshape(k, b))
    num = chunk_sum(jax.tree.map(lambda x: x[0], args)) if k == 1 else jnp.sum(jax.lax.map(chunk_sum, args))
    return num / jnp.sum(w_q)


def candidate_losses(
    params: Params, cfg: ModelConfig, lora_c: Lora, batch_cns: TokenBatch, *,
    example_chunk: int | None = None, remat: bool = False,
) -> jax.Array:
    """task_loss for C (adapter, task) pairs at once: [C] float32. Every leaf of `lora_c` and
    of `batch_cns` ([C, n, S]) carries the leading candidate axis."""
    def one(lora: Lora, batch_ns: TokenBatch) -> jax.Array:
        return task_loss(params, cfg, lora, batch_ns, example_chunk=example_chunk, remat=remat)

    return jax.vmap(one)(lora_c, batch_cns)


def candidate_packed_losses(
    params: Params, cfg: ModelConfig, lora_c: Lora, pb_c: packing.PackedBatch, *,
    loss_chunk: int | None = None, example_chunk: int | None = None,
) -> jax.Array:
    """packed_task_loss for C (adapter, task) pairs at once: [C] float32 (every leaf of `lora_c`
    and `pb_c` carries the leading candidate axis). Under the vmap the logits peak at
    [C, loss_chunk, V] and the attention scores at [C, example_chunk, H, S, S]."""
    def one(lora: Lora, pb: packing.PackedBatch) -> jax.Array:
        return packed_task_loss(params, cfg, lora, pb, loss_chunk=loss_chunk, example_chunk=example_chunk)

    return jax.vmap(one)(lora_c, pb_c)
