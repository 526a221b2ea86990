"""Fake scorers for the engine tests (no model): a deterministic synthetic loss of (mask, task).

Tasks carry hidden "family" labels; the loss of task t under the merge of the adapters in `mask`
grows with the members of other families and shrinks a little with members of t's own family,
plus a small hash-derived term so that ties are rare and every (mask, task) differs.
This file holds no tests; the test modules import it.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np


class FakeScorer:
    """`losses(masks_cn, tasks_c)` like the real Scorer, scoring in chunks of `batch_size`."""

    def __init__(self, families, *, batch_size: int = 8, noise: float = 0.02, delay: float = 0.0):
        self.families_n = np.asarray(families)
        self.num_tasks = len(self.families_n)
        self.batch_size = batch_size
        self.noise = noise
        self.delay = delay
        self.calls: list[int] = []  # number of requests of each call

    def loss(self, mask_n: np.ndarray, task: int) -> np.float32:
        mask_n = np.asarray(mask_n, bool)
        assert mask_n[task], "the engine asked for a task outside the merged cluster"
        fam_n = self.families_n[mask_n]
        same = int(np.sum(fam_n == self.families_n[task])) - 1
        other = int(np.sum(fam_n != self.families_n[task]))
        digest = hashlib.sha256(np.packbits(mask_n).tobytes() + int(task).to_bytes(4, "little")).digest()
        h = int.from_bytes(digest[:4], "little") / 2**32
        return np.float32(1.0 + 0.05 * task / self.num_tasks + 0.3 * other - 0.05 * same + self.noise * h)

    def losses(self, masks_cn: np.ndarray, tasks_c: np.ndarray) -> np.ndarray:
        masks_cn, tasks_c = np.asarray(masks_cn, bool), np.asarray(tasks_c)
        assert masks_cn.ndim == 2 and masks_cn.shape == (len(tasks_c), self.num_tasks)
        self.calls.append(len(tasks_c))
        out = []
        for start in range(0, len(tasks_c), self.batch_size):  # chunked, like the real scorer's batches
            if self.delay:
                time.sleep(self.delay)
            out += [self.loss(m, t) for m, t in zip(masks_cn[start:start + self.batch_size], tasks_c[start:start + self.batch_size])]
        return np.array(out, np.float32)


class TableScorer:
    """Losses from a function of (mask tuple, task); counts calls. For scripted decisions."""

    def __init__(self, num_tasks: int, fn):
        self.num_tasks = num_tasks
        self.fn = fn
        self.calls: list[int] = []

    def losses(self, masks_cn, tasks_c):
        self.calls.append(len(tasks_c))
        return np.array([self.fn(tuple(np.flatnonzero(m)), int(t)) for m, t in zip(masks_cn, tasks_c)], np.float32)


def families(num_tasks: int, num_families: int) -> np.ndarray:
    """Interleaved hidden families: task i is in family i % F (so sorted names don't reveal them)."""
    return np.arange(num_tasks) % num_families
