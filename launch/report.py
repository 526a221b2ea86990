"""The paper's Table 1 and its two analyses on a suite, written as markdown + PNGs.

  python launch/report.py --suite=full --seeds=3 [--iterations=T] [--output_dir=docs]

--suite is a suite directory built by launch/make_suite.py, or a preset name (demo, full, warm_start) that is
built on first use under --suite_root. Runs random, kmeans, svd_kmeans, D²C as in the paper
(P=1, M=1, local) and D²C with --population/--proposals/--objective, plus zero-shot, single-task
and all-in-one, at K=--num_clusters; then score vs K over --cluster_counts, the adjusted Rand
index of the found clusters vs family / language tags, and a small investigation (oracle
partitions, --compare_merges). Writes OUTPUT_DIR/results.md (with this command line),
results_*.png and results.json. Everything runs in this process (experiments/report/).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Sequence

if __name__ == "__main__":  # first: a signal during the imports below ends the command cleanly
    from d2c_jax import signals

    signals.install()

from absl import app, flags, logging

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax import config_flags  # noqa: E402
from d2c_jax.errors import run_cli  # noqa: E402
from experiments import report  # noqa: E402

config_flags.define_flags(report.ReportConfig, skip=("command",))  # one flag per setting, same name


def config_from_flags(f: flags.FlagValues, command: str) -> report.ReportConfig:
    return config_flags.from_flags(report.ReportConfig, f, command=command)


def check_output(cfg: report.ReportConfig) -> None:
    """The files written into --output_dir are new or an earlier report's (its results.json), and
    never inside the suite."""
    from d2c_jax import output_guard
    from experiments.report import render

    suite = cfg.suite if os.path.isdir(cfg.suite) else os.path.join(cfg.suite_root, cfg.suite)
    names = (render.RESULTS_MD, render.TABLE_PNG, render.CLUSTERS_PNG, render.ASSIGNMENT_PNG, render.RESULTS_JSON)
    output_guard.claim_files(cfg.output_dir, names, what="report file", flag="--output_dir", inputs=[suite],
                             ours=lambda d: output_guard.json_keys("command", "suite")(
                                 os.path.join(d, render.RESULTS_JSON)))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])

    def body() -> None:
        cfg = config_from_flags(flags.FLAGS, command)
        check_output(cfg)
        print(command, flush=True)
        start = time.time()

        def log(msg: str) -> None:
            print(f"[report {time.time() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

        res = report.run_report(cfg, log)
        written = report.write_report(res, cfg.output_dir)
        print(f"wall time {res.seconds / 60:.1f} min; wrote {', '.join(written.values())}")

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)  # --help exits 0; one-line flag errors
