"""Population search: P D²C chains in lock-step, the worst periodically replaced by the best.

Each chain draws its proposals from its own random stream (seed, iteration, chain), so chain p of a
population follows exactly the single-chain run with the same seed until the first exchange. An
exchange ranks the chains by their global objective (summed loss of every task under its cluster's
merge; ties broken by chain index) and overwrites the worst `max(1, P // 4)` chains with copies of
the best ones (the i-th worst receives the i-th best); the copies then diverge, as each keeps its
own random stream.

Shapes: P chains, N adapters.
"""

from __future__ import annotations

import numpy as np

EXCHANGE_FRACTION = 0.25


def num_replaced(population: int) -> int:
    """How many chains an exchange overwrites (never more than half, so no chain copies a copy)."""
    return 0 if population < 2 else max(1, int(population * EXCHANGE_FRACTION))


def exchange(partitions_pn: np.ndarray, objectives_p: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Returns the new partitions and the (overwritten chain, copied chain) pairs."""
    count = num_replaced(len(partitions_pn))
    if count == 0:
        return partitions_pn, []
    # Sort by (objective, chain index): NaN objectives rank last, ties by index.
    order_p = np.lexsort((np.arange(len(objectives_p)), np.nan_to_num(objectives_p, nan=np.inf)))
    best, worst = order_p[:count], order_p[::-1][:count]
    out_pn = partitions_pn.copy()
    pairs = []
    for dst, src in zip(worst, best):
        out_pn[dst] = partitions_pn[src]
        pairs.append((int(dst), int(src)))
    return out_pn, pairs


def best_chain(objectives_p: np.ndarray) -> int:
    """The chain with the lowest objective (the first on ties; NaN never wins unless all are)."""
    return int(np.argmin(np.nan_to_num(objectives_p, nan=np.inf)))
