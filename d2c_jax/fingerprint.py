"""The run fingerprint: content hashes of every input that changes a result, for checkpoints.

A checkpoint records the fingerprint of the run that made it; a restart whose inputs hash
differently is refused with one line naming the first input that changed (a retrained adapter of
the same size, new base weights behind an unchanged config.json, edited examples).

    {"files": {"base_model/model.safetensors": sha256, "tokenizer/tokenizer.json": sha256,
               "adapters/<task>/adapter_model.safetensors": sha256, ...},
     "examples": {"<task>": sha256 of the (prompt, response) pairs actually used},
     "prompts": {"<task>": sha256 of the prompts' token ids, as the model sees them},
     "settings": {flag: value},
     "revisions": {"org/name@revision": commit} of the inputs named by Hub id (hub.py)}

The prompts' token ids cover what the raw examples and the tokenizer files do not: a chat
template's output depends on values it reads at run time (Llama 3's "Today Date"), so a resume
that would see other prompts than the checkpoint's losses were computed on is refused.

Keys are relative, so moving the same inputs elsewhere still resumes. Files are hashed streaming
(4 MiB chunks, several files at once: hashlib releases the GIL) and each hash is cached in
`<cache dir>/file_hashes.json` under (path, size, mtime_ns, ctime_ns, inode): a restart of a run on
a 3B model re-reads nothing. The cache dir is $D2C_CACHE_DIR, else $XDG_CACHE_HOME/d2c_jax, else
~/.cache/d2c_jax; a cache that cannot be read or written only costs the re-hashing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from d2c_jax.atomic_io import write_json_atomic
from d2c_jax.errors import UserError
from d2c_jax.hf_io import TOKENIZER_FILES

_CHUNK = 4 << 20
_MAX_CACHE_ENTRIES = 20_000
# Files of a base model directory that change results, by role (the rest: README, .bin, ...).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
_ROLE_WORDS = {"base_model": "base model file", "tokenizer": "tokenizer file", "adapters": "adapter file"}


def cache_dir() -> str:
    if os.environ.get("D2C_CACHE_DIR"):
        return os.environ["D2C_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "d2c_jax")


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: Sequence[str]) -> dict[str, str]:
    """{path: sha256 of its content}, from the cache where (size, mtime, ctime, inode) match."""
    cache_path = os.path.join(cache_dir(), "file_hashes.json")
    try:
        with open(cache_path, encoding="utf-8") as f:
            cache = json.load(f)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    out: dict[str, str] = {}
    todo: dict[str, list[int]] = {}
    for path in paths:
        apath = os.path.abspath(path)
        try:
            key = _stat_key(os.stat(apath))
        except OSError as e:
            raise UserError(path, f"cannot read: {e.strerror}") from None
        hit = cache.get(apath)
        if isinstance(hit, list) and hit[:-1] == key:
            out[path] = hit[-1]
        else:
            todo[path] = key
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            futures = {path: pool.submit(_sha256_file, path) for path in todo}
        for path, fut in futures.items():
            try:
                out[path] = fut.result()
            except OSError as e:
                raise UserError(path, f"cannot read: {e.strerror}") from None
            cache.pop(os.path.abspath(path), None)
            cache[os.path.abspath(path)] = todo[path] + [out[path]]
        for stale in list(cache)[: max(0, len(cache) - _MAX_CACHE_ENTRIES)]:
            del cache[stale]
        try:
            write_json_atomic(cache_path, cache, indent=None)
        except UserError:
            pass  # an unwritable cache only costs hashing again next time
    return out


def base_model_files(base_model: str) -> tuple[list[str], list[str]]:
    """(weight files incl. config.json, tokenizer files) of a HF model directory, sorted."""
    try:
        names = sorted(os.listdir(base_model))
    except OSError as e:
        raise UserError(base_model, f"cannot list the model directory: {e.strerror}") from None
    weights = [n for n in names if n == "config.json" or n.endswith(_WEIGHT_SUFFIXES)]
    tokenizer = [n for n in names if n in TOKENIZER_FILES]
    full = lambda ns: [os.path.join(base_model, n) for n in ns if os.path.isfile(os.path.join(base_model, n))]  # noqa: E731
    return full(weights), full(tokenizer)


def examples_hash(examples: Iterable[tuple[str, str]]) -> str:
    """sha256 of the (prompt, response) pairs, in order."""
    h = hashlib.sha256()
    for prompt, response in examples:
        h.update(json.dumps([prompt, response]).encode() + b"\n")
    return h.hexdigest()


def run_fingerprint(
    base_model: str,
    adapter_dirs: Mapping[str, str],
    examples: Mapping[str, Iterable[tuple[str, str]]],
    settings: Mapping[str, Any],
    revisions: Mapping[str, str] | None = None,
    prompt_ids: Mapping[str, Iterable[Sequence[int]]] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a run: its base model, tokenizer, adapters {task: dir}, the examples used
    {task: [(prompt, response), ...]}, its result-relevant settings, the commit of each input
    named by Hub id and the prompts' token ids {task: [ids, ...]} (templated, as the model sees
    them)."""
    weights, tokenizer = base_model_files(base_model)
    keyed: dict[str, str] = {}
    for path in weights:
        keyed[f"base_model/{os.path.basename(path)}"] = path
    for path in tokenizer:
        keyed[f"tokenizer/{os.path.basename(path)}"] = path
    for task, d in sorted(adapter_dirs.items()):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            keyed[f"adapters/{task}/{name}"] = os.path.join(d, name)
    hashes = hash_files(list(keyed.values()))
    out = {
        "files": {key: hashes[path] for key, path in keyed.items()},
        "examples": {task: examples_hash(ex) for task, ex in sorted(examples.items())},
        "settings": json.loads(json.dumps(dict(settings))),
        "revisions": dict(sorted((revisions or {}).items())),
    }
    if prompt_ids is not None:
        out["prompts"] = {task: ids_hash(ids) for task, ids in sorted(prompt_ids.items())}
    return out


