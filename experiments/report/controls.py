"""Controls of the report's best method (an operator with tuned factors on the D²C-ours partitions):
which part of its score comes from the partition, which from the operator, which from tuning.

Shapes: N adapters (= tasks), K clusters, R adapter rank.

`run_controls(...)` adds, on Table 1's D²C partitions (the paper's setting, key "d2c") and ours
("d2c_ours"), both found with the report's merge: the operator and the scale operator (core_ta: task
arithmetic) with unit weights; the scale operator with one tuned weight per cluster (variant
"scale_tuned", tune.py granularity "scale"); a fresh rank-R LoRA per cluster from PEFT's
initialisation trained like the tuned factors, at their step budget ("fresh_factors") and a larger
one ("fresh_long_factors"); the operator's tuned factors where the operator section has none; and the
operator, unit and tuned factors, on the random baseline's partitions and the all-in-one merge
(K = 1). Every tuned row is fitted on the search examples with tune.py's held-out guard; every
score is on the held-out .eval.jsonl split. `render_controls(res, ...)` gives the table and the
findings.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from experiments.report.analysis import gap as _gap
from experiments.report.merging import Log, _tuned_runs, cells, select

TARGET_MARGIN = 3.0  # points of held-out score the best method must beat every control by
TARGET_GAP = 0.75  # fraction of the all-in-one -> single-task gap it must close


def run_controls(bench: Any, cfg: Any, done: dict, record: Callable[[Any], Any], log: Log,
                 unit: Callable[..., Any], op: str, mean_score: Callable[[str, str], float]) -> None:
    """The runs of the module docstring for the tuned-factor operator `op`; `unit(key, seed, part,
    op, kk)` evaluates (or reuses) a unit-weight run, `mean_score(op, variant)` is the operator
    section's mean on the D²C-ours partitions (-inf: no such runs)."""
    from d2c_jax import tune

    k = cfg.num_clusters
    seeds = list(range(min(cfg.seeds, cfg.operator_seeds)))

    def table1(key: str, kk: int = k) -> list[tuple[str, int | None, np.ndarray]]:
        ss = [None] if key == "all_in_one" else seeds
        return [(key, s, np.asarray(done[(key, kk, s, cfg.merge)].partition, np.int32))
                for s in ss if (key, kk, s, cfg.merge) in done]

    paired = table1("d2c") + table1("d2c_ours")
    sop = cfg.scale_operator
    for key, seed, part in paired + table1("random"):
        unit(key, seed, part, op)
    for key, seed, part in paired:
        unit(key, seed, part, sop)
    for key, seed, part in table1("all_in_one", 1):
        unit(key, seed, part, op, 1)

    def tuned(parts, variant, settings=None, kk=k, rank=0):
        if parts:  # always in the compiled steps of K clusters (K = 1: one used, the others empty)
            for r in _tuned_runs(bench, cfg, op if variant.endswith("factors") else sop, parts, kk, log,
                                 rank=rank, variant=variant, settings=settings, tune_k=k):
                record(r)

    # Tuned factors of `op` where the operator section has none (it has the D²C-ours ones).
    tuned([p for p in paired if not (p[0] == "d2c_ours" and mean_score(op, "factors") > -np.inf)]
          + table1("random"), "factors")
    tuned(table1("all_in_one", 1), "factors", kk=1)
    scale = tune.TuneSettings(granularity="scale")  # a search over c (tune._scale_search), no steps
    tuned(paired, "scale_tuned", scale)
    if sop == "core_ta":  # task arithmetic's exact sum: an output rank that truncates nothing
        tuned(paired, "scale_tuned_exact", scale, rank=exact_rank(bench.prepared(sop)))
    tuned(paired, "fresh_factors", tune.TuneSettings(granularity="factors", steps=cfg.factor_steps, start="fresh"))
    if cfg.fresh_long_steps:
        tuned(paired, "fresh_long_factors", tune.TuneSettings(granularity="factors", steps=cfg.fresh_long_steps,
                                                              start="fresh", patience=cfg.fresh_long_patience))


