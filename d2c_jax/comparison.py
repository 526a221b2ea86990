"""A run's merged adapters next to the references a user compares them with: tables and chart.

Methods (rows): merged (the run's written adapters, each task with its cluster's), single_task
(each task with its own adapter: the upper reference), all_in_one (the run's merge of all N
adapters: what one adapter gives), random_start (the partition the run's search started from,
merged like the run), zero_shot (the base model alone).

Groups: every task ("overall") and each family of tasks.json's tags. A group's row holds the
mean held-out loss, the mean task score (each task scored with its own metric, in [0, 100]),
the mean of each metric over the tasks that use it, and the gap closed:
  gap closed = (m - all_in_one) / (single_task - all_in_one)
of the mean score (of the mean loss without generation): 0 is no better than one adapter for
every task, 1 (100 %) as good as keeping all N single-task adapters; and, with generation
metrics and the single-task reference, the S-score (K-Merge's measure):
  S = mean over the group's tasks of score(m, t) / score(single_task, t)
over the tasks whose single-task score is positive (a ratio to 0 is undefined).

Shapes: T tasks.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

ORDER = ("merged", "single_task", "all_in_one", "random_start", "zero_shot")
LABELS = {"merged": "merged (the run)", "single_task": "single-task", "all_in_one": "all-in-one",
          "random_start": "random start", "zero_shot": "zero-shot"}
GAP_DEFINITION = ("gap closed = (m - all_in_one) / (single_task - all_in_one) of the mean score (of the mean "
                  "loss without generation metrics): 0 % = one adapter for every task, 100 % = every task's own "
                  "adapter")
S_SCORE_DEFINITION = ("S-score = mean over tasks of score(m) / score(single-task), over tasks whose single-task "
                      "score is positive")


EVALUATION_TITLE = "Held-out evaluation of"  # the first line of an evaluation's .md table: "# TITLE ..."
EVALUATION_FILES = ("evaluation.json", "evaluation.md", "evaluation.png")  # a run's own evaluation, in its workdir


def is_our_table(path: str) -> bool:
    """Whether `path` is an evaluation table `markdown` wrote (its title line)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(f"# {EVALUATION_TITLE} ")
    except (OSError, UnicodeDecodeError):
        return False


def run_jobs(jobs: Mapping[str, Callable[[], Any]], progress: bool = True) -> dict[str, Any]:
    """Runs each evaluation in order with a progress bar (one step per method) on stderr."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="evaluating", unit="method", file=sys.stderr, dynamic_ncols=True)
    out = {}
    try:
        for name, job in jobs.items():
            if bar is not None:
                bar.set_postfix_str(LABELS.get(name, name))
            out[name] = job()
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return out


def groups_of(names: Sequence[str], tags: Mapping[str, Mapping[str, str]]) -> dict[str, list[int]]:
    """{"overall": every task, family: its tasks} (families in order of first appearance)."""
    out: dict[str, list[int]] = {"overall": list(range(len(names)))}
    families: dict[str, list[int]] = {}
    for t, name in enumerate(names):
        fam = (tags.get(name) or {}).get("family")
        if fam:
            families.setdefault(fam, []).append(t)
    if len(families) > 1 or (families and len(next(iter(families.values()))) < len(names)):
        out.update(families)
    return out


def s_score(scores_t: Sequence[float], single_t: Sequence[float]) -> float | None:
    """The S-score: mean over tasks of (score with the task's merged adapter) / (score with its own
    adapter), over the tasks whose own score is positive; None if there is none."""
    merged, single = np.asarray(scores_t, np.float64), np.asarray(single_t, np.float64)
    ok = single > 0
    return float(np.mean(merged[ok] / single[ok])) if ok.any() else None


def _gap(value: float | None, low: float | None, high: float | None) -> float | None:
    if value is None or low is None or high is None or high == low:
        return None
    return (value - low) / (high - low)


def group_rows(results: Mapping[str, Any], idx: Sequence[int]) -> list[dict[str, Any]]:
    """One row per method (ORDER first) on the tasks `idx`: loss, score, each metric, gap closed."""
    rows = []
    for m in sorted(results, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        r = results[m]
        row: dict[str, Any] = {"method": m, "loss": float(np.mean(r.losses_t[idx]))}
        if r.scores_t is not None:
            row["score"] = float(np.mean(r.scores_t[idx]))
            for metric in sorted({r.metrics[t] for t in idx}):
                row[metric] = float(np.mean([r.scores_t[t] for t in idx if r.metrics[t] == metric]))
        rows.append(row)
    by = {row["method"]: row for row in rows}
    lo, hi = by.get("all_in_one"), by.get("single_task")
    single = results.get("single_task")
    for row in rows:
        r = results[row["method"]]
        row["s_score"] = (None if single is None or single.scores_t is None or r.scores_t is None
                          else s_score(r.scores_t[idx], single.scores_t[idx]))
        row["gap_closed_loss"] = None if lo is None or hi is None else _gap(row["loss"], lo["loss"], hi["loss"])
        row["gap_closed_score"] = (None if lo is None or hi is None or "score" not in row
                                   else _gap(row["score"], lo["score"], hi["score"]))
        row["gap_closed"] = row["gap_closed_score"] if "score" in row else row["gap_closed_loss"]
    return rows


def comparison_document(docs: Mapping[str, Any], results: Mapping[str, Any],
                        tags: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The JSON's "comparison": every method's {"tasks", "summary"} and the tables per group."""
    names = next(iter(results.values())).names
    groups = groups_of(names, tags)
    return {
        "methods": dict(docs),
        "groups": {g: {"tasks": [names[t] for t in idx], "rows": group_rows(results, idx)}
                   for g, idx in groups.items()},
        "gap_closed_definition": GAP_DEFINITION,
    }


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    metrics = sorted({k for r in rows for k in r} - {"method", "loss", "score", "gap_closed", "gap_closed_loss",
                                                     "gap_closed_score", "s_score"})
    cols = ["loss"] + (["score"] if any("score" in r for r in rows) else []) + metrics
    if any(r.get("s_score") is not None for r in rows):
        cols.append("s_score")
    if any(r.get("gap_closed") is not None for r in rows):
        cols.append("gap_closed")
    return cols


