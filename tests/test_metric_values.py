"""Generation metric VALUES: exact_match, squad_f1, rouge_l and chrf equal rouge-score, sacrebleu
and the official SQuAD v1.1 definitions on pairs of unequal length and reordered tokens in Latin,
Cyrillic and CJK script, both as functions and as reported by launch/evaluate.py and by the
report's evaluation (experiments/report), where the predictions are greedy generations computed here
independently with transformers + PEFT and scored against the references of the eval files.

Every comparison is set up so that the likely mistakes give other numbers, and the test checks
that they do: ROUGE-1 instead of ROUGE-L (reordered tokens), recall or precision instead of F
(unequal lengths), scoring against the prompts instead of the references.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from d2c_jax import metrics
from tolerances import METRIC_ABS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# References written from the published definitions.


def squad_normalize(s: str, punctuation=frozenset(string.punctuation)) -> str:
    """SQuAD v1.1 evaluate-v1.1.py normalize_answer: lower, drop punctuation, drop a/an/the,
    collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


# MLQA's multilingual extension of the same script also drops every Unicode punctuation character.
UNICODE_PUNCT = frozenset(string.punctuation) | {
    chr(i) for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P")}


def squad_f1_ref(pred: str, ref: str, punctuation=frozenset(string.punctuation)) -> float:
    """evaluate-v1.1.py f1_score (x100)."""
    p = squad_normalize(pred, punctuation).split()
    g = squad_normalize(ref, punctuation).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 100.0 * 2 * precision * recall / (precision + recall)


def exact_match_ref(pred: str, ref: str, punctuation=frozenset(string.punctuation)) -> float:
    return 100.0 * (squad_normalize(pred, punctuation) == squad_normalize(ref, punctuation))


class ScriptTokenizer:
    """For rouge-score on any script: lower-cased words, each CJK character a word of its own
    (rouge-score's default tokenizer keeps only [a-z0-9] and would score such text as empty)."""

    def tokenize(self, text: str) -> list[str]:
        out = []
        for word in text.lower().split():
            word = "".join(ch for ch in word if ch.isalnum())
            cjk = [ch for ch in word if "CJK" in unicodedata.name(ch, "") or "HANGUL" in unicodedata.name(ch, "")
                   or "HIRAGANA" in unicodedata.name(ch, "") or "KATAKANA" in unicodedata.name(ch, "")]
            if cjk:
                out.extend(word)  # CJK text: one token per character
            elif word:
                out.append(word)
        return out


def rouge_ref(kind: str, pred: str, ref: str, field: str = "fmeasure", latin_default: bool = False) -> float:
    scorer = (rouge_scorer.RougeScorer([kind]) if latin_default
              else rouge_scorer.RougeScorer([kind], tokenizer=ScriptTokenizer()))
    return 100.0 * getattr(scorer.score(ref, pred)[kind], field)


def lcs_f(pred: str, ref: str) -> float:
    """ROUGE-L F1 from its definition (Lin, 2004): LCS of the token sequences, P = LCS/|pred|,
    R = LCS/|ref|, F = 2PR/(P+R)."""
    x, y = ScriptTokenizer().tokenize(pred), ScriptTokenizer().tokenize(ref)
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 100.0 * 2 * p * r / (p + r)


# Unequal lengths, reordered tokens, Latin / Cyrillic / CJK, ASCII punctuation and casing.
PAIRS = [
    ("the cat sat on the mat today", "a mat the cat sat on"),
    ("Paris is the capital of France.", "france capital: paris"),
    ("quick brown fox", "the quick fox jumps over the lazy brown dog"),
    ("кошка сидит на ковре", "на ковре сидит большая кошка"),
    ("Москва, столица России", "столица россии — москва"),
    ("猫在垫子上", "垫子上有一只猫"),
    ("東京は日本の首都です", "日本の首都は東京"),
]


def test_pairs_tell_the_likely_mistakes_apart():
    """ROUGE-1 != ROUGE-L and recall != F on these pairs (else the value tests prove nothing)."""
    for pred, ref in PAIRS:
        lf = rouge_ref("rougeL", pred, ref)
        assert abs(rouge_ref("rouge1", pred, ref) - lf) > 1 or abs(rouge_ref("rougeL", pred, ref, "recall") - lf) > 1
    assert sum(abs(rouge_ref("rouge1", p, r) - rouge_ref("rougeL", p, r)) > 1 for p, r in PAIRS) >= 4
    assert sum(abs(rouge_ref("rougeL", p, r, "recall") - rouge_ref("rougeL", p, r)) > 1 for p, r in PAIRS) >= 4
    # chrF weighs recall twice (beta 2): swapping prediction and reference changes it.
    swapped = [abs(sacrebleu.sentence_chrf(p, [r]).score - sacrebleu.sentence_chrf(r, [p]).score) for p, r in PAIRS]
    assert sum(d > 1 for d in swapped) >= 4


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_rouge_l_is_rouge_score_lcs_f(pred, ref):
    want = rouge_ref("rougeL", pred, ref)  # float64 scores in [0, 100]: METRIC_ABS (tolerances.py)
    assert want == pytest.approx(lcs_f(pred, ref), abs=METRIC_ABS)  # rouge-score == the definition
    assert metrics.rouge_l(pred, ref) == pytest.approx(want, abs=METRIC_ABS)
    if pred.isascii() and ref.isascii():  # on Latin text, rouge-score's own default tokenizer too
        assert metrics.rouge_l(pred, ref) == pytest.approx(rouge_ref("rougeL", pred, ref, latin_default=True),
                                                           abs=METRIC_ABS)


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_chrf_is_sacrebleu(pred, ref):
    assert metrics.chrf(pred, ref) == pytest.approx(sacrebleu.sentence_chrf(pred, [ref]).score, abs=METRIC_ABS)


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_squad_f1_and_exact_match_are_the_official_script(pred, ref):
    assert metrics.squad_f1(pred, ref) == pytest.approx(squad_f1_ref(pred, ref, UNICODE_PUNCT), abs=METRIC_ABS)
    assert metrics.exact_match(pred, ref) == exact_match_ref(pred, ref, UNICODE_PUNCT)
    if all(ch.isascii() or not unicodedata.category(ch).startswith("P") for ch in pred + ref):
        assert metrics.squad_f1(pred, ref) == pytest.approx(squad_f1_ref(pred, ref), abs=METRIC_ABS)


def test_exact_match_normalises_like_squad():
    for pred, ref in [("The  Cat!", "cat"), ("An apple.", "apple"), ("Кошка.", "кошка")]:
        assert metrics.exact_match(pred, ref) == exact_match_ref(pred, ref) == 100.0
    assert metrics.exact_match("cats", "cat") == exact_match_ref("cats", "cat") == 0.0


def _reference_score(metric: str, preds, refs) -> float:
    fn = {"rouge_l": lambda p, r: rouge_ref("rougeL", p, r),
          "chrf": lambda p, r: sacrebleu.sentence_chrf(p, [r]).score,
          "squad_f1": lambda p, r: squad_f1_ref(p, r, UNICODE_PUNCT),
          "exact_match": lambda p, r: exact_match_ref(p, r, UNICODE_PUNCT)}[metric]
    return float(np.mean([fn(p, r) for p, r in zip(preds, refs)]))


# ---------------------------------------------------------------------------------------------
# End to end: launch/evaluate.py and the report's evaluation on real generations.

WORDS = (["the", "cat", "sat", "on", "mat", "quick", "brown", "fox", "paris", "france", "capital", "dog"]
         + ["кошка", "сидит", "на", "ковре", "москва", "столица", "россии", "большая", "собака", "дом"]
         + ["猫", "垫子", "上", "东京", "日本", "首都", "一只", "有", "大", "狗"])
# task -> (metric, prompt words)
TASKS = {"cjk_chrf": ("chrf", ["猫", "有", "东京", "日本"]),
         "cyr_f1": ("squad_f1", ["кошка", "сидит", "москва", "дом"]),
         "lat_em": ("exact_match", ["the", "quick", "paris", "dog"]),
         "lat_rouge": ("rouge_l", ["the", "cat", "brown", "france"])}
NEW_TOKENS = 6


def make_word_tokenizer(out_dir) -> object:
    """A word-level tokenizer over WORDS (three scripts); decode joins words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def _prompts(task: str) -> list[str]:
    words = TASKS[task][1]
    return [" ".join(words[i:] + words[:i]) for i in range(3)]


def _references(task: str, pred: str, i: int) -> str:
    """A reference that differs from the prediction in length, order and (EM) form."""
    w = pred.split()
    if TASKS[task][0] == "exact_match":
        return [pred.upper() + "!", " ".join(w[:-1]) or "dog", pred][i % 3]
    extra = WORDS[(7 * i + len(task)) % len(WORDS)]
    return " ".join(w[1:][::-1] + w[:1] + [extra]) if len(w) > 1 else f"{pred} {extra}"


def _hf_predictions(base_model: str, adapters_dir: str) -> dict[str, list[str]]:
    """Greedy generation with transformers + PEFT, one prompt at a time, each task's adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    names = sorted(TASKS)
    model = PeftModel.from_pretrained(model, os.path.join(adapters_dir, names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(os.path.join(adapters_dir, n), adapter_name=n)
    model.eval()
    out = {}
    for task in names:
        model.set_adapter(task)
        out[task] = []
        for prompt in _prompts(task):
            ids = tok(prompt)["input_ids"]
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            out[task].append(tok.decode(gen[0, len(ids):], skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from fixtures_adapters import make_peft_adapters
    from fixtures_models import make_tiny_model

    root = tmp_path_factory.mktemp("metric_values")
    base = make_tiny_model(root / "base", "llama", seed=2, tokenizer=make_word_tokenizer)
    adapters = str(root / "adapters")
    make_peft_adapters(base, adapters, sorted(TASKS), r=4, alpha=8, scale=0.4, seed=3,
                       target_modules=("q_proj", "v_proj", "up_proj"))
    preds = _hf_predictions(base, adapters)
    data_dir = root / "data"
    data_dir.mkdir()
    refs = {}
    for task in TASKS:
        refs[task] = [_references(task, p, i) for i, p in enumerate(preds[task])]
        lines = [json.dumps({"prompt": q, "response": r}, ensure_ascii=False)
                 for q, r in zip(_prompts(task), refs[task])]
        (data_dir / f"{task}.eval.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (data_dir / f"{task}.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    (data_dir / "tasks.json").write_text(json.dumps({t: {"metric": m} for t, (m, _) in TASKS.items()}))
    want = {t: _reference_score(TASKS[t][0], preds[t], refs[t]) for t in TASKS}
    print("predictions:", preds, "\nreference scores:", want)
    # The data has teeth: the predictions are not empty, the scores are neither 0 nor 100, and
    # scoring against the prompts, with ROUGE-1 or with recall would report other numbers.
    assert all(p for ps in preds.values() for p in ps)
    assert all(0 < s < 100 for s in want.values()), want
    for t, (m, _) in TASKS.items():
        assert abs(_reference_score(m, preds[t], _prompts(t)) - want[t]) > 1, t
    p, r = preds["lat_rouge"], refs["lat_rouge"]
    lf = np.mean([rouge_ref("rougeL", a, b) for a, b in zip(p, r)])
    assert abs(np.mean([rouge_ref("rouge1", a, b) for a, b in zip(p, r)]) - lf) > 1
    assert abs(np.mean([rouge_ref("rougeL", a, b, "recall") for a, b in zip(p, r)]) - lf) > 1
    return dict(root=str(root), base=base, adapters=adapters, data=str(data_dir), preds=preds, want=want)


def test_launch_evaluate_reports_the_reference_metric_values(generated, tmp_path):
    from fixtures_search_inputs import child_env

    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "evaluate.py"), f"--base_model={generated['base']}",
         f"--adapters_dir={generated['adapters']}", f"--data_dir={generated['data']}", f"--output={out}",
         "--dtype=float32", "--metrics=loss,generation", f"--max_new_tokens={NEW_TOKENS}", "--max_seq_len=32"],
        capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for task, (metric, _) in TASKS.items():
        # float64 scores of the same texts (the JSON keeps every digit): METRIC_ABS (tolerances.py)
        assert doc["tasks"][task][metric] == pytest.approx(generated["want"][task], abs=METRIC_ABS), task
    assert doc["summary"]["mean_score"] == pytest.approx(np.mean(list(generated["want"].values())), abs=METRIC_ABS)


def test_report_evaluation_reports_the_reference_metric_values(generated):
    from experiments.report import run as report

    cfg = report.ReportConfig(suite=generated["root"], output_dir=generated["root"], seeds=1,
                              max_new_tokens=NEW_TOKENS, dtype="float32")
    paths = report.resolve_suite(generated["root"], generated["root"])
    bench = report.Bench(paths, cfg)
    run = report.evaluate_run(bench, "single", None, len(TASKS), None, "ties", single=True)
    for t, score in zip(bench.names, run.task_scores):
        assert score == pytest.approx(generated["want"][t], abs=METRIC_ABS), t  # as above
    assert run.score == pytest.approx(np.mean(list(generated["want"].values())), abs=METRIC_ABS)
