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
import time

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
    ("r_far_beyond_the_weights", lambda i: edit_config(i, r=1000000000),  # must not allocate [L, 1e9, d] first
     W2 + ": tensor " + KEY.format(l=0, m="k_proj", f="A") + " has shape (4, 64) but the base model and r=1000000000 "
     "need (1000000000, 64) (k_proj: d_in=64, d_out=32); was this adapter trained for another base model?"),
    ("adapter_of_another_architecture", lambda i: edit_config(i, auto_mapping={
        "base_model_class": "Qwen2ForCausalLM", "parent_library": "transformers.models.qwen2.modeling_qwen2"}),
     A2 + ": auto_mapping.base_model_class='Qwen2ForCausalLM': this adapter was trained for another architecture "
     "than the base model's (llama); it cannot be applied to it"),
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
    ("config_rope_theta_null", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"), rope_theta=None,
                                                    rope_parameters=None),  # a transformers-4 config.json
     "{base_model}/config.json: rope_theta=None: must be a finite number > 0"),
    ("config_rope_parameters_theta_null", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"),
                                                               rope_parameters={"rope_theta": None}),
     "{base_model}/config.json: rope_parameters.rope_theta=None: must be a finite number > 0"),
    ("config_negative_hidden_size", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"), hidden_size=-64),
     "{base_model}/config.json: hidden_size=-64: must be an integer >= 1"),
    ("config_layers_as_a_string", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"),
                                                       num_hidden_layers="2"),
     "{base_model}/config.json: num_hidden_layers='2': must be an integer >= 1"),
    ("config_eps_zero", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"), rms_norm_eps=0),
     "{base_model}/config.json: rms_norm_eps=0: must be a finite number > 0"),
    ("config_eos_outside_the_vocabulary", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"),
                                                               eos_token_id=10 ** 9),
     "{base_model}/config.json: eos_token_id=1000000000: must be a token id in [0, vocab_size={vocab}) or null"),
    ("config_rope_scaling_factor_null", lambda i: _edit_json(os.path.join(i["base_model"], "config.json"),
                                                             rope_parameters={
        "rope_theta": 10000.0, "rope_type": "llama3", "factor": None, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "{base_model}/config.json: rope_parameters.factor=None: must be a finite number > 0"),
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
    ("workdir_holds_a_users_files", lambda i: (os.makedirs(i["wd"]), write(os.path.join(i["wd"], "notes.txt"), "x")),
     "{wd}: --workdir exists and is not a d2c_jax search workdir (no .d2c_output); refusing to overwrite it — "
     "choose another --workdir or remove it yourself"),
    ("workdir_is_the_adapters_dir", lambda i: {"workdir": i["adapters_dir"]},
     "{adapters_dir}: --workdir is the input {adapters_dir}; it would be destroyed — choose another --workdir"),
    ("workdir_inside_the_data_dir", lambda i: {"workdir": os.path.join(i["data_dir"], "run")},
     "{data_dir}/run: --workdir is inside the input {data_dir}; it would be destroyed — choose another --workdir"),
    ("workdir_links_to_a_users_directory", lambda i: (os.makedirs(os.path.join(i["tmp"], "mine")),
                                                      write(os.path.join(i["tmp"], "mine", "notes.txt"), "x"),
                                                      os.symlink(os.path.join(i["tmp"], "mine"), i["wd"])),
     "{tmp}/mine: --workdir exists and is not a d2c_jax search workdir (no .d2c_output); refusing to overwrite it — "
     "choose another --workdir or remove it yourself"),
    ("lock_file_is_a_symlink", lambda i: (_ours(i), write(os.path.join(i["tmp"], "precious"), "keep"),
                                          os.symlink(os.path.join(i["tmp"], "precious"), os.path.join(i["wd"], ".d2c.lock"))),
     "{wd}/.d2c.lock: is a symbolic link, which d2c_jax never creates; refusing to write through it — remove it "
     "(what it points to is not touched)"),
    ("checkpoints_is_a_symlink", lambda i: (_ours(i), os.makedirs(os.path.join(i["tmp"], "mine")),
                                            os.symlink(os.path.join(i["tmp"], "mine"), os.path.join(i["wd"], "checkpoints"))),
     "{wd}/checkpoints: is a symbolic link, which d2c_jax never creates; refusing to write through it — remove it "
     "(what it points to is not touched)"),
    ("lock_file_is_a_hard_link", lambda i: (_ours(i), write(os.path.join(i["tmp"], "precious"), "keep"),
                                            os.link(os.path.join(i["tmp"], "precious"), os.path.join(i["wd"], ".d2c.lock"))),
     "{wd}/.d2c.lock: is a hard link to another file, which d2c_jax never creates; refusing to write it — remove it"),
    ("finished_run_given_a_tuning_flag", lambda i: (_finished(i), {"tune_weights": True})[1],
     "{wd}: holds a finished run with --tune_weights=False (not True); use --overwrite to replace it or choose "
     "another --workdir"),
    ("finished_run_given_another_template_date", lambda i: (_finished(i, chat_template=True,
                                                                     chat_template_date="2026-01-01"),
                                                           {"chat_template": True,
                                                            "chat_template_date": "2026-01-02"})[1],
     "{wd}: holds a finished run with --chat_template_date='2026-01-01' (not '2026-01-02'); use --overwrite to "
     "replace it or choose another --workdir"),
    ("suite_beside_explicit_paths", lambda i: {"suite": "nonesuch"},
     "--suite=nonesuch is not used: --base_model, --adapters_dir and --data_dir are all given; drop --suite (--suite= "
     "clears one set in a flagfile)"),
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


def _ours(inp):
    """A workdir of ours (its config.json) holding no run yet."""
    os.makedirs(inp["wd"])
    write(os.path.join(inp["wd"], "config.json"), _config(inp).to_json())


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
    if "{vocab}" in expected:
        fields["vocab"] = json.load(open(os.path.join(inp["base_model"], "config.json")))["vocab_size"]
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
    ("merge_different_architectures", lambda i: (
        edit_config(i, "task_0", auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "x"}),
        edit_config(i, "task_1", auto_mapping={"base_model_class": "Qwen2ForCausalLM", "parent_library": "x"})),
     dict(dirs=("task_0", "task_1")),
     "{adapters_dir}/task_1/" + CONFIG + ": auto_mapping.base_model_class='Qwen2ForCausalLM' differs from "
     "'LlamaForCausalLM' of {adapters_dir}/task_0/" + CONFIG + "; adapters of different architectures cannot be "
     "merged"),
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
    args = [a for a in args if a]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                          text=True, env=child_env(), timeout=300, cwd=cwd)
    return proc.returncode, proc.stderr.splitlines(), proc.stdout


