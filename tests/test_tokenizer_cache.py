"""hf_io.load_tokenizer remembers AutoTokenizer's class pick (tokenizer_cache): the tokenizer it
returns, from a cold cache and from a recorded entry, is transformers' AutoTokenizer's, of the same
class and behaving token for token the same (encodings, chat template renderings, special ids);
a recorded entry spares the next process torch; a changed file or a foreign entry never loads a
stale or arbitrary class."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from d2c_jax import hf_io, tokenizer_cache  # noqa: E402
from fixtures_chat_templates import make_chat_tokenizer  # noqa: E402

TEXTS = ["the quick brown fox", "  question: who wrote the book?\n", "<|im_start|>user one two"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]

# (chat fixture, tokenizer_class as a model's tokenizer_config.json declares it, config model_type,
# the class AutoTokenizer picks): Llama 3.2 and Qwen 2.5 as published on the Hub, and a declared
# LlamaTokenizerFast over a ByteLevel tokenizer.json (AutoTokenizer's own override).
CASES = [("llama3.2", "PreTrainedTokenizerFast", "llama", "TokenizersBackend"),
         ("qwen2.5", "Qwen2Tokenizer", "qwen2", "Qwen2Tokenizer"),
         ("stablelm2-chat", "LlamaTokenizerFast", "llama", "TokenizersBackend")]


def _model_dir(root, name, declared, model_type):
    d = root / name
    make_chat_tokenizer(d, name)
    path = d / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "tokenizer_class": declared}))
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(d)


def _behaviour(tok):
    """Everything the engine reads from a tokenizer, and the backend's whole definition."""
    return {"class": type(tok).__name__, "backend": tok.backend_tokenizer.to_str(),
            "ids": [tok(t)["input_ids"] for t in TEXTS],
            "no_specials": [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
            "chat": tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
            "specials": (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id),
            "special_map": tok.special_tokens_map, "len": len(tok), "padding_side": tok.padding_side}


@pytest.mark.parametrize("name,declared,model_type,picked", CASES)
def test_loaded_tokenizer_is_autotokenizers_cold_and_from_the_recorded_pick(tmp_path, monkeypatch, name,
                                                                             declared, model_type, picked):
    from transformers import AutoTokenizer

    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    d = _model_dir(tmp_path, name, declared, model_type)
    want = _behaviour(AutoTokenizer.from_pretrained(d, local_files_only=True))
    assert want["class"] == picked
    cold = hf_io.load_tokenizer(d)
    entry = tmp_path / "cache" / tokenizer_cache.SUBDIR / (tokenizer_cache.choice_key(d) + ".json")
    assert json.loads(entry.read_text())["name"] == picked
    warm = hf_io.load_tokenizer(d)  # from the entry
    assert _behaviour(cold) == want
    assert _behaviour(warm) == want


def test_a_recorded_pick_spares_the_next_process_torch(tmp_path):
    d = _model_dir(tmp_path, "qwen2.5", "Qwen2Tokenizer", "qwen2")
    env = {**os.environ, "D2C_CACHE_DIR": str(tmp_path / "cache")}
    code = ("import sys; from d2c_jax import hf_io; t = hf_io.load_tokenizer(sys.argv[1]); "
            "print(type(t).__name__, 'torch' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, env=env, timeout=120)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    first, second = (r.stdout.split()[-2:] for r in runs)
    assert first[0] == second[0] == "Qwen2Tokenizer"
    assert second[1] == "False"  # the class came from the entry, without AutoConfig's torch import


def test_a_changed_file_or_a_foreign_entry_goes_back_to_autotokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    d = _model_dir(tmp_path, "qwen2.5", "Qwen2Tokenizer", "qwen2")
    assert type(hf_io.load_tokenizer(d)).__name__ == "Qwen2Tokenizer"
    # The model now declares another class: a new key, AutoTokenizer's new pick.
    conf = json.loads((tmp_path / "qwen2.5" / "tokenizer_config.json").read_text())
    (tmp_path / "qwen2.5" / "tokenizer_config.json").write_text(
        json.dumps({**conf, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "qwen2.5" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert type(hf_io.load_tokenizer(d)).__name__ == "TokenizersBackend"
    # An entry naming something outside transformers' tokenizers is never imported or called.
    entry = tmp_path / "cache" / tokenizer_cache.SUBDIR / (tokenizer_cache.choice_key(d) + ".json")
    for bad in ({"module": "subprocess", "name": "Popen"}, {"module": "transformers.utils", "name": "logging"},
                {"module": "transformers.nope", "name": "X"}, "not json"):
        entry.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert type(hf_io.load_tokenizer(d)).__name__ == "TokenizersBackend"
        assert json.loads(entry.read_text())["name"] == "TokenizersBackend"  # recorded again


def test_the_same_files_elsewhere_load_from_the_recorded_pick_unless_only_the_path_names_the_model(
        tmp_path, monkeypatch):
    """With a model_type in config.json the path plays no part in AutoTokenizer's pick, so a copy
    of the model elsewhere reuses the entry (and behaves as AutoTokenizer's tokenizer there does);
    without one, AutoConfig matches the path against model names, so the path is part of the key."""
    import shutil

    from transformers import AutoTokenizer

    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    d = _model_dir(tmp_path, "qwen2.5", "Qwen2Tokenizer", "qwen2")
    hf_io.load_tokenizer(d)  # records the pick
    copy = str(tmp_path / "elsewhere" / "model")
    shutil.copytree(d, copy)
    want = _behaviour(AutoTokenizer.from_pretrained(copy, local_files_only=True))
    assert tokenizer_cache.choice_key(copy) == tokenizer_cache.choice_key(d)

    def no_auto(*args, **kwargs):
        raise AssertionError("AutoTokenizer called: the recorded pick was not used")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_auto)
    tok = hf_io.load_tokenizer(copy)
    assert _behaviour(tok) == want and tok.name_or_path == copy
    for path in (d, copy):  # no model_type: the path names the model
        (tmp_path / path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    assert tokenizer_cache.choice_key(copy) != tokenizer_cache.choice_key(d)

