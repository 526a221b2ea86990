"""Uploading a finished result to the Hugging Face Hub as one model repo with a model card.

A search run's repo holds `cluster_<k>/` (the K merged PEFT adapters, each loadable with
`PeftModel.from_pretrained(base, repo, subfolder="cluster_<k>")` or given back to d2c_jax as
`org/name/cluster_<k>`), `partition.json` and `README.md` (the card: base model, the tasks of each
cluster, the merge operator, the objective and what the search bought). launch/merge.py's repo
holds the one merged adapter at its top level. The repo is created private unless asked
otherwise (an existing repo keeps its visibility); everything goes up in one commit, through
huggingface_hub (HF_ENDPOINT and the login of `hf auth login` / HF_TOKEN honoured).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from d2c_jax import hub
from d2c_jax.errors import UserError


def check_token(repo_id: str) -> None:
    """Refuses, before any work, a push without a Hub token (no network: the stored login or HF_TOKEN)."""
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(repo_id, f"--push_to_hub needs a Hub token with write access: {hub.LOGIN}")


def _front_matter(base_model: str | None) -> str:
    """The card's YAML header (base_model only for a Hub id: the Hub links the two)."""
    parsed = hub.parse_hub_id(base_model) if base_model else None
    base = f"base_model: {parsed[0]}\n" if parsed else ""
    return f"---\n{base}library_name: peft\ntags:\n- lora\n- peft\n- model-merging\n---\n"


def _model_id(base_model: str) -> str:
    parsed = hub.parse_hub_id(base_model)
    return parsed[0] if parsed else base_model


def search_card(doc: Mapping[str, Any], repo_id: str, gain: str) -> str:
    """README.md of a search run's repo, from its partition.json `doc` and `gain` (the run's gain line)."""
    base_model = _model_id(str(doc["base_model"]))
    k = int(doc["num_clusters"])
    n = sum(len(c) for c in doc["clusters"])
    rows = "\n".join(f"| {c} | `cluster_{c}/` | {len(tasks)} | {', '.join(tasks)} |"
                     for c, tasks in enumerate(doc["clusters"]))
    base_commit = _base_commit(doc, base_model)
    return f"""{_front_matter(doc["base_model"])}
# {k} merged LoRA adapters covering {n} tasks

{n} single-task LoRA adapters of `{base_model}`{base_commit} clustered into
{k} groups by data-driven clustering and merging (D²C; strategy `{doc['strategy']}`), each group merged into
one adapter with `{doc['merge']}` (density {doc['density']}, rank {doc.get('output_rank', '?')}).

| cluster | folder | tasks | task names |
|---|---|---|---|
{rows}

Objective (summed loss over the tasks' examples, lower is better; search objective
`{doc.get('search_objective', '?')}`, seed {doc.get('seed', '?')}):

    {gain}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="cluster_0")  # the cluster of your task
```

`partition.json` holds the whole result (clusters, per-task losses, settings, the commit of every
Hub input).
"""


def merge_card(repo_id: str, base_model: str | None, adapters: Sequence[str], method: str, density: float) -> str:
    """README.md of launch/merge.py's repo: one adapter merged from `adapters`."""
    listed = "\n".join(f"- `{a}`" for a in adapters)
    base = _model_id(base_model) if base_model else "BASE_MODEL"
    load = (f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")')
    return f"""{_front_matter(base_model)}
# One LoRA adapter merged from {len(adapters)}

Merged with `{method}` (density {density}) from:

{listed}

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

{load}
```
"""


def _base_commit(doc: Mapping[str, Any], base_model: str) -> str:
    commit = next((c for k, c in (doc.get("hub_commits") or {}).items() if k.split("@")[0] == base_model), None)
    return f" (commit `{commit[:12]}`)" if commit else ""


def push(repo_id: str, files: Mapping[str, str], card: str, *, private: bool = True,
         message: str = "d2c_jax result") -> str:
    """Uploads `files` ({path in repo: local file or directory}) and README.md = `card` to the
    model repo `repo_id` (created if absent) in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub import errors as hf_errors

    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    for dest, local in sorted(files.items()):
        if os.path.isdir(local):
            for root, _, names in sorted(os.walk(local)):
                for name in sorted(names):
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, local).replace(os.sep, "/")
                    operations.append(CommitOperationAdd(path_in_repo=f"{dest}/{rel}".lstrip("/"),
                                                         path_or_fileobj=full))
        else:
            operations.append(CommitOperationAdd(path_in_repo=dest, path_or_fileobj=local))
    api = HfApi(endpoint=hub.endpoint(), token=get_token())  # explicit: also with HF_HUB_DISABLE_IMPLICIT_TOKEN
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        why = ("the token may not write there (a repo of another user or organisation?)" if status in (401, 403)
               else "try again")
        raise UserError(repo_id, f"push to the Hub ({hub.endpoint()}) failed with HTTP {status}: {why}; "
                        f"{hub.LOGIN} with a write token, then re-run the same command") from None
    except Exception as e:  # noqa: BLE001 - the network failing midway, a bad local file
        raise UserError(repo_id, f"push to the Hub failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}; "
                        "re-run the same command to try again") from None
    return info.commit_url