def test_flags_that_would_have_no_effect_are_refused(pristine, tmp_path):
    """One CPU device in the child: --model_shards=2 cannot take effect; --budget chooses K."""
    common = [f"--{k}={v}" for k, v in pristine.items()] + [f"--workdir={tmp_path / 'wd'}", "--iterations=1"]
    assert _cli("search.py", *common, "--num_clusters=2", "--model_shards=2")[:2] == (
        1, ["error: --model_shards=2 must divide the 1 devices"])
    assert _cli("search.py", *common, "--budget=50", "--num_clusters=2")[:2] == (
        1, ["error: --num_clusters=2 has no effect with --budget/--budget_mb (the budget mode chooses K and the "
            "rank); drop one of them"])
    assert os.listdir(tmp_path) == []


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


# ----------------------------------------------------------------------------- Hub ids and --push_to_hub
# Each case against the stand-in Hub (fixtures_hub.FakeHub on 127.0.0.1) and a fresh Hub cache:
# one `error:` line naming the repo and what to do, exit 1, no workdir written.


@pytest.fixture(scope="module")
def stand_in_hub(pristine):
    from fixtures_hub import FakeHub

    with FakeHub() as fake:
        fake.add_dir("org/tiny", pristine["base_model"])
        fake.add_dir("org/ads", pristine["adapters_dir"])
        fake.add_dir("org/private", pristine["base_model"], private=True)
        fake.add_dir("org/gated", pristine["base_model"], gated=True)
        yield fake


