"""Where a scorer's time goes: the batched, padded path against the unbatched, packed CPU default.

  python experiments/benchmark/components.py [--fixture=runs/bench_fixture/<tag>] [--repeats=7]

On the benchmark's fixture (launch/benchmark.py builds it), in one process, medians of
--repeats after a warm-up:
  - the whole scorer per request, for 8-member clusters: `Scorer(batched=True)` (the vmapped,
    request-bucketed path that accelerators and meshes run, and the CPU default before the
    unbatched one: a padded [n, S] grid, the LM head at every position) against the default
    `Scorer()` (one device: unbatched, packed);
  - the unbatched scorer's requests one at a time against two in flight (its two host threads);
  - the task loss alone for one merged adapter: `loss.task_loss` (padded) against
    `loss.packed_task_loss` (real tokens through the layers, the last layer's MLP and the LM head
    on loss positions), and three ablations of the packed loss that say where its time goes:
    without the adapter (the LoRA products' share), with attention replaced by a pass-through of
    q (q, k, v still computed; attention's share), and with the last layer on all P positions
    (the layout before `decoder.run_layers(last_rows=...)`);
  - one 8-member merge: `scoring.merge_members` (the batched path's, [G, ...] gathered first)
    against `merge.merge_gathered` (the unbatched path's, gathered inside each branch);
  - scoring one partition's 40 requests from a cold start (no persistent cache in this script):
    seconds, compilation included, and the scorer executables traced.
Both scorers give the same losses (printed: the largest relative difference).
"""

from __future__ import annotations

import glob
import os
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("fixture", None, "A benchmark fixture directory (default: the N=40 one in runs/bench_fixture).")
flags.DEFINE_integer("repeats", 7, "Timed repeats per figure (median).")
FLAGS = flags.FLAGS


