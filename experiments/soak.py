"""Soak test: a long search with frequent checkpoints, sampling the process's memory (RSS), open
file descriptors and the checkpoint directory's size, to show that none of them grows.

  python experiments/soak.py --workdir=runs/soak [--iterations=2000] [--every=10] [--cache_size=200] \
      [-- extra launch/search.py flags]

Runs `launch/search.py --flagfile=configs/demo.flags` (the demo suite, built on first use) as a
child process, samples it every `--interval` seconds, and writes `<workdir>.soak.jsonl` (one
sample per line) and a summary table (first / last / max of each series, and the loss cache
size from metrics.jsonl against --cache_size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _dir_mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed by the run meanwhile
    return total / 2**20


def _step(path: str) -> int | None:
    try:
        steps = [int(d) for d in os.listdir(path) if d.isdigit()]
    except OSError:
        return None
    return max(steps) if steps else None


def _slope(samples: list[dict], key: str) -> float:
    """Least-squares slope of samples[key] against the checkpoint step, per 1000 iterations."""
    xs, ys = [s["step"] for s in samples], [s[key] for s in samples]
    if len(xs) < 2 or max(xs) == min(xs):
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--cache_size", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    ckpt_dir = os.path.join(args.workdir, "checkpoints")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "search.py"), f"--flagfile={ROOT}/configs/demo.flags",
           f"--workdir={args.workdir}", f"--iterations={args.iterations}", f"--checkpoint_every={args.every}",
           f"--cache_size={args.cache_size}", "--noprogress", "--overwrite", *args.extra]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    samples = []
    with open(args.workdir.rstrip("/") + ".soak.jsonl", "w") as log:
        while proc.poll() is None:
            s = {"t": round(time.time() - start, 1), "rss_mib": _rss_mib(proc.pid), "fds": _fds(proc.pid),
                 "ckpt_mib": round(_dir_mib(ckpt_dir), 3), "step": _step(ckpt_dir)}
            if s["rss_mib"] is not None:
                samples.append(s)
                log.write(json.dumps(s) + "\n")
                log.flush()
            time.sleep(args.interval)
    # While searching: after the first checkpoint, before the last (then the outputs are written,
    # which imports the plotting library: not the search's memory).
    searching = [s for s in samples if s["step"] is not None and s["step"] < args.iterations]
    print(f"exit {proc.returncode} after {time.time() - start:.0f} s; {len(searching)} samples while searching")
    if not searching:
        return 1
    # Growth is judged on the second half: the first iterations still compile new request buckets
    # and fill the loss cache (bounded by --cache_size); a leak keeps growing after that.
    half = [s for s in searching if s["step"] >= searching[-1]["step"] / 2]
    for key in ("rss_mib", "fds", "ckpt_mib"):
        marks = [searching[min(len(searching) - 1, int(q * (len(searching) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]
        at = ", ".join(f"step {m['step']}: {m[key]}" for m in marks)
        print(f"{key:>9}: {at}; max {max(s[key] for s in searching)}; "
              f"second-half slope {_slope(half, key):+.3f} per 1000 iterations")
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        sizes = [json.loads(line)["cache_size"] for line in f]
    print(f"loss cache entries: max {max(sizes)} over {len(sizes)} rows (--cache_size={args.cache_size})")
    log_mib = os.path.getsize(os.path.join(args.workdir, "metrics.jsonl")) / 2**20
    print(f"metrics.jsonl (the run's history, one row per iteration, kept outside the checkpoints): {log_mib:.3f} MiB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