def ids_hash(sequences: Iterable[Sequence[int]]) -> str:
    """sha256 of token id sequences, in order."""
    h = hashlib.sha256()
    for ids in sequences:
        h.update(json.dumps([int(i) for i in ids]).encode() + b"\n")
    return h.hexdigest()


def mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Words for the first part of two fingerprints that differs (what changed), or None."""
    rev_saved, rev_now = saved.get("revisions") or {}, current.get("revisions") or {}
    for key in sorted(rev_saved):
        if key not in rev_now:
            return f"Hub input {key} is gone (now: {', '.join(sorted(set(rev_now) - set(rev_saved))) or 'none'})"
        if rev_saved[key] != rev_now[key]:
            return f"Hub input {key} is at commit {rev_now[key][:12]} now, {rev_saved[key][:12]} in the checkpoint"
    for key in sorted(set(rev_now) - set(rev_saved)):
        return f"Hub input {key} is new"
    files_saved, files_now = saved.get("files") or {}, current.get("files") or {}
    for key in sorted(set(files_saved) | set(files_now)):
        role, _, rel = key.partition("/")
        what = f"{_ROLE_WORDS.get(role, 'file')} {rel}"
        if key not in files_now:
            return f"{what} is gone"
        if key not in files_saved:
            return f"{what} is new"
        if files_saved[key] != files_now[key]:
            return f"{what} changed (content hash)"
    ex_saved, ex_now = saved.get("examples") or {}, current.get("examples") or {}
    for task in sorted(set(ex_saved) | set(ex_now)):
        if ex_saved.get(task) != ex_now.get(task):
            return f"the examples used for task {task} changed"
    pr_saved, pr_now = saved.get("prompts"), current.get("prompts")
    if pr_saved is not None and pr_now is not None:  # (a checkpoint of an older version has none)
        for task in sorted(set(pr_saved) | set(pr_now)):
            if pr_saved.get(task) != pr_now.get(task):
                return (f"the prompts of task {task}, as the model sees them, changed (the chat template or a "
                        "value it reads, such as --chat_template_date)")
    s_saved, s_now = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(set(s_saved) | set(s_now)):
        if s_saved.get(key) != s_now.get(key):
            return f"--{key} changed ({s_saved.get(key)!r} in the checkpoint, {s_now.get(key)!r} now)"
    return None
