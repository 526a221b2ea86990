r"""Adds new adapters (with their tasks' examples) to a finished run's K merged adapters, no new search.

  python launch/add.py --workdir=RUN --adapters=DIR[,DIR...] --data_dir=DIR [--refine_iterations=T]
  python launch/add.py --workdir=RUN --remove=TASK

Each new adapter, in the order given, is scored under every cluster's merge with it added (the
run's objective), joins the cluster where the objective is best, and only that cluster is merged
again (K + cluster-size evaluations with the local objective). --refine_iterations=T then runs a
short search from the new partition. The result is a new version of RUN's partition.json,
merged/ and assignment.png; the previous one is kept in RUN/versions/<n>/. Interrupted (SIGTERM,
Ctrl-C, a crash), the same command resumes; after success it says so and exits 0.
"""

from __future__ import annotations

from typing import Sequence

if __name__ == "__main__":  # first: a signal during the imports below ends the command cleanly
    from d2c_jax import signals

    signals.install()

from absl import app, flags, logging

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax import config_flags  # noqa: E402
from d2c_jax.add_run import AddConfig  # noqa: E402
from d2c_jax.errors import run_cli  # noqa: E402

config_flags.define_flags(AddConfig)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)

    def body() -> int:
        from d2c_jax import add_run

        return add_run.add(config_flags.from_flags(AddConfig, flags.FLAGS))

    cli.finish(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