@pytest.fixture
def hub_env(stand_in_hub, tmp_path, monkeypatch):
    """The stand-in as HF_ENDPOINT (no token, progress bars off), a fresh Hub cache under tmp_path."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    for key, value in stand_in_hub.env(tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's HF_HUB_OFFLINE=1, frozen at import
    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield stand_in_hub
    if not was_off:
        enable_progress_bars()


def _hub_ads(*specs):
    return {"adapters_dir": None, "adapters": specs}


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorded(inp, commit):
    """A workdir whose config.json recorded org/ads@main at `commit` (a run started earlier)."""
    os.makedirs(inp["wd"])
    with open(os.path.join(inp["wd"], "config.json"), "w") as f:
        json.dump({"strategy": "d2c", "workdir": inp["wd"], "num_clusters": 2, "hub_commits": {"org/ads@main": commit}}, f)
    return _hub_ads(*(f"org/ads/{n}" for n in NAMES))


LOGIN = "run `hf auth login` (the `huggingface-cli login` of older versions) or set HF_TOKEN"
HUB_CASES = [
    # (id, set-up (monkeypatch, inp) -> run settings, expected line after "error: ")
    ("hub_missing_repo", lambda mp, i: {"base_model": "org/nope"},
     "org/nope: is neither a local directory nor a repo on the Hub ({url}) that this machine may read: check the id, "
     "or, if it is private, " + LOGIN),
    ("hub_private_repo_without_token", lambda mp, i: {"base_model": "org/private"},
     "org/private: is neither a local directory nor a repo on the Hub ({url}) that this machine may read: check the "
     "id, or, if it is private, " + LOGIN),
    ("hub_gated_repo", lambda mp, i: {"base_model": "org/gated"},
     "org/gated: is a gated repo: accept its conditions at {url}/org/gated with your account, then " + LOGIN),
    ("hub_missing_revision", lambda mp, i: {"base_model": "org/tiny@v9"},
     "org/tiny@v9: the Hub has no revision 'v9' of org/tiny"),
    ("hub_missing_sub_folder", lambda mp, i: _hub_ads("org/ads/task_0", "org/ads/nope"),
     "org/ads/nope: no folder 'nope' in org/ads at commit {ads_commit12}"),
    ("hub_offline_not_cached", lambda mp, i: mp.setenv("HF_HUB_OFFLINE", "1") or {"base_model": "org/tiny"},
     "org/tiny: org/tiny at 'main' is not in the Hub cache {hf_cache} and HF_HUB_OFFLINE=1: run once online, or "
     "`hf download org/tiny --revision main`, first"),
    ("hub_unreachable", lambda mp, i: mp.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
     or {"base_model": "org/tiny"},
     "org/tiny: cannot reach the Hub at {endpoint} and org/tiny at 'main' is not in the Hub cache {hf_cache}: check "
     "the network (or HF_ENDPOINT), or download it elsewhere into that cache and set HF_HUB_OFFLINE=1"),
    ("hub_recorded_commit_gone", lambda mp, i: _recorded(i, "0" * 40),
     "org/ads/task_0: commit 000000000000, which this run started from, is no longer on the Hub; --overwrite starts "
     "the run again at the current revision"),
    ("hub_same_task_twice", lambda mp, i: _hub_ads("org/ads/task_0", "org/ads@main/task_0"),
     "--adapters names task 'task_0' twice (org/ads/task_0 and org/ads@main/task_0); name them apart with task=ID"),
    ("hub_bad_adapters_entry", lambda mp, i: _hub_ads("=org/ads/task_0"),
     "--adapters entry '=org/ads/task_0': expected ID_OR_DIR or task=ID_OR_DIR"),
    ("hub_adapters_and_adapters_dir", lambda mp, i: {"adapters": ("org/ads/task_0",)},
     "--adapters=org/ads/task_0: give --adapters_dir or --adapters, not both"),
    ("push_bad_repo_id", lambda mp, i: {"push_to_hub": "just-a-name"},
     "--push_to_hub=just-a-name: must be a Hub repo id org/name"),
    ("push_without_token", lambda mp, i: {"push_to_hub": "me/result"},
     "me/result: --push_to_hub needs a Hub token with write access: " + LOGIN),
]


@pytest.mark.parametrize("case_id, setup, expected", HUB_CASES, ids=[c[0] for c in HUB_CASES])
def test_hub_failure_is_one_line_exit_1_and_nothing_written(inp, hub_env, capsys, monkeypatch, case_id, setup,
                                                            expected):
    over = setup(monkeypatch, inp)
    before = _tree(inp["wd"]) if os.path.lexists(inp["wd"]) else None
    kwargs = {**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}, "workdir": inp["wd"], **SETTINGS,
              **over}
    rc, lines, _ = _run_in_process(kwargs, capsys)
    fields = {"url": hub_env.url, "endpoint": os.environ["HF_ENDPOINT"], "hf_cache": os.environ["HF_HUB_CACHE"],
              "ads_commit12": hub_env.repos["org/ads"].refs["main"][:12]}
    notes = [line for line in lines[:-1] if "recorded when this run started" in line]  # a resume's pin, said once
    assert (rc, lines[len(notes):]) == (1, ["error: " + _fill(expected, fields)])
    assert (_tree(inp["wd"]) if os.path.lexists(inp["wd"]) else None) == before


# gs:// inputs and work directories against gcp-storage-emulator (a real GCS JSON API on
# 127.0.0.1, started here), behind the proxy that enforces the generation preconditions it ignores.


@pytest.fixture(scope="module")
def gcs_url():
    pytest.importorskip("gcsfs")
    from fixtures_gcs import gcs_emulator, preconditions_enforced

    with gcs_emulator() as url, preconditions_enforced(url) as (proxy, _):
        yield proxy


def _unreachable_gcs(mp):
    import gcsfs.retry

    # Retries off: gcsfs retries a refused connection 6 times with backoff (~31 s of sleeps); the
    # first failure is the same error, reaching storage.local_dir the same way.
    mp.setattr(gcsfs.retry, "is_retriable", lambda e: False)
    mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    return {"data_dir": "gs://bkt/data"}


GCS_CASES = [
    ("gcs_missing_prefix", lambda mp: {"adapters_dir": "gs://bkt/nothing/here"},
     "gs://bkt/nothing/here: no such directory in the bucket (no objects under this prefix)"),
    ("gcs_unreachable", _unreachable_gcs,
     "gs://bkt/data: cannot reach the GCS endpoint {endpoint}: check the network (or STORAGE_EMULATOR_HOST)"),
]


@pytest.mark.parametrize("case_id, setup, expected", GCS_CASES, ids=[c[0] for c in GCS_CASES])
def test_gcs_failure_is_one_line_exit_1_and_nothing_written(inp, gcs_url, capsys, monkeypatch, case_id, setup,
                                                            expected):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    over = setup(monkeypatch)
    kwargs = {**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}, "workdir": inp["wd"], **SETTINGS,
              **over}
    rc, lines, _ = _run_in_process(kwargs, capsys)
    assert (rc, lines) == (1, ["error: " + _fill(expected, {"endpoint": os.environ["STORAGE_EMULATOR_HOST"]})])
    assert not os.path.lexists(inp["wd"])


def _gcs_objects(url):
    """{name: generation} of every object in the emulator's bucket at `url`."""
    from d2c_jax import storage

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)
        fs = storage.filesystem()
    return {k: v["generation"] for k, v in fs.find("bkt", detail=True).items()}


