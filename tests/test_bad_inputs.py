"""The catalogue of bad inputs and faults: each case asserts the exact one-line `error:` message,
the exit status, and that nothing was left behind (no workdir, no half-written output).

Most cases run the validation in-process through `run_cli(pipeline.run)` (the launch scripts'
own error path) on a fresh copy of one tiny input set, mutated by the case; only the cases where
the command line itself is the point (flag parsing, exit codes) start a subprocess.

What is refused rather than supported, and why (see also README "Bad inputs"):
- DoRA, fan_in_fan_out, trained biases (bias != "none", lora_bias), modules_to_save,
  rank_pattern / alpha_pattern, non-LoRA PEFT types: their effect is not a rank-r product B @ A
  per module, so no LoRA merge (and no PEFT LoRA output) can represent them.
- adapter_model.bin only: unpickling runs arbitrary code; safetensors is one save_pretrained away.
- adapters naming different base models: same-shaped bases of other architectures would merge
  silently into nonsense; adapters saying nothing about their base are accepted.
- all-zero adapters (untrained: B = 0) and all-zero merges: they change nothing.
- density outside (0, 1]: 0 keeps nothing (an all-zero adapter), > 1 has no meaning.
Supported on purpose: mixed ranks (zero-padded to the largest, exact) and mixed target modules
(the union; absent modules are zeros), see test_lora_io.py and the last test here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import pipeline  # noqa: E402
from d2c_jax.errors import UserError, run_cli  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from d2c_jax.workdir_lock import WorkdirLock  # noqa: E402
from fixtures_search_inputs import NAMES, child_env, make_search_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SETTINGS = dict(num_clusters=2, iterations=2, examples_per_task=3, max_seq_len=64, dtype="float32",
                checkpoint_every=1, progress=False)
KEY = "base_model.model.model.layers.{l}.self_attn.{m}.lora_{f}.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "hash_cache"))


@pytest.fixture
def inp(pristine, tmp_path):
    """A private copy of the inputs, plus the paths a case needs."""
    out = {}
    for key, src in pristine.items():
        out[key] = str(tmp_path / "in" / os.path.basename(src))
        shutil.copytree(src, out[key])
    out["wd"] = str(tmp_path / "wd")
    out["tmp"] = str(tmp_path)
    return out


# ----------------------------------------------------------------------------- mutations


def _adapter(inp, task="task_2"):
    return os.path.join(inp["adapters_dir"], task)


def edit_config(inp, task="task_2", **changes):
    path = os.path.join(_adapter(inp, task), CONFIG)
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def edit_weights(inp, fn, task="task_2"):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(_adapter(inp, task), WEIGHTS)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _set(key, value):
    def fn(t):
        t[key] = np.array(t[key])
        t[key].flat[3] = value
    return fn


def write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _line(i, prompt="one two", response="three"):
    return json.dumps({"prompt": prompt, "response": response}) + "\n"


def _other_base_weights(t):
    for k in list(t):  # as if trained on a base with hidden size 32
        a = t[k]
        t[k] = np.ones((a.shape[0], 32), np.float32) if ".lora_A." in k else np.ones((32, a.shape[1]), np.float32)


def _base_nan(inp):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(inp["base_model"], "model.safetensors")
    t = load_file(path)
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].copy()
    t["model.layers.0.mlp.down_proj.weight"][1, 2] = np.nan
    save_file(t, path, metadata={"format": "pt"})


def _response_tokens(inp, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inp["base_model"])
    return len(tok(text, add_special_tokens=False)["input_ids"]) + 1


LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
A2 = "{adapters_dir}/task_2/" + CONFIG
W2 = "{adapters_dir}/task_2/" + WEIGHTS

# (id, mutate(inp) -> RunConfig overrides or None, expected line after "error: ")
CASES = [
    # --- adapters
    ("adapter_for_another_base", lambda i: edit_weights(i, _other_base_weights),
     W2 + ": tensor " + KEY.format(l=0, m="k_proj", f="A") + " has shape (4, 32) but the base model and r=4 need "
     "(4, 64) (k_proj: d_in=64, d_out=32); was this adapter trained for another base model?"),
    ("adapters_naming_different_bases", lambda i: edit_config(i, "task_3", base_model_name_or_path="Qwen/Qwen2-0.5B"),
     "{adapters_dir}/task_3/" + CONFIG + ": base_model_name_or_path='Qwen/Qwen2-0.5B' differs from '{pristine_base}' "
     "of {adapters_dir}/task_0/" + CONFIG + "; adapters of different base models cannot be merged"),
    ("use_dora", lambda i: edit_config(i, use_dora=True),
     A2 + ": use_dora=True is not supported (DoRA adapters cannot be merged as LoRA)"),
    ("fan_in_fan_out", lambda i: edit_config(i, fan_in_fan_out=True),
     A2 + ": fan_in_fan_out=True is not supported (transposed (Conv1D) weights cannot be merged as LoRA)"),
    ("bias_all", lambda i: edit_config(i, bias="all"),
     A2 + ": bias='all' is not supported (trained bias terms cannot be merged as LoRA); only bias=\"none\""),
    ("bias_lora_only", lambda i: edit_config(i, bias="lora_only"),
     A2 + ": bias='lora_only' is not supported (trained bias terms cannot be merged as LoRA); only bias=\"none\""),
    ("lora_bias", lambda i: edit_config(i, lora_bias=True),
     A2 + ": lora_bias=True is not supported (LoRA bias terms cannot be merged as LoRA)"),
    ("peft_type_ia3", lambda i: edit_config(i, peft_type="IA3"), A2 + ": peft_type='IA3' is not supported (only LORA)"),
    ("peft_type_prefix", lambda i: edit_config(i, peft_type="PREFIX_TUNING"),
     A2 + ": peft_type='PREFIX_TUNING' is not supported (only LORA)"),
    ("modules_to_save", lambda i: edit_config(i, modules_to_save=["lm_head"]),
     A2 + ": modules_to_save=['lm_head'] is not supported (fully trained modules (modules_to_save) cannot be "
     "merged as LoRA)"),
    ("rank_pattern", lambda i: edit_config(i, rank_pattern={"q_proj": 8}),
     A2 + ": rank_pattern={'q_proj': 8} is not supported (per-module ranks/alphas); only a single r and lora_alpha"),
    ("r_disagrees_with_weights", lambda i: edit_config(i, r=8),
     W2 + ": tensor " + KEY.format(l=0, m="k_proj", f="A") + " has shape (4, 64) but the base model and r=8 need "
     "(8, 64) (k_proj: d_in=64, d_out=32); was this adapter trained for another base model?"),
    ("adapter_model_bin_only", lambda i: (os.remove(os.path.join(_adapter(i), WEIGHTS)),
                                          write(os.path.join(_adapter(i), "adapter_model.bin"), b"PK")),
     W2 + ": missing; found only adapter_model.bin (pickle), which is not supported: re-save the adapter with "
     "save_pretrained(..., safe_serialization=True)"),
    ("missing_adapter_config", lambda i: os.remove(os.path.join(_adapter(i), CONFIG)),
     A2 + ": missing adapter_config.json (expected a PEFT LoRA adapter directory)"),
    ("adapter_config_not_json", lambda i: write(os.path.join(_adapter(i), CONFIG), "{r: 4"),
     A2 + ": cannot parse adapter_config.json: Expecting property name enclosed in double quotes: line 1 column 2 "
     "(char 1)"),
    ("nan_weight", lambda i: edit_weights(i, _set(KEY.format(l=1, m="v_proj", f="B"), np.nan)),
     W2 + ": tensor " + KEY.format(l=1, m="v_proj", f="B") + " contains NaN or Inf"),
    ("inf_weight", lambda i: edit_weights(i, _set(KEY.format(l=0, m="q_proj", f="A"), np.inf)),
     W2 + ": tensor " + KEY.format(l=0, m="q_proj", f="A") + " contains NaN or Inf"),
    ("all_zero_adapter", lambda i: edit_weights(i, lambda t: [t.__setitem__(k, np.zeros_like(v)) for k, v in
                                                              list(t.items()) if ".lora_B." in k]),
     W2 + ": every lora_A or every lora_B weight is zero: the adapter changes nothing (an untrained adapter?)"),
    ("empty_safetensors", lambda i: write(os.path.join(_adapter(i), WEIGHTS), b""),
     W2 + ": not a valid safetensors file (Error while deserializing header: header too small)"),
    ("truncated_safetensors", lambda i: write(os.path.join(_adapter(i), WEIGHTS),
                                              open(os.path.join(_adapter(i), WEIGHTS), "rb").read()[:-100]),
     W2 + ": not a valid safetensors file (Error while deserializing header: incomplete metadata, file not fully "
     "covered)"),
    ("trained_bias_tensor", lambda i: edit_weights(i, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.bias", np.ones(64, np.float32))),
     W2 + ": unexpected tensor base_model.model.model.layers.0.self_attn.q_proj.bias (only lora_A/lora_B weights "
     "are supported: no trained biases, DoRA magnitudes or modules_to_save)"),
    ("no_adapters", lambda i: [shutil.rmtree(os.path.join(i["adapters_dir"], n)) for n in NAMES],
     "{adapters_dir}: no adapter sub-directories (expected one PEFT adapter per task)"),
    # --- base model
    ("base_without_tokenizer", lambda i: [os.remove(os.path.join(i["base_model"], f)) for f in
                                          ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")],
     "{base_model}: no tokenizer files (expected tokenizer.json or tokenizer.model or vocab.json or vocab.txt); "
     "copy the base model's tokenizer into this directory"),
    ("unsupported_architecture", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"),
                                                      architectures=["GPT2LMHeadModel"]),
     "{base_model}/config.json: unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM, "
     "Qwen2ForCausalLM, StableLmForCausalLM"),
    ("base_without_config", lambda i: os.remove(os.path.join(i["base_model"], "config.json")),
     "{base_model}/config.json: missing config.json (expected a Hugging Face model directory)"),
    ("base_missing", lambda i: {"base_model": os.path.join(i["tmp"], "no_such_model")},
     "{tmp}/no_such_model: model directory does not exist"),
    ("base_nan_weight", _base_nan,
     "{base_model}/model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' contains NaN or Inf values"),
    ("chat_template_without_template", lambda i: (os.remove(os.path.join(i["base_model"], "chat_template.jinja")),
                                                  {"chat_template": True})[1],
     "{base_model}/tokenizer_config.json: --chat_template is set but the tokenizer has no chat template (no "
     "\"chat_template\" here and no chat_template.jinja beside it)"),
    # --- task data
    ("broken_jsonl_line", lambda i: write(os.path.join(i["data_dir"], "task_1.jsonl"), _line(1) + '{"prompt": "a", "resp'),
     "{data_dir}/task_1.jsonl: line 2: malformed JSON (Unterminated string starting at)"),
    ("non_utf8_line", lambda i: write(os.path.join(i["data_dir"], "task_1.jsonl"),
                                      (_line(1) + _line(2)).encode() + b'{"prompt": "\xff", "response": "x"}\n'),
     "{data_dir}/task_1.jsonl: line 3: not UTF-8 text (byte 13 of the line is 0xff)"),
    ("empty_response", lambda i: write(os.path.join(i["data_dir"], "task_1.jsonl"), _line(1, response="  ")),
     "{data_dir}/task_1.jsonl: line 1: empty response"),
    ("missing_prompt", lambda i: write(os.path.join(i["data_dir"], "task_1.jsonl"), '{"response": "x"}\n'),
     "{data_dir}/task_1.jsonl: line 1: missing \"prompt\""),
    ("empty_data_file", lambda i: write(os.path.join(i["data_dir"], "task_1.jsonl"), "\n\n"),
     "{data_dir}/task_1.jsonl: no examples (the file is empty)"),
    ("over_long_example", lambda i: write(os.path.join(i["data_dir"], "task_1.jsonl"), _line(1, response=LONG)),
     "{data_dir}/task_1.jsonl: line 1: the response alone is {long_tokens} tokens (with eos); it needs at least one "
     "prompt token and max_seq_len=64"),
    ("missing_task_data", lambda i: os.remove(os.path.join(i["data_dir"], "task_4.jsonl")),
     "{data_dir}: no search examples for adapter task(s) task_4 (expected task_4.jsonl)"),
    ("data_without_adapter", lambda i: write(os.path.join(i["data_dir"], "task_9.jsonl"), _line(1)),
     "{data_dir}: data for task(s) with no adapter: task_9 (remove the files or add the adapters)"),
    ("duplicate_task_in_tasks_json", lambda i: write(os.path.join(i["data_dir"], "tasks.json"),
                                                     '{"task_0": {}, "task_1": {}, "task_0": {"metric": "chrf"}}'),
     "{data_dir}/tasks.json: 'task_0' is given twice"),
    ("unknown_metric", lambda i: write(os.path.join(i["data_dir"], "tasks.json"), '{"task_0": {"metric": "bleu"}}'),
     "{data_dir}/tasks.json: task 'task_0': unknown metric 'bleu'; supported: rouge_l, squad_f1, exact_match, chrf"),
    # --- settings
    ("k_below_1", lambda i: {"num_clusters": 0}, "--num_clusters=0: must be >= 1"),
    ("k_not_below_n", lambda i: {"num_clusters": 5},
     "--num_clusters=5 must be between 1 and 4 (the number of adapters minus one; there are 5)"),
    ("density_0", lambda i: {"density": 0.0}, "--density=0.0: must be in (0, 1]"),
    ("density_above_1", lambda i: {"density": 1.5}, "--density=1.5: must be in (0, 1]"),
    ("examples_per_task_0", lambda i: {"examples_per_task": 0}, "--examples_per_task=0: must be >= 1"),
    ("max_seq_len_1", lambda i: {"max_seq_len": 1}, "--max_seq_len=1: must be >= 2"),
    ("checkpoint_every_0", lambda i: {"checkpoint_every": 0}, "--checkpoint_every=0: must be >= 1"),
    # --- workdir
    ("workdir_is_a_file", lambda i: write(i["wd"], "x"), "{wd}: --workdir exists and is not a directory"),
    ("workdir_parent_is_a_file", lambda i: (write(os.path.join(i["tmp"], "f"), "x"),
                                            {"workdir": os.path.join(i["tmp"], "f", "wd")})[1],
     "{tmp}/f/wd: cannot create --workdir: {tmp}/f is not a directory"),
    ("finished_run_of_other_settings", lambda i: _finished(i, num_clusters=3),
     "{wd}: holds a finished run with --num_clusters=3 (not 2); use --overwrite to replace it or choose another "
     "--workdir"),
]


def _edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


def _config(inp, **over) -> RunConfig:
    keys = ("base_model", "adapters_dir", "data_dir")
    return RunConfig.from_flat(**{k: inp[k] for k in keys}, workdir=inp["wd"], **{**SETTINGS, **over})


def _finished(inp, **saved):
    """A workdir holding a finished run (config.json + partition.json) of `saved` settings."""
    os.makedirs(inp["wd"])
    write(os.path.join(inp["wd"], "config.json"), _config(inp, **saved).to_json())
    write(os.path.join(inp["wd"], "partition.json"), "{}")


def _tree(path):
    """Every path under `path` with its content (None for directories): what must not change."""
    out = {}
    if os.path.isfile(path):
        return {path: open(path, "rb").read()}
    for root, dirs, files in os.walk(path):
        out.update({os.path.join(root, d): None for d in dirs})
        out.update({os.path.join(root, f): open(os.path.join(root, f), "rb").read() for f in files})
    return out


def _fill(template: str, fields) -> str:
    """The template with {name} replaced by fields[name] (other braces kept: messages print dicts)."""
    for key, value in fields.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def _run_in_process(cfg_kwargs, capsys):
    """(exit status, stderr lines, stdout) of launch/search.py's body on these settings."""
    def body():
        return pipeline.run(RunConfig.from_flat(**cfg_kwargs))

    rc = run_cli(body)
    out = capsys.readouterr()
    return rc, [line for line in out.err.splitlines() if line.strip()], out.out


