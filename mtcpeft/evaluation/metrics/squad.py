"""SQuAD exact match and token F1, as the official evaluation scripts compute them.

Rajpurkar et al., 2016 (SQuAD v1.1, arXiv 1606.05250) and 2018 (SQuAD v2.0, arXiv 1806.03822). Both scripts
normalise an answer by lower-casing it, deleting every ASCII punctuation character, deleting the articles
"a", "an", "the" as whole words and collapsing white space; exact match compares normalised strings and F1 is
the harmonic mean of token precision and recall on the normalised tokens. A question's score is the maximum over
its gold answers. v2.0 adds unanswerable questions: gold answers that normalise to nothing are dropped, a
question left with none has the single gold answer "" and an empty prediction scores 1 on it (any other
prediction 0). On answerable questions the two scripts agree, so one function serves both.

Missing predictions score 0, as in the official scripts, and are counted in the result.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Hashable, Mapping, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: ``"The  Dog's."`` -> ``"dogs"``."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings; two empty strings agree (v2.0's unanswerable case)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """Exact match and F1 of ``predictions`` {id: answer text} against ``references`` {id: [gold answers]}.

    An empty reference list marks an unanswerable (v2.0) question. Returns ``{"exact_match", "f1"}`` (means over
    the referenced ids, in [0, 1]), ``"count"``, ``"missing"`` (ids without a prediction, scored 0) and
    ``"per_example"`` {id: {"exact_match", "f1"}}. Predictions for ids without references are ignored.
    """
    per, missing = {}, 0
    for qid, golds in references.items():
        if isinstance(golds, str):
            raise TypeError(f"references[{qid!r}] is a string; give a list of gold answers (empty if unanswerable)")
        golds = [g for g in golds if normalize_answer(g)] or [""]
        if qid not in predictions:
            missing += 1
            per[qid] = {"exact_match": 0.0, "f1": 0.0}
            continue
        pred = predictions[qid] or ""
        per[qid] = {"exact_match": max(exact_match(pred, g) for g in golds),
                    "f1": max(token_f1(pred, g) for g in golds)}
    n = len(per)
    return {"exact_match": sum(s["exact_match"] for s in per.values()) / n if n else 0.0,
            "f1": sum(s["f1"] for s in per.values()) / n if n else 0.0,
            "count": n, "missing": missing, "per_example": per}
