"""Task examples on disk -> tokenised, right-padded arrays with response-only loss weights.

Shapes: T tasks, n examples per task, S sequence (inputs are the full example minus its last token).

On disk (`data_dir`): `<task>.jsonl` (the "search" split) and optionally `<task>.eval.jsonl` (the
"eval" split), one `{"prompt": str, "response": str}` object per line; optional `tasks.json`
`{"<task>": {"metric": "rouge_l"|"squad_f1"|"exact_match"|"chrf", "tags": {str: str}}}`.

Tokenisation matches Hugging Face exactly (DESIGN.md "Tokenisation and loss"):
  prompt_ids   = tokenizer(prompt)["input_ids"]   (or the chat template with a generation prompt)
  response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
  example      = prompt_ids + response_ids;  inputs = example[:-1];  targets = example[1:]
  weights      = 1 where the target is a response token, so the loss is HF's with prompt labels -100.
The first `examples_per_task` lines of a file are used (deterministic, no sampling), so a data set
that is already shuffled gives a random subset and a re-run sees the same examples.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from d2c_jax.errors import UserError
from d2c_jax.types import TokenBatch

METRICS = ("rouge_l", "squad_f1", "exact_match", "chrf")
SPLITS = ("search", "eval")
_SEQ_MULTIPLE = 16  # S is rounded up to a multiple of this, so nearby data sets share compilations


@dataclasses.dataclass(frozen=True)
class TaskMeta:
    """What tasks.json says about a task (metric None when tasks.json does not name one)."""

    metric: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Every task's examples as fixed-shape arrays; rows past a task's `num_examples` are dummies
    (zero weight, one attended pad token so no attention row is fully masked)."""

    names: tuple[str, ...]
    batch: TokenBatch  # every leaf [T, n, S]: int32 tokens / targets / attn, float32 weights
    num_examples: np.ndarray  # int32 [T]
    num_truncated: np.ndarray  # int32 [T], examples whose prompt was cut from the left
    files: tuple[str, ...]  # the jsonl file each task was read from
    prompts: tuple[tuple[str, ...], ...]  # raw text, for generation metrics
    responses: tuple[tuple[str, ...], ...]
    prompt_ids: tuple[tuple[tuple[int, ...], ...], ...]  # after left truncation

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    # The batch's leaves by their shape-suffixed names.
    tokens_tns = property(lambda self: self.batch.tokens)
    targets_tns = property(lambda self: self.batch.targets)
    weights_tns = property(lambda self: self.batch.weights)
    attn_tns = property(lambda self: self.batch.attn)

    def index(self, task: str) -> int:
        return self.names.index(task)


