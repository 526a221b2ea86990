"""Inputs named by Hugging Face Hub id, resolved to directories of the standard Hub cache.

A base model or an adapter is a local directory or a Hub id `org/name[@revision][/sub/folder]`
(a path that exists wins, as in transformers; a revision holding '/' is written URL-encoded,
`refs%2Fpr%2F1`). `resolve` downloads through huggingface_hub only the files a run reads (a
model's config.json, tokenizer files, safetensors weights and their index; an adapter's
adapter_config.json and adapter_model.safetensors, at the repo's top level or in the sub-folder)
into the Hub cache (HF_HUB_CACHE, else HF_HOME/hub), with huggingface_hub's progress bars; with
HF_HUB_OFFLINE=1 it reads the cache only and never touches the network.

Every resolved repo is recorded by its commit (`commits`: {"org/name@revision": sha}): a run
writes them to config.json, its checkpoint fingerprint and partition.json, and a resume passes
them back as `pinned`, so a branch or tag that moved on the Hub since is read at the commit the
run started with (a run that names a commit reads that commit; the fingerprint then refuses a
checkpoint made at another one). A missing, private, gated or unreachable repo, or one not in the
cache when offline, is one UserError naming it and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import urllib.parse
from typing import Iterable, Mapping, Sequence

from d2c_jax import storage
from d2c_jax.errors import UserError
from d2c_jax.hf_io import TOKENIZER_FILES

# org/name[@revision][/sub/folder]: the Hub's repo-name characters, a revision without '/'.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^/@]+))?"
                     r"(?P<subfolder>(?:/[\w.-]+)*)")
_COMMIT = re.compile(r"[0-9a-f]{40}")
DEFAULT_REVISION = "main"
# What a run reads of a base model (transformers' weight file names) and of an adapter.
MODEL_FILES = ("config.json", *TOKENIZER_FILES, "model.safetensors", "model.safetensors.index.json",
               "model-*.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LOGIN = "run `hf auth login` (the `huggingface-cli login` of older versions) or set HF_TOKEN"


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One input: what the user gave and the local directory read for it (for a Hub id, the
    snapshot directory of `commit` in the Hub cache, plus the sub-folder)."""

    spec: str
    path: str
    repo: str | None = None
    revision: str | None = None  # as given (None: the default branch)
    commit: str | None = None
    subfolder: str = ""

    @property
    def key(self) -> str | None:
        """'org/name@revision' (what `commits` and `pinned` are keyed by); None for a directory."""
        return None if self.repo is None else f"{self.repo}@{self.revision or DEFAULT_REVISION}"

    @property
    def name(self) -> str:
        """The default task name: the last component of the sub-folder, repo name or directory."""
        tail = self.subfolder or (self.repo or os.path.normpath(self.path))
        return tail.rstrip("/").rsplit("/", 1)[-1]

    @property
    def model_id(self) -> str:
        """How an adapter written from this base model names it (base_model_name_or_path): the
        repo id for a Hub model, else the directory as given."""
        return self.repo or self.spec


def parse_hub_id(spec: str) -> tuple[str, str | None, str] | None:
    """(repo, revision or None, sub-folder) of a Hub id; None for anything that is not one or
    that exists locally (a local path wins)."""
    if not spec or spec.startswith(("/", ".", "~")) or os.path.exists(spec) or "\\" in spec:
        return None
    m = _HUB_ID.fullmatch(spec)
    if m is None:
        return None
    revision = urllib.parse.unquote(m["revision"]) if m["revision"] else None
    return m["repo"], revision, m["subfolder"].strip("/")


def commits(resolved: Iterable[Resolved]) -> dict[str, str]:
    """{'org/name@revision': commit} of every Hub input (what a resume pins)."""
    return {r.key: r.commit for r in resolved if r.repo is not None}


