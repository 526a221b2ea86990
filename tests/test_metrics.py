"""Generation metrics against their references: rouge-score's own scorer, sacrebleu, and
SQuAD v1.1 scores worked out by hand from the official script's rules."""

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from d2c_jax import metrics
from tolerances import METRIC_ABS


def test_rouge_l_matches_rouge_score_on_ascii_text():
    reference = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("the cat sat on the mat", "a cat sat on a mat"), ("one two", "three four"),
             ("Hello, World!", "hello world")]
    for pred, ref in pairs:
        want = 100 * reference.score(ref, pred)["rougeL"].fmeasure
        assert metrics.rouge_l(pred, ref) == pytest.approx(want, abs=METRIC_ABS)  # float64 scores, tolerances.py


def test_rouge_l_scores_non_latin_scripts():
    # rouge-score's default tokenizer drops these characters and would score 0 for a match.
    assert metrics.rouge_l("Привет мир", "привет мир") == 100.0  # P = R = 1: exact in any order
    want = 100 * 2 * (2 / 4 * 1) / (2 / 4 + 1)
    assert metrics.rouge_l("你好世界", "你好") == pytest.approx(want, abs=METRIC_ABS)


def test_chrf_is_sacrebleu_sentence_chrf():
    assert metrics.chrf("the cat", "the cat sat") == pytest.approx(
        sacrebleu.sentence_chrf("the cat", ["the cat sat"]).score, abs=METRIC_ABS)


def test_squad_f1_and_exact_match_follow_squad_normalisation():
    # Articles and punctuation are dropped: pred {cat, sat}, ref {cat, sat, on, mat}: P=1, R=1/2.
    assert metrics.squad_f1("The cat sat.", "cat sat on a mat") == pytest.approx(100 * 2 / 3, abs=METRIC_ABS)
    assert metrics.squad_f1("dog", "cat") == 0.0
    assert metrics.exact_match("The  Cat!", "cat") == 100.0
    assert metrics.exact_match("cats", "cat") == 0.0


def test_score_averages_and_rejects_unknown_metric():
    assert metrics.score("exact_match", ["a b", "c"], ["a b", "d"]) == 50.0  # (100 + 0) / 2: exact
    assert math.isnan(metrics.score("chrf", [], []))
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score("bleu", ["a"], ["a"])
