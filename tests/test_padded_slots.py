"""The Scorer pads its adapter and task axes (scoring.slots) so that nearby N share executables; the
padded slots change no loss, no merge and no placement, and no request can name one.

Reference: the same Scorer built without padding (SLOT_MULTIPLE = 1: every axis at its exact size),
itself checked against transformers + PEFT in test_scoring.py / test_loss_parity.py. Nine rank-2
adapters (padded to 16 slots) on the tiny Llama: masks of up to 8 members are merged from their
gathered members (G = 8 in both scorers), a mask of all nine over every slot (16 against 9).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import merge, online, scoring  # noqa: E402
from d2c_jax.search import LossCache  # noqa: E402
from test_scoring import build_wide  # noqa: E402
from tolerances import U  # noqa: E402

N = 9  # adapters = tasks; padded to 16 slots
WORDS = "one two four six sort".split()  # 3 tokens each: one sequence bucket, one loss executable


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """(padded Scorer, unpadded Scorer) over the same N adapters, tasks and ties merges."""
    def example(i, e):
        w = [WORDS[(i // 5 + i + k * (e + 1)) % 5] for k in range(4)]
        return f"{w[0]} {w[1]}", f"{w[2]} {w[3]}"

    inp = build_wide(str(tmp_path_factory.mktemp("padded")), N, example, prefix="p", model_seed=4, adapter_seed=3,
                     num_hidden_layers=1)
    cfg, params, td = inp["cfg"], inp["params"], inp["task_data"]
    prepared = merge.prepare_merge(inp["adapters"], "ties", 0.5)
    padded = scoring.Scorer(params, cfg, prepared, td, batched=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(scoring, "SLOT_MULTIPLE", 1)
    try:
        exact = scoring.Scorer(params, cfg, prepared, td, batched=False)
    finally:
        mp.undo()
    assert (padded.adapter_slots, exact.adapter_slots) == (16, N)
    assert len(padded._data_by_seq) == 1  # every task in one sequence bucket: one loss executable each
    return padded, exact


def _masks(sizes, seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(sizes), N), bool)
    for i, size in enumerate(sizes):
        masks[i, rng.choice(N, size, replace=False)] = True
    return masks


def test_padding_changes_no_merge_and_no_loss(scorers):
    """Gathered merges (<= 8 members) read the same member rows in both scorers: bit-identical. The
    all-slot merge (9 members) sums over 16 rows (7 exact zeros) instead of 9, so XLA may add the
    members in another order: TIES elects signs, so the kept terms of an entry agree in sign and a
    float32 sum of k <= 9 of them errs by at most gamma_9 ~ 9 U of the entry itself; both orders,
    plus the weight product and the division by the count: (2 * 9 + 4) U relative. A loss of the
    same merged adapter reads its task's row of a [16, ...] or a [T_b, ...] array: bit-identical."""
    padded, exact = scorers
    masks = _masks([1, 2, 3, 5, 8, 9], seed=7)
    for mask in masks:
        a, b = (jax.tree.map(np.asarray, s.merge(mask)) for s in (padded, exact))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            if mask.sum() <= 8:
                np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_allclose(x, y, rtol=(2 * 9 + 4) * U, atol=0)
        for t in np.flatnonzero(mask)[:2]:
            assert padded.loss_of_lora(a, int(t)) == exact.loss_of_lora(a, int(t))
    gathered = masks[masks.sum(axis=1) <= 8]
    tasks = np.array([np.flatnonzero(m)[0] for m in gathered])
    np.testing.assert_array_equal(padded.losses(gathered, tasks), exact.losses(gathered, tasks))


def test_padded_slots_hold_zeros_and_no_request_can_name_one(scorers):
    """Every padded row of the prepared merge inputs is exactly zero (a member there would add
    nothing), and the Scorer refuses masks over the padded width and task indices past the real
    tasks, so the engine (which sees num_adapters = num_tasks = N) can never select one."""
    padded, _ = scorers
    assert padded.num_adapters == padded.num_tasks == N
    for leaf in jax.tree.leaves(padded._prepared):
        assert leaf.shape[0] == 16 and not np.any(np.asarray(leaf)[N:])
    wide = np.ones((1, 16), bool)
    with pytest.raises(ValueError, match="masks_cn has shape"):
        padded.losses(wide, np.array([0]))
    with pytest.raises(ValueError, match="mask_n has shape"):
        padded.merge(wide[0])
    with pytest.raises(ValueError, match="task index out of range"):
        padded.losses(np.ones((1, N), bool), np.array([N]))


def test_a_placement_is_the_same_with_and_without_padding(scorers):
    """online.place (launch/add.py's rule) of adapter 8 into a partition of the other eight: the
    same candidates, objective changes and choice with both scorers (its merges have <= 8 members:
    gathered, bit-identical above), and a partition of N entries, none for a padded slot."""
    partition_n = np.array([0, 0, 1, 1, 2, 2, 0, 1, -1], np.int32)
    out = []
    for s in scorers:
        losses, _ = online.task_losses(s, LossCache(N), partition_n)
        cache = online.seeded_cache(partition_n, losses)
        part, placement = online.place(s, cache, partition_n, 8, objective="local", max_clusters=3)
        out.append((part.tolist(), placement.candidates, placement.changes))
    assert out[0] == out[1] and len(out[0][0]) == N