def _held_lock(mp):
    from d2c_jax import storage

    storage.filesystem().pipe_file("bkt/held/.d2c.lock", json.dumps(
        {"host": "other-host", "pid": 4242, "heartbeat": time.time()}).encode())
    return "gs://bkt/held"


def _not_ours(mp):
    from d2c_jax import storage

    storage.filesystem().pipe_file("bkt/mine/notes.txt", b"keep")
    return "gs://bkt/mine"


def _unreachable_workdir(mp):
    _unreachable_gcs(mp)
    return "gs://bkt/run"


GCS_WORKDIR_CASES = [
    ("gcs_workdir_without_a_path", lambda mp: "gs://bkt",
     r"gs://bkt: a gs:// work directory needs a bucket and a path in it: gs://BUCKET/PATH"),
    ("gcs_workdir_path_with_dot_dot", lambda mp: "gs://bkt/a/../../b",
     r"gs://bkt/a/\.\./\.\./b: a gs:// work directory path may not hold empty, '\.' or '\.\.' components"),
    ("gcs_workdir_bucket_missing", lambda mp: "gs://nobkt/run",
     r"gs://nobkt/run: no such bucket: gs://nobkt \(create it, e\.g\. `gcloud storage buckets create gs://nobkt`, or "
     r"check the name\)"),
    ("gcs_workdir_unreachable", _unreachable_workdir,
     r"gs://bkt/run: cannot reach the GCS endpoint {endpoint}: check the network \(or STORAGE_EMULATOR_HOST\)"),
    ("gcs_workdir_locked_by_another_run", _held_lock,
     r"gs://bkt/held: another run is using this --workdir \(process 4242 on other-host holds \.d2c\.lock, last "
     r"heartbeat \d+ s ago\); wait for it to end or choose another --workdir"),
    ("gcs_workdir_holds_a_users_objects", _not_ours,
     r"gs://bkt/mine: holds objects that are not a d2c_jax search run; choose a new path for --workdir \(nothing "
     r"there is touched\)"),
    ("gcs_workdir_inside_an_input", lambda mp: "gs://bkt/in/data/run",
     r"gs://bkt/in/data/run: --workdir is inside the input gs://bkt/in/data; it would be destroyed — choose another "
     r"--workdir"),
]


