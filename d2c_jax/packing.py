"""Packed token layout for scoring: only real tokens go through the dense layers, only loss
positions through the LM head.

Shapes: T tasks, n examples per task, S padded sequence (the grid), P packed tokens, Q loss
positions, D model dim.

A task's right-padded [n, S] grid wastes the pad slots in every matmul (examples of 84-112 tokens
padded to 112: 13 %), and its LM head runs on prompt positions whose logits the loss never reads
(two thirds of the positions in a typical prompt/response pair). `pack` lays each task's real
tokens end to end ([P], P = the longest task's real-token count, rounded up) and lists its
loss positions ([Q]). The decoder runs its position-wise work (norms, projections, MLP, LoRA) on
the [P] stream and gathers q/k/v into the [n, S] grid only for attention (`grid_attention`), so
every token sees exactly the keys it sees in the padded layout; the last layer keeps only the Q
loss positions after attention (its output projection and MLP run on Q rows, not P), and the
final norm and the LM head run on those. Same arithmetic per token as the padded forward, so the
loss is transformers' (tests/test_loss_parity.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from d2c_jax.models import decoder
from d2c_jax.models.config import ModelConfig
from d2c_jax.types import Array, Lora, Params, TokenBatch

ALIGN = 16  # P and Q are rounded up to a multiple of this (fewer distinct shapes, aligned dots)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One task's examples packed (a leading T axis may be added to every leaf)."""

    tokens: Array  # int32 [P]: the real input tokens, example after example (0 past the end)
    positions: Array  # int32 [P]: each token's position in its example (rotary)
    grid_of_packed: Array  # int32 [P]: flat grid slot (e * S + s) of each packed token
    packed_of_grid: Array  # int32 [n * S]: packed index of each grid slot (pad slots: 0)
    attn: Array  # int32 [n, S]: the grid's attention mask (1 on real tokens)
    loss_at: Array  # int32 [Q]: packed index of each loss position (pad: 0, weight 0)
    targets: Array  # int32 [Q]: the next token at each loss position
    weights: Array  # float32 [Q]: its loss weight (0 on padding)


def _round_up(x: int, m: int = ALIGN) -> int:
    return max(m, -(-int(x) // m) * m)


def packed_sizes(batch_tns: TokenBatch) -> tuple[int, int]:
    """(P, Q) that hold every task of `batch_tns`: the most real tokens and loss positions of
    any task, rounded up to ALIGN."""
    attn = np.asarray(batch_tns.attn) != 0
    weights = np.asarray(batch_tns.weights) > 0
    return _round_up(attn.sum(axis=(1, 2)).max()), _round_up(weights.sum(axis=(1, 2)).max())


def pack(batch_tns: TokenBatch) -> PackedBatch:
    """Packs every task of a [T, n, S] TokenBatch (numpy, once per run); every leaf gets a
    leading T axis. Real tokens are the attended ones, which data.py puts first in each row;
    loss positions are those with weight > 0 (always real tokens)."""
    tokens = np.asarray(batch_tns.tokens)
    attn = np.asarray(batch_tns.attn) != 0
    weights = np.asarray(batch_tns.weights, np.float32)
    targets = np.asarray(batch_tns.targets)
    t, n, s = tokens.shape
    p, q = packed_sizes(batch_tns)
    if (weights[~attn] > 0).any():
        raise ValueError("pack: a loss weight sits on an unattended (pad) position")
    out = {k: np.zeros((t, size), np.int32) for k, size in
           (("tokens", p), ("positions", p), ("grid_of_packed", p), ("packed_of_grid", n * s),
            ("loss_at", q), ("targets", q))}
    out_w = np.zeros((t, q), np.float32)
    for ti in range(t):
        grid = np.flatnonzero(attn[ti].reshape(-1))  # real slots in (example, position) order
        k = len(grid)
        out["tokens"][ti, :k] = tokens[ti].reshape(-1)[grid]
        out["positions"][ti, :k] = np.asarray(decoder.positions_from_mask(attn[ti])).reshape(-1)[grid]
        out["grid_of_packed"][ti, :k] = grid
        out["packed_of_grid"][ti, grid] = np.arange(k)
        lw = weights[ti].reshape(-1)[grid]
        at = np.flatnonzero(lw > 0)
        out["loss_at"][ti, :len(at)] = at
        out["targets"][ti, :len(at)] = targets[ti].reshape(-1)[grid][at]
        out_w[ti, :len(at)] = lw[at]
    return PackedBatch(attn=attn.astype(np.int32), weights=out_w, **out)


def grid_attention(pb: PackedBatch, mask_nst: jax.Array, example_chunk: int | None = None) -> Callable:
    """attend_fn for decoder.run_layers on a packed [1, P] stream: q/k/v are gathered into the
    [n, S] grid, attended there under `mask_nst`, and the outputs gathered back to [1, P].
    `example_chunk` (None: all n) attends that many examples at a time (a lax.map over chunks),
    so the float32 scores peak at [chunk, H, S, S], not [n, H, S, S]."""
    n, s = pb.attn.shape
    b = n if example_chunk is None else max(1, min(int(example_chunk), n))
    k = -(-n // b)

    def attend_fn(q_bphd: jax.Array, k_bpkd: jax.Array, v_bpkd: jax.Array) -> jax.Array:
        def to_grid(x):
            return jnp.take(x[0], pb.packed_of_grid, axis=0).reshape((n, s) + x.shape[2:])

        q, kk, v, mask = to_grid(q_bphd), to_grid(k_bpkd), to_grid(v_bpkd), mask_nst
        if k == 1:
            out_nsq = decoder.attend(q, kk, v, mask)
        else:  # padded examples attend nowhere (finite garbage); no packed token reads them
            pad = lambda x: jnp.pad(x, ((0, k * b - n),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
            chunks = [pad(x).reshape((k, b) + x.shape[1:]) for x in (q, kk, v, mask)]
            out_nsq = jax.lax.map(lambda c: decoder.attend(*c), tuple(chunks)).reshape((k * b, s, -1))[:n]
        return jnp.take(out_nsq.reshape(n * s, -1), pb.grid_of_packed, axis=0)[None]

    return attend_fn


def loss_residual(params: Params, cfg: ModelConfig, pb: PackedBatch, lora: Lora | None = None,
                  example_chunk: int | None = None) -> jax.Array:
    """The residual stream [Q, D] at the loss positions after the last layer (before the final
    norm) of one task's packed examples: the layers run on the P packed tokens only, and the last
    layer's output projection and MLP on the Q loss positions only (no later layer reads the
    other positions). `example_chunk`: examples attended at a time (grid_attention)."""
    x_bpd = decoder.embed(params, pb.tokens[None])
    attend_fn = grid_attention(pb, decoder.causal_padding_mask(pb.attn), example_chunk)
    x_bqd, _ = decoder.run_layers(params, cfg, x_bpd, pb.positions[None], None, lora, attend_fn=attend_fn,
                                  last_rows=pb.loss_at)
    return x_bqd[0]
