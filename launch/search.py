r"""Clusters N LoRA adapters into K groups whose TIES merges score best (D²C), or a baseline.

  python launch/search.py --flagfile=configs/llama.flags [--workdir=DIR] [overrides]
  python launch/search.py --workdir=DIR --show     # a finished run's summary table again

Writes into --workdir (a directory, or gs://BUCKET/PATH: docs/remote_inputs.md): partition.json,
merged/cluster_<k>/ (PEFT adapters), metrics.jsonl, objective.png, assignment.png, config.json and
checkpoints/. Re-running the same command resumes from the latest checkpoint; SIGTERM saves one at
the end of the current iteration and exits 0.

Multi-host (JAX's distributed runtime, one process per host): run the same command on every host.
The processes build one mesh over all hosts' devices, take identical decisions, save checkpoints
together (Orbax) and only process 0 writes the other files. --workdir must be a gs:// path or on
storage every host sees (NFS/Filestore, gcsfuse), and the inputs at the same paths.

  # Cloud TPU VM pod slice: hosts, process ids and the coordinator are auto-detected.
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd d2c && \
      python launch/search.py --flagfile=configs/llama.flags --workdir=gs://my-bucket/d2c/run1"

  # Elsewhere (GPU or CPU hosts): name the coordinator (process 0's host:port) on every host.
  python launch/search.py --flagfile=... --workdir=/shared/run1 \
      --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=0   # host 0
  python launch/search.py --flagfile=... --workdir=/shared/run1 \
      --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=1   # host 1

Without these flags the run is a single process, except on a Cloud TPU VM (auto-detected), with
JAX_COORDINATOR_ADDRESS set (plus JAX_NUM_PROCESSES / JAX_PROCESS_ID), or with D2C_DISTRIBUTED=1
(JAX then detects SLURM / Open MPI jobs); D2C_DISTRIBUTED=0 forces a single process. SIGTERM on
any host stops all at the same iteration with a checkpoint; re-run the command on every host to
resume (a checkpoint does not depend on the number of hosts).
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
from d2c_jax.errors import run_cli  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402

config_flags.define_flags(RunConfig)  # one flag per RunConfig / SearchSettings field, same name
flags.DEFINE_string("dry_run", None, "Compile every executable of this run for a TPU topology (v4-8, v5e-1, "
                    "v5e-4, v5e-8, v5e-16, v5p-8, v6e-8; needs libtpu, no TPU) or this machine (cpu) and print "
                    "per-device memory and estimated time; reads only headers and examples, never --workdir.")
flags.DEFINE_bool("show", False, "Print the summary table and gain line of the finished run in --workdir, and exit "
                  "(nothing else is needed or touched).")

# --help: these first, by group; every other flag below them as "advanced".
HELP_GROUPS = {
    "inputs": ("flagfile", "base_model", "adapters_dir", "data_dir", "suite", "examples_per_task", "max_seq_len",
               "chat_template", "dtype"),
    "search": ("strategy", "num_clusters", "iterations", "objective", "proposal", "start", "population", "proposals",
               "seed"),
    "merge": ("merge", "density", "output_rank", "budget", "tune_weights"),
    "outputs": ("workdir", "show", "overwrite"),
    "run control": ("checkpoint_every", "progress", "batch_size", "model_shards", "dry_run"),
}


def config_from_flags(f: flags.FlagValues) -> RunConfig:
    """Every RunConfig field comes from the flag of the same name, unchanged; a flag that would
    have no effect is refused."""
    cfg = config_flags.from_flags(RunConfig, f)
    if cfg.budget_mode and f["num_clusters"].present:
        from d2c_jax.errors import UserError

        raise UserError(None, f"--num_clusters={cfg.search.num_clusters} has no effect with --budget/--budget_mb "
                        "(the budget mode chooses K and the rank); drop one of them")
    return cfg


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)

    def body() -> int:
        if flags.FLAGS.dry_run:
            from d2c_jax import dry_run

            return dry_run.dry_run(config_from_flags(flags.FLAGS), flags.FLAGS.dry_run)
        from d2c_jax import pipeline

        if flags.FLAGS.show:
            return pipeline.show(flags.FLAGS.workdir)
        return pipeline.run(config_from_flags(flags.FLAGS))  # starts jax.distributed if asked

    cli.finish(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parser(HELP_GROUPS))
