"""gs:// inputs (--base_model, --adapters_dir, --data_dir) against a real GCS API on this machine
(gcp-storage-emulator, started by these tests; STORAGE_EMULATOR_HOST points gcsfs at it).

The reference is the same run from the local directories the bucket was filled from.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gcsfs")

from d2c_jax import pipeline, storage  # noqa: E402
from d2c_jax.errors import run_cli  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from fixtures_gcs import gcs_emulator, upload  # noqa: E402
from fixtures_search_inputs import make_search_inputs, read_partition  # noqa: E402

SETTINGS = dict(num_clusters=2, iterations=3, population=2, proposals=2, examples_per_task=3, max_seq_len=64,
                dtype="float32", checkpoint_every=1, progress=False, seed=1, all_in_one_reference=False)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """(emulator URL, local inputs, the same inputs as gs:// paths)."""
    inputs = make_search_inputs(tmp_path_factory.mktemp("inputs"))
    with gcs_emulator() as url:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            fs = storage.filesystem()
            for key, local in inputs.items():
                upload(fs, local, f"bkt/in/{key}")
        yield url, inputs, {key: f"gs://bkt/in/{key}" for key in inputs}


@pytest.fixture
def env(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", bucket[0])
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def _files(d):
    return {os.path.relpath(os.path.join(r, n), d): open(os.path.join(r, n), "rb").read()
            for r, _, ns in os.walk(d) for n in ns}


def test_a_gs_prefix_is_mirrored_once_and_anew_when_an_object_changes(bucket, env):
    _, inputs, gs = bucket
    first = storage.local_dir(gs["data_dir"])
    assert _files(first) == _files(inputs["data_dir"])
    assert first.startswith(os.path.join(env, "gcs", "bkt", "in", "data_dir") + os.sep)
    assert storage.local_dir(gs["data_dir"]) == first  # unchanged objects: the same mirror, no download
    fs = storage.filesystem()
    name = sorted(_files(first))[0]
    fs.pipe_file(f"bkt/in/data_dir/{name}", open(os.path.join(first, name), "rb").read() + b"\n")
    try:
        second = storage.local_dir(gs["data_dir"])
        assert second != first and _files(second)[name] == _files(first)[name] + b"\n"
    finally:
        fs.pipe_file(f"bkt/in/data_dir/{name}", _files(inputs["data_dir"])[name])


def test_a_search_from_gs_inputs_equals_the_local_run(bucket, env, tmp_path, capsys):
    _, inputs, gs = bucket
    results = {}
    for name, paths in (("local", inputs), ("gs", gs)):
        rc = run_cli(lambda: pipeline.run(RunConfig.from_flat(**SETTINGS, workdir=str(tmp_path / name), **paths)))
        assert rc == 0, capsys.readouterr().err
        results[name] = read_partition(tmp_path / name)
    for key in ("clusters", "objective", "task_losses", "random_start_objective"):
        assert results["gs"][key] == results["local"][key], key
    assert results["gs"]["adapters_dir"] == gs["adapters_dir"] and results["gs"]["data_dir"] == gs["data_dir"]
