"""Offline stand-ins for VQA v2 and SQuAD built from easy-VQA (the ``easy-vqa`` pip package; scene facts from
:func:`mtcpeft.data.easyvqa.scene_facts`). Splits: "train" (easy-VQA's train images) and "val" (its test images).
Order is deterministic: by image id, then easy-VQA's question order.

* :func:`easyvqa_vqa`: VQA examples; easy-VQA has one answer per question, so ``answers`` repeats it 10 times and
  the VQA accuracy of the official script (leave-one-out over 10 humans) is 1 for it and 0 otherwise.
* :func:`easyvqa_qa`: SQuAD-style examples whose passage describes the image in words (a phrasing and a closing
  sentence chosen by image id, so the same image always reads the same). Colour and shape answers occur in the
  passage and ``answer_starts`` gives their offset. Yes/no answers do not occur in any passage: they are kept with
  ``answer_starts == [-1]``, so QA on this set is generative (the model writes the answer), not extractive.
"""
from __future__ import annotations

import re

from .easyvqa import scene_facts

PASSAGES = (
    "The picture shows a {color} {shape} on a light background.",
    "There is one {color} {shape} in this image.",
    "A single {shape} is drawn in the image, and it is {color}.",
    "This image contains a {shape}. The {shape} is {color}.",
)
CLOSINGS = (  # no colour or shape words: nothing to distract from the answer
    "Nothing else is drawn.",
    "It is the only shape in the picture.",
    "The background is plain and pale.",
)
SPLITS = {"train": "train", "val": "test"}  # our split -> easy-VQA's


def _facts(split: str) -> list[tuple[int, dict]]:
    if split not in SPLITS:
        raise ValueError(f"easy-VQA stand-ins have splits {sorted(SPLITS)}, not {split!r}")
    return sorted(scene_facts(SPLITS[split]).items())


def _questions(split: str, questions_per_image: int | None, limit: int | None):
    """(image id, facts, k, question, answer) in order, at most ``questions_per_image`` per image (the first
    ones easy-VQA lists) and ``limit`` in all."""
    n = 0
    for image_id, f in _facts(split):
        for k, (q, a) in enumerate(f["questions"][:questions_per_image]):
            if limit is not None and n >= limit:
                return
            yield image_id, f, k, q, a
            n += 1


def passage(image_id: int, color: str, shape: str) -> str:
    """The scene in words, phrased by image id: ``"There is one red circle in this image. Nothing else is drawn."``"""
    first = PASSAGES[image_id % len(PASSAGES)].format(color=color, shape=shape)
    return f"{first} {CLOSINGS[(image_id // len(PASSAGES)) % len(CLOSINGS)]}"


def easyvqa_vqa(split: str, limit: int | None = None, questions_per_image: int | None = None) -> list[dict]:
    """VQA v2-shaped examples: ``{"question_id", "image_id", "image", "question", "answers": [answer] * 10,
    "answer"}``; question ids are ``"easyvqa-<split>-<image id>-<k>"``."""
    return [{"question_id": f"easyvqa-{split}-{i}-{k}", "image_id": i, "image": f["image"], "question": q,
             "answers": [a] * 10, "answer": a}
            for i, f, k, q, a in _questions(split, questions_per_image, limit)]


def easyvqa_qa(split: str, limit: int | None = None, questions_per_image: int | None = None) -> list[dict]:
    """SQuAD-shaped examples: ``{"id", "context", "question", "answers": [answer], "answer_starts": [offset or
    -1 for yes/no], "impossible": False}``."""
    out = []
    for i, f, k, q, a in _questions(split, questions_per_image, limit):
        context = passage(i, f["color"], f["shape"])
        start = -1
        if a not in ("yes", "no"):
            m = re.search(rf"\b{re.escape(a)}\b", context)
            if m is None:  # scene_facts derives colour and shape from these very answers
                raise RuntimeError(f"easy-VQA answer {a!r} is not in the passage of image {i} ({context!r}); "
                                   "scene_facts disagrees with the question set")
            start = m.start()
        out.append({"id": f"easyvqa-{split}-{i}-{k}", "context": context, "question": q, "answers": [a],
                    "answer_starts": [start], "impossible": False})
    return out
