"""Hub ids for the base model and the adapters, and --push_to_hub, against a stand-in Hub.

The stand-in (`fixtures_hub.FakeHub`) serves the tiny search inputs on 127.0.0.1; huggingface_hub
itself downloads them into a Hub cache under tmp_path (its own layout) and uploads the results.
A run from Hub ids must equal the run from the same files as local directories (the reference),
record the commit of every repo, and read a moved branch at the recorded commit when it resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from huggingface_hub import constants as hf_constants  # noqa: E402

from d2c_jax import hub, lora, pipeline  # noqa: E402
from d2c_jax.errors import UserError, run_cli  # noqa: E402
from d2c_jax.evaluation import EvalConfig, evaluate  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from fixtures_hub import FakeHub  # noqa: E402
from fixtures_search_inputs import NAMES, child_env, make_search_inputs, read_partition  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(num_clusters=2, iterations=3, population=2, proposals=2, examples_per_task=3, max_seq_len=64,
                dtype="float32", checkpoint_every=1, progress=False, seed=1, all_in_one_reference=False)
ADAPTERS = tuple(f"org/ads/{n}" for n in NAMES)
# Files of the base repo that a run does not read: never downloaded.
UNREAD = {"README.md": b"# tiny\n", "pytorch_model.bin": b"\0" * 64, "original/model.safetensors": b"\0" * 64}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(the running FakeHub, the local inputs it serves: base_model / adapters_dir / data_dir)."""
    inputs = make_search_inputs(tmp_path_factory.mktemp("inputs"))
    with FakeHub() as fake:
        fake.add_dir("org/tiny", inputs["base_model"])
        fake.repos["org/tiny"].commit(UNREAD)
        fake.add_dir("org/ads", inputs["adapters_dir"])
        fake.add_dir("org/one", os.path.join(inputs["adapters_dir"], NAMES[0]))
        yield fake, inputs


@pytest.fixture
def env(stand_in, tmp_path, monkeypatch):
    """The stand-in as HF_ENDPOINT, a fresh Hub cache and hash cache; returns the Hub cache."""
    fake, _ = stand_in
    for key, value in fake.env(tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "hash_cache"))
    # conftest's HF_HUB_OFFLINE=1 was frozen into huggingface_hub at import: this process talks to
    # the stand-in (hub.py reads HF_HUB_OFFLINE itself, at each call).
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return str(tmp_path / "hf")


def _run(capsys, **kw):
    rc = run_cli(lambda: pipeline.run(RunConfig.from_flat(**{**SETTINGS, **kw})))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _files(d):
    return {os.path.relpath(os.path.join(r, n), d): open(os.path.join(r, n), "rb").read()
            for r, _, ns in os.walk(d) for n in ns}


# ----------------------------------------------------------------------------- resolution


def test_hub_ids_parse_with_revision_and_sub_folder_and_an_existing_path_wins(tmp_path, monkeypatch):
    assert hub.parse_hub_id("meta-llama/Llama-3.2-3B-Instruct") == ("meta-llama/Llama-3.2-3B-Instruct", None, "")
    assert hub.parse_hub_id("org/ads@v1.0/tasks/qa") == ("org/ads", "v1.0", "tasks/qa")
    assert hub.parse_hub_id("org/ads@refs%2Fpr%2F3") == ("org/ads", "refs/pr/3", "")
    for local in ("/abs/dir", "./rel", "../up/x", "~/models/x", "a\\b"):
        assert hub.parse_hub_id(local) is None
    monkeypatch.chdir(tmp_path)
    os.makedirs("org/name")
    assert hub.parse_hub_id("org/name") is None  # a directory of that name is read as a directory
    assert hub.resolve("org/name") == hub.Resolved("org/name", "org/name")


def test_a_hub_model_is_downloaded_with_only_the_files_a_run_reads(stand_in, env):
    fake, inputs = stand_in
    res = hub.resolve("org/tiny")
    commit = fake.repos["org/tiny"].refs["main"]
    assert (res.repo, res.revision, res.commit) == ("org/tiny", None, commit)
    assert res.path == os.path.join(env, "models--org--tiny", "snapshots", commit)
    read = {n: v for n, v in _files(inputs["base_model"]).items() if n != "generation_config.json"}  # not read
    assert _files(res.path) == read  # every file a run reads, none of UNREAD
    assert hub.commits([res]) == {"org/tiny@main": commit}