@pytest.mark.parametrize("case_id, setup, expected", GCS_WORKDIR_CASES, ids=[c[0] for c in GCS_WORKDIR_CASES])
def test_gcs_workdir_failure_is_one_line_exit_1_and_nothing_written(inp, gcs_url, capsys, monkeypatch, case_id,
                                                                    setup, expected):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    workdir = setup(monkeypatch)
    inputs = {k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}
    if case_id == "gcs_workdir_inside_an_input":
        inputs["data_dir"] = "gs://bkt/in/data"
    before = _gcs_objects(gcs_url)
    rc, lines, _ = _run_in_process({**inputs, "workdir": workdir, **SETTINGS}, capsys)
    assert rc == 1 and len(lines) == 1, lines
    assert re.fullmatch("error: " + expected.format(endpoint=re.escape(os.environ["STORAGE_EMULATOR_HOST"])),
                        lines[0]), lines[0]
    assert _gcs_objects(gcs_url) == before  # no object written, changed or removed


LOCAL_ONLY = ("{path}: {flag} must be a local path for {command} (of the outputs, only launch/search.py's --workdir "
              "may be gs://); copy with `gcloud storage cp -r` to or from local disk")


@pytest.mark.parametrize("script, flags, flag, command", [
    ("evaluate.py", ["--workdir=gs://bkt/run"], "--workdir", "launch/evaluate.py"),
    ("add.py", ["--workdir=gs://bkt/run", "--remove=task_0"], "--workdir", "launch/add.py"),
    ("merge.py", ["--adapters={a0},{a1}", "--output_dir=gs://bkt/out"], "--output_dir", "this command"),
], ids=["evaluate_workdir_in_a_bucket", "add_workdir_in_a_bucket", "merge_output_dir_in_a_bucket"])
def test_a_gs_path_where_a_command_works_on_local_paths_is_one_line(inp, script, flags, flag, command):
    argv = [f.format(a0=_adapter(inp, "task_0"), a1=_adapter(inp, "task_1")) for f in flags]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *argv], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    path = next(a.split("=", 1)[1] for a in argv if a.startswith(flag))
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (
        1, ["error: " + LOCAL_ONLY.format(path=path, flag=flag, command=command)]), proc.stderr


