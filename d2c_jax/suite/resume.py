"""Checkpoints of the suite build's two trainings, so that an interrupted build continues.

The build (in its child process, `worker`) saves the pre-training's and the adapter training's
state (parameters, optimiser state, step, losses so far) every CHECKPOINT_EVERY steps, and at
once when SIGINT / SIGTERM arrives, into a stage directory beside the suite (one per settings
hash, `stage_dir`); a re-run continues from the newest checkpoint. The same jitted steps then
run on the same bits, so the weights are bit-identical to an uninterrupted build. Each file is
written atomically (temp file + rename); the stage directory is removed once the suite is in
place.
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any, Callable

import jax
import numpy as np

from d2c_jax.atomic_io import is_leftover, remove_path, write_bytes_atomic

CHECKPOINT_EVERY = 50  # steps (a few seconds of the demo build on one CPU)


class Stopped(Exception):
    """A signal stopped the build after a checkpoint was saved."""


def stage_dir(root: str, settings_hash: str) -> str:
    """Where the checkpoints of a build of `root` with these settings live: beside it, hidden."""
    root = os.path.abspath(root)
    return os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.build-{settings_hash[:12]}")


class StopFlag:
    """SIGINT / SIGTERM set a flag (checked after every training step) instead of raising."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def save(path: str, step: int, tree: Any, state: Any, losses: list) -> None:
    """step, the leaves of (tree, state) and the losses so far, in one .npz written atomically."""
    leaves = jax.tree_util.tree_leaves((tree, state))
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    buf = io.BytesIO()
    np.savez(buf, step=np.int64(step), losses=np.asarray([np.asarray(x) for x in losses]), **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load(path: str, tree: Any, state: Any) -> tuple[int, Any, Any, list] | None:
    """(step, tree, state, losses) saved in `path`, shaped like the templates `tree` and `state`
    (their initial values); None when there is no usable checkpoint."""
    if not os.path.isfile(path):
        return None
    template, treedef = jax.tree_util.tree_flatten((tree, state))
    try:
        with np.load(path) as z:
            leaves = [z[f"leaf_{i}"] for i in range(len(template))]
            step, losses = int(z["step"]), list(z["losses"])
    except (OSError, KeyError, ValueError):
        return None
    if any(a.shape != np.shape(t) or a.dtype != np.asarray(t).dtype for a, t in zip(leaves, template)):
        return None  # saved by other code: start over
    restored = [jax.numpy.asarray(a) for a in leaves]
    tree, state = jax.tree_util.tree_unflatten(treedef, restored)
    return step, tree, state, losses


def remove_leftovers(stage: str) -> None:
    """Temp files of checkpoint writes that a kill interrupted."""
    if os.path.isdir(stage):
        for name in os.listdir(stage):
            if is_leftover(name):
                remove_path(os.path.join(stage, name))


def hook(path: str, total: int, stop: Callable[[], bool], log: Callable[[str], None], what: str):
    """The on_step of a training: saves every CHECKPOINT_EVERY steps, at the last step and when
    `stop()` says a signal came (then raises Stopped)."""

    def on_step(done: int, tree: Any, state: Any, losses: list) -> None:
        stopping = stop()
        if stopping or done % CHECKPOINT_EVERY == 0 or done == total:
            save(path, done, tree, state, losses)
        if stopping:
            log(f"{what}: checkpoint of step {done}/{total} saved in {os.path.dirname(path)}")
            raise Stopped

    return on_step