def test_offline_reads_the_cache_without_a_request(stand_in, env, monkeypatch):
    fake, _ = stand_in
    online = hub.resolve("org/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sent = len(fake.requests)
    assert hub.resolve("org/tiny") == online
    assert len(fake.requests) == sent
    with pytest.raises(UserError) as e:
        hub.resolve("org/one")
    assert str(e.value) == (f"org/one: org/one at 'main' is not in the Hub cache {env} and HF_HUB_OFFLINE=1: run "
                            "once online, or `hf download org/one --revision main`, first")


def test_adapter_entries_take_sub_folders_revisions_and_task_names(stand_in, env):
    fake, inputs = stand_in
    commit = fake.repos["org/ads"].refs["main"]
    local = os.path.join(inputs["adapters_dir"], NAMES[2])
    got = hub.resolve_adapters([f"org/ads@{commit}/{NAMES[1]}", f"mine=org/one", local])
    assert [n for n, _ in got] == [NAMES[1], "mine", NAMES[2]]
    assert [r.subfolder for _, r in got] == [NAMES[1], "", ""]
    for (_, res), task in zip(got[:2], NAMES[1::-1]):
        want = _files(os.path.join(inputs["adapters_dir"], task))
        assert _files(res.path) == {n: want[n] for n in hub.ADAPTER_FILES}  # not PEFT's README.md
    assert got[2][1].path == local
    assert hub.commits(r for _, r in got) == {f"org/ads@{commit}": commit,
                                              "org/one@main": fake.repos["org/one"].refs["main"]}


# ----------------------------------------------------------------------------- search, resume


def test_a_search_from_hub_ids_equals_the_local_run_and_records_commits(stand_in, env, tmp_path, capsys):
    fake, inputs = stand_in
    rc, _, err = _run(capsys, workdir=str(tmp_path / "local"), **inputs)
    assert rc == 0, err
    rc, _, err = _run(capsys, workdir=str(tmp_path / "hub"), base_model="org/tiny", adapters=ADAPTERS,
                      data_dir=inputs["data_dir"])
    assert rc == 0, err
    local, remote = read_partition(tmp_path / "local"), read_partition(tmp_path / "hub")
    for key in ("clusters", "objective", "task_losses", "random_start_objective"):
        assert remote[key] == local[key], key
    commits = {"org/tiny@main": fake.repos["org/tiny"].refs["main"], "org/ads@main": fake.repos["org/ads"].refs["main"]}
    assert remote["hub_commits"] == commits and local["hub_commits"] == {}
    with open(tmp_path / "hub" / "config.json") as f:
        assert json.load(f)["hub_commits"] == commits
    for k in range(2):  # the merged adapters: the same bytes but for the base model's name
        a, b = (_files(tmp_path / w / "merged" / f"cluster_{k}") for w in ("local", "hub"))
        assert {n: v for n, v in a.items() if n != "adapter_config.json"} == \
            {n: v for n, v in b.items() if n != "adapter_config.json"}
        with open(tmp_path / "hub" / "merged" / f"cluster_{k}" / "adapter_config.json") as f:
            assert json.load(f)["base_model_name_or_path"] == "org/tiny"


def _move_adapters(fake, inputs):
    """A new commit on org/ads's main: task_1's adapter retrained (other weights, same shapes)."""
    from safetensors.numpy import load_file, save

    path = os.path.join(inputs["adapters_dir"], NAMES[1], "adapter_model.safetensors")
    tensors = {k: v * 1.5 for k, v in load_file(path).items()}
    return fake.repos["org/ads"].commit({f"{NAMES[1]}/adapter_model.safetensors": save(tensors)})


def test_a_resume_after_the_hub_moved_reads_the_recorded_commit(stand_in, env, tmp_path, capsys, monkeypatch):
    from d2c_jax.signals import PreemptionFlag

    fake, inputs = stand_in
    before = fake.repos["org/ads"].refs["main"]
    kw = dict(base_model="org/tiny", adapters=ADAPTERS, data_dir=inputs["data_dir"])
    rc, _, err = _run(capsys, workdir=str(tmp_path / "whole"), **kw)
    assert rc == 0, err
    monkeypatch.setattr(PreemptionFlag, "__call__", lambda self: True)  # stop after the first iteration
    rc, out, _ = _run(capsys, workdir=str(tmp_path / "wd"), **kw)
    assert rc == 0 and "checkpoint of iteration 1/3 saved" in out
    monkeypatch.undo()
    for key, value in stand_in[0].env(env).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "hash_cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    moved = _move_adapters(fake, inputs)
    try:
        rc, _, err = _run(capsys, workdir=str(tmp_path / "wd"), **kw)
        assert rc == 0, err
        assert f"org/ads@main: using commit {before[:12]}, recorded when this run started" in err
        assert read_partition(tmp_path / "wd")["clusters"] == read_partition(tmp_path / "whole")["clusters"]
        assert read_partition(tmp_path / "wd")["hub_commits"]["org/ads@main"] == before
        # Naming the new commit explicitly is another input: the checkpoint refuses it.
        os.remove(tmp_path / "wd" / "partition.json")
        at_new = tuple(a.replace("org/ads/", f"org/ads@{moved}/") for a in ADAPTERS)
        rc, _, err = _run(capsys, workdir=str(tmp_path / "wd"), **{**kw, "adapters": at_new})
        assert rc == 1 and err.strip().splitlines()[-1] == (
            f"error: the checkpoint in {tmp_path / 'wd' / 'checkpoints'} belongs to other inputs: Hub input "
            f"org/ads@main is gone (now: org/ads@{moved}); use --overwrite or another --workdir")
        # --overwrite starts again at the current commit.
        rc, _, err = _run(capsys, workdir=str(tmp_path / "wd"), overwrite=True, **kw)
        assert rc == 0, err
        assert read_partition(tmp_path / "wd")["hub_commits"]["org/ads@main"] == moved
    finally:
        fake.repos["org/ads"].refs["main"] = before


# ----------------------------------------------------------------------------- push


def test_push_to_hub_uploads_the_merged_adapters_partition_and_card(stand_in, env, tmp_path, capsys, monkeypatch):
    fake, inputs = stand_in
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    wd = tmp_path / "wd"
    rc, out, err = _run(capsys, workdir=str(wd), base_model="org/tiny", adapters=ADAPTERS,
                        data_dir=inputs["data_dir"], push_to_hub="me/result")
    assert rc == 0, err
    assert fake.repos["me/result"].private
    files = fake.files("me/result")
    doc = read_partition(wd)
    expected = {"partition.json": open(wd / "partition.json", "rb").read()}
    for k in range(2):
        expected.update({f"cluster_{k}/{n}": v for n, v in _files(wd / "merged" / f"cluster_{k}").items()})
    assert {n: v for n, v in files.items() if n != "README.md"} == expected
    card = files["README.md"].decode()
    assert card.startswith("---\nbase_model: org/tiny\nlibrary_name: peft\n")
    assert fake.cards[-1] == {"base_model": "org/tiny", "library_name": "peft",
                              "tags": ["lora", "peft", "model-merging"]}  # valid YAML, as the Hub checks it
    for k, tasks in enumerate(doc["clusters"]):
        assert f"| {k} | `cluster_{k}/` | {len(tasks)} | {', '.join(tasks)} |" in card
    assert pipeline.gain_line(doc) in card and f"`{doc['merge']}` (density {doc['density']}" in card
    assert f"pushed to me/result: {fake.url}/me/result/commit/" in out
    # What was pushed is read back as an adapter like any other Hub adapter.
    back = hub.resolve("me/result/cluster_0", "adapter")
    assert _files(back.path) == _files(wd / "merged" / "cluster_0")
    # A finished run re-run with --push_to_hub pushes again (a failed push is retried this way).
    fake.repos["me/result"].commit({"other": b"x"}, replace=True)
    rc, out, err = _run(capsys, workdir=str(wd), base_model="org/tiny", adapters=ADAPTERS,
                        data_dir=inputs["data_dir"], push_to_hub="me/result")
    assert rc == 0 and "already finished" in out and "pushed to me/result" in out, err
    assert fake.files("me/result")["partition.json"] == expected["partition.json"]


def test_push_without_a_token_is_refused_before_any_work(stand_in, env, tmp_path, capsys):
    _, inputs = stand_in
    rc, _, err = _run(capsys, workdir=str(tmp_path / "wd"), **inputs, push_to_hub="me/result2")
    assert (rc, err.strip()) == (1, f"error: me/result2: --push_to_hub needs a Hub token with write access: "
                                    f"{hub.LOGIN}")
    assert not os.path.exists(tmp_path / "wd")


def test_push_refused_by_the_hub_is_one_line_and_keeps_the_outputs(stand_in, env, tmp_path, capsys, monkeypatch):
    fake, inputs = stand_in
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    fake.add_repo("other/theirs", {"x": b"1"}, private=True)
    monkeypatch.setattr(fake, "_commit", lambda h, *a: fake._error(h, 403, "Forbidden"))
    rc, _, err = _run(capsys, workdir=str(tmp_path / "wd"), **inputs, push_to_hub="other/theirs")
    assert (rc, err.strip()) == (1, f"error: other/theirs: push to the Hub ({fake.url}) failed with HTTP 403: the "
                                    "token may not write there (a repo of another user or organisation?); "
                                    f"{hub.LOGIN} with a write token, then re-run the same command")
    assert os.path.exists(tmp_path / "wd" / "partition.json")


# ----------------------------------------------------------------------------- merge and evaluate


def test_evaluate_takes_hub_ids_and_pins_the_partitions_commits(stand_in, env, tmp_path, capsys):
    fake, inputs = stand_in
    common = dict(data_dir=inputs["data_dir"], output=str(tmp_path / "out.json"), dtype="float32", max_seq_len=64)
    local = evaluate(EvalConfig(base_model=inputs["base_model"], adapters_dir=inputs["adapters_dir"], **common))
    remote = evaluate(EvalConfig(base_model="org/tiny", adapters=ADAPTERS, **common))
    assert remote["tasks"] == local["tasks"]
    # A partition.json that recorded an older commit of org/ads is evaluated at that commit.
    before = fake.repos["org/ads"].refs["main"]
    part = tmp_path / "partition.json"
    part.write_text(json.dumps({"clusters": [NAMES[:2], NAMES[2:]], "merge": "ties", "density": 0.5,
                                "hub_commits": {"org/ads@main": before}}))
    moved = _move_adapters(fake, inputs)
    try:
        pinned = evaluate(EvalConfig(base_model="org/tiny", adapters=ADAPTERS, partition=str(part), **common))
        again = evaluate(EvalConfig(base_model=inputs["base_model"], adapters_dir=inputs["adapters_dir"],
                                    partition=str(part), **common))
        assert pinned["tasks"] == again["tasks"] and moved != before
    finally:
        fake.repos["org/ads"].refs["main"] = before


def test_launch_merge_takes_hub_ids_and_pushes(stand_in, env, tmp_path):
    fake, inputs = stand_in
    script = os.path.join(ROOT, "launch", "merge.py")
    dirs = [os.path.join(inputs["adapters_dir"], n) for n in NAMES[:3]]
    ids = [f"org/ads/{n}" for n in NAMES[:3]]
    run_env = child_env(**fake.env(env), HF_TOKEN="hf_test", PYTHONPATH=ROOT)
    for name, adapters, extra in (("local", dirs, []), ("hub", ids, ["--push_to_hub=me/merged"])):
        proc = subprocess.run([sys.executable, script, f"--adapters={','.join(adapters)}",
                               f"--output_dir={tmp_path / name}", *extra], capture_output=True, text=True,
                              env=run_env, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert _files(tmp_path / "hub") == _files(tmp_path / "local")
    pushed = fake.files("me/merged")
    assert {n: v for n, v in pushed.items() if n != "README.md"} == _files(tmp_path / "hub")
    assert all(f"- `{i}`" in pushed["README.md"].decode() for i in ids)
    a = lora.load_adapter(tmp_path / "hub", lora.infer_dims([tmp_path / "hub"]))
    assert np.isfinite(a.scaling)
