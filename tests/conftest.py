"""Test set-up, before jax is imported: 8 host CPU devices for the sharding tests; one persistent
XLA compilation cache and one d2c_jax cache dir for the session."""

import atexit
import os
import shutil
import tempfile

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
