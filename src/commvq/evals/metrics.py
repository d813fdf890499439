"""LongBench-style metrics: QA token F1, ROUGE-L F, classification accuracy, code edit
similarity."""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, truth: str) -> float:
    """ROUGE-L F-measure on lowercase whitespace tokens."""
    pred, gold = prediction.lower().split(), truth.lower().split()
    if not pred or not gold:
        return 0.0
    lcs = _lcs(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def classification(prediction: str, truth: str, all_classes: list[str]) -> float:
    """1/k if the gold label is among the k labels named in the prediction (labels contained in the
    gold label's own name do not count against it), else 0."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in truth and c != truth)]
    return 1.0 / len(named) if truth in named else 0.0


def first_code_line(prediction: str) -> str:
    """The first line that is code rather than a comment or a fence."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return prediction


def code_sim(prediction: str, truth: str) -> float:
    """Edit similarity of the first code line to the reference (difflib ratio, 0..1)."""
    return difflib.SequenceMatcher(None, first_code_line(prediction), truth).ratio()
