"""The search's per-iteration metrics rows on disk: an append-only JSON-lines file.

Checkpoints hold only how many rows their step had, not the rows themselves, so a checkpoint's
size does not grow with the iterations run (the history is O(T); each of keep-latest-N
checkpoints carrying a copy of it made the checkpoint directory grow without bound). The rows
since the last save are appended and fsynced *before* the checkpoint that counts them is
committed, so every committed step's rows are on disk whole; a restore keeps the first `count`
rows and cuts off the rest (rows of a later, uncommitted or skipped step, or a line half-written
by a kill), so appending goes on from exactly that step.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

from d2c_jax.atomic_io import fsync_path, nofollow, save_error, write_bytes_atomic
from d2c_jax.errors import UserError


def jsonl_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The rows as metrics.jsonl holds them: one JSON object per line."""
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


class MetricsLog:
    """Rows 0..n-1 of a run in `path`; only the writing process (process 0) touches the file."""

    def __init__(self, path: str | os.PathLike, *, writer: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        self.writer = writer
        self._on_disk: int | None = None  # rows known to be in the file (None: not yet written by us)

    def read(self) -> list[dict[str, Any]]:
        """The complete rows at the start of the file (stops at the first line that is not one)."""
        rows: list[dict[str, Any]] = []
        try:
            with open(self.path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # a line cut by a kill
                    try:
                        row = json.loads(line)
                    except ValueError:
                        break
                    if not isinstance(row, dict):
                        break
                    rows.append(row)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(self.path, f"cannot read: {e}") from None
        return rows

    def restore(self, count: int, step: int) -> list[dict[str, Any]]:
        """The first `count` rows (those of checkpoint `step`); the file is cut back to them."""
        rows = self.read()
        if len(rows) < count and self.writer:
            print(f"warning: {self.path} holds {len(rows)} of the {count} metrics rows of checkpoint step "
                  f"{step}; the resumed history has only those", file=sys.stderr, flush=True)
        rows = rows[:count]
        if self.writer:
            write_bytes_atomic(self.path, jsonl_bytes(rows))
            self._on_disk = len(rows)
        return rows

    def sync(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Makes the file hold exactly `rows` (durably): appends the new ones when the file holds a
        prefix we wrote, else rewrites it whole."""
        if not self.writer:
            return
        if self._on_disk is None or self._on_disk > len(rows):
            write_bytes_atomic(self.path, jsonl_bytes(rows))
        elif self._on_disk < len(rows):
            try:
                with open(self.path, "ab", opener=nofollow) as fh:
                    fh.write(jsonl_bytes(rows[self._on_disk:]))
                    fh.flush()
                    os.fsync(fh.fileno())
                fsync_path(os.path.dirname(self.path))
            except OSError as e:
                raise save_error(self.path, "", e) from None
        self._on_disk = len(rows)