def recorded_commits(path: str) -> dict[str, str]:
    """The "hub_commits" a run recorded in its config.json or partition.json ({} when absent):
    what a resume, or an evaluation of its partition, pins its Hub inputs to."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("hub_commits")
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


def cache_dir() -> str:
    """The Hub cache huggingface_hub uses (read now, so a changed environment is honoured)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in (
        "1", "ON", "YES", "TRUE")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def resolve(spec: str, kind: str = "model", *, pinned: Mapping[str, str] | None = None) -> Resolved:
    """A local directory as it is (a gs:// one mirrored, `storage.local_dir`); a Hub id downloaded
    (or found in the cache) at its revision, or at `pinned[key]` when the revision is a branch or
    tag the run recorded a commit for.

    kind: "model" (config, tokenizer, weights) or "adapter" (PEFT adapter files)."""
    if storage.is_gcs(spec):
        return Resolved(spec=spec, path=storage.local_dir(spec))
    parsed = parse_hub_id(spec)
    if parsed is None:
        return Resolved(spec=spec, path=spec)
    repo, revision, subfolder = parsed
    asked = revision or DEFAULT_REVISION
    pin = None if _COMMIT.fullmatch(asked) else (pinned or {}).get(f"{repo}@{asked}")
    if pin:
        print(f"{repo}@{asked}: using commit {pin[:12]}, recorded when this run started", file=sys.stderr)
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [prefix + p for p in (MODEL_FILES if kind == "model" else ADAPTER_FILES)]
    snapshot = _download(spec, repo, pin or asked, patterns, ignore=[prefix + "*/*"], pinned=pin is not None)
    commit = os.path.basename(os.path.normpath(snapshot))
    path = os.path.join(snapshot, subfolder) if subfolder else snapshot
    if not os.path.isdir(path):
        raise UserError(spec, f"no folder {subfolder!r} in {repo} at commit {commit[:12]}")
    return Resolved(spec=spec, path=path, repo=repo, revision=revision, commit=commit, subfolder=subfolder)


def resolve_adapters(specs: Sequence[str], *, pinned: Mapping[str, str] | None = None,
                     unique: bool = True) -> list[tuple[str, Resolved]]:
    """--adapters entries (`[task=]ID_OR_DIR`) resolved, as (task name, Resolved) in the given
    order; `unique`: two entries of one task name are refused (they would be one task)."""
    out: list[tuple[str, Resolved]] = []
    for entry in specs:
        name, eq, spec = entry.partition("=")
        if not eq:
            name, spec = "", entry
        spec = spec.strip()
        if not spec or (eq and not name.strip()):
            raise UserError(None, f"--adapters entry {entry!r}: expected ID_OR_DIR or task=ID_OR_DIR")
        res = resolve(spec, "adapter", pinned=pinned)
        name = name.strip() or res.name
        twin = next((r for n, r in out if n == name), None)
        if unique and twin is not None:
            raise UserError(None, f"--adapters names task {name!r} twice ({twin.spec} and {spec}); "
                            "name them apart with task=ID")
        out.append((name, res))
    return out


def _download(spec: str, repo: str, revision: str, patterns: list[str], *, ignore: list[str],
              pinned: bool) -> str:
    """huggingface_hub.snapshot_download of the files matching `patterns` (the snapshot
    directory), every failure turned into one line naming the repo and what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    cache = cache_dir()
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=ignore,
                                 cache_dir=cache, endpoint=endpoint(), local_files_only=offline())
    except hf_errors.GatedRepoError:
        raise UserError(spec, f"is a gated repo: accept its conditions at {endpoint()}/{repo} with your account, "
                        f"then {LOGIN}") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(spec, f"is neither a local directory nor a repo on the Hub ({endpoint()}) that this "
                        f"machine may read: check the id, or, if it is private, {LOGIN}") from None
    except hf_errors.RevisionNotFoundError:
        if pinned:
            raise UserError(spec, f"commit {revision[:12]}, which this run started from, is no longer on the Hub; "
                            "--overwrite starts the run again at the current revision") from None
        raise UserError(spec, f"the Hub has no revision {revision!r} of {repo}") from None
    except hf_errors.LocalEntryNotFoundError:
        what = f"{repo} at {'commit ' + revision[:12] if _COMMIT.fullmatch(revision) else repr(revision)}"
        if offline():
            raise UserError(spec, f"{what} is not in the Hub cache {cache} and HF_HUB_OFFLINE=1: run once "
                            f"online, or `hf download {repo} --revision {revision}`, first") from None
        raise UserError(spec, f"cannot reach the Hub at {endpoint()} and {what} is not in the Hub cache {cache}: "
                        "check the network (or HF_ENDPOINT), or download it elsewhere into that cache and set "
                        "HF_HUB_OFFLINE=1") from None
    except hf_errors.HFValidationError as e:
        raise UserError(spec, f"not a valid Hub id: {e}") from None
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise UserError(spec, f"the Hub ({endpoint()}) answered HTTP {status}; try again later, or set "
                        f"HF_HUB_OFFLINE=1 to use the Hub cache {cache}") from None
    except Exception as e:  # noqa: BLE001 - the network failing midway (reset, proxy), a full disk
        raise UserError(spec, f"download failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}; "
                        "re-run to resume it") from None
