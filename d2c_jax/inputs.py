"""The one loading path: HF base model + PEFT adapters + task data -> a Scorer.

Shapes: N adapters (= T tasks; adapter i is the adapter of task i), n examples per task,
S sequence.

`resolve_sources` comes first: the base model and the adapters are local directories, Hub ids
(`hub.py`: downloaded into, or found in, the Hub cache, each recorded by its commit) or gs://
prefixes (`storage.py`: mirrored locally), the adapters from a parent directory (`adapters_dir`,
one sub-directory per task) or a list (`adapters`, `[task=]ID_OR_DIR`). `load_inputs` then reads,
in this order, the model config, the adapters (in task-name order; without adapters the task list
comes from the data files), the tokenizer, one split of the task data and tasks.json. Everything
there is cheap and checked, so a bad input fails in seconds. The base weights are read on first
use of `Inputs.params`, after whatever further checks the caller makes; with a mesh they are read
straight into their shardings (`sharding.PARAM_RULES`), never gathered on one device first.
`Inputs.prepared` runs `merge.prepare_merge` once per (method, density, seed) and `Inputs.scorer`
builds the `scoring.Scorer` that the search, the evaluation, the report and the benchmark all
score with.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from d2c_jax import data, hf_io, hub, lora, merge, storage
from d2c_jax import sharding as sharding_lib
from d2c_jax.data import TaskData, TaskMeta
from d2c_jax.errors import UserError
from d2c_jax.lora import AdapterSet
from d2c_jax.merge import Prepared
from d2c_jax.models.config import ModelConfig, load_config
from d2c_jax.scoring import Scorer
from d2c_jax.types import Params


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where a run reads its base model, adapters and data: local directories (Hub ids resolved to
    their commit's directory in the Hub cache, gs:// prefixes to their local mirror)."""

    base_model: hub.Resolved | None
    adapters: Mapping[str, hub.Resolved]  # task name -> its adapter ({} without adapters)
    data_dir: str | None = None  # the local directory of the task data (a gs:// one mirrored)

    @property
    def adapter_dirs(self) -> dict[str, str]:
        """{task: local adapter directory}, in task order."""
        return {name: r.path for name, r in self.adapters.items()}

    def commits(self) -> dict[str, str]:
        """{'org/name@revision': commit} of every Hub input (config.json, fingerprint, resume pins)."""
        return hub.commits([*([self.base_model] if self.base_model else []), *self.adapters.values()])


def resolve_sources(base_model: str | None, adapters_dir: str | None = None, adapters: Sequence[str] = (), *,
                    data_dir: str | None = None, pinned: Mapping[str, str] | None = None) -> Sources:
    """The base model and the adapters as local directories (Hub ids downloaded or found in the
    cache; `pinned`: the commits a resumed run started from, see hub.py).

    adapters_dir: a parent directory, one adapter per sub-directory (the task name); adapters:
    `[task=]ID_OR_DIR` entries instead (in task-name order, like a parent directory's). Any
    directory may be gs://bucket/prefix (`storage.local_dir`: mirrored into a local cache)."""
    if adapters_dir and adapters:
        raise UserError(None, "give --adapters_dir or --adapters, not both")
    base = hub.resolve(base_model, "model", pinned=pinned) if base_model else None
    if adapters:
        found = dict(sorted(hub.resolve_adapters(adapters, pinned=pinned)))
    elif adapters_dir:
        local = storage.local_dir(adapters_dir)
        found = {n: hub.Resolved(spec=f"{adapters_dir.rstrip('/')}/{n}", path=os.path.join(local, n))
                 for n in lora.adapter_subdirs(local)}
    else:
        found = {}
    return Sources(base, found, storage.local_dir(data_dir) if data_dir else None)


