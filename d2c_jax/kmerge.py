"""K-Merge and K-Merge++: data-free placement of arriving LoRA adapters into K storage slots.

Shapes: N adapters, L layers, R rank, d_in / d_out module widths, K slots.

The rules (as in the public K-Merge code, written again here):
  similarity(new, slot) = the mean, over the (layer, module) matrices that both adapt, of the
      cosine similarity of ΔW = B A (raw PEFT factors for the new adapter; the factors of the
      slot's current merged adapter for the slot).
  K-Merge:   the first K adapters fill the empty slots in arrival order; every later one joins the
      slot of highest similarity (the first on ties) and the slot is merged again as PEFT's
      "linear" merge of [slot, new] with weights [(n-1)/n, 1/n] (n: the slot's size after), which
      unrolls to the linear merge of all its members with weight 1/n each (`running_average`).
  K-Merge++: the first adapter fills slot 0; while empty slots remain, a later one opens the next
      slot if its similarity to every filled slot is below `threshold` (0.02); otherwise it joins
      the nearest slot.
Either rule can merge a slot with any of our operators (`merge.METHODS`) instead of the running
average: the rule only needs each slot's current factors.

The cosine never forms a d_out x d_in matrix: <B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)) and
||B A||_F^2 = tr((B^T B)(A A^T)), O((d_in + d_out) R^2) per matrix, in float64.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

THRESHOLD = 0.02  # K-Merge++'s similarity below which a new slot is opened
RULES = ("kmerge", "kmerge_pp")

Factors = Mapping[str, Mapping[str, np.ndarray]]  # {module: {"a": [L, R, d_in], "b": [L, d_out, R]}}


def _gram(a1_lrd: np.ndarray, b1_ldr: np.ndarray, a2_lrd: np.ndarray, b2_ldr: np.ndarray) -> np.ndarray:
    """float64[L]: <B1 A1, B2 A2>_F per layer, from the factors."""
    a1, b1 = np.asarray(a1_lrd, np.float64), np.asarray(b1_ldr, np.float64)
    a2, b2 = np.asarray(a2_lrd, np.float64), np.asarray(b2_ldr, np.float64)
    bb_lrr = np.einsum("lor,los->lrs", b1, b2)  # B1^T B2
    aa_lsr = np.einsum("lsi,lri->lsr", a2, a1)  # A2 A1^T
    return np.einsum("lrs,lsr->l", bb_lrr, aa_lsr)


def layer_cosines(x: Factors, y: Factors) -> np.ndarray:
    """float64[M, L]: cos(ΔW_x, ΔW_y) per (module, layer) over the modules both have; NaN where
    either ΔW is zero (a matrix the adapter does not adapt)."""
    rows = []
    for m in sorted(set(x) & set(y)):
        ax, bx, ay, by = x[m]["a"], x[m]["b"], y[m]["a"], y[m]["b"]
        inner = _gram(ax, bx, ay, by)
        nx = np.sqrt(np.maximum(_gram(ax, bx, ax, bx), 0.0))
        ny = np.sqrt(np.maximum(_gram(ay, by, ay, by), 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            rows.append(np.where((nx > 0) & (ny > 0), inner / (nx * ny), np.nan))
    return np.array(rows, np.float64) if rows else np.zeros((0, 0), np.float64)


def similarity(x: Factors, y: Factors) -> float:
    """K-Merge's similarity: the mean cosine over the matrices both adapt (0 when none)."""
    cos = layer_cosines(x, y)
    valid = np.isfinite(cos)
    return float(cos[valid].mean()) if valid.any() else 0.0


def running_average(lora: Factors, size: int) -> dict[str, dict[str, np.ndarray]]:
    """A slot's K-Merge adapter from the unit-weight linear merge of its `size` members: both
    factors times sqrt(1/n), exactly the factors of PEFT's running average (weights (n-1)/n, 1/n:
    sqrt((n-1)/n) * sqrt(1/(n-1)) = sqrt(1/n) per member)."""
    f = np.float32(np.sqrt(1.0 / size))
    return {m: {"a": np.asarray(v["a"]) * f, "b": np.asarray(v["b"]) * f} for m, v in lora.items()}


@dataclasses.dataclass
class Slots:
    """The K slots: each a list of member adapter indices in arrival order (empty: free)."""

    num_slots: int
    members: list[list[int]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.members:
            self.members = [[] for _ in range(self.num_slots)]

    @property
    def filled(self) -> list[int]:
        return [k for k, m in enumerate(self.members) if m]

    def partition(self, indices: Sequence[int]) -> np.ndarray:
        """int32[len(indices)]: the slot of each given adapter."""
        where = {i: k for k, m in enumerate(self.members) for i in m}
        return np.array([where[i] for i in indices], np.int32)


def choose_slot(rule: str, slots: Slots, new_factors: Factors, slot_factors: Callable[[int], Factors],
                threshold: float = THRESHOLD) -> tuple[int, list[float]]:
    """(slot for the new adapter, its similarity to each filled slot) under K-Merge's `rule`;
    `slot_factors(k)` is slot k's current merged factors."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    filled = slots.filled
    if not filled:
        return 0, []
    if rule == "kmerge" and len(filled) < slots.num_slots:
        return filled[-1] + 1, []  # the first K fill the empty slots in order
    sims = [similarity(new_factors, slot_factors(k)) for k in filled]
    if rule == "kmerge_pp" and len(filled) < slots.num_slots and all(s < threshold for s in sims):
        return filled[-1] + 1, sims
    return filled[int(np.argmax(sims))], sims  # argmax: the first of equal maxima
