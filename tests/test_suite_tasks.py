"""The suite's world, task families, example splits and word-level tokenizer (no training)."""

from __future__ import annotations

import pytest

from d2c_jax.errors import UserError
from d2c_jax.suite import build, tasks
from d2c_jax.suite import tokenizer as tok_lib


@pytest.fixture(scope="module")
def world():
    return tasks.make_world(seed=3, num_languages=4, num_concepts=16)


def test_languages_are_distinct_vocabularies_over_the_same_concepts(world):
    all_words = [w for lex in world.words for w in lex]
    assert len(all_words) == len(set(all_words)) == 4 * 16
    assert not set(all_words) & set(tasks.reserved_words(tasks.MAX_LANGUAGES))
    # Language j does not depend on how many languages the suite has.
    bigger = tasks.make_world(seed=3, num_languages=6, num_concepts=16)
    assert bigger.words[:4] == world.words
    assert tasks.make_world(seed=4, num_languages=4, num_concepts=16).words != world.words


def test_shift_cycle_visits_every_concept(world):
    c, seen = 0, set()
    for _ in range(world.num_concepts):
        seen.add(c)
        c = int(world.next_concept[c])
    assert c == 0 and len(seen) == world.num_concepts


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_family_transforms_concepts_and_renders_in_the_prompt_language(world, family):
    exs = tasks.task_examples(world, family, 2, "eval", 20, min_words=3, max_words=6)
    lex = world.words[2]
    for e in exs:
        head, body = e["prompt"].split(f" {tasks.PROMPT_SEP} ")
        assert head == f"{family} l2" and body.endswith(f" {tasks.PROMPT_END}")
        c_in = [lex.index(w) for w in body[: -len(tasks.PROMPT_END) - 1].split()]
        c_out = [lex.index(w) for w in e["response"].split()]
        expected = {
            "reverse": c_in[::-1], "sort": sorted(c_in), "copy": c_in,
            "shift": [int(world.next_concept[x]) for x in c_in],
            "dedup": list(dict.fromkeys(c_in)), "rotate": c_in[1:] + c_in[:1],
            "skip": c_in[::2],
            "swap": [c_in[i ^ 1] if (i ^ 1) < len(c_in) else c_in[i] for i in range(len(c_in))],
        }[family]
        assert c_out == expected
        if family == "dedup":
            assert len(set(c_in)) < len(c_in)


def test_splits_are_disjoint_and_deterministic(world):
    sizes = {"eval": 25, "search": 10, "train": 200}
    a = tasks.task_splits(world, "sort", 1, sizes, min_words=3, max_words=6)
    b = tasks.task_splits(world, "sort", 1, sizes, min_words=3, max_words=6)
    assert a == b
    prompts = [{e["prompt"] for e in a[s]} for s in ("eval", "search", "train")]
    assert [len(p) for p in prompts] == [25, 10, 200]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_vocab_tokenises_like_the_saved_tokenizer_and_chat_template(tmp_path, world):
    from transformers import AutoTokenizer

    vocab = tok_lib.make_vocab(tasks.reserved_words(4) + [w for lex in world.words for w in lex])
    tok_lib.save_tokenizer(vocab, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (vocab.bos_id, vocab.eos_id, vocab.pad_id)
    assert len(tok) == vocab.size
    for fam in ("reverse", "dedup"):
        for e in tasks.task_examples(world, fam, 3, "search", 5, min_words=3, max_words=6):
            assert tok(e["prompt"])["input_ids"] == vocab.prompt_ids(e["prompt"])
            resp = tok(e["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert resp == vocab.response_ids(e["response"])
            chat = tok.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                           add_generation_prompt=True, tokenize=True)
            chat_ids = chat["input_ids"] if hasattr(chat, "keys") else chat
            assert list(chat_ids) == vocab.prompt_ids(e["prompt"])
            assert tok.decode(resp, skip_special_tokens=True) == e["response"]


@pytest.mark.parametrize("bad", [dict(families=9), dict(languages=0), dict(families=1, languages=1),
                                 dict(max_words=20), dict(num_heads=3), dict(nonsense=1)])
def test_bad_settings_are_user_errors(bad):
    kw = {"families": 2, "languages": 2, **bad}
    with pytest.raises(UserError):
        build.make_settings(**kw)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a d2c_jax suite"):
        build.ensure_suite(tmp_path, families=2, languages=2)
    assert (tmp_path / "notes.txt").read_text() == "mine"