class Inputs:
    """Everything one run reads: model config, adapters, tokenizer, one split's task data, the
    tasks.json entries, and (on first use) the base weights. `base_model` is the local directory
    read (for a Hub id, in the Hub cache); `sources` says where everything came from."""

    def __init__(self, base_model: str, model_cfg: ModelConfig, names: tuple[str, ...],
                 adapters: AdapterSet | None, tokenizer: Any, task_data: TaskData,
                 meta: dict[str, TaskMeta], *, data_dir: str, dtype: str, chat_template: bool,
                 mesh: jax.sharding.Mesh | None, sources: Sources | None = None,
                 template_date: str | None = None):
        self.base_model, self.model_cfg, self.names = base_model, model_cfg, names
        self.sources = sources or Sources(hub.Resolved(base_model, base_model), {})
        self.adapters, self.tokenizer, self.task_data, self.meta = adapters, tokenizer, task_data, meta
        self.data_dir, self.dtype, self.chat_template, self.mesh = data_dir, dtype, chat_template, mesh
        self.template_date = template_date
        self._prepared: dict[tuple[str, float, int], Prepared] = {}

    @property
    def tags(self) -> dict[str, dict[str, str]]:
        """Each task's tags from tasks.json (family, language, ...)."""
        return {n: dict(self.meta[n].tags) for n in self.names}

    @property
    def task_metrics(self) -> list[str | None]:
        """Each task's metric from tasks.json (None where it names none)."""
        return [self.meta[n].metric for n in self.names]

    @functools.cached_property
    def params(self) -> Params:
        """The base weights in `dtype`; with a mesh, each loaded straight into its sharding."""
        shardings = None
        if self.mesh is not None:
            shardings = sharding_lib.param_shardings(hf_io.param_shape_tree(self.model_cfg), self.mesh)
        return hf_io.load_params(self.base_model, self.model_cfg, self.dtype, shardings=shardings)

    def load_split(self, split: str, examples_per_task: int | None, max_seq_len: int) -> TaskData:
        """Another split (or size) of the same tasks' data, with the same tokenizer and template."""
        return data.load_task_data(self.data_dir, self.names, self.tokenizer, split=split,
                                   examples_per_task=examples_per_task, max_seq_len=max_seq_len,
                                   chat_template=self.chat_template, template_date=self.template_date)

    def prepared(self, method: str, density: float, seed: int = 0, rank: int | None = None) -> Prepared:
        """merge.prepare_merge of the adapters, once per (method, density, seed, output rank)."""
        if self.adapters is None:
            raise UserError(None, "merging needs --adapters_dir")
        key = (method, float(density), int(seed), rank or None)
        if key not in self._prepared:
            # With a mesh: built in host memory (never whole on one accelerator), then sharded
            # over "model" by the Scorer.
            host = jax.local_devices(backend="cpu")[0] if self.mesh is not None else None
            with jax.default_device(host):
                self._prepared[key] = merge.prepare_merge(self.adapters, method, density, seed=seed,
                                                          rank=rank or None)
        return self._prepared[key]

    def scorer(self, method: str, density: float, *, seed: int = 0, batch_size: int | str = "auto",
               task_data: TaskData | None = None, example_chunk: int | None = None,
               rank: int | None = None) -> Scorer:
        """A Scorer of the merges of `method` on `task_data` (default: the loaded split)."""
        return Scorer(self.params, self.model_cfg, self.prepared(method, density, seed, rank),
                      self.task_data if task_data is None else task_data, batch_size=batch_size,
                      mesh=self.mesh, example_chunk=example_chunk)


def load_inputs(
    base_model: str,
    adapters_dir: str | None,
    data_dir: str,
    *,
    adapters: Sequence[str] = (),
    pinned: Mapping[str, str] | None = None,
    sources: Sources | None = None,
    split: str = "search",
    examples_per_task: int | None = 10,
    max_seq_len: int = 1024,
    chat_template: bool = False,
    dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    model_cfg: ModelConfig | None = None,
    template_date: str | None = None,
) -> Inputs:
    """Reads and checks every input but the base weights (see the module docstring).

    Args:
      base_model: a local directory or a Hub id `org/name[@rev]` (see `resolve_sources`).
      adapters_dir: one PEFT adapter per sub-directory (its name is the task name); None (and no
        `adapters`): no adapters (zero-shot evaluation), the tasks are those with data files.
      adapters: `[task=]ID_OR_DIR` entries instead of adapters_dir (Hub ids or directories).
      pinned: the Hub commits a resumed run recorded ({'org/name@rev': sha}).
      sources: already resolved sources (skips resolving base_model / adapters again).
      split: "search" (<task>.jsonl) or "eval" (<task>.eval.jsonl, else <task>.jsonl).
      examples_per_task: the first n examples of each task (None: all).
      model_cfg: the already loaded config of base_model (skips reading it again).
      template_date: the date the chat template sees (data.template_values; None: today).
    """
    sources = sources or resolve_sources(base_model, adapters_dir, adapters, data_dir=data_dir, pinned=pinned)
    base_model, data_dir = sources.base_model.path, sources.data_dir or data_dir
    model_cfg = model_cfg or load_config(base_model)
    adapter_set = None
    if sources.adapters:
        adapter_set = lora.stack_adapters([lora.load_adapter(path, model_cfg, name=name)
                                           for name, path in sources.adapter_dirs.items()])
        names = tuple(adapter_set.names)
    else:
        names = data.data_tasks(data_dir)
        if not names:
            raise UserError(data_dir, "no <task>.jsonl files")
    data.check_tasks_match(data_dir, names, split=split)
    tokenizer = hf_io.load_tokenizer(base_model)
    task_data = data.load_task_data(data_dir, names, tokenizer, split=split, examples_per_task=examples_per_task,
                                    max_seq_len=max_seq_len, chat_template=chat_template,
                                    template_date=template_date)
    meta = data.load_task_meta(data_dir, names)
    return Inputs(str(base_model), model_cfg, names, adapter_set, tokenizer, task_data, meta, data_dir=data_dir,
                  dtype=dtype, chat_template=chat_template, mesh=mesh, sources=sources, template_date=template_date)
