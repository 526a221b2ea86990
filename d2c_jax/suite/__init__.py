"""The synthetic multi-task suite: a tiny Llama base model, one LoRA adapter per task, task data.

`ensure_suite(output_dir, families=5, languages=8, seed=0, **settings) -> SuitePaths(base_model,
adapters_dir, data_dir, root)` builds it once, deterministically from the seed, on CPU with optax,
and returns at once when output_dir already holds a complete suite of the same settings.
`ensure_preset("demo" | "full" | "warm_start", root="runs/suites")` does the same for the named presets.

Modules: tasks (made-up languages over shared concepts, task families, example splits),
tokenizer (word-level HF tokenizer), train (pre-training and vmapped adapter training),
checkpoint (HF checkpoint writer), build (orchestration, cache manifest, atomic install).
"""

from d2c_jax.suite.build import (
    PRESETS,
    SuitePaths,
    SuiteSettings,
    build_suite,
    ensure_preset,
    ensure_suite,
    is_complete,
    make_settings,
    read_manifest,
    suite_paths,
)

__all__ = [
    "PRESETS",
    "SuitePaths",
    "SuiteSettings",
    "build_suite",
    "ensure_preset",
    "ensure_suite",
    "is_complete",
    "make_settings",
    "read_manifest",
    "suite_paths",
]
