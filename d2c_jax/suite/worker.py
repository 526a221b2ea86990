"""The suite build's child process:
`python -m d2c_jax.suite.worker TMP BASE_MODEL SETTINGS_JSON [STAGE]`.

`build.build_suite` starts it with `build.build_env()` (fixed XLA CPU flags, no inherited XLA/JAX
variables); it pins itself to one CPU, so that the weights depend neither on the caller's process
nor on the machine's CPU count, writes the complete suite into TMP and prints its log lines.
With STAGE its trainings checkpoint there and continue from there; SIGINT / SIGTERM make it
save a checkpoint after the current step and exit with status 130 (`build.EXIT_STOPPED`).
"""

from __future__ import annotations

import json
import os
import sys


def pin_to_one_cpu() -> None:
    """Restricts this process to one CPU before XLA starts: XLA sizes its intra-op thread pool and
    splits work by the CPUs it may use, and the weights changed with that number (measured:
    docs/results.md). One CPU is what every machine has; which one does not matter (builds running
    side by side take different ones)."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[os.getpid() % len(cpus)]})


def main(argv: list[str]) -> int:
    from d2c_jax.suite.resume import StopFlag

    stop = StopFlag().install()  # before the slow imports: a Ctrl-C then only stops at a step's end
    pin_to_one_cpu()
    from d2c_jax.suite.build import EXIT_STOPPED, SuiteSettings, build_into
    from d2c_jax.suite.resume import Stopped

    tmp, base_model, settings_json, *rest = argv
    settings = SuiteSettings(**json.loads(settings_json))
    try:
        build_into(tmp, base_model, settings, log=lambda msg: print(msg, flush=True),
                   stage=rest[0] if rest else None, stop=stop)
    except Stopped:
        return EXIT_STOPPED
    return 0 if not stop() else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