def exact_rank(prepared: Any) -> int:
    """The largest min(d_out, d_in) over the modules: at this output rank core_ta's merge is the
    whole sum of its members' updates (no truncation), at that much more storage."""
    return max(min(ab["b"].shape[-2], ab["a"].shape[-1]) for ab in prepared.task.values())


def render_controls(res: Any, seeds: list[int], lo: float, hi: float) -> list[str]:
    """The controls table and its findings (empty when the report ran without controls)."""
    from experiments.report.render import _md_table  # render imports merging, which imports this lazily

    fresh = [r for r in res.runs if r.variant == "fresh_factors"]
    if not fresh:
        return []
    cfg, k, rank = res.cfg, res.cfg.num_clusters, res.adapters["rank"]
    op, sop, base = fresh[0].merge, cfg.scale_operator, cfg.merge
    ta = " (task arithmetic)" if sop == "core_ta" else ""

    def runs(key, merge, variant, kk=k):
        return select(res, seeds, key, merge, variant, kk)

    def mean(key, merge, variant, kk=k):
        rr = runs(key, merge, variant, kk)
        return float(np.mean([r.score for r in rr])) if rr else None

    long_label = (f"fresh rank-{rank} LoRA per cluster, ≤ {cfg.fresh_long_steps} steps (patience "
                  f"{cfg.fresh_long_patience})")
    exact = [r.rank for r in res.runs if r.variant == "scale_tuned_exact"]
    exact_label = (f"{sop}{ta} at rank {exact[0]} (the exact sum, {exact[0] / rank:g}× the storage), one tuned "
                   "scale per cluster") if exact else ""
    per_partition = [
        (base, "", f"{base}, unit weights (the paper's merge)"),
        (op, "", f"{op}, unit weights"),
        (sop, "", f"{sop}{ta}, unit weights"),
        (sop, "scale_tuned", f"{sop}{ta}, one tuned scale per cluster"),
        (sop, "scale_tuned_exact", exact_label),
        (op, "fresh_factors", f"fresh rank-{rank} LoRA per cluster, ≤ {cfg.factor_steps} steps"),
        (op, "fresh_long_factors", long_label),
        (op, "factors", f"{op}, tuned factors (≤ {cfg.factor_steps} steps)"),
    ]
    groups = [("d2c", "D²C paper (found with " + base + ")", k, per_partition),
              ("d2c_ours", "D²C ours (found with " + base + ")", k, per_partition),
              ("random", "Random (Table 1's seeds)", k, per_partition[1:2] + per_partition[-1:]),
              ("all_in_one", "All-in-one (K = 1)", 1, per_partition[1:2] + per_partition[-1:])]
    table = []
    for key, label, kk, rows in groups:
        for merge, variant, what in rows:
            rr = runs(key, merge, variant, kk)
            if rr:
                table.append([label, what] + cells(rr, lo, hi))
    out = ["", f"### Controls: partition, operator or tuning? (K = {k}, seeds {', '.join(map(str, seeds))})", "",
           f"The same examples for every row, and the same storage (K rank-{rank} adapters) but for the exact sum. Fresh LoRA = a new "
           f"rank-{rank} LoRA per cluster from PEFT's initialisation (A uniform in ±1/sqrt(d_in), B = 0: the base "
           "model), trained on the cluster's pooled search examples with the tuned factors' optimiser, learning "
           "rate and held-out guard (7 of 10 examples per task fitted, early stop and keep-if-better on the other 3). "
           f"One tuned scale = {sop} with a single merge weight per cluster shared by its members (tune.py "
           "granularity scale: c searched on the fit examples, a log grid per cluster from 1/(2n) to 2, n its "
           "members, refined around the best value; same guard)"
           + (f"; at rank {rank} it is the sum of the members' updates truncated to rank {rank}" if ta else "")
           + ". Random and all-in-one partitions are "
           "Table 1's.",
           ""]
    out.append(_md_table(["Partitions", "Method", "Avg score ↑", "Eval loss ↓", "Gap closed", "Runs"], table,
                         "llrrrr"))
    best = mean("d2c_ours", op, "factors")
    if best is None:
        return out
    lines = []
    paper_f, rand_f, aio_f = mean("d2c", op, "factors"), mean("random", op, "factors"), mean("all_in_one", op,
                                                                                            "factors", 1)
    u_ours, u_rand = mean("d2c_ours", op, ""), mean("random", op, "")
    if rand_f is not None:
        lines.append(f"Partition: with {op} and tuned factors, D²C ours {best:.2f}, D²C paper "
                     + (f"{paper_f:.2f}" if paper_f is not None else "—")
                     + f", random {rand_f:.2f}" + (f", all-in-one {aio_f:.2f}" if aio_f is not None else "")
                     + f": the partition is worth {best - rand_f:+.2f} points over a random one"
                     + (f" ({best - aio_f:+.2f} over no partition)" if aio_f is not None else "")
                     + (f"; with unit {op} weights {u_ours:.2f} vs random {u_rand:.2f} ({u_ours - u_rand:+.2f})."
                        if u_ours is not None and u_rand is not None else "."))
    u_base, ta_u, ta_s = mean("d2c_ours", base, ""), mean("d2c_ours", sop, ""), mean("d2c_ours", sop, "scale_tuned")
    if u_base is not None and u_ours is not None:
        lines.append(f"Operator (D²C-ours partitions, unit weights): {base} {u_base:.2f} → {op} {u_ours:.2f} "
                     f"({u_ours - u_base:+.2f})"
                     + (f"; {sop}{ta} {ta_u:.2f}" if ta_u is not None else "")
                     + (f", with one tuned scale per cluster {ta_s:.2f}" if ta_s is not None else "") + ".")
    f_s, f_l = mean("d2c_ours", op, "fresh_factors"), mean("d2c_ours", op, "fresh_long_factors")
    if u_ours is not None:
        fresh_best = max(x for x in (f_s, f_l, -np.inf) if x is not None)
        lines.append(f"Tuning: {op} unit {u_ours:.2f} → tuned factors {best:.2f} ({best - u_ours:+.2f}); a fresh "
                     f"LoRA per cluster on the same examples reaches "
                     + (f"{f_s:.2f}" if f_s is not None else "—")
                     + (f" ({f_l:.2f} with ≤ {cfg.fresh_long_steps} steps)" if f_l is not None else "")
                     + (f", so starting from the merge is worth {best - fresh_best:+.2f} over training from scratch."
                        if np.isfinite(fresh_best) else "."))
    controls = []
    for key, label in (("d2c", "D²C paper"), ("d2c_ours", "D²C ours")):
        for merge, variant, what in per_partition[3:7]:
            x = mean(key, merge, variant)
            if x is not None:
                controls.append((x, f"{what} on the {label} partitions"))
    for key, label, kk in (("random", "random partitions", k), ("all_in_one", "the all-in-one merge", 1)):
        x = mean(key, op, "factors", kk)
        if x is not None:
            controls.append((x, f"{op}, tuned factors on {label}"))
    if controls:
        c, what = max(controls)
        margin = best - c
        lines.append(f"Target (the best method beats every control by ≥ {TARGET_MARGIN:g} points): {best:.2f} vs the "
                     f"strongest control, {what}, {c:.2f}: margin {margin:+.2f}: "
                     + ("met." if margin >= TARGET_MARGIN else
                        ("not met — the control wins." if margin < 0 else "not met.")))
    if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
        target = lo + TARGET_GAP * (hi - lo)
        lines.append(f"Gap target (≥ {TARGET_GAP:.0%}, score ≥ {target:.2f}): {best:.2f} = {_gap(best, lo, hi)} of the "
                     "gap: " + ("met." if best >= target else "not met."))
    for variant, what in (("fresh_factors", f"≤ {cfg.factor_steps} steps"), ("fresh_long_factors", long_label[
            long_label.index("≤"):])):
        rr = [r for r in res.runs if r.variant == variant and r.extra and r.seed in seeds]
        if rr:
            best_steps, ran = [r.extra["best_step"] for r in rr], [r.extra.get("steps", 0) for r in rr]
            lines.append(f"The fresh LoRA with {what} kept the weights of held-out best step {min(best_steps)} to "
                         f"{max(best_steps)} (the latest over a partition's clusters) and ran {min(ran)} to "
                         f"{max(ran)} steps.")
    return out + [""] + [f"- {line}" for line in lines]
