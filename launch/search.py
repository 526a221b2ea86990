r"""Clusters N LoRA adapters into K groups whose TIES merges score best (D²C), or a baseline.

  python launch/search.py --flagfile=configs/llama.flags [--workdir=DIR] [overrides]

Writes into --workdir: partition.json, merged/cluster_<k>/ (PEFT adapters), metrics.jsonl,
objective.png, assignment.png, config.json and checkpoints/. Re-running the same command resumes
from the latest checkpoint; SIGTERM saves one at the end of the current iteration and exits 0.

Multi-host (JAX's distributed runtime, one process per host): run the same command on every host.
The processes build one mesh over all hosts' devices, take identical decisions, save checkpoints
together (Orbax) and only process 0 writes the other files. --workdir must be on storage every
host sees (NFS/Filestore, or a bucket mounted with gcsfuse) and the inputs at the same paths.

  # Cloud TPU VM pod slice: hosts, process ids and the coordinator are auto-detected.
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd d2c && \
      python launch/search.py --flagfile=configs/llama.flags --workdir=/mnt/shared/run1"

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

import dataclasses
import os
import sys
from typing import Sequence

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2c_jax.errors import run_cli  # noqa: E402
from d2c_jax.merge import METHODS as MERGES  # noqa: E402
from d2c_jax.run_config import DTYPES, OBJECTIVES, STRATEGIES, RunConfig  # noqa: E402

flags.DEFINE_string("base_model", None, "Hugging Face base model directory.")
flags.DEFINE_string("adapters_dir", None, "Directory of PEFT LoRA adapters, one sub-directory per task.")
flags.DEFINE_string("data_dir", None, "Directory of <task>.jsonl examples (and optional tasks.json).")
flags.DEFINE_string("workdir", None, "Output and checkpoint directory.")
flags.DEFINE_integer("num_clusters", 5, "K: number of merged adapters (1 <= K < N).")
flags.DEFINE_integer("iterations", 200, "T: search iterations.")
flags.DEFINE_enum("strategy", "d2c", list(STRATEGIES), "d2c search, or a baseline.")
flags.DEFINE_enum("objective", "local", list(OBJECTIVES),
                  "local: loss of the moved task (the paper); global: summed loss of both clusters.")
flags.DEFINE_integer("population", 1, "P: search chains run in lock-step.")
flags.DEFINE_integer("proposals", 1, "M: candidate moves per chain per iteration (best improving kept).")
flags.DEFINE_integer("exchange_every", 0,
                     "Every k iterations copy the best quarter of the chains over the worst (0: never).")
flags.DEFINE_integer("track_every", 10,
                     "Compute every chain's global objective (metrics, plot) every k iterations and at the "
                     "end; 1 is exact per iteration but costs extra evaluations with --objective=local.")
flags.DEFINE_enum("merge", "ties", list(MERGES), "Merge method.")
flags.DEFINE_float("density", 0.5, "Fraction of entries kept when trimming (TIES).")
flags.DEFINE_integer("examples_per_task", 10, "n: examples per task used to score merges.")
flags.DEFINE_integer("max_seq_len", 1024, "Longest example in tokens (prompts cut from the left).")
flags.DEFINE_bool("chat_template", False, "Wrap prompts in the tokenizer's chat template.")
flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Base weight dtype.")
flags.DEFINE_integer("seed", 0, "Seed of every random choice.")
flags.DEFINE_integer("batch_size", 8, "Evaluation requests per accelerator call (does not change results).")
flags.DEFINE_integer("model_shards", 1, "Devices per model replica (tensor parallel); the rest score candidates.")
flags.DEFINE_integer("checkpoint_every", 10, "Save a checkpoint every k iterations.")
flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
flags.DEFINE_bool("overwrite", False, "Replace a finished run, or a checkpoint of other inputs, in --workdir.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0, the same on every host (default: auto-detected "
                    "on TPU VMs, SLURM, Open MPI or from JAX_COORDINATOR_ADDRESS; none: one process).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes, one per host (default: auto-detected).")
flags.DEFINE_integer("process_id", None, "Multi-host: this host's process index in [0, --num_processes) "
                     "(default: auto-detected); process 0 writes the outputs.")
flags.DEFINE_string("suite", None, "A built-in synthetic suite (demo | full), built on first use into "
                    "--suite_root/<name>; it supplies --base_model/--adapters_dir/--data_dir when they are unset.")
flags.DEFINE_string("suite_root", "runs/suites", "Where built-in suites are built and cached.")
flags.mark_flags_as_required(["workdir"])


def config_from_flags(f: flags.FlagValues) -> RunConfig:
    """Every RunConfig field comes from the flag of the same name, unchanged."""
    return RunConfig(**{field.name: getattr(f, field.name) for field in dataclasses.fields(RunConfig)})


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)

    def body() -> int:
        from d2c_jax import pipeline

        return pipeline.run(config_from_flags(flags.FLAGS))  # starts jax.distributed if asked

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main)
