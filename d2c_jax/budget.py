"""A storage budget instead of K: the ways (K clusters at output rank r) to fill it.

Shapes: N adapters, R their rank, L layers, K clusters, r output rank.

A rank-r PEFT adapter stores, per adapted layer and module, lora_A [r, d_in] and lora_B [d_out, r]:
r * (d_in + d_out) numbers. A merged adapter is written in float32 (lora.save_peft_adapter) with
every layer of every module any input adapts, so K merged adapters at rank r cost K * r * unit
bytes, unit = 4 * L * sum over those modules of (d_in + d_out): the tensor bytes of the files
written (their safetensors headers and adapter_config.json aside). Storing all N adapters costs
what their own tensors hold, in float32: sum over adapters i of r_i * 4 * sum over the (layer,
module) pairs i adapts of (d_in + d_out). `--budget=P` allows P % of that, `--budget_mb=M`
M * 10^6 bytes; `candidates` lists, for each candidate rank r, the largest K that fits, and the
engine searches each and keeps the lowest objective (the summed search loss of every task, which
is comparable across K).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from d2c_jax.errors import UserError
from d2c_jax.lora import AdapterSet

BYTES_PER_PARAM = 4  # float32 safetensors


def rank_unit_bytes(adapter_set: AdapterSet) -> int:
    """Bytes of one rank of one merged adapter as written: 4 * L * sum over modules of (d_in + d_out)."""
    total = 0
    for m in adapter_set.a:
        d_in, d_out = adapter_set.a[m].shape[3], adapter_set.b[m].shape[2]
        total += adapter_set.a[m].shape[1] * (d_in + d_out)
    return BYTES_PER_PARAM * total


def adapters_bytes(adapter_set: AdapterSet) -> int:
    """Bytes of the N input adapters' own tensors in float32: each at its own rank, over the
    (layer, module) pairs it adapts (those with a non-zero factor)."""
    total = 0
    for m in adapter_set.a:
        d_in, d_out = adapter_set.a[m].shape[3], adapter_set.b[m].shape[2]
        adapted_nl = np.any(adapter_set.a[m] != 0, axis=(2, 3)) | np.any(adapter_set.b[m] != 0, axis=(2, 3))
        total += int((adapted_nl.sum(axis=1) * np.asarray(adapter_set.ranks)).sum()) * (d_in + d_out)
    return BYTES_PER_PARAM * total


def budget_bytes(adapter_set: AdapterSet, percent: float | None, mb: float | None) -> int:
    """The budget in bytes, from a percentage of storing all N adapters or from megabytes."""
    if (percent is None) == (mb is None):
        raise UserError(None, "give exactly one of --budget (percent) and --budget_mb")
    if percent is not None:
        if not (0 < percent <= 100 and math.isfinite(percent)):
            raise UserError(None, f"--budget={percent}: must be a percentage in (0, 100]")
        return int(math.floor(adapters_bytes(adapter_set) * percent / 100.0 + 1e-9))
    if not (mb > 0 and math.isfinite(mb)):
        raise UserError(None, f"--budget_mb={mb}: must be > 0")
    return int(math.floor(mb * 1e6))


def default_ranks(rank: int, delta_space: bool) -> tuple[int, ...]:
    """R/4, R/2, R (and 2R for delta-space operators, whose merges have more than R directions)."""
    ranks = {max(1, rank // 4), max(1, rank // 2), rank}
    if delta_space:
        ranks.add(2 * rank)
    return tuple(sorted(ranks))


def candidates(adapter_set: AdapterSet, budget: int, ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(K, r) pairs: for each rank r the largest K with K * r * unit <= budget and 1 <= K < N,
    largest K first; a clear error when none fits."""
    unit = rank_unit_bytes(adapter_set)
    n = adapter_set.num_adapters
    out = []
    for r in sorted(set(int(x) for x in ranks), reverse=False):
        if r < 1:
            raise UserError(None, f"--budget_ranks: rank {r} must be >= 1")
        k = min(budget // (r * unit), n - 1)
        if k >= 1 and (k, r) not in out:
            out.append((int(k), r))
    if not out:
        raise UserError(None, f"a budget of {budget} bytes holds no merged adapter at ranks "
                        f"{', '.join(map(str, ranks))} (one rank costs {unit} bytes)")
    return sorted(out, key=lambda kr: (-kr[0], kr[1]))


def storage_bytes(adapter_set: AdapterSet, num_clusters: int, rank: int) -> int:
    return int(num_clusters * rank * rank_unit_bytes(adapter_set))