@pytest.mark.parametrize("case_id, mutate, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_1_and_nothing_written(inp, pristine, capsys, case_id, mutate, expected):
    over = mutate(inp)
    over = over if isinstance(over, dict) else {}
    wd = over.get("workdir", inp["wd"])
    before = _tree(wd) if os.path.lexists(wd) else None
    inputs_before = {k: _tree(inp[k]) for k in ("base_model", "adapters_dir", "data_dir")}
    kwargs = {**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}, "workdir": inp["wd"],
              **SETTINGS, **over}
    rc, lines, _ = _run_in_process(kwargs, capsys)
    fields = {**inp, "pristine_base": pristine["base_model"]}
    if "{long_tokens}" in expected:
        fields["long_tokens"] = _response_tokens(inp, LONG)
    assert (rc, lines) == (1, ["error: " + _fill(expected, fields)])
    # Nothing written: the workdir as it was (absent, or unchanged), the inputs untouched.
    assert (_tree(wd) if os.path.lexists(wd) else None) == before
    assert {k: _tree(inp[k]) for k in ("base_model", "adapters_dir", "data_dir")} == inputs_before


def test_catalogue_size():
    assert len(CASES) + len(EXTRA_CASES) >= 40


# ----------------------------------------------------------------------------- faults and states


def test_a_locked_workdir_names_the_holder(inp, capsys):
    os.makedirs(inp["wd"])
    with WorkdirLock(inp["wd"]):
        before = _tree(inp["wd"])
        rc, lines, _ = _run_in_process({**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")},
                                        "workdir": inp["wd"], **SETTINGS}, capsys)
        assert _tree(inp["wd"]) == before
    assert (rc, lines) == (1, [f"error: {inp['wd']}: another run is using this --workdir (process {os.getpid()} "
                               "holds .d2c.lock); wait for it to end or choose another --workdir"])


