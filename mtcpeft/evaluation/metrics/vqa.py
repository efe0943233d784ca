"""VQA accuracy as the official VQA evaluation script computes it (Antol et al., 2015, arXiv 1505.00468;
VQA v2: Goyal et al., 2017, arXiv 1612.00837).

A predicted answer is normalised (white space, punctuation, number words to digits, articles removed, missing
apostrophes restored: :func:`normalize_answer`); its accuracy on a question with 10 human answers is

    acc = mean over the 10 subsets of 9 humans (leave one out) of min(#humans in the subset who gave it / 3, 1)

so an answer given by m of the 10 humans scores (m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10: 0.3, 0.6, 0.9
and 1.0 for m = 1, 2, 3, >= 4. Like the script, human answers only get the punctuation step, and only when they
disagree (the released annotations are already normalised); ``normalize_references=True`` gives them the full
normalisation too, for references written by hand. Missing predictions score 0 and are counted.
"""
from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

from .vqa_maps import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)


def process_punctuation(text: str) -> str:
    """The script's punctuation step: each mark is deleted where it touches a space (or anywhere, when the text
    holds a number like "1,000"), else replaced by a space ("black/white" -> "black white"); periods not
    followed by a digit are deleted."""
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # the script tests the original text, not the partly processed one
        out = out.replace(p, "" if strip_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)  # the script passes re.UNICODE (= 32) where sub takes its count


def process_digit_article(text: str) -> str:
    """Lower case; number words to digits; articles dropped; apostrophe-less contractions fixed."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the script compares it: ``"Two"`` -> ``"2"``, ``"the dog."`` -> ``"dog"``,
    ``"dont"`` -> ``"don't"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_example_accuracy(prediction: str, answers: Sequence[str], normalize_references: bool = False) -> float:
    """Accuracy of one (unnormalised) prediction against the human answers of one question."""
    if isinstance(answers, str):
        raise TypeError("answers must be the list of human answers, not one string")
    if len(answers) < 4:
        raise ValueError(f"VQA accuracy needs the human answers of a question (10 in VQA v2), got {len(answers)}; "
                         "with fewer than 4 even a unanimous answer cannot score 1 (repeat a single answer 10 times)")
    pred = normalize_answer(prediction or "")
    if normalize_references:
        gold = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        gold = [process_punctuation(a) for a in answers]
    else:
        gold = list(answers)
    accs = []
    for left_out in range(len(gold)):
        matches = sum(1 for j, a in enumerate(gold) if j != left_out and a == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                 normalize_references: bool = False) -> dict:
    """Mean VQA accuracy of ``predictions`` {question id: answer} against ``references`` {question id: [10 human
    answers]}. Returns ``{"accuracy"}`` in [0, 1], ``"count"``, ``"missing"`` and ``"per_example"`` {id: acc}."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("vqa_accuracy takes dicts {question id: answer} and {question id: [human answers]}; "
                        "score a single question with vqa_example_accuracy(prediction, answers)")
    per, missing = {}, 0
    for qid, answers in references.items():
        if qid in predictions:
            per[qid] = vqa_example_accuracy(predictions[qid], answers, normalize_references)
        else:
            missing += 1
            per[qid] = 0.0
    n = len(per)
    return {"accuracy": sum(per.values()) / n if n else 0.0, "count": n, "missing": missing, "per_example": per}
