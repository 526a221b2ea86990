"""Test set-up, before jax is imported: 8 host CPU devices for the sharding tests; one persistent
XLA compilation cache and one d2c_jax cache dir for the session."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The session's compilation cache, in a directory of its own (removed at exit): a program that
# another fixture compiles again (the same shapes, a new function object) and every launched
# child share it, and no test reads or fills the user's cache (~/.cache/d2c_jax/xla), so a run
# costs here what it costs on a fresh machine. A cache named from outside is used instead.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="d2c-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# Likewise d2c_jax's own cache (file hashes, tokenizer class picks), unless named from outside.
if not os.environ.get("D2C_CACHE_DIR"):
    os.environ["D2C_CACHE_DIR"] = tempfile.mkdtemp(prefix="d2c-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["D2C_CACHE_DIR"], True)


def pytest_terminal_summary(terminalreporter, config):
    """The order seed on every run (pytest-randomly shuffles the tests; -q hides its header), so
    an order-dependent failure can be replayed with --randomly-seed=SEED."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} (replay: python -m pytest --randomly-seed={seed})")


# Seconds each of the slower test files takes on one worker of a 2-core machine (measured with
# --durations=0; rounded). With -n, --dist=loadfile hands whole files to the workers; dealing the
# longest first (any file not listed counts a second per test) keeps the run from ending with one
# worker on a long file and the other idle.
FILE_SECONDS = {
    "test_tune.py": 227, "test_add.py": 184, "test_multiprocess.py": 85, "test_tune_controls.py": 81,
    "test_gcs_workdir.py": 73, "test_report.py": 71, "test_kill_resume.py": 71, "test_merge_vmap.py": 58,
    "test_suite.py": 53, "test_scoring.py": 51, "test_tune_remat.py": 49, "test_merge_core.py": 48,
    "test_loss_parity.py": 40, "test_benchmark_smoke.py": 40, "test_launch_search.py": 39,
    "test_finished_run.py": 37, "test_bf16_parity.py": 36, "test_bad_inputs.py": 35, "test_signals.py": 34,
    "test_launch_evaluate.py": 33, "test_dry_run.py": 30, "test_merge_parity.py": 28, "test_generate.py": 27,
    "test_checkpoint.py": 27, "test_command_properties.py": 26, "test_suite_resume.py": 23,
    "test_readme_commands.py": 23, "test_hub.py": 23, "test_merge_properties.py": 22, "test_merge_svd.py": 20,
    "test_sharding.py": 19, "test_model_parity.py": 18, "test_metric_values.py": 17,
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist=loadfile with the files dealt out longest first (FILE_SECONDS)."""
    if getattr(config.option, "dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFileFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "_ordered", False):  # the queue is whole before the first unit goes
                self._ordered = True
                units = sorted(self.workqueue.items(),
                               key=lambda unit: -FILE_SECONDS.get(os.path.basename(unit[0]), len(unit[1])))
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return LongestFileFirst(config, log)
