"""data.py: HF-exact tokenisation, response-only weights, padding, truncation and input errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from d2c_jax import data
from d2c_jax.errors import UserError
from fixtures_models import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


EXAMPLES = {
    "alpha": [
        {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"},
        {"prompt": "one two three", "response": "four"},
        {"prompt": "hello world", "response": "this is a test"},
    ],
    "beta": [{"prompt": "question: who wrote the book?", "response": "the author"}],
}


@pytest.fixture()
def ddir(tmp_path):
    for task, rows in EXAMPLES.items():
        _write(tmp_path / f"{task}.jsonl", rows)
    return tmp_path


def _expected(tok, prompt, response, chat):
    if chat:
        p = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return list(p), list(r)


@pytest.mark.parametrize("chat", [False, True])
def test_arrays_match_hf_tokenisation_with_response_only_weights(tok, ddir, chat):
    td = data.load_task_data(ddir, ["alpha", "beta"], tok, examples_per_task=10,
                             max_seq_len=256, chat_template=chat)
    assert td.tokens_tns.shape[:2] == (2, 3) and td.tokens_tns.shape[2] % 16 == 0
    assert td.num_examples.tolist() == [3, 1]
    for ti, task in enumerate(["alpha", "beta"]):
        for ei, ex in enumerate(EXAMPLES[task]):
            p, r = _expected(tok, ex["prompt"], ex["response"], chat)
            ids = p + r
            m = len(ids) - 1
            np.testing.assert_array_equal(td.tokens_tns[ti, ei, :m], ids[:-1])
            np.testing.assert_array_equal(td.targets_tns[ti, ei, :m], ids[1:])
            assert td.attn_tns[ti, ei].sum() == m
            w = td.weights_tns[ti, ei]
            # HF labels: -100 on the prompt; the shift drops label[0]. Weighted targets == response.
            assert w.sum() == len(r)
            np.testing.assert_array_equal(td.targets_tns[ti, ei][w > 0], r)
    # beta's padding rows: no weight, one attended token so no attention row is fully masked.
    assert td.weights_tns[1, 1:].sum() == 0 and td.attn_tns[1, 1:].sum(-1).tolist() == [1, 1]
    if chat:
        assert td.tokens_tns[0, 0, 0] == tok.bos_token_id


def test_first_examples_per_task_lines_are_used(tok, ddir):
    td = data.load_task_data(ddir, ["alpha", "beta"], tok, examples_per_task=2, max_seq_len=256)
    assert td.num_examples.tolist() == [2, 1]
    assert td.prompts[0] == ("the quick brown fox", "one two three")
    assert td.tokens_tns.shape[1] == 2


def test_long_prompt_is_cut_from_the_left_with_one_warning(tok, tmp_path, caplog):
    long_prompt = " ".join(["the quick brown fox"] * 20)
    _write(tmp_path / "t.jsonl", [{"prompt": long_prompt, "response": "the lazy dog"}] * 2
           + [{"prompt": "hi", "response": "ok"}])
    p, r = _expected(tok, long_prompt, "the lazy dog", False)
    assert len(p) + len(r) > 24
    with caplog.at_level(logging.WARNING):
        td = data.load_task_data(tmp_path, ["t"], tok, max_seq_len=24)
    warnings = [rec for rec in caplog.records if "truncated" in rec.getMessage()]
    assert len(warnings) == 1 and "2 of 3" in warnings[0].getMessage()
    assert td.num_truncated.tolist() == [2] and td.tokens_tns.shape[2] <= 24
    ids = (p + r)[-24:]
    np.testing.assert_array_equal(td.tokens_tns[0, 0, :23], ids[:-1])
    np.testing.assert_array_equal(td.targets_tns[0, 0][td.weights_tns[0, 0] > 0], r)


def test_response_that_cannot_fit_is_an_error(tok, tmp_path):
    _write(tmp_path / "t.jsonl", [{"prompt": "a", "response": " ".join(["hello world"] * 30)}])
    with pytest.raises(UserError, match=r"t\.jsonl.*line 1: the response alone"):
        data.load_task_data(tmp_path, ["t"], tok, max_seq_len=16)


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"prompt": "a", "response": "b"}, "{not json"], r"line 2: malformed JSON"),
        ([{"response": "b"}], r"line 1: missing \"prompt\""),
        ([{"prompt": "a", "response": 3}], r"line 1: \"response\" must be a string"),
        ([{"prompt": "a", "response": "  "}], r"line 1: empty response"),
        (["[1, 2]"], r"line 1: expected an object"),
        ([], r"no examples"),
    ],
)
def test_bad_lines_name_file_and_line(tok, tmp_path, lines, message):
    _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(UserError, match=message) as e:
        data.load_task_data(tmp_path, ["t"], tok)
    assert e.value.path.endswith("t.jsonl")


def test_missing_dir_and_task_mismatches_are_errors(tok, ddir, tmp_path):
    with pytest.raises(UserError, match="data directory not found"):
        data.load_task_data(tmp_path / "nope", ["alpha"], tok)
    with pytest.raises(UserError, match=r"no search examples for adapter task\(s\) gamma"):
        data.load_task_data(ddir, ["alpha", "beta", "gamma"], tok)
    with pytest.raises(UserError, match=r"data for task\(s\) with no adapter: beta"):
        data.load_task_data(ddir, ["alpha"], tok)


def test_eval_split_prefers_eval_file_and_falls_back_per_task(tok, ddir):
    _write(ddir / "alpha.eval.jsonl", [{"prompt": "held out", "response": "yes"}])
    td = data.load_task_data(ddir, ["alpha", "beta"], tok, split="eval")
    assert td.files[0].endswith("alpha.eval.jsonl") and td.files[1].endswith("beta.jsonl")
    assert td.prompts == (("held out",), ("question: who wrote the book?",))
    td = data.load_task_data(ddir, ["alpha", "beta"], tok, split="search")
    assert td.prompts[0][0] == "the quick brown fox"
    _write(ddir / "gamma.eval.jsonl", [{"prompt": "only held out", "response": "fine"}])
    td = data.load_task_data(ddir, ["alpha", "beta", "gamma"], tok, split="eval")
    assert td.prompts[2] == ("only held out",)
    with pytest.raises(UserError, match=r"no search examples for adapter task\(s\) gamma"):
        data.load_task_data(ddir, ["alpha", "beta", "gamma"], tok, split="search")


def test_tasks_json_metrics_and_tags_are_validated(ddir):
    (ddir / "tasks.json").write_text(json.dumps(
        {"alpha": {"metric": "rouge_l", "tags": {"family": "qa", "language": "en"}}}))
    meta = data.load_task_meta(ddir, ["alpha", "beta"])
    assert meta["alpha"].metric == "rouge_l" and meta["alpha"].tags["language"] == "en"
    assert meta["beta"] == data.TaskMeta()
    (ddir / "tasks.json").write_text(json.dumps({"alpha": {"metric": "bleu"}}))
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        data.load_task_meta(ddir, ["alpha", "beta"])
    (ddir / "tasks.json").write_text("{")
    with pytest.raises(UserError, match="tasks.json"):
        data.load_task_meta(ddir, ["alpha", "beta"])


def test_ids_are_extracted_from_any_tokenizer_return_type(tok):
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = data._as_ids(enc)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert data._as_ids({"input_ids": [[1, 2]]}) == [1, 2]
    assert data._as_ids(np.array([3, 4])) == [3, 4]
