"""The synthetic multi-task suite: a tiny Llama base model, one LoRA adapter per task, task data.

`ensure_suite(output_dir, families, languages, seed) -> SuitePaths(base_model, adapters_dir,
data_dir, root)` builds it once (deterministically from the seed) and reuses it afterwards.
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
