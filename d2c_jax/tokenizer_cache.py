"""Which transformers tokenizer class a model directory loads as, remembered between commands.

`AutoTokenizer.from_pretrained` picks the class from the model's config (through `AutoConfig`,
whose import pulls in torch) and then calls that class's `from_pretrained`. The pick costs about
3 s of CPU per command (torch's import and teardown), more than everything else a command on a
small model does before its first step. It depends only on the transformers version and the files
the pick reads (config.json, tokenizer_config.json, tokenizer.json, tekken.json), and on the path
given only when config.json names no `model_type` (AutoConfig then matches the path against model
names), so the first command records the class's module and name under the cache dir, keyed by a
hash of those, and later commands call that class's `from_pretrained` with the arguments
AutoTokenizer passes it: the same model copied elsewhere (each test's fixture) reuses the entry.
Anything unexpected (no entry, an unreadable or foreign entry, a class outside transformers) falls
back to AutoTokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from d2c_jax.fingerprint import cache_dir

# The files AutoTokenizer reads to choose the class (the model config, the tokenizer config,
# tokenizer.json for its ByteLevel check, tekken.json for its Mistral probe).
CHOICE_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "tekken.json")
SUBDIR = "tokenizer-classes"


def choice_key(model_dir: str) -> str:
    """Hash of everything the class choice depends on: versions, the files, and the path as given
    when config.json has no model_type."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps([transformers.__version__, tokenizers.__version__]).encode())
    typed = False
    for name in CHOICE_FILES:
        path = os.path.join(model_dir, name)
        h.update(f"\0{name}\0".encode())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            h.update(hashlib.sha256(data).digest())
            typed = typed or (name == "config.json" and _names_model_type(data))
        else:
            h.update(b"absent")
    if not typed:
        h.update(b"\0path\0" + model_dir.encode())
    return h.hexdigest()


def _names_model_type(config_json: bytes) -> bool:
    try:
        config = json.loads(config_json)
    except ValueError:
        return False
    return isinstance(config, dict) and isinstance(config.get("model_type"), str) and bool(config["model_type"])


def _entry_path(key: str) -> str:
    return os.path.join(cache_dir(), SUBDIR, key + ".json")


def _recorded_class(key: str) -> type | None:
    """The class recorded for `key`, or None when there is no usable entry."""
    import importlib

    try:
        with open(_entry_path(key)) as f:
            entry = json.load(f)
        module, name = entry["module"], entry["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(module, str) and isinstance(name, str) and module.startswith("transformers.")):
        return None
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase) else None


def _record(key: str, cls: type) -> None:
    """Write the entry atomically; a cache that cannot be written only costs the next command time."""
    path = _entry_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"module": cls.__module__, "name": cls.__qualname__}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def load(model_dir: str) -> Any:
    """The tokenizer AutoTokenizer.from_pretrained(model_dir, local_files_only=True) returns."""
    key = choice_key(model_dir)
    cls = _recorded_class(key)
    if cls is not None:
        # AutoTokenizer's own call of the chosen class (for a local directory: no revision).
        return cls.from_pretrained(model_dir, local_files_only=True, _from_auto=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if type(tok).__module__.startswith("transformers."):
        _record(key, type(tok))
    return tok
