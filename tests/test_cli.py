"""cli.start() silences the two lines of library noise every run printed: transformers' "PyTorch
was not found" (where torch is absent, simulated here) and jax's "Unable to initialize backend"."""

from __future__ import annotations

import subprocess
import sys

from fixtures_search_inputs import child_env

_CHILD = r"""
import importlib.util, logging, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "torch" else real(name, *a, **k)  # torch absent
if sys.argv[1] == "start":
    from d2c_jax import cli
    cli.start()
logging.basicConfig(level=logging.INFO)
import transformers  # noqa: F401
import jax
jax.devices()
print("done")
"""


def _stderr(mode: str) -> str:
    env = child_env(JAX_PLATFORMS="")  # let jax probe its backends, as a user's run does
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    return proc.stderr


def test_start_silences_library_noise():
    noisy = _stderr("plain")
    assert "PyTorch was not found" in noisy  # the simulation reproduces the noise
    quiet = _stderr("start")
    assert "PyTorch was not found" not in quiet and "Unable to initialize backend" not in quiet, quiet
