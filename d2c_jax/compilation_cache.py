"""The persistent XLA compilation cache: a second run with the same shapes compiles nothing.

`enable(directory)` points JAX's persistent cache at `directory` (default: JAX_COMPILATION_CACHE_DIR
when set, else the user cache dir $XDG_CACHE_HOME/d2c_jax/xla or ~/.cache/d2c_jax/xla; "none"
turns it off) and caches every
executable however fast it compiled. `counts()` reports, from JAX's own monitoring events, how
many compilations this process asked for and how many of them the cache answered, so tests and
partition.json can show that a second run compiled nothing.
"""

from __future__ import annotations

import collections
import os

import jax

_EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "requests",
    "/jax/compilation_cache/cache_hits": "hits",
}
_COUNTS: collections.Counter[str] = collections.Counter()
_LISTENING: list[bool] = []


def default_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "d2c_jax", "xla")


def _listen(event: str, **_: object) -> None:
    if event in _EVENTS:
        _COUNTS[_EVENTS[event]] += 1


def enable(directory: str = "") -> str | None:
    """Turns the persistent cache on in `directory` ("" : default_dir(), "none": off); call
    before the first compilation. Returns the directory used (None when off or unwritable)."""
    if not _LISTENING:
        jax.monitoring.register_event_listener(_listen)
        _LISTENING.append(True)
    if directory.strip().lower() == "none":
        return None
    # "" keeps a directory already configured (JAX_COMPILATION_CACHE_DIR) before the default.
    directory = os.path.abspath(directory or jax.config.jax_compilation_cache_dir or default_dir())
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def counts() -> dict[str, int]:
    """{"compilations": executables compiled by XLA, "cache_hits": executables read from the
    persistent cache} in this process so far (both 0 while the cache is off)."""
    return {"compilations": _COUNTS["requests"] - _COUNTS["hits"], "cache_hits": _COUNTS["hits"]}
