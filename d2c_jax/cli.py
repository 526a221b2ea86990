"""What every launch script does first: signals, quiet libraries, one-line flag errors.

`start()` runs before jax or transformers are imported: it routes SIGTERM / SIGINT through
`signals` and silences two lines of noise that every run printed ("[transformers] PyTorch was not
found..." where torch is absent; jax's "Unable to initialize backend 'tpu'").

Flag parsing: absl prints "FATAL Flags parsing error: Unknown command line flag 'x'" plus a usage hint and
names neither the flagfile holding the flag nor the flagfile that is missing. `parse_flags` is
passed to `app.run(main, flags_parser=parse_flags)`; on a flag error it names the flagfile (or
the command line), prints one line and exits 1.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterator, Sequence

from absl import flags

from d2c_jax import signals


def start() -> None:
    """Signal handling and quiet libraries; call at the top of a launch script."""
    signals.install()
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    skip_absent_tpu()


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of this vendor (as jax's hardware_utils finds them)


def skip_absent_tpu(environ: dict | None = None, pci_root: str = "/sys/bus/pci/devices") -> None:
    """With libtpu installed (`.[tpu]`, for --dry_run) but no TPU chip on this machine, JAX would
    still start the TPU runtime on first use: 0.9 s more and five lines of libtpu errors about the
    accelerator type and worker hostnames. JAX_PLATFORMS then leaves the TPU out (cpu, plus cuda
    when an NVIDIA GPU is visible); a JAX_PLATFORMS the user set is kept as it is."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME"):
        return
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return
    try:
        vendors = [os.path.join(pci_root, d, "vendor") for d in os.listdir(pci_root)]
    except OSError:
        vendors = []
    for path in vendors:
        try:
            with open(path, encoding="ascii") as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return  # a Google PCI device: maybe a TPU, let JAX decide
        except OSError:
            continue
    gpu = any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))
    cuda = gpu and any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    env["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"


def _flagfile_args(args: Sequence[str]) -> Iterator[str]:
    for i, arg in enumerate(args):
        for prefix in ("--flagfile=", "-flagfile="):
            if arg.startswith(prefix):
                yield arg[len(prefix):]
        if arg in ("--flagfile", "-flagfile") and i + 1 < len(args):
            yield args[i + 1]


def _walk(args: Sequence[str], parent: str | None = None, seen: frozenset[str] = frozenset()
          ) -> Iterator[tuple[str, str | None, list[str] | None]]:
    """(flagfile, the flagfile naming it or None, its lines or None if unreadable), depth first."""
    for path in _flagfile_args(args):
        path = os.path.expanduser(path)
        if path in seen:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError):
            yield path, parent, None
            continue
        yield path, parent, lines
        yield from _walk(lines, path, seen | {path})


def _names(arg: str) -> set[str]:
    name = arg.lstrip("-").split("=", 1)[0]
    return {name, name[2:]} if name.startswith("no") else {name}


def describe(argv: Sequence[str], error: flags.Error) -> str:
    """The one line for a flag parsing error (without the leading "error: ")."""
    text = " ".join(str(error).split())
    if isinstance(error, flags.UnrecognizedFlagError):
        name = error.flagname
        for path, _, lines in _walk(argv[1:]):
            if lines and any(line.startswith("-") and name in _names(line) for line in lines):
                return f"{path}: unknown flag --{name}"
        return f"unknown flag --{name} (see --helpshort)"
    if "Unable to open flagfile" in text:
        for path, parent, lines in _walk(argv[1:]):
            if lines is None:
                named = f" (named in {parent})" if parent else ""
                return f"{path}: cannot read this flagfile{named}"
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing of argv, with flag errors as one `error:` line and exit status 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {describe(argv, e)}", file=sys.stderr)
        sys.exit(1)
