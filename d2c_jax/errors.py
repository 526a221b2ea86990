"""User-facing errors: one clear line naming the file and the problem, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix (bad path, bad weights, bad flags).

    Launch scripts catch it and print `error: <path>: <message>` on one line, exit status 1.
    """

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


def run_cli(main: Callable[[], int | None]) -> int:
    """Runs a launch script's body, turning UserError into one line on stderr and status 1."""
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
