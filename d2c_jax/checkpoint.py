"""Search checkpoints (Orbax), resumption, run fingerprints and preemption.

A checkpoint step s (= iterations completed) holds two Orbax items, committed atomically by
Orbax (written to a temporary directory, then renamed):
  state (StandardSave): partitions int32[P, N], iteration int64[], cache_size int64[],
      cache_masks uint8[Q', N] (0/1), cache_tasks int32[Q'], cache_losses float32[Q']
      (Q' = max(Q, 1): Orbax refuses zero-size arrays; the first `cache_size` rows are valid)
  meta (JsonSave): {"version", "iteration", "fingerprint", "metrics": [row, ...]}
There is no random-generator state to save: the engine's streams are keyed by (seed, iteration).

The fingerprint is {"base_model": sha256, "adapters": sha256, "data": sha256, "settings": {...}}
(`fingerprint()`); a checkpoint made with another one is refused with a UserError naming what
differs. SIGTERM (`PreemptionFlag`) asks the engine to checkpoint at the end of the current
iteration and stop.

Shapes: P chains, N adapters, Q cache entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from typing import Any, Iterable, Mapping

import numpy as np

from d2c_jax.errors import UserError
from d2c_jax.search import LossCache, SearchState

FORMAT_VERSION = 1
_ITEMS = ("state", "meta")
_FINGERPRINT_NAMES = {"base_model": "base model", "adapters": "adapters", "data": "task data"}


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over (base name, content) of each file, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def fingerprint(
    base_model: str | os.PathLike,
    adapter_dirs: Iterable[str | os.PathLike],
    data_files: Iterable[str | os.PathLike],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it.

    base_model: its config.json; adapters: each adapter's name, adapter_config.json and the size
    of its weights file (hashing all weights would cost seconds per GB); data: every data file
    (names and contents); settings: the result-relevant flags, verbatim.
    """
    adapter_h = hashlib.sha256()
    for d in adapter_dirs:
        d = os.fspath(d)
        adapter_h.update(os.path.basename(os.path.normpath(d)).encode() + b"\0")
        cfg = os.path.join(d, "adapter_config.json")
        adapter_h.update(sha256_files([cfg]).encode() if os.path.exists(cfg) else b"-")
        weights = os.path.join(d, "adapter_model.safetensors")
        adapter_h.update(str(os.path.getsize(weights) if os.path.exists(weights) else -1).encode() + b"\0")
    return {
        "base_model": sha256_files([os.path.join(base_model, "config.json")]),
        "adapters": adapter_h.hexdigest(),
        "data": sha256_files(list(data_files)),
        "settings": json.loads(json.dumps(dict(settings))),
    }


