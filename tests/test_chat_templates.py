"""--chat_template with the real chat templates of Llama 3.2, Qwen 2.5 and StableLM 2 (written in
fixtures_chat_templates.py from their tokenizer_config.json): our token arrays equal transformers'
apply_chat_template + the response ids + EOS token for token, BOS appears once, and a too-long
prompt is cut from the left keeping the assistant header and the whole response."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from d2c_jax import data, hf_io  # noqa: E402
from fixtures_chat_templates import MODELS, make_chat_tokenizer  # noqa: E402

EXAMPLES = [
    {"prompt": "translate the sentence into french", "response": "the quick brown fox"},
    {"prompt": "  question: who wrote the book?\n", "response": " the author of the story."},
    {"prompt": "one two three four five six seven eight nine ten", "response": "eleven"},
]


def _expected_text(name: str, prompt: str) -> str:
    """The rendered user turn + generation prompt, written out from each model's documented format."""
    if name == "llama3.2":
        today = datetime.datetime.now().strftime("%d %b %Y")
        return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if name == "qwen2.5":
        return ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    if name == "stablelm2-chat":
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return f"<|user|>\n{prompt}<|endoftext|>\n<|assistant|>\n"


@pytest.fixture(params=sorted(MODELS))
def case(request, tmp_path):
    name = request.param
    make_chat_tokenizer(tmp_path / "model", name)
    tok = hf_io.load_tokenizer(str(tmp_path / "model"))  # the loading path of every launch script
    ddir = tmp_path / "data"
    ddir.mkdir()
    (ddir / "t.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return name, tok, ddir


def _reference(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """HF: the template rendered, then tokenised without adding specials (what apply_chat_template
    does), and the response's ids + EOS."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, r


def test_rendered_prompts_are_the_models_formats(case):
    name, tok, _ = case
    for e in EXAMPLES:
        text = tok.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                       add_generation_prompt=True, tokenize=False)
        assert text == _expected_text(name, e["prompt"])


def test_token_arrays_equal_hf_chat_template_token_for_token(case):
    name, tok, ddir = case
    td = data.load_task_data(ddir, ["t"], tok, max_seq_len=256, chat_template=True)
    assert td.num_truncated[0] == 0
    for i, e in enumerate(EXAMPLES):
        p, r = _reference(tok, e["prompt"], e["response"])
        direct = data._as_ids(tok.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                                      add_generation_prompt=True, tokenize=True))
        assert direct == p
        assert list(td.prompt_ids[0][i]) == p
        ids = p + r
        m = len(ids) - 1
        np.testing.assert_array_equal(td.tokens_tns[0, i, :m], ids[:-1])
        np.testing.assert_array_equal(td.targets_tns[0, i, :m], ids[1:])
        assert td.attn_tns[0, i, :m].all() and not td.attn_tns[0, i, m:].any()
        # Loss only on the response tokens and the EOS that ends them.
        np.testing.assert_array_equal(np.flatnonzero(td.weights_tns[0, i]), np.arange(len(p) - 1, m))
        np.testing.assert_array_equal(td.targets_tns[0, i, len(p) - 1:m], r)
        assert r[-1] == tok.convert_tokens_to_ids(MODELS[name][3])


def test_bos_appears_once(case):
    """Llama 3's template writes <|begin_of_text|> and its tokenizer adds one too: tokenising the
    rendered text as ordinary text would start with two; the pipeline must have exactly one."""
    name, tok, ddir = case
    td = data.load_task_data(ddir, ["t"], tok, max_seq_len=256, chat_template=True)
    bos = MODELS[name][2]
    for i, e in enumerate(EXAMPLES):
        ids = list(td.prompt_ids[0][i])
        if name == "llama3.2":
            bos_id = tok.convert_tokens_to_ids(bos)
            assert ids[0] == bos_id and ids.count(bos_id) == 1
            text = tok.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                           add_generation_prompt=True, tokenize=False)
            naive = tok(text)["input_ids"]  # the mistake: specials added on top of the template's
            assert naive[:2] == [bos_id, bos_id] and naive[1:] == ids
        elif bos is not None:  # StableLM 2 chat: bos = eos = <|endoftext|>, never in a prompt
            assert tok.convert_tokens_to_ids(bos) not in ids


def test_long_prompt_is_cut_from_the_left_keeping_the_assistant_header(case):
    name, tok, ddir = case
    refs = [_reference(tok, e["prompt"], e["response"]) for e in EXAMPLES]
    max_len = max(len(r) for _, r in refs) + 6  # every response fits, with 6 or more prompt tokens
    p, r = refs[2]
    keep = max_len - len(r)  # prompt tokens that fit
    assert keep < len(p)
    td = data.load_task_data(ddir, ["t"], tok, max_seq_len=max_len, chat_template=True)
    i = 2
    assert td.tokens_tns.shape[-1] <= max_len
    assert list(td.prompt_ids[0][i]) == p[-keep:]  # the end of the prompt: the generation header
    ids = p[-keep:] + r
    np.testing.assert_array_equal(td.tokens_tns[0, i, :len(ids) - 1], ids[:-1])
    np.testing.assert_array_equal(td.targets_tns[0, i, keep - 1:len(ids) - 1], r)
    assert td.weights_tns[0, i].sum() == len(r)
    assert td.num_truncated[0] == sum(len(p) + len(r) > max_len for p, r in refs)
