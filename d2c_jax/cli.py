"""What every launch script does first: signals, quiet libraries, help, one-line flag errors.

`start()` runs before jax or transformers are imported: it routes SIGTERM / SIGINT through
`signals` and silences two lines of noise that every run printed ("[transformers] PyTorch was not
found..." where torch is absent; jax's "Unable to initialize backend 'tpu'").

Flag parsing: `parser(groups)` (or `parse_flags`, no groups) is passed to
`app.run(main, flags_parser=...)`. It
  - answers --help / -h / --helpshort (the script's basic flags by group, then the others) and
    --helpfull (also the general absl flags, never the test frameworks' flags) and exits 0;
  - turns a flag error into one `error:` line naming the flagfile (or the command line), with
    the closest known name for an unknown flag, and exits 1 (absl prints "FATAL Flags parsing
    error" plus a usage hint and names neither the flagfile holding the flag nor a missing one);
  - refuses a flagfile whose `/path/to/` placeholders are still in effect, naming all of them.
"""

from __future__ import annotations

import difflib
import gc
import logging
import os
import sys
import textwrap
from typing import Callable, Iterator, Mapping, NoReturn, Sequence

from absl import flags

from d2c_jax import signals


def start() -> None:
    """Signal handling and quiet libraries; call at the top of a launch script."""
    signals.install()
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    for name in ("httpx", "httpx2"):  # huggingface_hub's HTTP client logs each request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    skip_absent_tpu()


def finish(status: int) -> NoReturn:
    """sys.exit(status) for a launch script's last line, without the interpreter's final cyclic
    garbage collections over every object ever imported (gc.freeze): with torch loaded (the
    transformers tokenizer imports it) they take about 2 s of a command's wall time. atexit
    handlers still run and open files are still flushed."""
    gc.freeze()
    sys.exit(status)


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


PLACEHOLDER = "/path/to/"
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")
# Modules whose flags --helpfull shows besides the script's own (absl's general flags).
GENERAL_MODULES = ("absl.flags", "absl.app", "absl.logging")
Groups = Mapping[str, Sequence[str]]
FLAGFILE_HELP = ("  --flagfile=FILE\n      Read flags from FILE, one per line (e.g. configs/demo.flags); flags given "
                 "after it\n      on the command line override its values.")


def _script_flags(flag_values: flags.FlagValues) -> list:
    """The flags the running script defined (absl files them under sys.argv[0])."""
    return list(flag_values.get_key_flags_for_module(sys.argv[0]))


def _known_names(flag_values: flags.FlagValues) -> list[str]:
    names = [f.name for f in _script_flags(flag_values)] or list(flag_values)
    bools = [f"no{f.name}" for f in _script_flags(flag_values) if f.boolean]
    return names + bools + ["flagfile"]


def describe(argv: Sequence[str], error: flags.Error, flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """The one line for a flag parsing error (without the leading "error: ")."""
    text = " ".join(str(error).split())
    if isinstance(error, flags.UnrecognizedFlagError):
        name = error.flagname
        close = difflib.get_close_matches(name, _known_names(flag_values), n=1, cutoff=0.6)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        for path, _, lines in _walk(argv[1:]):
            if lines and any(line.startswith("-") and name in _names(line) for line in lines):
                return f"{path}: unknown flag --{name}{hint}"
        return f"unknown flag --{name}{hint or ' (see --helpshort)'}"
    if "Unable to open flagfile" in text:
        for path, parent, lines in _walk(argv[1:]):
            if lines is None:
                named = f" (named in {parent})" if parent else ""
                return f"{path}: cannot read this flagfile{named}"
    return text


def placeholders(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> str | None:
    """The error line (without "error: ") for flags whose parsed value still holds a `/path/to/`
    placeholder, naming the flagfile they come from and every one of them; None when none."""
    bad = [(name, flag_values[name].value) for name in flag_values
           if isinstance(flag_values[name].value, str) and PLACEHOLDER in flag_values[name].value]
    if not bad:
        return None
    files = [path for path, _, lines in _walk(argv[1:])
             if lines and any(line.startswith("-") and PLACEHOLDER in line for line in lines)]
    listed = ", ".join(f"--{name}={value}" for name, value in sorted(set(bad)))
    where = f"{files[0]}: " if files else ""
    return (f"{where}placeholder path(s) still to edit: {listed} (edit the file, or give these flags on the "
            "command line)")


def _flag_line(flag) -> str:
    default = flag.default_as_str if flag.default is not None else ""
    default = default.strip("'") if default else ""
    head = f"  --{flag.name}" + (f"={default}" if default and not flag.boolean else "")
    if flag.boolean:
        head = f"  --[no]{flag.name}" + (" (default: on)" if flag.default else "")
    body = textwrap.fill(" ".join((flag.help or "").split()), width=96, initial_indent="      ",
                         subsequent_indent="      ")
    return f"{head}\n{body}" if body.strip() else head


def _usage() -> str:
    """The script's docstring: its first line and its command lines."""
    lines = (sys.modules["__main__"].__doc__ or "").strip("\n").splitlines()
    keep, going_on = lines[:1] + [""], False
    for line in lines[1:]:
        if line.startswith("  python") or going_on:
            keep.append(line)
        going_on = (line.startswith("  python") or going_on) and line.rstrip().endswith("\\")
    return "\n".join(keep).rstrip()


def help_text(groups: Groups, full: bool, flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """The basic flags by group, then the script's other flags ("advanced"); with `full`, also
    absl's general flags."""
    own = {f.name: f for f in _script_flags(flag_values)}
    out = [_usage(), ""]
    shown = set()
    for group, names in groups.items():
        rows = [own[n] if n in own else flag_values[n] for n in names if n in own or n in flag_values]
        if rows:
            out.append(f"{group}:")
            if "flagfile" in names:
                out.append(FLAGFILE_HELP)
            out += [_flag_line(f) for f in rows]
            out.append("")
            shown.update(f.name for f in rows)
    rest = [own[n] for n in sorted(own) if n not in shown]
    if rest:
        out.append("advanced:" if groups else "flags:")
        out += [_flag_line(f) for f in rest]
        out.append("")
    if full:
        general = {f.name: f for m in GENERAL_MODULES for f in flag_values.get_key_flags_for_module(m)}
        rows = [general[n] for n in sorted(general) if n not in own and n not in shown]
        if rows:
            out.append("general (absl):")
            out += [_flag_line(f) for f in rows]
            out.append("")
    else:
        out.append("--helpfull also lists the general absl flags (logging, flagfile handling).")
    return "\n".join(out).rstrip() + "\n"


def _help_request(argv: Sequence[str]) -> str | None:
    for arg in argv[1:]:
        if arg == "--":
            return None
        if arg in HELP_ARGS or arg.split("=", 1)[0] in ("--help", "--helpshort", "--helpfull"):
            return arg
    return None


def parser(groups: Groups | None = None) -> Callable[[list[str]], list[str]]:
    """The flags_parser for app.run: help (exit 0), one-line flag errors (exit 1), placeholders."""
    groups = groups or {}

    def parse(argv: list[str]) -> list[str]:
        asked = _help_request(argv)
        if asked is not None:
            sys.stdout.write(help_text(groups, full="helpfull" in asked))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            print(f"error: {describe(argv, e)}", file=sys.stderr)
            sys.exit(1)
        problem = placeholders(argv)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(1)
        return rest

    return parse


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing of argv (see `parser`), without help groups."""
    return parser()(argv)