def _mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Words for the first part of two fingerprints that differs, or None."""
    for key, words in _FINGERPRINT_NAMES.items():
        if saved.get(key) != current.get(key):
            return words
    s_saved, s_now = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(set(s_saved) | set(s_now)):
        if s_saved.get(key) != s_now.get(key):
            return f"--{key} ({s_saved.get(key)!r} in the checkpoint, {s_now.get(key)!r} now)"
    return None


def state_to_tree(state: SearchState) -> dict[str, np.ndarray]:
    masks_qn, tasks_q, losses_q = state.cache.to_arrays()
    q = len(tasks_q)
    if q == 0:  # Orbax cannot save zero-size arrays
        masks_qn = np.zeros((1, state.cache.num_adapters), np.uint8)
        tasks_q, losses_q = np.zeros(1, np.int32), np.zeros(1, np.float32)
    return {
        "partitions": np.asarray(state.partitions_pn, np.int32),
        "iteration": np.asarray(state.iteration, np.int64),
        "cache_size": np.asarray(q, np.int64),
        "cache_masks": masks_qn,
        "cache_tasks": tasks_q,
        "cache_losses": losses_q,
    }


def tree_to_state(tree: Mapping[str, Any], metrics: list[dict[str, Any]], num_adapters: int) -> SearchState:
    q = int(np.asarray(tree["cache_size"]))
    cache = LossCache.from_arrays(
        num_adapters, np.asarray(tree["cache_masks"])[:q], np.asarray(tree["cache_tasks"])[:q],
        np.asarray(tree["cache_losses"])[:q],
    )
    partitions_pn = np.asarray(tree["partitions"], np.int32)
    if partitions_pn.ndim != 2 or partitions_pn.shape[1] != num_adapters:
        raise ValueError(f"partitions of shape {partitions_pn.shape} for {num_adapters} adapters")
    return SearchState(partitions_pn.copy(), int(np.asarray(tree["iteration"])), cache, list(metrics))


class Checkpointer:
    """Saves / restores the search state in `directory` with an Orbax CheckpointManager.

    Saves every `every` iterations (or when forced: preemption, last iteration) and keeps the
    latest `keep`. Every process must call `save` (Orbax coordinates hosts; process 0 writes).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, fingerprint: Mapping[str, Any]):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = dict(fingerprint)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=False,  # a step is committed when save() returns
            cleanup_tmp_directories=True,  # leftovers of a save killed midway
            create=True,
        )
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable directory
            raise UserError(self.directory, f"cannot open the checkpoint directory ({_one_line(e)}); "
                            "use --overwrite or another --workdir") from e

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def _meta(self, step: int) -> dict[str, Any]:
        ocp = self._ocp
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown checkpoint format {meta.get('version') if isinstance(meta, dict) else meta!r}")
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        return meta

    def _corrupt(self, step: int, e: BaseException) -> UserError:
        return UserError(os.path.join(self.directory, str(step)), f"cannot read the checkpoint ({_one_line(e)}); "
                         "it may be corrupt: use --overwrite or another --workdir")

    def _checked_meta(self) -> tuple[int, dict[str, Any]] | None:
        """(latest step, its metadata) if that step was made by this run (same fingerprint), None
        if there is none; UserError if it was made by a different run or cannot be read."""
        step = self._mngr.latest_step()
        if step is None:
            return None
        meta = self._meta(step)
        diff = _mismatch(meta.get("fingerprint", {}), self.fingerprint)
        if diff is not None:
            raise UserError(None, f"checkpoint in {self.directory} was made with a different {diff}; "
                            "use --overwrite or another --workdir")
        return step, meta

    def check(self) -> int | None:
        """The latest step if it was made by this run (same fingerprint), None if there is none;
        UserError if it was made by a different run or cannot be read. Reads only the metadata."""
        checked = self._checked_meta()
        return None if checked is None else checked[0]

    def restore(self, num_adapters: int) -> SearchState | None:
        """The latest checkpoint's state, or None when there is none; UserError when it was made
        by a different run or cannot be read."""
        checked = self._checked_meta()
        if checked is None:
            return None
        step, meta = checked
        ocp = self._ocp
        try:
            tree = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
            state = tree_to_state(tree, meta["metrics"], num_adapters)
            if state.iteration != step:
                raise ValueError(f"step {step} holds iteration {state.iteration}")
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        return state

    def save(self, state: SearchState, force: bool = False) -> bool:
        """Saves when the interval says so (or `force`); True if a checkpoint was written."""
        step = state.iteration
        if not force and not self._mngr.should_save(step):
            return False
        if step in self._mngr.all_steps():
            return False
        ocp = self._ocp
        meta = {"version": FORMAT_VERSION, "iteration": step, "fingerprint": self.fingerprint,
                "metrics": state.metrics}
        saved = self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        self._mngr.wait_until_finished()
        return bool(saved)

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption signal (False where JAX's preemption service is off)."""
        try:
            return bool(self._mngr.reached_preemption(step))
        except Exception:  # noqa: BLE001 - the service is optional
            return False

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionFlag:
    """Context manager: SIGTERM sets the flag (instead of killing the process); calling the object
    returns whether it is set. The engine polls it at the end of each iteration."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
