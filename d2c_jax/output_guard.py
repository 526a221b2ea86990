"""Every command writes only where it may: never over a user's file, never over its own inputs.

The one rule each command applies to each output path before it computes anything:

- the output must not be one of the inputs, lie inside one, or hold one (`--adapters=A,B
  --output_dir=A` would replace an input adapter);
- an existing output must be ours: an output directory holds `atomic_io.MARKER` (written together
  with the output), or passes the command's own `ours` test (a search workdir's lock file, an
  evaluation JSON's keys); an empty directory or file loses nothing and is taken. Anything else is
  refused with one line, whatever `--overwrite` says; `--overwrite` only replaces our own output
  (commands without that flag replace their own re-computable output, as a re-run would);
- a symbolic link is never written through (we never create one);
- what a killed write into the same place left beside it (`.OUT.tmp-*`, `.OUT.old-*`) is removed.

Nothing here writes, except the removal of those leftovers.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Callable, Sequence

from d2c_jax.atomic_io import MARKER, is_leftover, remove_leftovers
from d2c_jax.errors import UserError


def _real(path: str) -> str:
    if path.startswith("gs://"):  # an object path: compared by name
        return "gs://" + posixpath.normpath(path[len("gs://"):]).strip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
    if child.startswith("gs://") or parent.startswith("gs://"):
        return child.startswith(parent + "/")
    return child != parent and os.path.commonpath([child, parent]) == parent


def refuse_inputs(output: str, inputs: Sequence[str | None], flag: str) -> None:
    """An output equal to, inside, or holding one of the inputs is refused (symlinks resolved)."""
    out = _real(output)
    for given in inputs:
        if not given:
            continue
        inp = _real(given)
        if out == inp:
            how = "is"
        elif _inside(out, inp):
            how = "is inside"
        elif _inside(inp, out):
            how = "holds"
        else:
            continue
        raise UserError(output, f"{flag} {how} the input {given}; it would be destroyed — choose another {flag}")


def marker(path: str) -> dict[str, Any] | None:
    """The MARKER of an output directory of ours (None: absent or unreadable; a link is not ours)."""
    p = os.path.join(path, MARKER)
    if os.path.islink(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("written_by") == "d2c_jax" else None


def _is_empty_dir(path: str) -> bool:
    try:
        return all(is_leftover(n) for n in os.listdir(path))
    except OSError:
        return False


def refuse_bucket(path: str | None, flag: str, command: str) -> None:
    """A gs:// path where `command` reads or writes local files only: one line saying what to do."""
    if path and str(path).startswith("gs://"):
        raise UserError(path, f"{flag} must be a local path for {command} (of the outputs, only launch/search.py's "
                        "--workdir may be gs://); copy with `gcloud storage cp -r` to or from local disk")


def claim_dir(path: str, *, what: str, flag: str, inputs: Sequence[str | None] = (), overwrite: bool | None = None,
              ours: Callable[[str], bool] | None = None, command: str | None = None, follow: bool = False) -> bool:
    """Checks that the directory `path` may be (re)written; returns True when it already holds
    an output of ours. `command`: the MARKER's command that counts as ours (None: any of ours);
    `ours(path)`: another way to recognise our own output; `overwrite`: None when the command
    has no --overwrite flag (our own output is then replaced), else its value; `follow`: a
    symbolic link to a directory is judged by that directory (a workdir written into, never
    replaced), else refused (an output replaced as a whole would replace the link)."""
    refuse_bucket(path, flag, "this command")
    if follow and os.path.islink(path) and os.path.isdir(path):
        path = os.path.realpath(path)
    if os.path.islink(path):
        raise UserError(path, f"{flag} is a symbolic link; refusing to write through it — choose another {flag}")
    refuse_inputs(path, inputs, flag)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(path, f"{flag} exists and is not a directory; refusing to replace it — choose another {flag}")
    remove_leftovers(path)
    if not os.path.exists(path) or _is_empty_dir(path):
        return False
    mark = marker(path)
    if (mark is not None and (command is None or mark.get("command") == command)) or (ours is not None and ours(path)):
        if overwrite is False:
            raise UserError(path, f"{flag} holds an earlier {what}; pass --overwrite to replace it or choose "
                            f"another {flag}")
        return True
    raise UserError(path, f"{flag} exists and is not a d2c_jax {what} (no {MARKER}); refusing to overwrite it — "
                    f"choose another {flag} or remove it yourself")


def json_keys(*keys: str) -> Callable[[str], bool]:
    """An `ours` test for a JSON file output: a JSON object holding every one of `keys`."""
    def test(path: str) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)
    return test


def claim_file(path: str, *, what: str, flag: str, inputs: Sequence[str | None] = (),
               ours: Callable[[str], bool]) -> None:
    """Checks that the file `path` may be (re)written: absent, empty, or ours (`ours(path)`)."""
    refuse_bucket(path, flag, "this command")
    if os.path.islink(path):
        raise UserError(path, f"{flag} is a symbolic link; refusing to write through it — choose another {flag}")
    refuse_inputs(path, inputs, flag)
    if os.path.isdir(path):
        raise UserError(path, f"{flag} is a directory; give a file name")
    remove_leftovers(path)
    if not os.path.lexists(path) or (os.path.isfile(path) and os.path.getsize(path) == 0):
        return
    if not os.path.isfile(path) or not ours(path):
        raise UserError(path, f"{flag} exists and is not a d2c_jax {what}; refusing to overwrite it — choose another "
                        f"{flag} or remove it yourself")


def claim_files(directory: str, names: Sequence[str], *, what: str, flag: str, inputs: Sequence[str | None] = (),
                ours: Callable[[str], bool]) -> None:
    """Checks the files `names` a command writes into a shared directory (e.g. a report into
    docs/): each absent, empty, or ours by `ours(directory)` (the command's own index file there)."""
    mine = os.path.isdir(directory) and ours(directory)
    for name in names:
        claim_file(os.path.join(directory, name), what=what, flag=flag, inputs=inputs, ours=lambda p: mine)


def mark_dir(path: str, command: str) -> None:
    """Creates `path` if needed and gives it our MARKER (for directories written file by file)."""
    from d2c_jax.atomic_io import write_json_atomic

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(path, f"cannot create the directory: {e.strerror}") from None
    if marker(path) is None:
        write_json_atomic(os.path.join(path, MARKER), {"written_by": "d2c_jax", "command": command}, indent=None)
