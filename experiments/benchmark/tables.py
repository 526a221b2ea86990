"""The benchmark's printed tables: the side-by-side speed table and the strategy table."""

from __future__ import annotations

from typing import Any

from experiments.benchmark.sessions import STALL_ITERATIONS


def _fmt(x: Any, spec: str = ".3g", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, spec)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _text_table(table: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned, a
    dash line under the head row."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def speed_table(result: dict[str, Any]) -> str:
    """The side-by-side table: reference | d2c_jax paper | d2c_jax P/M."""
    cols = result["columns"]
    ref_eps, ref_best = cols[0]["evals_per_s"], cols[0]["best_evals_per_s"]
    ref_pps = cols[0]["proposals"] / cols[0]["seconds"] if cols[0]["seconds"] else None

    def per_s(c: dict[str, Any], key: str) -> float | None:
        return c[key] / c["seconds"] if c["seconds"] else None

    def dev(c: dict[str, Any]) -> str:
        m = c.get("device_memory")
        if not m or "peak_bytes_in_use" not in m:
            return "n/a (CPU)" if c["column"] != "reference" else "-"
        return f"{m['peak_bytes_in_use'] / 2**20:.0f}"

    rows = [
        ("settings", [c["settings"] for c in cols]),
        ("batch size (requests / call)", [str(c["batch_size"]) for c in cols]),
        ("iterations timed", [str(c["iterations"]) for c in cols]),
        ("proposals (moves) timed", [str(c["proposals"]) for c in cols]),
        ("scorer evaluations", [str(c["evaluations"]) for c in cols]),
        ("loss-cache hit rate", [_fmt(c["cache_hit_rate"], ".1%", "- (no cache)") for c in cols]),
        ("seconds / iteration (mean)", [_fmt(c["seconds_per_iteration"], ".2f") for c in cols]),
        ("seconds / iteration (median; best)", [f"{c['median_seconds_per_iteration']:.2f}; "
                                                f"{c['best_seconds_per_iteration']:.2f}" for c in cols]),
        ("CPU seconds / iteration (all threads)", [_fmt(c["cpu_seconds_per_iteration"], ".2f") for c in cols]),
        ("evaluations / s", [_fmt(c["evals_per_s"], ".3f") for c in cols]),
        ("speed-up, evaluations / s", [_fmt(c["evals_per_s"] / ref_eps if c["evals_per_s"] and ref_eps else None,
                                            ".2f") + "x" for c in cols]),
        ("best iteration: evaluations / s", [_fmt(c["best_evals_per_s"], ".3f") for c in cols]),
        ("speed-up, best iteration", [_fmt(c["best_evals_per_s"] / ref_best if c["best_evals_per_s"] and ref_best
                                           else None, ".2f") + "x" for c in cols]),
        ("proposals / s", [_fmt(per_s(c, "proposals"), ".3f") for c in cols]),
        ("speed-up, proposals / s", [_fmt(per_s(c, "proposals") / ref_pps if ref_pps else None, ".2f") + "x"
                                     for c in cols]),
        ("projected 200 iterations", [_minutes(200 * c["seconds_per_iteration"]) for c in cols]),
        ("first-call compile (s)", [_fmt(c["compile_s"], ".1f") for c in cols]),
        ("setup: load model+adapters+data (s)", [_fmt(c["setup_s"], ".1f") for c in cols]),
        ("peak RSS (MB)", [_fmt(c["peak_rss_mb"], ".0f") for c in cols]),
        ("device peak memory (MB)", [dev(c) for c in cols]),
    ]
    head = ["", "reference (torch+PEFT)"] + [c["column"] for c in cols[1:]]
    lines = _text_table([head] + [[name] + vals for name, vals in rows])
    b = cols[0]["per_eval_breakdown_s"]
    p = result["parity"]
    lines += [
        "",
        f"reference per evaluation: add_weighted_adapter(ties) {b['merge_s']:.2f} s + forward "
        f"{b['forward_s']:.2f} s + delete_adapter {b['delete_s']:.2f} s; torch threads {cols[0]['torch_threads']}",
        f"same (mask, task) pairs, reference vs d2c_jax paper: {p['pairs']} losses, max |diff| "
        f"{_fmt(p['max_abs_loss_diff'], '.2e')}; accept/reject decisions agree "
        f"{p['decisions_agree']}/{p['decisions_compared']}",
        "timed iterations interleaved round by round across the three columns (same background load); "
        "projections: 200 x the mean seconds / iteration (the cache hit rate grows over a real run, so "
        "d2c_jax's are upper bounds); d2c_jax's run_search also scores the initial and final partitions "
        f"(up to 2 x {result['fixture']['num_adapters']} x P evaluations), not included",
    ]
    return "\n".join(lines)


def strategy_table(result: dict[str, Any]) -> str:
    rows = result["strategies"]
    if not rows:
        return "(strategy comparison skipped: --strategy_budget=0)"
    n = result["fixture"]["num_adapters"]
    rand = next((r["objective"] for r in rows if r["strategy"] == "random"), None)
    head = ["strategy", "search evals", "iterations", "global objective", "mean task loss", "vs random"]
    table = [head]
    for r in rows:
        table.append([r["strategy"], str(r["search_evaluations"]), str(r["iterations"]), f"{r['objective']:.4f}",
                      f"{r['objective'] / n:.5f}",
                      f"{r['objective'] - rand:+.4f}" if rand is not None else "-"])
    lines = _text_table(table)
    lines.append(f"global objective = summed loss of the {n} tasks, each under its cluster's TIES merge "
                 f"(lower is better); every search strategy stopped at the first iteration reaching "
                 f"{result['bench']['strategy_budget']} scorer evaluations (or after {STALL_ITERATIONS} "
                 f"iterations without a new one); the objective's own evaluations are not counted")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    f, m = result["fixture"], result["machine"]
    return "\n".join([
        f"fixture: random Llama, {f['param_count']:,} parameters (hidden {f['hidden']}, {f['layers']} layers, "
        f"{f['heads']} heads / {f['kv_heads']} kv, mlp {f['intermediate']}, vocab {f['vocab']}, tied embeddings); "
        f"{f['num_adapters']} PEFT LoRA adapters r={f['rank']} alpha={f['alpha']} on q/k/v/o "
        f"({f['adapter_param_count']:,} parameters each); {f['examples_per_task']} examples per task, "
        f"<= {f['seq_len']} tokens; K={result['bench']['num_clusters']}, TIES density {result['bench']['density']}, "
        f"{result['bench']['dtype']}",
        f"machine: {m['cpus']} CPU(s), {m['cpu_model']}; load average {m['loadavg_start'][0]:.1f} at start, "
        f"{m['loadavg_end'][0]:.1f} at end (shared machine: timings are noisy); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ])


def report(result: dict[str, Any]) -> str:
    return "\n\n".join([header(result), speed_table(result), strategy_table(result)])