def test_too_little_disk_space_is_refused_before_writing(inp, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, lines, _ = _run_in_process({**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")},
                                    "workdir": inp["wd"], **SETTINGS}, capsys)
    assert rc == 1 and len(lines) == 1 and not os.path.exists(inp["wd"])
    assert re.fullmatch(rf"error: {re.escape(inp['wd'])}: only 0\.0 MiB free on its file system; the outputs and "
                        r"checkpoints need about \d+\.\d MiB", lines[0]), lines


def test_rerunning_a_finished_run_reports_it_and_exits_0(inp, capsys):
    _finished(inp)
    before = _tree(inp["wd"])
    rc, lines, out = _run_in_process({**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")},
                                      "workdir": inp["wd"], **SETTINGS}, capsys)
    assert (rc, lines) == (0, [])  # the run's summary table, then where it is
    assert out.splitlines()[-1] == f"already finished: {inp['wd']}/partition.json (use --overwrite to run again)"
    assert _tree(inp["wd"]) == before


def test_a_checkpoint_of_another_adapter_set_is_refused(inp, capsys, monkeypatch):
    from d2c_jax.signals import PreemptionFlag

    kwargs = {**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}, "workdir": inp["wd"], **SETTINGS}
    monkeypatch.setattr(PreemptionFlag, "__call__", lambda self: True)  # stop after the first iteration
    rc, _, out = _run_in_process(kwargs, capsys)
    assert rc == 0 and "checkpoint of iteration 1/2 saved" in out
    monkeypatch.undo()
    # Retrained in place: same file size, same config, other weights.
    edit_weights(inp, lambda t: t.update({k: v * 1.5 for k, v in t.items()}), task="task_1")
    before = _tree(inp["wd"])
    rc, lines, _ = _run_in_process(kwargs, capsys)
    assert (rc, lines) == (1, [f"error: the checkpoint in {inp['wd']}/checkpoints belongs to other inputs: adapter "
                               "file task_1/adapter_model.safetensors changed (content hash); use --overwrite or "
                               "another --workdir"])
    assert _tree(inp["wd"]) == before