# ----------------------------------------------------------------------------- outputs that are not ours


def _marked(path, command="merge"):
    """A directory holding an earlier output of ours (its marker) and one file."""
    os.makedirs(path)
    write(os.path.join(path, ".d2c_output"), json.dumps({"written_by": "d2c_jax", "command": command}))
    write(os.path.join(path, CONFIG), "{}")
    return path


MERGE_OUTPUT_CASES = [
    # (id, the --output_dir made by the case, expected line after "error: ")
    ("output_is_an_input_adapter", lambda i: _adapter(i, "task_0"),
     "{out}: --output_dir is the input {out}; it would be destroyed — choose another --output_dir"),
    ("output_inside_an_input_adapter", lambda i: os.path.join(_adapter(i, "task_0"), "merged"),
     "{out}: --output_dir is inside the input {a0}; it would be destroyed — choose another --output_dir"),
    ("output_holds_an_input_adapter", lambda i: i["adapters_dir"],
     "{out}: --output_dir holds the input {a0}; it would be destroyed — choose another --output_dir"),
    ("output_is_a_users_directory", lambda i: (os.makedirs(os.path.join(i["tmp"], "mine")),
                                               write(os.path.join(i["tmp"], "mine", "notes.txt"), "keep"))
     and os.path.join(i["tmp"], "mine"),
     "{out}: --output_dir exists and is not a d2c_jax merged adapter (no .d2c_output); refusing to overwrite it — "
     "choose another --output_dir or remove it yourself"),
    ("output_is_a_file", lambda i: write(os.path.join(i["tmp"], "f"), "keep") or os.path.join(i["tmp"], "f"),
     "{out}: --output_dir exists and is not a directory; refusing to replace it — choose another --output_dir"),
    ("output_is_a_symlink", lambda i: os.symlink(i["data_dir"], os.path.join(i["tmp"], "link"))
     or os.path.join(i["tmp"], "link"),
     "{out}: --output_dir is a symbolic link; refusing to write through it — choose another --output_dir"),
    ("output_of_another_command", lambda i: _marked(os.path.join(i["tmp"], "bench"), "benchmark"),
     "{out}: --output_dir exists and is not a d2c_jax merged adapter (no .d2c_output); refusing to overwrite it — "
     "choose another --output_dir or remove it yourself"),
    ("our_output_without_overwrite", lambda i: _marked(os.path.join(i["tmp"], "merged_out")),
     "{out}: --output_dir holds an earlier merged adapter; pass --overwrite to replace it or choose another "
     "--output_dir"),
]


@pytest.mark.parametrize("case_id, make, expected", MERGE_OUTPUT_CASES, ids=[c[0] for c in MERGE_OUTPUT_CASES])
def test_merge_refuses_an_output_that_is_not_its_own(inp, case_id, make, expected):
    out = make(inp)
    before = _tree(inp["tmp"])
    rc, err, stdout = _cli("merge.py", f"--adapters={_adapter(inp, 'task_0')},{_adapter(inp, 'task_1')}",
                           f"--output_dir={out}", "--overwrite" if case_id == "output_of_another_command" else "")
    assert (rc, err, stdout) == (1, ["error: " + _fill(expected, {"out": out, "a0": _adapter(inp, "task_0")})], "")
    assert _tree(inp["tmp"]) == before  # nothing written or removed anywhere


