"""A tiny synthetic suite end to end: builds fast, is deterministic, is reused from cache, and its
base model / tokenizer / adapters load in transformers and PEFT with logits equal to our decoder's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from d2c_jax import cached_dir
from d2c_jax.suite import SuiteSettings, ensure_suite, is_complete, make_settings, read_manifest
from d2c_jax.suite.build import BUILD_XLA_FLAGS
from tolerances import FORWARD_RTOL

# 2 families x 2 languages, a 2-layer width-32 model, a few dozen optimiser steps.
TINY = dict(
    families=2, languages=2, seed=1, concepts=12, min_words=3, max_words=5, search_examples=4,
    eval_examples=6, train_examples=48, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, pretrain_steps=30, pretrain_batch=16, adapter_steps=20,
    adapter_batch=8, rank=8, alpha=32,
)


def _file_hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            full = os.path.join(dirpath, fn)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite") / "tiny"
    return ensure_suite(root, log=lambda m: None, **TINY)


def test_builds_a_complete_suite(suite):
    paths = suite
    names = ["reverse_l0", "reverse_l1", "sort_l0", "sort_l1"]
    assert sorted(os.listdir(paths.adapters_dir)) == names
    for n in names:
        assert sorted(os.listdir(os.path.join(paths.adapters_dir, n))) == [
            "adapter_config.json", "adapter_model.safetensors"]
        with open(os.path.join(paths.data_dir, f"{n}.jsonl")) as f:
            search = [json.loads(line) for line in f]
        with open(os.path.join(paths.data_dir, f"{n}.eval.jsonl")) as f:
            held_out = [json.loads(line) for line in f]
        assert len(search) == 4 and len(held_out) == 6
        assert all(set(e) == {"prompt", "response"} for e in search + held_out)
        assert not {e["prompt"] for e in search} & {e["prompt"] for e in held_out}
    with open(os.path.join(paths.data_dir, "tasks.json")) as f:
        meta = json.load(f)
    assert meta["sort_l1"] == {"metric": "rouge_l", "tags": {"family": "sort", "language": "l1"}}
    with open(os.path.join(paths.adapters_dir, "sort_l0", "adapter_config.json")) as f:
        acfg = json.load(f)
    assert (acfg["peft_type"], acfg["task_type"], acfg["r"], acfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 32)
    assert sorted(acfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert acfg["base_model_name_or_path"] == paths.base_model
    manifest = read_manifest(paths.root)
    assert manifest["tasks"] == names
    assert set(manifest["files"]) == set(_file_hashes(paths.root)) - {"suite.json"}
    assert not [p for p in os.listdir(os.path.dirname(paths.root)) if p.startswith(".")]  # no temp dirs


def test_adapters_beat_zero_shot_on_their_own_task(suite):
    q = read_manifest(suite.root)["quality"]["summary"]
    assert q["own_adapter_loss"] < q["zero_shot_loss"]
    assert q["own_adapter_loss"] < q["other_family_loss"]


def test_second_call_is_a_cache_hit(suite, monkeypatch):
    """Proven by what happens, not by how long it takes: no build is started, no file changes."""
    from d2c_jax.suite import build

    paths = suite
    before = _file_hashes(paths.root)
    mtime = os.path.getmtime(os.path.join(paths.root, "suite.json"))
    builds = []
    monkeypatch.setattr(build, "_build_in_child", lambda *a, **k: builds.append(a) or pytest.fail("rebuilt"))
    again = ensure_suite(paths.root, **TINY)  # returns at once: nothing rewritten
    assert builds == []
    assert again == paths
    assert os.path.getmtime(os.path.join(paths.root, "suite.json")) == mtime
    assert _file_hashes(paths.root) == before
    assert is_complete(paths.root, make_settings(**TINY))
    assert not is_complete(paths.root, make_settings(**{**TINY, "seed": 2}))


def test_same_seed_rebuilds_identical_files(suite, tmp_path):
    paths = suite
    other = ensure_suite(tmp_path / "again", log=lambda m: None, **TINY)
    a, b = _file_hashes(paths.root), _file_hashes(other.root)
    assert set(a) == set(b)
    # Only the adapters' base_model_name_or_path (an absolute path) and so suite.json may differ.
    differing = sorted(k for k in a if a[k] != b[k])
    assert all(k == "suite.json" or k.endswith("adapter_config.json") for k in differing), differing
    ma, mb = read_manifest(paths.root), read_manifest(other.root)
    assert ma["quality"] == mb["quality"] and ma["settings_hash"] == mb["settings_hash"]
    for k in differing:
        if k.endswith("adapter_config.json"):
            ja, jb = (json.load(open(os.path.join(r, k))) for r in (paths.root, other.root))
            ja.pop("base_model_name_or_path"), jb.pop("base_model_name_or_path")
            assert ja == jb


def _weight_files_hash(root: str) -> str:
    """The definition of suite.json's weights_hash, from the files: sha256 of the JSON object
    {relative path: sha256} of every .safetensors file, keys sorted."""
    weights = {k.replace(os.sep, "/"): v for k, v in _file_hashes(root).items() if k.endswith(".safetensors")}
    assert len(weights) == 1 + 4  # the base model and the 4 adapters
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()


def test_the_manifest_records_the_weights_hash_and_the_build_settings(suite):
    paths = suite
    manifest = read_manifest(paths.root)
    assert manifest["weights_hash"] == _weight_files_hash(paths.root)
    assert manifest["build"]["xla_flags"] == " ".join(BUILD_XLA_FLAGS)


def test_the_weights_do_not_depend_on_the_callers_cpus_or_xla_settings(suite, tmp_path):
    """Another machine, emulated: the caller runs on one CPU (another intra-op thread count) with
    other XLA flags and JAX settings; the build runs in its own process with fixed XLA flags and
    trains bit-identical weights."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    paths = suite
    out = tmp_path / "other"
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from d2c_jax.suite import ensure_suite; "
            f"ensure_suite(sys.argv[1], log=lambda m: None, **{TINY!r})")
    env = {**os.environ,
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true --xla_force_host_platform_device_count=3",
           "JAX_DEFAULT_MATMUL_PRECISION": "bfloat16", "JAX_ENABLE_X64": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = read_manifest(out)
    assert other["build"]["cpus"] == 1
    assert _weight_files_hash(str(out)) == _weight_files_hash(paths.root) == other["weights_hash"]


def test_an_old_suite_of_other_settings_is_replaced_atomically(tmp_path, monkeypatch):
    """What build_suite does once its temp dir is complete: swap it in, drop the old suite."""
    from d2c_jax.suite import build

    target = tmp_path / "s"
    target.mkdir()
    (target / "suite.json").write_text(json.dumps({"settings_hash": "old"}))
    (target / "stale.txt").write_text("x")

    def fake_build_into(tmp, final, settings, log):  # the finished temp dir, without the training
        with open(os.path.join(tmp, "suite.json"), "w") as f:
            f.write(json.dumps({"settings_hash": "new"}))

    monkeypatch.setattr(build, "_build_in_child", fake_build_into)
    assert cached_dir.replaceable(str(target), build.MANIFEST, build.PARTS)
    build.build_suite(target, make_settings(**TINY), log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert sorted(os.listdir(target)) == ["suite.json"]
    assert read_manifest(target) == {"settings_hash": "new"}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask  # the usual mode, not mkdtemp's 0700


def test_a_suite_installed_concurrently_is_kept(tmp_path, monkeypatch):
    """If another builder installs a complete suite of the same settings just before our swap,
    build_suite keeps theirs and leaves no temp dir behind."""
    from d2c_jax.suite import build

    settings = make_settings(**TINY)
    target = tmp_path / "s"
    theirs = {"settings_hash": build.settings_hash(settings), "files": {}}

    def fake_build_into(tmp, final, s, log):
        with open(os.path.join(tmp, "suite.json"), "w") as f:
            f.write(json.dumps({"settings_hash": "ours"}))

    real_replace = os.replace

    def racing_replace(src, dst):
        if os.fspath(dst) == str(target) and not os.path.exists(dst):  # the other builder wins
            os.mkdir(dst)
            with open(os.path.join(dst, "suite.json"), "w") as f:
                f.write(json.dumps(theirs))
        return real_replace(src, dst)

    monkeypatch.setattr(build, "_build_in_child", fake_build_into)
    monkeypatch.setattr(os, "replace", racing_replace)
    build.build_suite(target, settings, log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert read_manifest(target) == theirs


def _examples(paths, task, tok):
    with open(os.path.join(paths.data_dir, f"{task}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    ids = [tok(r["prompt"])["input_ids"] + tok(r["response"], add_special_tokens=False)["input_ids"]
           + [tok.eos_token_id] for r in rows]
    s = max(map(len, ids))
    tokens = np.full((len(ids), s), tok.pad_token_id, np.int32)
    mask = np.zeros((len(ids), s), np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)], mask[i, : len(x)] = x, 1
    return tokens, mask


def test_loads_in_transformers_and_peft_with_our_logits(suite):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2c_jax import hf_io
    from d2c_jax import lora as lora_lib
    from d2c_jax.models import decoder

    paths = suite
    tok = AutoTokenizer.from_pretrained(paths.base_model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(paths.base_model, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg, params = hf_io.load_model(paths.base_model)
    tokens, mask = _examples(paths, "sort_l1", tok)
    real = mask.astype(bool)

    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    ours = np.asarray(decoder.forward(params, cfg, tokens, mask))
    # two float32 forwards: FORWARD_RTOL of the largest |logit| (tolerances.py)
    np.testing.assert_allclose(ours[real], ref[real], atol=FORWARD_RTOL * np.abs(ref[real]).max(), rtol=0)

    adapters = lora_lib.load_adapter_set(paths.adapters_dir, cfg)
    i = adapters.names.index("sort_l1")
    peft_model = PeftModel.from_pretrained(model, os.path.join(paths.adapters_dir, "sort_l1")).eval()
    with torch.no_grad():
        ref_lora = peft_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    ours_lora = np.asarray(decoder.forward(params, cfg, tokens, mask, lora_lib.effective_lora(adapters, i)))
    np.testing.assert_allclose(ours_lora[real], ref_lora[real], atol=FORWARD_RTOL * np.abs(ref_lora[real]).max(),
                               rtol=0)
    assert np.abs(ref_lora[real] - ref[real]).max() > 1e-2  # the adapter does something (>> the tolerance)


def test_settings_defaults_follow_the_paper():
    s = SuiteSettings()
    assert (s.families, s.languages, s.rank, s.alpha) == (5, 8, 32, 128)
