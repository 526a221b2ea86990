"""Merges PEFT LoRA adapters into one PEFT adapter (TIES by default, like PEFT's add_weighted_adapter).

  python launch/merge.py --adapters=DIR1,DIR2,... --method=ties --density=0.5 --output_dir=OUT \\
      [--weights=1,1,...] [--seed=0] [--base_model=DIR]

No base model is needed: its dims are read off the adapters (--base_model only checks the fit).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax.errors import UserError, run_cli  # noqa: E402
from d2c_jax.merge import METHODS  # noqa: E402

flags.DEFINE_list("adapters", None, "Comma-separated PEFT LoRA adapter directories.")
flags.DEFINE_string("output_dir", None, "Where the merged PEFT adapter is written (replaced if it exists).")
flags.DEFINE_string("method", "ties", f"Merge method: one of {', '.join(METHODS)}.")
flags.DEFINE_float("density", 0.5, "Fraction of entries kept per tensor when trimming.")
flags.DEFINE_list("weights", None, "One weight per adapter (default: all 1).")
flags.DEFINE_integer("seed", 0, "Seed of dare_ties' random drop mask.")
flags.DEFINE_string("base_model", None, "Optional base model directory, to check the adapters fit it.")
flags.mark_flags_as_required(["adapters", "output_dir"])
FLAGS = flags.FLAGS


def _weights(raw: list[str] | None) -> list[float] | None:
    if raw is None:
        return None
    try:
        return [float(w) for w in raw]
    except ValueError:
        raise UserError(None, f"--weights must be comma-separated numbers; got {','.join(raw)!r}") from None


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    def body() -> int:
        from d2c_jax.merge import merge_adapter_dirs

        out = merge_adapter_dirs(
            FLAGS.adapters, FLAGS.output_dir, method=FLAGS.method, density=FLAGS.density,
            weights=_weights(FLAGS.weights), seed=FLAGS.seed, base_model=FLAGS.base_model,
        )
        print(f"wrote {out}")
        return 0

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