def data_file(data_dir: str | os.PathLike, task: str, split: str) -> str:
    """Path of a task's jsonl for a split ("search" -> <task>.jsonl, "eval" -> <task>.eval.jsonl)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    suffix = ".jsonl" if split == "search" else ".eval.jsonl"
    return os.path.join(os.fspath(data_dir), task + suffix)


def data_tasks(data_dir: str | os.PathLike) -> tuple[str, ...]:
    """Task names that have a search or eval file in `data_dir`, sorted."""
    _check_dir(data_dir)
    names = set()
    for f in os.listdir(data_dir):
        if f.startswith("."):
            continue
        if f.endswith(".eval.jsonl"):
            names.add(f[: -len(".eval.jsonl")])
        elif f.endswith(".jsonl"):
            names.add(f[: -len(".jsonl")])
    return tuple(sorted(names))


def check_tasks_match(
    data_dir: str | os.PathLike, task_names: Sequence[str], split: str = "search", extra_ok: bool = False
) -> None:
    """Every task (adapter) has examples for the split (for "eval": an eval or a search file)
    and (unless `extra_ok`: a directory that also holds other tasks) every data file belongs to a task."""
    present = set(data_tasks(data_dir))

    def has(t: str) -> bool:
        found = os.path.isfile(data_file(data_dir, t, "search"))
        return found or (split == "eval" and os.path.isfile(data_file(data_dir, t, "eval")))

    missing = [t for t in task_names if not has(t)]
    if missing:
        raise UserError(
            data_dir, f"no {split} examples for adapter task(s) {', '.join(missing)} "
            f"(expected {', '.join(t + '.jsonl' for t in missing)})"
        )
    extra = sorted(present - set(task_names))
    if extra and not extra_ok:
        raise UserError(
            data_dir, f"data for task(s) with no adapter: {', '.join(extra)} "
            "(remove the files or add the adapters)"
        )


def load_task_meta(data_dir: str | os.PathLike, task_names: Sequence[str]) -> dict[str, TaskMeta]:
    """Reads the optional tasks.json; every task gets a TaskMeta (empty when not described)."""
    _check_dir(data_dir)
    path = os.path.join(os.fspath(data_dir), "tasks.json")
    meta = {t: TaskMeta() for t in task_names}
    if not os.path.exists(path):
        return meta
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f, object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(path, f"cannot read tasks.json: {e}") from None
    except ValueError as e:  # a duplicate key
        raise UserError(path, str(e)) from None
    if not isinstance(raw, dict):
        raise UserError(path, "expected a JSON object {task: {\"metric\": ..., \"tags\": {...}}}")
    unknown = sorted(set(raw) - set(task_names))
    if unknown:
        raise UserError(path, f"describes task(s) with no adapter/data: {', '.join(unknown)}")
    for task, entry in raw.items():
        if not isinstance(entry, dict):
            raise UserError(path, f"task {task!r}: expected an object, got {type(entry).__name__}")
        bad_keys = sorted(set(entry) - {"metric", "tags"})
        if bad_keys:
            raise UserError(path, f"task {task!r}: unknown key(s) {', '.join(bad_keys)}")
        metric = entry.get("metric")
        if metric is not None and metric not in METRICS:
            raise UserError(
                path, f"task {task!r}: unknown metric {metric!r}; supported: {', '.join(METRICS)}"
            )
        tags = entry.get("tags", {})
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise UserError(path, f"task {task!r}: tags must be an object of strings")
        meta[task] = TaskMeta(metric=metric, tags=dict(tags))
    return meta


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice (a task described twice) is an error, not "last wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        out[key] = value
    return out


def read_examples(path: str, limit: int | None = None) -> list[tuple[int, str, str]]:
    """(line number, prompt, response) from the first `limit` non-blank lines of a jsonl file."""
    if not os.path.isfile(path):
        raise UserError(path, "task data file not found")
    out: list[tuple[int, str, str]] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if limit is not None and len(out) >= limit:
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(path, f"line {lineno}: not UTF-8 text (byte {e.start + 1} of the line is "
                                    f"0x{raw[e.start]:02x})") from None
                if not line.strip():
                    continue
                out.append((lineno, *_parse_line(path, lineno, line)))
    except OSError as e:
        raise UserError(path, f"cannot read: {e}") from None
    if not out:
        raise UserError(path, "no examples (the file is empty)")
    return out


def _parse_line(path: str, lineno: int, line: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(path, f"line {lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(path, f"line {lineno}: expected an object with \"prompt\" and \"response\"")
    for key in ("prompt", "response"):
        if key not in obj:
            raise UserError(path, f"line {lineno}: missing \"{key}\"")
        if not isinstance(obj[key], str):
            raise UserError(
                path, f"line {lineno}: \"{key}\" must be a string, got {type(obj[key]).__name__}"
            )
    if not obj["response"].strip():
        raise UserError(path, f"line {lineno}: empty response")
    return obj["prompt"], obj["response"]


def _as_ids(out: Any) -> list[int]:
    """A list of token ids from whatever a tokenizer call returned (list, dict, BatchEncoding)."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        if len(out) != 1:
            raise ValueError(f"expected one sequence of ids, got a batch of {len(out)}")
        out = list(out[0])
    return [int(i) for i in out]


def today() -> str:
    """Today's date (local time, as transformers' strftime_now), YYYY-MM-DD."""
    return datetime.date.today().isoformat()


