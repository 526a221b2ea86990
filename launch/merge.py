"""Merges PEFT LoRA adapters into one PEFT adapter (TIES by default, like PEFT's add_weighted_adapter).

  python launch/merge.py --adapters=DIR1,DIR2,... --method=ties --density=0.5 --output_dir=OUT \\
      [--weights=1,1,...] [--seed=0] [--base_model=DIR] [--output_rank=R]
  python launch/merge.py --adapters=... --output_dir=OUT --base_model=DIR --tune_on=DATA_DIR \\
      [--tune_granularity=adapter|layer|scale|factors]
  python launch/merge.py --adapters=org/a,org/b@v1,org/c/sub --output_dir=OUT --push_to_hub=me/merged

--adapters and --base_model take directories or Hub ids (org/name[@revision], adapters also with a
/sub/folder; downloaded into the Hub cache, HF_HUB_OFFLINE=1: the cache only).
--output_dir must be new (or empty, or hold an earlier output of this command: --overwrite replaces
it); it is never one of the inputs. No base model is needed: its dims are read off the adapters
(--base_model only checks the fit).
--tune_on tunes the merge weights (d2c_jax/tune.py) on DATA_DIR/<task>.jsonl, task = each adapter
directory's name (part held out; kept only if they beat unit weights there); needs --base_model.
--tune_granularity=factors tunes the merged adapter's factors themselves, from the unit-weight merge.
"""

from __future__ import annotations

import sys
from typing import Sequence

if __name__ == "__main__":  # first: a signal during the imports below ends the command cleanly
    from d2c_jax import signals

    signals.install()

from absl import app, flags

from d2c_jax import cli

if __name__ == "__main__":
    cli.start()  # signals and quiet libraries, before jax is imported

from d2c_jax.errors import UserError, run_cli  # noqa: E402
from d2c_jax.merge import METHODS  # noqa: E402

flags.DEFINE_list("adapters", None, "Comma-separated PEFT LoRA adapters: directories or Hub ids "
                  "org/name[@revision][/sub/folder], each optionally task=ID.")
flags.DEFINE_string("output_dir", None, "Where the merged PEFT adapter is written (a new directory, or an "
                    "earlier output of this command with --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace an earlier merged adapter of this command in --output_dir.")
flags.DEFINE_string("method", "ties", f"Merge method: one of {', '.join(METHODS)}.")
flags.DEFINE_float("density", 0.5, "Fraction of entries kept per tensor when trimming.")
flags.DEFINE_list("weights", None, "One weight per adapter (default: all 1).")
flags.DEFINE_integer("seed", 0, "Seed of dare_ties' random drop mask.")
flags.DEFINE_string("base_model", None, "Optional base model (directory or Hub id), to check the adapters fit it.")
flags.DEFINE_integer("output_rank", 0, "Rank of the merged adapter (0: the adapters' rank).")
flags.DEFINE_string("tune_on", None, "Tune the merge weights on this data directory's search examples "
                    "(<task>.jsonl per adapter directory name); needs --base_model.")
flags.DEFINE_enum("tune_granularity", "adapter", ["adapter", "layer", "scale", "factors"],
                  "One weight per adapter, per adapter and layer, one for all (scale), or the merged factors "
                  "themselves.")
flags.DEFINE_integer("tune_steps", 60, "Most optimiser steps of the tuning.")
flags.DEFINE_integer("examples_per_task", 10, "Search examples per task used by --tune_on.")
flags.DEFINE_integer("max_seq_len", 1024, "Longest example in tokens (--tune_on).")
flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Base weight dtype (--tune_on).")
flags.DEFINE_string("push_to_hub", None, "Also upload the merged adapter and a model card to this Hub repo "
                    "(org/name; created if absent).")
flags.DEFINE_bool("push_private", True, "Create the --push_to_hub repo private (--nopush_private: public).")
flags.mark_flags_as_required(["adapters", "output_dir"])
FLAGS = flags.FLAGS


def _weights(raw: list[str] | None) -> list[float] | None:
    if raw is None:
        return None
    try:
        return [float(w) for w in raw]
    except ValueError:
        raise UserError(None, f"--weights must be comma-separated numbers; got {','.join(raw)!r}") from None


