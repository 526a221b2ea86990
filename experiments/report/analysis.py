"""Table 1's analyses, computed from the numbers of a ReportResult: the rows, the findings and the
explanation of the outcome in sentences, the adjusted Rand index against the tags, Spearman
correlations of loss and score.

Shapes: N adapters (= T tasks), K clusters, S seeds.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from d2c_jax import comparison
from experiments.report.run import ReportResult, Run, tag_labels


def ari(labels_n: np.ndarray | None, partition_n: Sequence[int]) -> float | None:
    from sklearn.metrics import adjusted_rand_score

    if labels_n is None:
        return None
    return float(adjusted_rand_score(labels_n, np.asarray(partition_n)))


def stats(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(xs, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def table1_rows(res: ReportResult) -> list[dict[str, Any]]:
    """Rows of Table 1: label, K, runs (over seeds)."""
    n, k = len(res.names), res.cfg.num_clusters
    rows = [
        {"key": "zero_shot", "label": "Zero-shot (base model)", "k": 0, "runs": res.select("zero_shot")},
        {"key": "single", "label": "Single-task adapters (upper bound)", "k": n, "runs": res.select("single")},
        {"key": "all_in_one", "label": "All-in-one merge", "k": 1, "runs": res.select("all_in_one", 1)},
    ]
    for m in res.cfg.methods():
        rows.append({"key": m.key, "label": m.label, "k": k, "runs": res.select(m.key, k)})
    return rows


def s_score_of(res: ReportResult, run: Run) -> float | None:
    """The run's S-score (`comparison.s_score`) against the single-task adapters' held-out scores."""
    single = res.select("single")
    return comparison.s_score(run.task_scores, single[0].task_scores) if single else None


def families(res: ReportResult) -> list[str]:
    return sorted({res.tags[n].get("family", "?") for n in res.names})


def per_family(res: ReportResult, runs: Sequence[Run]) -> list[str]:
    fams = families(res)
    out = []
    for fam in fams:
        idx = [i for i, n in enumerate(res.names) if res.tags[n].get("family", "?") == fam]
        out.append(f"{np.mean([np.mean([r.task_scores[i] for i in idx]) for r in runs]):.1f}"
                   if runs else "—")
    return out


def mean_of(runs: Sequence[Run], attr: str) -> float:
    return float(np.mean([getattr(r, attr) for r in runs])) if runs else float("nan")


def findings(res: ReportResult) -> list[str]:
    """The honest outcome, in sentences computed from the numbers."""
    k = res.cfg.num_clusters
    out = []
    d2c = res.select("d2c", k)
    ours = res.select("d2c_ours", k)
    for label, runs in (("D²C (paper setting)", d2c), ("D²C (ours)", ours)):
        if not runs:
            continue
        for base_key, base_label in (("random", "random clusters"), ("kmeans", "K-means"),
                                     ("svd_kmeans", "SVD K-means")):
            base = res.select(base_key, k)
            if not base:
                continue
            diffs = [r.score - b.score for r, b in zip(sorted(runs, key=lambda r: r.seed),
                                                       sorted(base, key=lambda r: r.seed))]
            m, s = stats(diffs)
            wins = sum(d > 0 for d in diffs)
            verdict = "beats" if m > 0 and wins == len(diffs) else (
                "does not reliably beat" if m > 0 else "does not beat")
            out.append(f"{label} {verdict} {base_label}: score difference {m:+.2f} ± {s:.2f} points "
                       f"(higher in {wins} of {len(diffs)} seeds); eval loss {mean_of(runs, 'loss'):.4f} "
                       f"vs {mean_of(base, 'loss'):.4f}.")
    single, zero, aio = res.select("single"), res.select("zero_shot"), res.select("all_in_one", 1)
    if single and zero and aio and d2c:
        out.append(f"Reference points: single-task {single[0].score:.2f}, zero-shot {zero[0].score:.2f}, "
                   f"all-in-one {aio[0].score:.2f}; D²C (paper setting) {mean_of(d2c, 'score'):.2f} closes "
                   f"{gap(mean_of(d2c, 'score'), aio[0].score, single[0].score)} of the gap between "
                   "all-in-one and single-task adapters.")
    if d2c:
        base = res.select("random", k)
        if base:
            out.append(f"Search-split loss (what D²C minimises, mean per task): D²C paper "
                       f"{np.mean([r.search_loss for r in d2c]):.4f} vs random {np.mean([r.search_loss for r in base]):.4f}"
                       + (f", D²C ours {np.mean([r.search_loss for r in ours]):.4f}" if ours else "") + ".")
    return out


def explanations(res: ReportResult) -> list[str]:
    """Why D²C (paper setting) lands where it does, in sentences computed from the numbers:
    search budget (converged or not), whether the weights alone reveal the grouping, and whether
    the merge method changes the ranking of partitions."""
    cfg, k = res.cfg, res.cfg.num_clusters
    out: list[str] = []
    d2c, ours = res.select("d2c", k), res.select("d2c_ours", k)
    candidates = [r for r in res.runs if r.merge == cfg.merge and r.num_clusters == k
                  and r.search_loss is not None and r.partition is not None]
    if d2c and candidates:
        best = min(candidates, key=lambda r: r.search_loss)
        d2c_sl = float(np.mean([r.search_loss for r in d2c]))
        gap = d2c_sl - best.search_loss
        text = (f"Search budget: after T = {cfg.iterations} iterations D²C (paper setting) reaches a "
                f"search loss of {d2c_sl:.4f} (mean over seeds), while the lowest search loss of any "
                f"partition evaluated at K = {k} is {best.search_loss:.4f} ({best.key}"
                + (f", seed {best.seed}" if best.seed is not None else "") + "). ")
        if gap > 1e-3:
            text += ("The paper's search has not converged within this budget: each iteration tries "
                     "one random move and judges it by the moved task's loss alone.")
        else:
            text += "The paper's search has converged to (near) the best partition found."
        long_runs = res.select("d2c_long", k)
        if long_runs:
            text += (f" With T = {cfg.long_iterations} (seed 0) it reaches {long_runs[0].search_loss:.4f}.")
        if ours:
            text += (f" Our setting (P = {cfg.population} chains × M = {cfg.proposals} proposals, "
                     f"{cfg.objective} objective) reaches {np.mean([r.search_loss for r in ours]):.4f} "
                     f"in the same T.")
        out.append(text)
    fam = tag_labels(res.tags, res.names, "family")
    svd = res.select("svd_kmeans", k)
    if fam is not None and svd:
        a = [ari(fam, r.partition) for r in svd]
        if all(x is not None for x in a):
            oracle = res.select("by_family")
            loss = (f" and a search loss of {np.mean([r.search_loss for r in svd]):.4f}"
                    + (f" (the family oracle: {oracle[0].search_loss:.4f})"
                       if oracle and oracle[0].search_loss is not None else ""))
            if np.mean(a) >= 0.5:
                out.append(
                    f"What the weights reveal: SVD K-means, which never looks at data, groups the tasks by "
                    f"family with ARI {np.mean(a):.3f}{loss}. On this suite the adapters of one family are alike "
                    "in weight space, so the partition the data-driven objective prefers is already visible "
                    "in the weights and a data-driven search has little room to beat it; it can win only "
                    "where weight similarity and mergeability disagree.")
            else:
                lang = tag_labels(res.tags, res.names, "language")
                by_lang = ([ari(lang, r.partition) for r in svd] if lang is not None else [])
                out.append(
                    f"What the weights reveal: SVD K-means, which never looks at data, does not group the tasks "
                    f"by family (with ARI {np.mean(a):.3f}"
                    + (f"; against the languages: {np.mean(by_lang):.3f}" if by_lang and None not in by_lang else "")
                    + f"){loss}. On this suite weight similarity and mergeability disagree, so only a "
                      "search that scores merges on data can find the partition that merges well.")
    for other in cfg.compare_merges:
        pairs = []
        for r in res.runs:
            if r.merge != cfg.merge or r.partition is None or r.seed not in (None, 0):
                continue
            o = [x for x in res.select(r.key, r.num_clusters, merge=other) if x.partition == r.partition]
            if o:
                pairs.append((r.score, o[0].score))
        if len(pairs) >= 3:
            x = np.asarray(pairs, np.float64)
            rho = _spearman(x[:, 0], x[:, 1])
            out.append(
                f"Merge method: the same {len(pairs)} partitions merged with {other} instead of {cfg.merge} "
                f"score {np.mean(x[:, 1] - x[:, 0]):+.2f} points on average (from {np.min(x[:, 1] - x[:, 0]):+.2f} "
                f"to {np.max(x[:, 1] - x[:, 0]):+.2f}); Spearman ρ between the two scorings of the partitions "
                f"= {'n/a' if rho is None else f'{rho:+.2f}'}" + (", so the merge method shifts the scores but hardly changes which "
                                  "partition is best." if rho is not None and rho > 0.8 else "."))
    return out


def loss_score_correlations(res: ReportResult) -> dict[str, Any]:
    """Spearman correlations over the distinct partitions evaluated at K (main merge): does a
    lower (search / eval) loss go with a higher score?"""
    k = res.cfg.num_clusters
    seen, rows = set(), []
    for r in res.runs:
        if r.merge == res.cfg.merge and r.num_clusters == k and r.partition is not None \
                and r.search_loss is not None and r.partition not in seen:
            seen.add(r.partition)
            rows.append((r.search_loss, r.loss, r.score))
    out: dict[str, Any] = {"partitions": len(rows)}
    if len(rows) >= 3:
        x = np.asarray(rows, np.float64)
        for name, (i, j) in {"search_loss_vs_score": (0, 2), "eval_loss_vs_score": (1, 2),
                             "search_loss_vs_eval_loss": (0, 1)}.items():
            out[name] = _spearman(x[:, i], x[:, j])
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho, None where it is undefined (a constant input)."""
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = float(spearmanr(x, y).statistic)
    return rho if np.isfinite(rho) else None


def gap(x: float, lo: float, hi: float) -> str:
    if not math.isfinite(hi - lo) or abs(hi - lo) < 1e-9:
        return "n/a"
    return f"{100.0 * (x - lo) / (hi - lo):.0f} %"


def count_runs(res: ReportResult, key: str, k: int, seeds: Sequence[int]) -> list[Run]:
    """A strategy's runs at K clusters for the cluster-count section (K = 1: the all-in-one merge)."""
    return res.select("all_in_one", 1) if k == 1 else res.select(key, k, seeds=seeds)


def best_d2c(res: ReportResult) -> Run | None:
    """The D²C (paper setting) run at K with the lowest search loss, None when there is none."""
    runs = res.select("d2c", res.cfg.num_clusters)
    return min(runs, key=lambda r: (r.search_loss if r.search_loss is not None else 0.0)) if runs else None
