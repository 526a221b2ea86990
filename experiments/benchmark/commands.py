"""Whole-command benchmark: the plain transformers + PEFT loop vs `launch/search.py`.

Shapes: N adapters (= tasks), K clusters, T iterations, L layers, D model dim, F mlp dim, V vocab.

For each T (default 40 and 200) three commands run one after the other, in one process tree
(this process starts each as a child and waits for it), so that the columns of a T share the
machine's load of that moment; a matmul peak (float32 1024^3 on CPU; in the run's dtype, 8192^3,
on an accelerator) is measured in this process between them:
  torch    experiments/benchmark/torch_loop.py: Algorithm 1 written as a user writes it (one PEFT
           add_weighted_adapter(ties) + one forward per evaluation, no cache), then the final
           partition's losses;
  default  launch/search.py with the paper's flags (--strategy=d2c --objective=local
           --population=1 --proposals=1 --num_clusters=K --iterations=T --dtype=float32, or the
           run's --dtype) and every other flag at its default, from a cold compilation cache (a
           first run ever);
  best     the same command with our best settings for this job (BEST_FLAGS: the torch loop's
           outputs, i.e. without the gain line's optional all-in-one reference, N evaluations)
           and the compilation cache of the default run (a second run compiles nothing).
Each row: whole-command seconds (start-up, loading and compilation included), evaluations,
evaluations per second (whole command) and per iteration, the model-FLOP utilisation of the
scoring step (model FLOPs of the evaluations / seconds inside the scorer / measured matmul peak,
median over iterations), and the child's peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_FLAGS = ("--strategy=d2c", "--objective=local", "--population=1", "--proposals=1")
# What the torch loop computes, nothing more: the partition and its losses. The default also scores
# the all-in-one merge for the gain line (N evaluations, on by default: issue 12); the random
# start's objective stays in both (29-35 extra evaluations with the local objective).
BEST_FLAGS: tuple[str, ...] = ("--noall_in_one_reference",)
COLUMNS = ("torch", "default", "best")


@dataclasses.dataclass(frozen=True)
class Fixture:
    base_model: str
    adapters_dir: str
    data_dir: str
    num_clusters: int = 5
    examples_per_task: int = 10
    seed: int = 0
    dtype: str = "float32"  # our columns' --dtype (the torch loop runs float32)


def peak_shape(dtype: str) -> tuple[int, str]:
    """(matmul size, dtype) of the peak measurement: float32 1024^3 on CPU (what the scorer runs
    there), the run's dtype at 8192^3 on an accelerator (a 1024^3 product does not fill one)."""
    import jax

    return (1024, "float32") if jax.default_backend() == "cpu" else (8192, dtype)


def matmul_peak_flops(dtype: str = "float32", repeats: int = 5) -> float:
    """Best FLOP/s of a jitted [size, size] @ [size, size] on the default JAX device (peak_shape)."""
    import jax
    import jax.numpy as jnp

    size, dt = peak_shape(dtype)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dt)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def model_flops_per_evaluation(fx: Fixture) -> float:
    """Forward FLOPs one evaluation needs: the layers (matmuls, attention, LoRA) on the task's
    real tokens and the LM head on its loss (response) positions only, the logits the loss
    reads. Counting the LM head at every position would credit us with work we skip."""
    from d2c_jax import data, hf_io, lora
    from d2c_jax.models.config import load_config, module_shapes

    cfg = load_config(fx.base_model)
    names = lora.adapter_subdirs(fx.adapters_dir)
    td = data.load_task_data(fx.data_dir, names, hf_io.load_tokenizer(fx.base_model),
                             examples_per_task=fx.examples_per_task, max_seq_len=100_000)
    dims = module_shapes(cfg)
    per_token = 2 * cfg.num_layers * sum(d_in * d_out for d_in, d_out in dims.values())
    aset = lora.load_adapter_set(fx.adapters_dir, cfg)
    per_token += 2 * cfg.num_layers * aset.rank * sum(dims[m][0] + dims[m][1] for m in aset.a)
    lengths_tn = td.attn_tns.sum(axis=-1) * (np.arange(td.attn_tns.shape[1]) < td.num_examples[:, None])
    tokens = float(lengths_tn.sum(axis=1).mean())
    loss_positions = float((np.asarray(td.weights_tns) > 0).sum(axis=(1, 2)).mean())
    # Causal attention: QK^T and AV over on average half the example, per layer.
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float((lengths_tn ** 2 / 2).sum(axis=1).mean())
    return tokens * per_token + attn + loss_positions * 2 * cfg.hidden_size * cfg.vocab_size


