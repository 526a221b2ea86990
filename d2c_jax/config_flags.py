"""absl flags generated from a frozen config dataclass, so each setting is declared once.

A field's default is the flag's default and its `setting(...)` metadata holds the help text (and
the choices of an enum flag); a field whose type is itself a config dataclass (RunConfig.search)
contributes its fields as flags of the same names. `define_flags(Config)` registers the flags
(launch scripts call it at import time), `from_flags(Config, FLAGS)` builds the config from the
parsed values. Library code still never reads FLAGS: the launch script passes them in.

Field types: bool, int, float, str (an enum when `choices` is given), `X | None` of those
(default None), and tuples of str or int (comma-separated lists).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Sequence

from absl import flags

from d2c_jax.errors import UserError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
            required: bool = False) -> Any:
    """A config field with its flag's help text; `required`: the flag must be given."""
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "required": required}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default")
    return dataclasses.field(default=default, metadata=metadata)


def _base(tp: Any) -> Any:
    """int for `int | None` (and the like); the type itself otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, _base(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS, *, skip: Sequence[str] = (),
                 module_name: str | None = None) -> None:
    """Registers one flag per field of `cls` (nested config dataclasses flattened), as flags of
    the calling module (what --helpshort lists)."""
    if module_name is None:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        module_name = sys.argv[0] if caller == "__main__" else caller
    for f, tp in _fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            define_flags(tp, flag_values, skip=skip, module_name=module_name)
            continue
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no setting(...) help text")
        default = None if f.default is dataclasses.MISSING else f.default
        kw = dict(name=f.name, default=default, help=meta["help"], flag_values=flag_values, module_name=module_name)
        if meta.get("choices"):
            flags.DEFINE_enum(enum_values=list(meta["choices"]), **kw)
        elif tp is bool:
            flags.DEFINE_bool(**kw)
        elif tp is int:
            flags.DEFINE_integer(**kw)
        elif tp is float:
            flags.DEFINE_float(**kw)
        elif tp is str:
            flags.DEFINE_string(**kw)
        elif typing.get_origin(tp) is tuple:
            kw["default"] = None if default is None else [str(x) for x in default]
            flags.DEFINE_list(**kw)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {tp}")
        if meta.get("required"):
            flags.mark_flag_as_required(f.name, flag_values)


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS, **given: Any) -> Any:
    """`cls` built from the parsed flags of its fields; `given` values win (and fill fields
    that have no flag)."""
    kwargs = {}
    for f, tp in _fields(cls):
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_flags(tp, flag_values)
        else:
            kwargs[f.name] = _convert(f.name, tp, flag_values[f.name].value)
    return cls(**kwargs)


def _convert(name: str, tp: Any, value: Any) -> Any:
    if typing.get_origin(tp) is not tuple or value is None:
        return value
    (item, _) = typing.get_args(tp)
    try:
        return tuple(item(x) for x in value if x != "")
    except ValueError:
        raise UserError(None, f"--{name}={','.join(value)}: must be {_PLURAL.get(item, item.__name__)}") from None


_PLURAL = {int: "integers", float: "numbers", str: "strings"}
