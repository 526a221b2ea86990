"""Builds the synthetic multi-task suite (or returns at once if it is already built).

  python launch/make_suite.py --output_dir=DIR [--families=5 --languages=8 --seed=0]
  python launch/make_suite.py --preset=demo          # 3 families x 4 languages in runs/suites/demo

Writes DIR/base (a tiny Llama HF checkpoint + tokenizer), DIR/adapters/<task> (PEFT LoRA, one per
task, trained together with optax), DIR/data (<task>.jsonl, <task>.eval.jsonl, tasks.json) and
DIR/suite.json (settings, hashes, the measured zero-shot / own / other adapter losses).
Deterministic from --seed; a DIR already holding a suite of the same settings is reused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

if __name__ == "__main__":  # first: a signal during the imports below ends the command cleanly
    from d2c_jax import signals

    signals.install()

from absl import app, flags

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax.errors import UserError, run_cli  # noqa: E402

flags.DEFINE_string("output_dir", None, "Suite directory (default with --preset: runs/suites/<preset>).")
flags.DEFINE_enum("preset", None, ["demo", "full", "warm_start"],
                  "Named settings: demo = 3 x 4 tasks, full = 5 x 8, warm_start = the second suite "
                  "(4 x 4, adapters fine-tuned from one warm-start LoRA per language).")
flags.DEFINE_integer("families", None, "Task families (skills), at most 8. Default 5 (or the preset's).")
flags.DEFINE_integer("languages", None, "Made-up languages, at most 16. Default 8 (or the preset's).")
flags.DEFINE_integer("seed", 0, "Seed of everything (world, data, model init, training).")
flags.DEFINE_bool("force", False, "Rebuild even if DIR already holds this suite.")
# Advanced: change the model or the training (each changes the cache key).
flags.DEFINE_integer("pretrain_steps", None, "Base-model pre-training steps.")
flags.DEFINE_integer("adapter_steps", None, "Adapter training steps (all tasks at once).")
flags.DEFINE_integer("rank", None, "LoRA rank r (paper: 32).")
flags.DEFINE_integer("alpha", None, "LoRA alpha (paper: 128).")
flags.DEFINE_integer("hidden_size", None, "Base model width.")
flags.DEFINE_integer("num_layers", None, "Base model depth.")
flags.DEFINE_integer("eval_examples", None, "Held-out examples per task.")
flags.DEFINE_integer("search_examples", None, "Search examples per task.")

_OVERRIDES = ("pretrain_steps", "adapter_steps", "rank", "alpha", "hidden_size", "num_layers",
              "eval_examples", "search_examples")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS

    def body() -> int:
        from d2c_jax.suite import PRESETS, ensure_suite, read_manifest
        from d2c_jax.suite.build import quality_sentence

        # Without a preset, ensure_suite's defaults (5 families x 8 languages) apply.
        settings = dict(PRESETS[f.preset]) if f.preset else {}
        for name in ("families", "languages", *_OVERRIDES):
            if getattr(f, name) is not None:
                settings[name] = getattr(f, name)
        output_dir = f.output_dir or (os.path.join("runs", "suites", f.preset) if f.preset else None)
        if not output_dir:
            raise UserError(None, "--output_dir is required (or give --preset=demo|full|warm_start)")
        start = time.time()
        paths = ensure_suite(output_dir, seed=f.seed, force=f.force,
                             log=lambda m: print(f"[{time.time() - start:6.1f}s] {m}", flush=True),
                             **settings)
        manifest = read_manifest(paths.root) or {}
        print(json.dumps({
            "base_model": paths.base_model,
            "adapters_dir": paths.adapters_dir,
            "data_dir": paths.data_dir,
            "tasks": len(manifest.get("tasks", [])),
            "seconds": round(time.time() - start, 1),
            "quality": quality_sentence(manifest["quality"]["summary"]) if manifest.get("quality") else None,
        }, indent=1))
        return 0

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
