"""Search checkpoints (Orbax): commit, fallback to the newest usable step, run fingerprints.

A checkpoint step s (= iterations completed) holds two Orbax items, written by Orbax into a
temporary directory and renamed into place:
  state (StandardSave): partitions int32[P, N], iteration int64[], cache_size int64[],
      cache_masks uint8[Q', N] (0/1), cache_tasks int32[Q'], cache_losses float32[Q']
      (Q' = max(Q, 1): Orbax refuses zero-size arrays; the first `cache_size` rows are valid)
  meta (JsonSave): {"version", "iteration", "fingerprint", "metrics_rows": how many rows of the
      run's metrics log (`metrics_log.MetricsLog`, outside the checkpoints) belong to this step}
and then our commit marker `s/d2c_committed`: written (and fsynced, like every file and directory
of the step before it) only after Orbax returned, so a step without it (a save cut by SIGKILL or
a power cut after Orbax's rename) never counts. There is no random-generator state to save: the
engine's streams are keyed by (seed, iteration).

Restoring walks back from the newest step to the newest one that is committed and reads back
whole, warns once naming the steps it skipped (and removes them, so they are neither kept by
keep-latest-N nor in the way of a new save), and refuses a readable step made by another run
(`fingerprint.mismatch`: one line naming what changed). Steps whose save never completed (no
marker) are no checkpoints: with only those the run starts afresh. Only when committed steps
exist and none of them is usable is --overwrite needed.

Shapes: P chains, N adapters, Q cache entries.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import numpy as np

from d2c_jax.atomic_io import finish_tree, fsync_path, remove_path, write_bytes_atomic
from d2c_jax.errors import UserError
from d2c_jax.fingerprint import mismatch
from d2c_jax.metrics_log import MetricsLog
from d2c_jax.search import LossCache, SearchState

FORMAT_VERSION = 3  # 2: the metrics rows inside meta (still read)
_READABLE = (2, 3)
_ITEMS = ("state", "meta")
COMMITTED = "d2c_committed"
_UNCOMMITTED = "not committed: its save was interrupted"


class _NotCommitted(Exception):
    pass


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

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, fingerprint: Mapping[str, Any],
                 metrics_path: str | os.PathLike, name: str | None = None):
        import jax
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.name = name or self.directory  # how warnings name it (a gs:// workdir's, for its staging copy)
        self.metrics_log = MetricsLog(metrics_path, writer=jax.process_index() == 0)
        self.fingerprint = dict(fingerprint)
        self._options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=False,  # Orbax is done when save() returns
            cleanup_tmp_directories=True,  # leftovers of a save killed midway
            create=True,
        )
        self._restored: SearchState | None = None
        self._mngr = self._open()

    def _open(self):
        try:
            return self._ocp.CheckpointManager(self.directory, options=self._options, item_names=_ITEMS)
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable directory
            raise UserError(self.directory, f"cannot open the checkpoint directory ({_one_line(e)}); "
                            "use --overwrite or another --workdir") from None

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def _read(self, step: int, num_adapters: int) -> tuple[dict[str, Any], SearchState]:
        """(meta, state) of a step; ValueError (or Orbax's errors) when it is not usable."""
        ocp = self._ocp
        if not os.path.isfile(os.path.join(self.directory, str(step), COMMITTED)):
            raise _NotCommitted(_UNCOMMITTED)
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("version") not in _READABLE:
            raise ValueError(f"unknown checkpoint format {meta.get('version') if isinstance(meta, dict) else meta!r}")
        diff = mismatch(meta.get("fingerprint", {}), self.fingerprint)
        if diff is not None:  # readable but another run's: refused, not skipped
            raise UserError(None, f"the checkpoint in {self.directory} belongs to other inputs: {diff}; "
                            "use --overwrite or another --workdir")
        tree = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        state = tree_to_state(tree, meta.get("metrics", []), num_adapters)
        if state.iteration != step:
            raise ValueError(f"step {step} holds iteration {state.iteration}")
        if not isinstance(meta.get("metrics_rows", 0), int):
            raise ValueError(f"metrics_rows {meta['metrics_rows']!r}")
        return meta, state

    def restore(self, num_adapters: int) -> SearchState | None:
        """The newest usable checkpoint's state, or None when there is no checkpoint; UserError when
        the newest readable one was made by another run or none can be read. Reads once (later
        calls return the same state until the next save)."""
        if self._restored is not None:
            return self._restored
        skipped: list[tuple[int, str]] = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                meta, state = self._read(step, num_adapters)
            except UserError:
                raise
            except _NotCommitted:
                skipped.append((step, _UNCOMMITTED))
                continue
            except Exception as e:  # noqa: BLE001 - any failure means this step is not usable
                skipped.append((step, _one_line(e)))
                continue
            if skipped:
                self._drop(skipped, f"resuming from step {step}")
            if "metrics_rows" in meta:  # format 3: the rows are in the metrics log
                state.metrics = self.metrics_log.restore(meta["metrics_rows"], step)
            self._restored = state
            return state
        corrupt = [(s, why) for s, why in skipped if why != _UNCOMMITTED]
        if corrupt:
            steps = ", ".join(str(s) for s, _ in corrupt)
            raise UserError(self.directory, f"no usable checkpoint (step {steps}: {corrupt[0][1]}); "
                            "use --overwrite to start afresh or another --workdir")
        if skipped:  # only saves that never completed: as if there were no checkpoint
            self._drop(skipped, "starting afresh")
        return None

    def _drop(self, skipped: list[tuple[int, str]], then: str) -> None:
        """Warns once about the unusable steps and removes them (process 0; the other processes
        from their own copy, where they have one), then re-opens Orbax."""
        import jax

        from d2c_jax.sharding import barrier

        steps = ", ".join(str(s) for s, _ in skipped)
        if jax.process_index() == 0:
            print(f"warning: {self.name}: skipping unusable checkpoint step {steps} "
                  f"({skipped[0][1]}); {then}", file=sys.stderr, flush=True)
            for step, _ in skipped:
                remove_path(os.path.join(self.directory, str(step)))
            fsync_path(self.directory)
        barrier("d2c_drop_checkpoints")
        if jax.process_index() != 0:  # a directory of its own (a gs:// workdir's staging copy): the same steps go
            for step, _ in skipped:
                if os.path.lexists(os.path.join(self.directory, str(step))):
                    remove_path(os.path.join(self.directory, str(step)))
        self._mngr.close()
        self._mngr = self._open()

    def check(self, num_adapters: int) -> int | None:
        """The step a restart resumes from (None: none); errors as `restore`."""
        state = self.restore(num_adapters)
        return None if state is None else state.iteration

    def save(self, state: SearchState, force: bool = False) -> bool:
        """Saves when the interval says so (or `force`); True if a checkpoint was committed."""
        import jax

        step = state.iteration
        if not force and not self._mngr.should_save(step):
            return False
        if step in self._mngr.all_steps():
            return False
        ocp = self._ocp
        meta = {"version": FORMAT_VERSION, "iteration": step, "fingerprint": self.fingerprint,
                "metrics_rows": len(state.metrics)}
        self.metrics_log.sync(state.metrics)  # the step's rows are durable before it can be committed
        try:
            saved = self._mngr.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                                        meta=ocp.args.JsonSave(meta)),
                force=force,
            )
            self._mngr.wait_until_finished()
            if not saved:
                return False
            if jax.process_index() == 0:
                step_dir = os.path.join(self.directory, str(step))
                finish_tree(step_dir)  # every file and directory of the step on disk ...
                fsync_path(self.directory)  # ... and its name in the checkpoint directory
                write_bytes_atomic(os.path.join(step_dir, COMMITTED), b"%d\n" % step)  # then the marker
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax wraps OS errors (full disk, permissions) in its own
            raise save_error(self.directory, step, e) from None
        self._restored = None
        return True

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


def save_error(directory: str, step: int, e: BaseException) -> UserError:
    """The one line for a checkpoint save that failed (a full disk, no permission, a path that is
    a file): the uncommitted step is skipped by the next run, which resumes from the last one."""
    return UserError(directory, f"cannot save the checkpoint of iteration {step} ({_one_line(e)}); free disk "
                     "space or make the directory writable, then re-run the same command to resume from the "
                     "last saved checkpoint")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