def _median_s(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv) -> int:
    del argv
    import jax
    import jax.numpy as jnp

    from d2c_jax import loss, merge, scoring
    from d2c_jax.inputs import load_inputs

    fx = FLAGS.fixture or next(iter(sorted(glob.glob(os.path.join("runs", "bench_fixture", "n40-*")))), None)
    if not fx or not os.path.isdir(fx):
        print("no fixture: run launch/benchmark.py first (or pass --fixture)", file=sys.stderr)
        return 2
    inp = load_inputs(os.path.join(fx, "base"), os.path.join(fx, "adapters"), os.path.join(fx, "data"),
                      dtype="float32")
    n = len(inp.names)
    rng = np.random.default_rng(0)
    part = rng.permutation(np.arange(n) % 5)
    masks = np.stack([part == part[i] for i in range(n)])
    rows = []

    def cold(batched: bool):
        t0 = time.perf_counter()
        sc = scoring.Scorer(inp.params, inp.model_cfg, inp.prepared("ties", 0.5), inp.task_data,
                            batched=batched)
        out = sc.losses(masks, np.arange(n))
        return sc, out, time.perf_counter() - t0, dict(sc.trace_counts)

    batched, lb, sb, tb = cold(True)
    unbatched, lu, su, tu = cold(False)
    print(f"fixture {fx}")
    print(f"one partition, 40 requests from cold: batched {sb:.1f} s ({len(tb)} scorer executables: {sorted(tb)}); "
          f"unbatched {su:.1f} s ({len(tu)}: {sorted(tu)}); largest relative loss difference "
          f"{float(np.max(np.abs(lu - lb) / np.abs(lb))):.1e}")

    reps = FLAGS.repeats
    eight = np.zeros(n, bool)
    eight[rng.choice(n, 8, replace=False)] = True
    task = int(np.flatnonzero(eight)[0])
    for name, sc in (("batched (padded)", batched), ("unbatched (packed)", unbatched)):
        rows.append((f"scorer, one request, 8-member merge: {name}",
                     _median_s(lambda sc=sc: jnp.asarray(sc.losses(eight[None], np.array([task]))), reps)))

    # A call of 8 requests (one 8-member merge, 8 of its tasks), one request in flight at a time
    # against the default's two (Scorer.threads: two host threads), per request; same losses.
    tasks8 = np.resize(np.flatnonzero(eight), 8)
    for threads in (1, 2):
        unbatched.threads = threads
        rows.append((f"scorer, 8 requests of one merge, {threads} in flight, per request", _median_s(
            lambda: jnp.asarray(unbatched.losses(np.repeat(eight[None], 8, axis=0), tasks8)), reps) / 8))
    unbatched.threads = scoring.SCORING_THREADS

    lora = unbatched.merge(eight)
    sbk = int(unbatched.seq_bucket_of[task])
    t_local = int(unbatched.local_task[task])
    grid = jax.tree.map(lambda x: x[t_local], unbatched._data_by_seq[sbk])
    packed = jax.tree.map(lambda x: x[t_local], unbatched._packed_by_seq[sbk])
    cfg, params = inp.model_cfg, inp.params
    padded_f = jax.jit(lambda p, l, b: loss.task_loss(p, cfg, l, b))
    packed_f = jax.jit(lambda p, l, b: loss.packed_task_loss(p, cfg, l, b))
    rows.append((f"task loss, padded grid {tuple(grid.shape)}", _median_s(lambda: padded_f(params, lora, grid), reps)))
    rows.append((f"task loss, packed P={packed.tokens.shape[0]} Q={packed.loss_at.shape[0]}",
                 _median_s(lambda: packed_f(params, lora, packed), reps)))
    base_f = jax.jit(lambda p, b: loss.packed_task_loss(p, cfg, None, b))
    rows.append(("  ablation: packed, no adapter", _median_s(lambda: base_f(params, packed), reps)))

    from d2c_jax import packing
    from d2c_jax.models import decoder

    def variant(p, l, pb, attend_fn, last_rows):  # packing.loss_residual + the loss, with knobs
        x = decoder.embed(p, pb.tokens[None])
        x, _ = decoder.run_layers(p, cfg, x, pb.positions[None], None, l, attend_fn=attend_fn, last_rows=last_rows)
        x = x[0] if last_rows is not None else jnp.take(x[0], pb.loss_at, axis=0)
        h = decoder.norm(p["final_norm"], cfg, x)
        ce = loss.token_ce(decoder.logits_from_hidden(p, cfg, h[None])[0], pb.targets)
        return jnp.sum(ce * pb.weights) / jnp.sum(pb.weights)

    def pass_through(q, k, v):  # attention replaced by q (k, v kept live)
        return q.reshape(q.shape[:2] + (-1,)) + (k.mean() + v.mean())

    noattn_f = jax.jit(lambda p, l, pb: variant(p, l, pb, pass_through, pb.loss_at))
    rows.append(("  ablation: packed, attention -> pass-through", _median_s(lambda: noattn_f(params, lora, packed), reps)))
    all_rows_f = jax.jit(lambda p, l, pb: variant(p, l, pb, packing.grid_attention(
        pb, decoder.causal_padding_mask(pb.attn)), None))
    rows.append(("  ablation: packed, last layer on all P positions", _median_s(
        lambda: all_rows_f(params, lora, packed), reps)))

    prepared = inp.prepared("ties", 0.5)
    members = np.flatnonzero(eight).astype(np.int32)
    valid = np.ones(8, bool)
    mm = jax.jit(scoring.merge_members)
    mg = jax.jit(merge.merge_gathered)
    rows.append(("merge of 8: scoring.merge_members (batched path)",
                 _median_s(lambda: mm(prepared, members[None], valid[None], np.ones(1, bool)), reps)))
    rows.append(("merge of 8: merge.merge_gathered (unbatched path)",
                 _median_s(lambda: mg(prepared, members, valid), reps)))
    for name, secs in rows:
        print(f"{name:<60} {secs * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
