"""Text metrics for generation-based evaluation, all on a 0-100 scale (the paper reports %).

ROUGE-L comes from `rouge-score` and chrF from `sacrebleu`; SQuAD F1 and exact match follow the
official SQuAD v1.1 evaluation script's normalisation. ROUGE uses a Unicode-aware tokenizer so
that non-Latin scripts are not silently scored as empty strings (rouge-score's default keeps only
[a-z0-9]).
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from typing import Callable, Sequence

import sacrebleu
from rouge_score import rouge_scorer

METRICS = ("exact_match", "rouge_l", "squad_f1", "chrf")


class _UnicodeTokenizer:
    """Lower-cased words of any script; CJK characters count one token each."""

    _token = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._token.findall(text.lower())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
_PUNCTUATION = frozenset(string.punctuation)


def _squad_normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION
                   and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 * float(_squad_normalize(prediction) == _squad_normalize(reference))


def squad_f1(prediction: str, reference: str) -> float:
    pred, ref = _squad_normalize(prediction).split(), _squad_normalize(reference).split()
    if not pred or not ref:
        return 100.0 * float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    return float(sacrebleu.sentence_chrf(prediction, [reference]).score)


_BY_NAME: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "squad_f1": squad_f1,
    "chrf": chrf,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of the per-example metric over a task's examples."""
    if metric not in _BY_NAME:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return float("nan")
    fn = _BY_NAME[metric]
    return sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions)