def test_disk_full_while_writing_a_merged_adapter_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    from d2c_jax import lora

    def full(*a, **k):
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    tree = {"q_proj": {"a": np.ones((2, 4, 8), np.float32), "b": np.ones((2, 8, 4), np.float32)}}
    out = tmp_path / "merged" / "cluster_0"
    rc = run_cli(lambda: lora.save_peft_adapter(out, tree, rank=4, alpha=4, base_model_path=None))
    lines = capsys.readouterr().err.splitlines()
    assert (rc, lines) == (1, [f"error: {out}: cannot write the adapter: adapter_model.safetensors: Error while "
                               'serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                               'device" })'])
    assert os.listdir(tmp_path / "merged") == []


# ----------------------------------------------------------------------------- merge.py and evaluate.py


def _merge_dirs(inp, *tasks):
    return [_adapter(inp, t) for t in tasks]


def _merge(inp, dirs, **kw):
    from d2c_jax.merge import merge_adapter_dirs

    return run_cli(lambda: merge_adapter_dirs(dirs, os.path.join(inp["tmp"], "merged_out"), **kw) and 0)


EXTRA_CASES = [
    # (id, mutate, merge kwargs or evaluate, expected)
    ("merge_different_bases", lambda i: edit_config(i, "task_1", base_model_name_or_path="/models/Qwen2-0.5B"),
     dict(dirs=("task_0", "task_1")),
     "{adapters_dir}/task_1/" + CONFIG + ": base_model_name_or_path='/models/Qwen2-0.5B' differs from "
     "'{pristine_base}' of {adapters_dir}/task_0/" + CONFIG + "; adapters of different base models cannot be merged"),
    ("merge_other_shapes", lambda i: edit_weights(i, _other_base_weights, task="task_1"), dict(dirs=("task_0", "task_1")),
     "{adapters_dir}/task_1/" + WEIGHTS + ": tensor " + KEY.format(l=0, m="k_proj", f="A") + " has shape (4, 32), "
     "which does not fit k_proj (d_in, d_out)=(64, 32) seen in {adapters_dir}/task_0/" + WEIGHTS + ":"
     + KEY.format(l=0, m="k_proj", f="A") + "; are these adapters for the same base model?"),
    ("merge_density_0", None, dict(dirs=("task_0", "task_1"), density=0.0), "--density=0.0: must be in (0, 1] (the "
     "fraction of entries kept per tensor)"),
    ("merge_density_above_1", None, dict(dirs=("task_0", "task_1"), density=1.5), "--density=1.5: must be in (0, 1] "
     "(the fraction of entries kept per tensor)"),
    ("merge_same_adapter_twice", None, dict(dirs=("task_0", "task_0")),
     "--adapters names the same adapter directory twice"),
    ("merge_nan_adapter", lambda i: edit_weights(i, _set(KEY.format(l=1, m="v_proj", f="B"), np.nan)),
     dict(dirs=("task_0", "task_2")), W2 + ": tensor " + KEY.format(l=1, m="v_proj", f="B") + " contains NaN or Inf"),
    ("evaluate_different_bases", lambda i: edit_config(i, "task_3", base_model_name_or_path="Qwen/Qwen2-0.5B"),
     "evaluate", "{adapters_dir}/task_3/" + CONFIG + ": base_model_name_or_path='Qwen/Qwen2-0.5B' differs from "
     "'{pristine_base}' of {adapters_dir}/task_0/" + CONFIG + "; adapters of different base models cannot be merged"),
    ("evaluate_all_zero_adapter", lambda i: edit_weights(i, lambda t: [t.__setitem__(k, np.zeros_like(v)) for k, v in
                                                                       list(t.items()) if ".lora_A." in k]),
     "evaluate", W2 + ": every lora_A or every lora_B weight is zero: the adapter changes nothing (an untrained "
     "adapter?)"),
]


@pytest.mark.parametrize("case_id, mutate, how, expected", EXTRA_CASES, ids=[c[0] for c in EXTRA_CASES])
def test_merge_and_evaluate_validate_like_search(inp, pristine, capsys, case_id, mutate, how, expected):
    if mutate is not None:
        mutate(inp)
    out = os.path.join(inp["tmp"], "merged_out") if how != "evaluate" else os.path.join(inp["tmp"], "eval.json")
    if how == "evaluate":
        from d2c_jax.evaluation import EvalConfig, evaluate

        cfg = EvalConfig(base_model=inp["base_model"], adapters_dir=inp["adapters_dir"], data_dir=inp["data_dir"],
                         output=out, dtype="float32", max_seq_len=64)
        rc = run_cli(lambda: evaluate(cfg))
    else:
        how = dict(how)
        rc = _merge(inp, _merge_dirs(inp, *how.pop("dirs")), **how)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (rc, lines) == (1, ["error: " + _fill(expected, {**inp, "pristine_base": pristine["base_model"]})])
    assert not [n for n in os.listdir(inp["tmp"]) if n.startswith((".merged_out", "merged_out", "eval.json"))]


def test_merged_adapter_files_get_ordinary_permissions(inp):
    old = os.umask(0o022)
    try:
        assert _merge(inp, _merge_dirs(inp, "task_0", "task_1", "task_2")) == 0
    finally:
        os.umask(old)
    out = os.path.join(inp["tmp"], "merged_out")
    assert os.stat(out).st_mode & 0o777 == 0o755
    for name in (WEIGHTS, CONFIG):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644


def test_mixed_ranks_and_target_modules_are_supported(inp):
    """Supported on purpose: a rank-2 adapter without v_proj beside rank-4 q/k/v/o ones."""
    from d2c_jax.lora import load_adapter_set
    from d2c_jax.models.config import load_config

    def shrink(t):
        for k in list(t):
            if ".v_proj." in k:
                del t[k]
            elif ".lora_A." in k:
                t[k] = np.ascontiguousarray(t[k][:2])
            else:
                t[k] = np.ascontiguousarray(t[k][:, :2])

    edit_weights(inp, shrink)
    edit_config(inp, r=2, target_modules=["q_proj", "k_proj", "o_proj"])
    aset = load_adapter_set(inp["adapters_dir"], load_config(inp["base_model"]))
    assert aset.ranks.tolist() == [4, 4, 2, 4, 4] and aset.rank == 4
    assert not aset.a["v_proj"][2].any() and aset.a["v_proj"][1].any()


# ----------------------------------------------------------------------------- the command line


def _cli(script, *args, cwd=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                          text=True, env=child_env(), timeout=300, cwd=cwd)
    return proc.returncode, proc.stderr.splitlines(), proc.stdout


def test_cli_flag_errors_name_the_flagfile(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("--num_clusters=3\n--bogus_flag=2\n")
    nested = tmp_path / "nested.flags"
    nested.write_text(f"--flagfile={tmp_path / 'missing.flags'}\n")
    assert _cli("search.py", f"--flagfile={bad}")[:2] == (1, [f"error: {bad}: unknown flag --bogus_flag"])
    assert _cli("merge.py", f"--flagfile={nested}")[:2] == (
        1, [f"error: {tmp_path / 'missing.flags'}: cannot read this flagfile (named in {nested})"])
    assert _cli("evaluate.py", "--bogus=1")[:2] == (1, ["error: unknown flag --bogus (see --helpshort)"])


def test_cli_flagfile_naming_a_missing_path_is_one_line_and_writes_nothing(pristine, tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(f"--base_model={tmp_path / 'gone'}\n--adapters_dir={pristine['adapters_dir']}\n"
                        f"--data_dir={pristine['data_dir']}\n--workdir={tmp_path / 'wd'}\n--num_clusters=2\n")
    rc, err, out = _cli("search.py", f"--flagfile={flagfile}")
    assert (rc, err, out) == (1, [f"error: {tmp_path / 'gone'}: model directory does not exist"], "")
    assert not (tmp_path / "wd").exists()
    rc, err, _ = _cli("merge.py", f"--adapters={pristine['adapters_dir']}/task_0,{pristine['adapters_dir']}/task_1",
                      "--density=1.5", f"--output_dir={tmp_path / 'm'}")
    assert (rc, err) == (1, ["error: --density=1.5: must be in (0, 1] (the fraction of entries kept per tensor)"])
    assert os.listdir(tmp_path) == ["run.flags"]