def _tuned(base_model: str, adapter_dirs: dict[str, str]):
    """(weights [N] or [N, L], None) tuned on --tune_on (one cluster holding every adapter), or
    (None, factors) for --tune_granularity=factors."""
    import numpy as np

    from d2c_jax import data, hf_io, lora, merge, tune
    from d2c_jax.models.config import load_config

    cfg = load_config(base_model)
    dirs, names = list(adapter_dirs.values()), list(adapter_dirs)
    aset = lora.load_adapter_dirs(dirs, cfg)
    task_data = data.load_task_data(FLAGS.tune_on, names, hf_io.load_tokenizer(base_model), split="search",
                                    examples_per_task=FLAGS.examples_per_task, max_seq_len=FLAGS.max_seq_len)
    params = hf_io.load_params(base_model, cfg, FLAGS.dtype)
    prepared = merge.prepare_merge(aset, FLAGS.method, FLAGS.density, seed=FLAGS.seed, rank=FLAGS.output_rank or None)
    settings = tune.TuneSettings(granularity=FLAGS.tune_granularity, steps=FLAGS.tune_steps)
    res = tune.tune_partition(params, cfg, prepared, task_data, np.zeros(len(dirs), np.int32), 1, settings)
    s = res.summary()
    print(f"held-out loss (summed over {len(dirs)} tasks): unit weights {s['heldout_unit_total']:.4f}, "
          f"tuned {s['tuned_heldout'][0]:.4f} -> {'tuned' if s['kept'][0] else 'unit'} "
          f"{'factors' if res.lora is not None else 'weights'} kept")
    if res.lora is not None:
        import jax

        return None, jax.tree.map(lambda x: x[0], res.lora)
    return res.weights[0], None


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    def body() -> int:
        from d2c_jax import hub, output_guard, push
        from d2c_jax.merge import merge_adapter_dirs

        output_guard.claim_dir(FLAGS.output_dir, what="merged adapter", flag="--output_dir", command="merge",
                               inputs=[*FLAGS.adapters, FLAGS.base_model, FLAGS.tune_on], overwrite=FLAGS.overwrite)
        weights, factors = _weights(FLAGS.weights), None
        if FLAGS.push_to_hub:
            push.check_token(FLAGS.push_to_hub)
        if FLAGS.tune_on and not FLAGS.base_model:
            raise UserError(None, "--tune_on needs --base_model (the losses are the base model's)")
        if FLAGS.tune_on and weights is not None:
            raise UserError(None, "--tune_on starts from unit weights; leave --weights unset")
        base_model = hub.resolve(FLAGS.base_model).path if FLAGS.base_model else None
        # In --weights order; one task name each only where it names the task's data (--tune_on).
        adapters = hub.resolve_adapters(FLAGS.adapters, unique=bool(FLAGS.tune_on))
        # Hub ids resolve to the Hub cache: the output must not be (in) one of those either.
        output_guard.refuse_inputs(FLAGS.output_dir, [r.path for _, r in adapters] + [base_model], "--output_dir")
        if FLAGS.tune_on:
            weights, factors = _tuned(base_model, {n: r.path for n, r in adapters})
        out = merge_adapter_dirs(
            [r.path for _, r in adapters], FLAGS.output_dir, method=FLAGS.method, density=FLAGS.density,
            weights=weights, seed=FLAGS.seed, base_model=base_model, rank=FLAGS.output_rank or None,
            factors=factors, owner="merge",
        )
        print(f"wrote {out}")
        if FLAGS.push_to_hub:
            card = push.merge_card(FLAGS.push_to_hub, FLAGS.base_model, FLAGS.adapters, FLAGS.method, FLAGS.density)
            url = push.push(FLAGS.push_to_hub, {"": out}, card, private=FLAGS.push_private,
                            message=f"d2c_jax: {FLAGS.method} merge of {len(adapters)} adapters")
            print(f"pushed to {FLAGS.push_to_hub}: {url}")
        return 0

    sys.exit(run_cli(body))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