def template_values(template_date: str | None) -> dict[str, Any]:
    """Values a chat template reads besides the messages, pinned: `date_string` (Llama 3.x writes
    "Today Date: " + date_string, else strftime_now("%d %b %Y")) as on `template_date`
    (YYYY-MM-DD), so a run resumed on another day sees the prompts of its first day. A template
    calling strftime_now itself cannot be pinned (transformers passes only plain data to it); the
    run fingerprint holds the prompts' token ids, so a resume that would see other prompts is
    refused. None: not pinned."""
    if not template_date:
        return {}
    return {"date_string": datetime.date.fromisoformat(template_date).strftime("%d %b %Y")}


def prompt_token_ids(tokenizer: Any, prompt: str, chat_template: bool, template_date: str | None = None) -> list[int]:
    """The prompt's ids exactly as HF makes them (special tokens / chat template included); with
    `template_date`, as HF makes them on that day."""
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            where = os.path.join(getattr(tokenizer, "name_or_path", "") or ".", "tokenizer_config.json")
            raise UserError(where, "--chat_template is set but the tokenizer has no chat template (no "
                            "\"chat_template\" here and no chat_template.jinja beside it)")
        return _as_ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                **template_values(template_date),
            )
        )
    return _as_ids(tokenizer(prompt))


def response_token_ids(tokenizer: Any, response: str) -> list[int]:
    """The response's ids without special tokens, plus eos (the model must learn to stop)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(None, "the tokenizer has no eos token; cannot mark the end of responses")
    return _as_ids(tokenizer(response, add_special_tokens=False)) + [int(eos)]


def load_task_data(
    data_dir: str | os.PathLike,
    task_names: Sequence[str],
    tokenizer: Any,
    *,
    split: str = "search",
    examples_per_task: int | None = 10,
    max_seq_len: int = 1024,
    chat_template: bool = False,
    extra_ok: bool = False,
    template_date: str | None = None,
) -> TaskData:
    """Reads, tokenises and pads every task's first `examples_per_task` examples (None: all).
    `template_date`: the date the chat template sees (`template_values`).

    split="search" reads `<task>.jsonl`; split="eval" reads `<task>.eval.jsonl` and falls back,
    per task, to `<task>.jsonl` when a task has no eval file (logged). `extra_ok`: data_dir may
    also hold other tasks' files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if examples_per_task is not None and examples_per_task < 1:
        raise UserError(None, f"examples_per_task must be >= 1, got {examples_per_task}")
    if max_seq_len < 2:
        raise UserError(None, f"max_seq_len must be >= 2, got {max_seq_len}")
    if not task_names:
        raise UserError(data_dir, "no tasks to load")
    check_tasks_match(data_dir, task_names, split, extra_ok=extra_ok)

    files, per_task, truncated = [], [], []
    fallback = []
    for task in task_names:
        path = data_file(data_dir, task, split)
        if split == "eval" and not os.path.isfile(path):  # has a search file (checked above)
            fallback.append(task)
            path = data_file(data_dir, task, "search")
        files.append(path)
        rows, n_cut = _tokenise_task(path, tokenizer, examples_per_task, max_seq_len, chat_template, template_date)
        per_task.append(rows)
        truncated.append(n_cut)
    if fallback:
        logging.info("no .eval.jsonl for %d task(s) (%s); using their search examples",
                     len(fallback), ", ".join(fallback))

    n = max(len(rows) for rows in per_task)
    longest = max(len(p) + len(r) - 1 for rows in per_task for (_, _, p, r) in rows)
    s = min(-(-longest // _SEQ_MULTIPLE) * _SEQ_MULTIPLE, max_seq_len)
    t = len(task_names)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((t, n, s), pad_id, np.int32)
    targets = np.zeros((t, n, s), np.int32)
    weights = np.zeros((t, n, s), np.float32)
    attn = np.zeros((t, n, s), np.int32)
    attn[:, :, 0] = 1  # dummy rows attend to one pad token; real rows overwrite this below
    for ti, rows in enumerate(per_task):
        for ei, (_, _, p_ids, r_ids) in enumerate(rows):
            ids = p_ids + r_ids
            m = len(ids) - 1
            tokens[ti, ei, :m] = ids[:-1]
            targets[ti, ei, :m] = ids[1:]
            attn[ti, ei, :m] = 1
            # inputs[i] predicts ids[i + 1]; it is a response token when i + 1 >= len(prompt).
            weights[ti, ei, max(len(p_ids) - 1, 0) : m] = 1.0
    return TaskData(
        names=tuple(task_names),
        batch=TokenBatch(tokens=tokens, targets=targets, weights=weights, attn=attn),
        num_examples=np.array([len(r) for r in per_task], np.int32),
        num_truncated=np.array(truncated, np.int32),
        files=tuple(files),
        prompts=tuple(tuple(p for p, _, _, _ in rows) for rows in per_task),
        responses=tuple(tuple(r for _, r, _, _ in rows) for rows in per_task),
        prompt_ids=tuple(tuple(tuple(p) for _, _, p, _ in rows) for rows in per_task),
    )


def concat_task_data(parts: Sequence[TaskData], pad_id: int = 0) -> TaskData:
    """The tasks of several TaskData (e.g. read from different directories) as one: each batch
    padded to the largest n (dummy rows as load_task_data makes them) and S, then stacked."""
    n = max(p.tokens_tns.shape[1] for p in parts)
    s = max(p.tokens_tns.shape[2] for p in parts)

    def pad(p: TaskData) -> TokenBatch:
        t, pn, ps = p.tokens_tns.shape
        out = TokenBatch(tokens=np.full((t, n, s), pad_id, np.int32), targets=np.zeros((t, n, s), np.int32),
                         weights=np.zeros((t, n, s), np.float32), attn=np.zeros((t, n, s), np.int32))
        out.attn[:, :, 0] = 1
        for new, old in ((out.tokens, p.tokens_tns), (out.targets, p.targets_tns), (out.weights, p.weights_tns),
                         (out.attn, p.attn_tns)):
            new[:, :pn, :ps] = old
        return out

    batches = [pad(p) for p in parts]
    return TaskData(
        names=tuple(x for p in parts for x in p.names),
        batch=TokenBatch(**{f: np.concatenate([getattr(b, f) for b in batches])
                            for f in ("tokens", "targets", "weights", "attn")}),
        num_examples=np.concatenate([p.num_examples for p in parts]),
        num_truncated=np.concatenate([p.num_truncated for p in parts]),
        files=tuple(x for p in parts for x in p.files),
        prompts=tuple(x for p in parts for x in p.prompts),
        responses=tuple(x for p in parts for x in p.responses),
        prompt_ids=tuple(x for p in parts for x in p.prompt_ids),
    )


def _tokenise_task(
    path: str, tokenizer: Any, limit: int | None, max_seq_len: int, chat_template: bool,
    template_date: str | None = None,
) -> tuple[list[tuple[str, str, list[int], list[int]]], int]:
    """(prompt, response, prompt_ids, response_ids) per example, prompts cut to fit max_seq_len."""
    rows, n_cut = [], 0
    for lineno, prompt, response in read_examples(path, limit):
        p_ids = prompt_token_ids(tokenizer, prompt, chat_template, template_date)
        r_ids = response_token_ids(tokenizer, response)
        if len(r_ids) + 1 > max_seq_len:
            raise UserError(
                path, f"line {lineno}: the response alone is {len(r_ids)} tokens (with eos); "
                f"it needs at least one prompt token and max_seq_len={max_seq_len}"
            )
        if len(p_ids) + len(r_ids) > max_seq_len:
            p_ids = p_ids[len(p_ids) + len(r_ids) - max_seq_len :]
            n_cut += 1
        rows.append((prompt, response, p_ids, r_ids))
    if n_cut:
        logging.warning("%s: %d of %d example(s) longer than max_seq_len=%d; prompts truncated "
                        "from the left", path, n_cut, len(rows), max_seq_len)
    return rows, n_cut


def _check_dir(data_dir: str | os.PathLike) -> None:
    if not os.path.isdir(data_dir):
        raise UserError(data_dir, "data directory not found")
