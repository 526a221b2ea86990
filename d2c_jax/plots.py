"""The run's two figures, rendered to PNG bytes (matplotlib Agg; the caller writes them atomically).

- objective vs iteration: every chain's global objective at the tracked iterations (metrics rows
  with "objectives"), the best chain in bold, the random start's and the all-in-one merge's
  objectives as labelled horizontal lines (lower is better);
- comparison bars (launch/evaluate.py): one bar per method (merged, single-task, ...) in each
  group of tasks (overall, each family);
- assignment map: tasks (rows) × clusters (columns), tasks grouped by their tags (family, then
  language, from tasks.json) when present, so that a clustering by family shows as blocks.

Shapes: P chains, N tasks, K clusters.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


SOFTWARE = "d2c_jax"  # each PNG's Software text: how a later run tells its own figure from a user's file


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": SOFTWARE})
    pyplot().close(fig)
    return buf.getvalue()


def is_our_png(path: str) -> bool:
    """Whether `path` is a figure `png` wrote (its Software text chunk, before the image data)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + SOFTWARE.encode() in head


def objective_png(metrics: Sequence[Mapping[str, Any]], title: str = "D²C search", *,
                  random_start: float | None = None, all_in_one: float | None = None) -> bytes:
    """Global objective (summed per-task loss) per chain against the iteration, with the random
    start's and the all-in-one merge's objectives as labelled reference lines."""
    return png(objective_figure(metrics, title, random_start=random_start, all_in_one=all_in_one))


def objective_figure(metrics: Sequence[Mapping[str, Any]], title: str = "D²C search", *,
                     random_start: float | None = None, all_in_one: float | None = None):
    """The matplotlib figure of objective_png."""
    plt = pyplot()
    rows = [r for r in metrics if r.get("objectives")]
    fig, ax = plt.subplots(figsize=(7, 4))
    if rows:
        its = np.array([r["iteration"] for r in rows])
        obj_tp = np.array([r["objectives"] for r in rows], np.float64)
        best = int(np.nanargmin(obj_tp[-1])) if np.isfinite(obj_tp[-1]).any() else 0
        for p in range(obj_tp.shape[1]):
            ax.plot(its, obj_tp[:, p], lw=2.2 if p == best else 0.9, alpha=1.0 if p == best else 0.5,
                    marker="o" if len(its) < 30 else None, ms=3, label=f"chain {p} (best)" if p == best else None)
    for value, label, style in ((random_start, "random start", ":"), (all_in_one, "all-in-one merge", "--")):
        if value is not None and np.isfinite(value):
            ax.axhline(value, color="0.35", ls=style, lw=1.2, label=f"{label} {value:.4g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective: summed task loss (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def comparison_png(groups: Sequence[str], methods: Sequence[str], values_gm: np.ndarray, ylabel: str,
                   labels: Mapping[str, str] | None = None, title: str = "held-out evaluation") -> bytes:
    """Grouped bars: for each group of tasks (G), one bar per method (M); values_gm [G, M]."""
    plt = pyplot()
    labels = labels or {}
    values_gm = np.asarray(values_gm, np.float64)
    g, m = values_gm.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 + 0.35 * g * m + 0.4 * g), 4))
    width = 0.8 / max(m, 1)
    x_g = np.arange(g)
    for j in range(m):
        bars = ax.bar(x_g - 0.4 + width * (j + 0.5), values_gm[:, j], width, label=labels.get(methods[j], methods[j]))
        if g * m <= 40:
            ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
    ax.set_xticks(x_g, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def task_order(names: Sequence[str], tags: Mapping[str, Mapping[str, str]] | None) -> list[int]:
    """Task indices grouped by (family, language, name) when tags exist, else by name."""
    tags = tags or {}

    def key(i: int):
        t = tags.get(names[i], {})
        return (t.get("family", ""), t.get("language", ""), names[i])

    return sorted(range(len(names)), key=key)


def assignment_png(
    partition_n: np.ndarray,
    names: Sequence[str],
    num_clusters: int,
    tags: Mapping[str, Mapping[str, str]] | None = None,
    title: str = "cluster assignment",
) -> bytes:
    """Tasks × clusters map (a filled cell: the task's adapter is merged into that cluster)."""
    plt = pyplot()
    tags = tags or {}
    order = task_order(names, tags)
    n = len(names)
    grid_nk = np.zeros((n, num_clusters))
    labels = []
    fams = sorted({tags.get(name, {}).get("family", "") for name in names})
    for row, i in enumerate(order):
        t = tags.get(names[i], {})
        grid_nk[row, int(partition_n[i])] = 1 + fams.index(t.get("family", ""))
        extra = "/".join(v for v in (t.get("family"), t.get("language")) if v)
        labels.append(f"{names[i]} ({extra})" if extra else names[i])
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * num_clusters, 1.2 + 0.22 * n))
    cmap = plt.get_cmap("tab10" if len(fams) <= 10 else "tab20")
    colours = np.ones((n, num_clusters, 3))
    for r in range(n):
        for k in range(num_clusters):
            if grid_nk[r, k]:
                colours[r, k] = cmap(int(grid_nk[r, k] - 1) % cmap.N)[:3]
    ax.imshow(colours, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(num_clusters), [str(k) for k in range(num_clusters)])
    ax.set_yticks(range(n), labels, fontsize=7 if n > 20 else 9)
    ax.set_xticks(np.arange(-0.5, num_clusters), minor=True)
    ax.set_yticks(np.arange(-0.5, n), minor=True)
    ax.grid(which="minor", color="0.85", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("cluster")
    ax.set_title(title)
    return png(fig)