def _run(cmd: Sequence[str], env: dict[str, str], log: str) -> tuple[float, int, float]:
    """(wall seconds, exit status, peak RSS MB) of one child command."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return wall, os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def _env(cache_home: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # JAX's default allocation (launch/benchmark.py sets it)
    if cache_home is not None:  # the column's compilation cache is $XDG_CACHE_HOME/d2c_jax/xla alone
        env["XDG_CACHE_HOME"] = cache_home
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # else jax's own setting would win (a warm "cold" column)
    return env


def run_column(column: str, fx: Fixture, iterations: int, out_dir: str, cache_home: str,
               flops_per_eval: float, peak: float) -> dict[str, Any]:
    """Runs one column's whole command for T = iterations; returns its row."""
    work = os.path.join(out_dir, f"{column}-T{iterations}")
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: a workdir left by an earlier benchmark would resume
    inputs = [f"--base_model={fx.base_model}", f"--adapters_dir={fx.adapters_dir}", f"--data_dir={fx.data_dir}"]
    common = [f"--num_clusters={fx.num_clusters}", f"--iterations={iterations}", f"--seed={fx.seed}",
              f"--examples_per_task={fx.examples_per_task}"]
    if column == "torch":
        out = work + ".json"
        cmd = [sys.executable, os.path.join(ROOT, "experiments", "benchmark", "torch_loop.py"), *inputs, *common,
               f"--output={out}"]
        env = _env()
    else:
        cmd = [sys.executable, os.path.join(ROOT, "launch", "search.py"), *inputs, f"--workdir={work}",
               *PAPER_FLAGS, f"--dtype={fx.dtype}", *common, *(BEST_FLAGS if column == "best" else ())]
        # default: a cold cache (a fresh XDG_CACHE_HOME); best: the one `default` of this T filled.
        cache = os.path.join(cache_home, f"T{iterations}")
        if column == "default":
            shutil.rmtree(cache, ignore_errors=True)
        env = _env(cache)
    wall, code, rss = _run(cmd, env, work + ".log")
    row: dict[str, Any] = {"column": column, "iterations": iterations, "seconds": wall, "exit": code,
                           "peak_rss_mb": rss, "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT)
                                                                    else c for c in cmd[1:])}
    if code != 0:
        return row
    if column == "torch":
        with open(out) as f:
            doc = json.load(f)
        row.update(evaluations=doc["evaluations"], partition=doc["partition"], objective=doc["objective"],
                   scoring_seconds_per_eval=doc["evaluation_seconds"] / max(doc["evaluations"], 1))
    else:
        with open(os.path.join(work, "partition.json")) as f:
            doc = json.load(f)
        with open(os.path.join(work, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        per_eval = [r["scorer_seconds"] / r["evaluations"] for r in rows if r.get("evaluations")]
        row.update(evaluations=doc["evaluations"], objective=doc["objective"], compile=doc.get("compile"),
                   partition=_labels(doc["clusters"], sorted(doc["task_losses"])),
                   scoring_seconds_per_eval=float(np.median(per_eval)) if per_eval else None)
    row["evals_per_s"] = row["evaluations"] / wall
    row["evals_per_iteration"] = row["evaluations"] / max(iterations, 1)
    spe = row.get("scoring_seconds_per_eval")
    row["mfu"] = flops_per_eval / spe / peak if spe else None
    return row


def _labels(clusters: list[list[str]], names: list[str]) -> list[int]:
    out = [0] * len(names)
    for k, members in enumerate(clusters):
        for m in members:
            out[names.index(m)] = k
    return out


def same_partition(a: Sequence[int], b: Sequence[int]) -> bool:
    """Equal up to relabelling the clusters."""
    return {frozenset(np.flatnonzero(np.asarray(a) == k)) for k in set(a)} == \
        {frozenset(np.flatnonzero(np.asarray(b) == k)) for k in set(b)}


def run_benchmark(fx: Fixture, iterations: Sequence[int], out_dir: str,
                  columns: Sequence[str] = COLUMNS, log=print) -> dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    cache_home = tempfile.mkdtemp(dir=out_dir, prefix="cache-")
    flops = model_flops_per_evaluation(fx)
    load = [os.getloadavg()[0]]
    peaks = [matmul_peak_flops(fx.dtype)]
    rows = []
    for t in iterations:
        for column in columns:
            log(f"running {column} T={t} (load average {os.getloadavg()[0]:.1f})")
            rows.append(run_column(column, fx, t, out_dir, cache_home, flops, float(np.median(peaks))))
            peaks.append(matmul_peak_flops(fx.dtype))
            load.append(os.getloadavg()[0])
            log(f"  {rows[-1]['seconds']:.1f} s, exit {rows[-1]['exit']}")
            with open(os.path.join(out_dir, "partial.json"), "w") as f:  # survives an interrupted run
                json.dump({"rows": rows, "matmul_peaks_gflops": [p / 1e9 for p in peaks], "load_average": load,
                           "model_gflops_per_evaluation": flops / 1e9}, f, indent=1)
    peak = float(np.median(peaks))
    for r in rows:  # MFU against the run's median peak
        spe = r.get("scoring_seconds_per_eval")
        r["mfu"] = flops / spe / peak if spe else None
        ref = next((x for x in rows if x["column"] == "torch" and x["iterations"] == r["iterations"]), None)
        if ref and ref.get("exit") == 0 and r.get("exit") == 0:
            r["speedup_vs_torch"] = ref["seconds"] / r["seconds"]
            r["same_partition_as_torch"] = same_partition(ref["partition"], r["partition"])
    size, dt = peak_shape(fx.dtype)
    return {"rows": rows, "matmul_peak_gflops": peak / 1e9, "matmul_peaks_gflops": [p / 1e9 for p in peaks],
            "matmul_peak_shape": f"{dt}, jitted {size}^3", "device": _device_name(),
            "model_gflops_per_evaluation": flops / 1e9, "load_average": load, "cpus": os.cpu_count(),
            "fixture": dataclasses.asdict(fx)}


def _device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{len(jax.devices())} x {d.device_kind}" if d.platform != "cpu" else "CPU (JAX)"


def table(result: dict[str, Any]) -> str:
    head = ["T", "column", "whole s", "x torch", "evals", "evals/s", "evals/iter", "scoring s/eval",
            "MFU", "peak RSS MB", "same partition"]
    lines = [head]
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in result["rows"]:
        lines.append([str(r["iterations"]), r["column"], f(r["seconds"], ".1f"), f(r.get("speedup_vs_torch"), ".2f"),
                      str(r.get("evaluations", "-")), f(r.get("evals_per_s"), ".3f"), f(r.get("evals_per_iteration"), ".2f"),
                      f(r.get("scoring_seconds_per_eval"), ".3f"), f(r.get("mfu"), ".2f"), f(r["peak_rss_mb"], ".0f"),
                      {True: "yes", False: "no"}.get(r.get("same_partition_as_torch"), "-")])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    la = result["load_average"]
    out.append("")
    out.append(f"matmul peak ({result['matmul_peak_shape']}, median of {len(result['matmul_peaks_gflops'])} in this run): "
               f"{result['matmul_peak_gflops']:.1f} GFLOP/s; model FLOPs per evaluation "
               f"{result['model_gflops_per_evaluation']:.1f} G; {result['device']}; {result['cpus']} CPUs; 1-minute load average "
               f"{min(la):.1f}-{max(la):.1f} during the run")
    return "\n".join(out)


def seconds_per_evaluation(fixtures: Sequence[Fixture], members: int = 8, repeats: int = 5,
                           requests: int = 2) -> list[float]:
    """Median seconds per evaluation of fresh (cluster of `members` adapters, member task) requests,
    `requests` per scorer call, for each fixture (same model, different N), measured alternately
    in this process after a warm-up call each."""
    from d2c_jax import data, hf_io, lora, merge
    from d2c_jax.models.config import load_config
    from d2c_jax.scoring import Scorer

    scorers = []
    for fx in fixtures:
        cfg = load_config(fx.base_model)
        aset = lora.load_adapter_set(fx.adapters_dir, cfg)
        td = data.load_task_data(fx.data_dir, aset.names, hf_io.load_tokenizer(fx.base_model),
                                 examples_per_task=fx.examples_per_task, max_seq_len=100_000)
        scorers.append(Scorer(hf_io.load_params(fx.base_model, cfg, fx.dtype), cfg,
                              merge.prepare_merge(aset, "ties", 0.5), td, batch_size=requests))
    rng = np.random.default_rng(0)

    def call(scorer) -> float:
        n = scorer.num_adapters
        masks = np.zeros((requests, n), bool)
        tasks = np.zeros(requests, np.int64)
        for i in range(requests):
            idx = rng.choice(n, members, replace=False)
            masks[i, idx] = True
            tasks[i] = idx[0]
        t0 = time.perf_counter()
        scorer.losses(masks, tasks)
        return (time.perf_counter() - t0) / requests

    for s in scorers:
        call(s)  # compile
    times = [[] for _ in scorers]
    for _ in range(repeats):
        for i, s in enumerate(scorers):
            times[i].append(call(s))
    return [float(np.median(t)) for t in times]