def test_merge_overwrite_replaces_its_own_output_and_removes_dead_temps(inp):
    import fcntl

    out = _marked(os.path.join(inp["tmp"], "merged_out"))
    dead = os.path.join(inp["tmp"], ".merged_out.tmp-dead")  # a merge killed mid-write left this
    os.makedirs(os.path.join(dead, "sub"))
    live = os.path.join(inp["tmp"], ".merged_out.tmp-live")  # a merge writing right now holds this
    os.makedirs(live)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        rc, err, stdout = _cli("merge.py", f"--adapters={_adapter(inp, 'task_0')},{_adapter(inp, 'task_1')}",
                               f"--output_dir={out}", "--overwrite")
    finally:
        os.close(fd)
    assert (rc, err, stdout) == (0, [], f"wrote {out}\n")
    assert sorted(os.listdir(out)) == [".d2c_output", CONFIG, WEIGHTS]
    assert sorted(n for n in os.listdir(inp["tmp"]) if n.startswith(".merged_out")) == [".merged_out.tmp-live"]


def test_evaluate_refuses_an_output_that_is_an_input_or_a_users_file(inp):
    data_file = os.path.join(inp["data_dir"], "task_0.jsonl")
    users = os.path.join(inp["tmp"], "notes.json")
    write(users, '{"mine": 1}')
    before = _tree(inp["tmp"])
    common = (f"--base_model={inp['base_model']}", f"--adapters_dir={inp['adapters_dir']}",
              f"--data_dir={inp['data_dir']}")
    assert _cli("evaluate.py", *common, f"--output={data_file}")[:2] == (
        1, [f"error: {data_file}: --output is inside the input {inp['data_dir']}; it would be destroyed — choose "
            "another --output"])
    assert _cli("evaluate.py", *common, f"--output={users}")[:2] == (
        1, [f"error: {users}: --output exists and is not a d2c_jax evaluation (JSON with tasks and summary); "
            "refusing to overwrite it — choose another --output or remove it yourself"])
    assert _tree(inp["tmp"]) == before


def test_report_and_benchmark_refuse_outputs_that_are_not_theirs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("my own notes")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "notes.txt").write_text("keep")
    before = _tree(str(tmp_path))
    assert _cli("report.py", f"--suite={tmp_path / 'nosuite'}", f"--output_dir={docs}")[:2] == (
        1, [f"error: {docs}/results.md: --output_dir exists and is not a d2c_jax report file; refusing to overwrite "
            "it — choose another --output_dir or remove it yourself"])
    assert _cli("benchmark.py", "--tiny", f"--out_dir={bench}", f"--fixture_dir={tmp_path / 'fx'}")[:2] == (
        1, [f"error: {bench}: --out_dir exists and is not a d2c_jax benchmark output directory (no .d2c_output); "
            "refusing to overwrite it — choose another --out_dir or remove it yourself"])
    assert _tree(str(tmp_path)) == before


# ----------------------------------------------------------------------------- prompts that change with the day