def _cell(row: Mapping[str, Any], col: str) -> str:
    value = row.get(col)
    if value is None:
        return "-"
    if col == "gap_closed":
        return f"{100 * value:.0f} %"
    return f"{value:.4f}" if col == "loss" else f"{value:.3f}" if col == "s_score" else f"{value:.2f}"


def _header(group: str, n: int) -> str:
    return f"{group} ({n} task{'s' if n != 1 else ''})"


def text_tables(comparison: Mapping[str, Any]) -> str:
    """One aligned table per group, for the terminal."""
    blocks = []
    for group, g in comparison["groups"].items():
        rows, cols = g["rows"], _columns(g["rows"])
        label_w = max(len(LABELS.get(r["method"], r["method"])) for r in rows)
        widths = [max(len(c), 8) for c in cols]
        lines = [_header(group, len(g["tasks"])),
                 "  " + "method".ljust(label_w) + "".join(f"  {_title(c):>{w}}" for c, w in zip(cols, widths))]
        for r in rows:
            lines.append("  " + LABELS.get(r["method"], r["method"]).ljust(label_w)
                         + "".join(f"  {_cell(r, c):>{w}}" for c, w in zip(cols, widths)))
        blocks.append("\n".join(lines))
    blocks.append("loss: held-out loss (lower is better); score and metrics: higher is better" + _gap_note(comparison))
    return "\n\n".join(blocks)


def _gap_note(comparison: Mapping[str, Any]) -> str:
    has_gap = any(r.get("gap_closed") is not None for g in comparison["groups"].values() for r in g["rows"])
    has_s = any(r.get("s_score") is not None for g in comparison["groups"].values() for r in g["rows"])
    return ("; " + GAP_DEFINITION if has_gap else "") + ("; " + S_SCORE_DEFINITION if has_s else "")


def _title(col: str) -> str:
    return "S-score" if col == "s_score" else col.replace("_", " ")


def markdown(comparison: Mapping[str, Any], title: str) -> str:
    """The same tables as Markdown."""
    out = [f"# {title}", ""]
    for group, g in comparison["groups"].items():
        rows, cols = g["rows"], _columns(g["rows"])
        out += [f"## {_header(group, len(g['tasks']))}", "",
                "| method | " + " | ".join(_title(c) for c in cols) + " |",
                "|---|" + "---:|" * len(cols)]
        out += ["| " + LABELS.get(r["method"], r["method"]) + " | " + " | ".join(_cell(r, c) for c in cols) + " |"
                for r in rows]
        out.append("")
    out.append("Loss: held-out loss (lower is better); score and metrics: higher is better" + _gap_note(comparison)
               + ".")
    return "\n".join(out) + "\n"


def chart_values(comparison: Mapping[str, Any]) -> tuple[list[str], list[str], np.ndarray, str]:
    """(groups, methods, values [G, M], what): the mean score per group and method (the mean loss
    without generation metrics)."""
    groups = list(comparison["groups"])
    rows0 = comparison["groups"][groups[0]]["rows"]
    methods = [r["method"] for r in rows0]
    key = "score" if all("score" in r for r in rows0) else "loss"
    values = np.array([[next(r[key] for r in comparison["groups"][g]["rows"] if r["method"] == m) for m in methods]
                       for g in groups], np.float64)
    what = "mean task score (higher is better)" if key == "score" else "mean held-out loss (lower is better)"
    return groups, methods, values, what