def test_a_resume_on_another_day_sees_the_prompts_of_the_first_day(inp, capsys, monkeypatch):
    """Llama 3.2's chat template writes "Today Date": the date is pinned at the run's start (kept in
    config.json), so a run stopped on one day and resumed on the next ends exactly like an
    uninterrupted run of the first day; a resume with another date is refused, not mixed."""
    from fixtures_chat_templates import LLAMA_3_2

    from d2c_jax import data
    from d2c_jax.signals import PreemptionFlag

    write(os.path.join(inp["base_model"], "chat_template.jinja"), LLAMA_3_2)
    kwargs = {**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}, "workdir": inp["wd"],
              **SETTINGS, "chat_template": True, "max_seq_len": 512}
    monkeypatch.setattr(data, "today", lambda: "2026-01-01")
    with monkeypatch.context() as m:
        m.setattr(PreemptionFlag, "__call__", lambda self: True)  # stop after the first iteration
        rc, _, out = _run_in_process(kwargs, capsys)
    assert rc == 0 and "checkpoint of iteration 1/2 saved" in out

    monkeypatch.setattr(data, "today", lambda: "2026-01-02")  # the next day
    before = _tree(inp["wd"])
    rc, lines, _ = _run_in_process({**kwargs, "chat_template_date": "2026-01-02"}, capsys)
    assert (rc, lines) == (1, [f"error: the checkpoint in {inp['wd']}/checkpoints belongs to other inputs: the "
                               "prompts of task task_0, as the model sees them, changed (the chat template or a "
                               "value it reads, such as --chat_template_date); use --overwrite or another --workdir"])
    assert _tree(inp["wd"]) == before

    rc, lines, _ = _run_in_process(kwargs, capsys)  # resumed on the next day, no date given
    assert (rc, lines) == (0, [])
    assert json.load(open(os.path.join(inp["wd"], "config.json")))["chat_template_date"] == "2026-01-01"
    resumed = json.load(open(os.path.join(inp["wd"], "partition.json")))

    other = os.path.join(inp["tmp"], "wd_uninterrupted")  # one run on the first day
    rc, lines, _ = _run_in_process({**kwargs, "workdir": other, "chat_template_date": "2026-01-01"}, capsys)
    assert (rc, lines) == (0, [])
    reference = json.load(open(os.path.join(other, "partition.json")))
    assert resumed["clusters"] == reference["clusters"]
    assert resumed["task_losses"] == reference["task_losses"]  # the same prompts: bit-identical losses
    assert resumed["chat_template_date"] == reference["chat_template_date"] == "2026-01-01"


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_run_resumes(inp, capsys, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    kwargs = {**{k: inp[k] for k in ("base_model", "adapters_dir", "data_dir")}, "workdir": inp["wd"], **SETTINGS}
    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", full)
        rc, lines, _ = _run_in_process(kwargs, capsys)
    assert (rc, lines) == (1, [f"error: {inp['wd']}/checkpoints: cannot save the checkpoint of iteration 1 (OSError: "
                               "[Errno 28] No space left on device); free disk space or make the directory writable, "
                               "then re-run the same command to resume from the last saved checkpoint"])
    rc, lines, _ = _run_in_process(kwargs, capsys)  # space freed: the same command
    assert (rc, lines) == (0, [])
    assert os.path.isfile(os.path.join(inp["wd"], "partition.json"))


def test_the_lock_file_is_never_opened_through_a_link(tmp_path):
    """Even when a link appears after the workdir was checked (O_NOFOLLOW at the open)."""
    precious = tmp_path / "precious"
    precious.write_text("keep")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(precious, wd / ".d2c.lock")
    with pytest.raises(UserError) as e:
        WorkdirLock(wd).acquire()
    assert str(e.value) == (f"{wd}/.d2c.lock: is a symbolic link, which d2c_jax never creates; refusing to open it "
                            "— remove it (the file it points to is not touched)")
    assert precious.read_text() == "keep" and os.path.islink(wd / ".d2c.lock")


def test_an_os_error_of_a_save_names_the_path_and_what_to_do(tmp_path, monkeypatch, capsys):
    import errno

    from d2c_jax import atomic_io

    (tmp_path / "file").write_text("keep")
    out = tmp_path / "file" / "eval.json"  # a path through a file
    assert run_cli(lambda: atomic_io.write_json_atomic(str(out), {})) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out}: cannot write: [Errno 17] File exists: '{tmp_path / 'file'}' — a component of the path is a "
        "file; remove it or choose another path"]

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "replace", full)
    out = tmp_path / "merged"
    assert run_cli(lambda: atomic_io.write_dir_atomic(str(out), lambda tmp: None, what="adapter")) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out}: cannot write the adapter: [Errno 28] No space left on device — free some disk space, then "
        "re-run the same command"]
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no temp left
