"""easy-VQA (the ``easy-vqa`` pip package: 64x64 images of one coloured shape, ~48k questions) as the offline
stand-in for real datasets. Captions are built from the answers its questions give about each image (colour and
shape), in a few phrasings; the package's train images are our train split and its test images our validation.
"""
from __future__ import annotations

import re
from functools import lru_cache

from .records import DataFormatError

COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}
PHRASINGS = (
    "a {color} {shape}.",
    "a {color} {shape} on a plain background.",
    "an image of a {color} {shape}.",
    "there is a {color} {shape} in the picture.",
)


@lru_cache(maxsize=2)
def scene_facts(split: str) -> dict[int, dict]:
    """image id -> {"color", "shape", "image" path, "questions": [(q, a)]} from easy-VQA's question set."""
    try:
        import easy_vqa
    except ImportError:
        raise DataFormatError("data.source=easyvqa needs the easy-vqa package: pip install easy-vqa (bash .ci/setup "
                              "installs it), or set data.source to a dataset on disk") from None

    questions, answers, image_ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    facts: dict[int, dict] = {i: {"image": paths[i], "questions": []} for i in paths}
    for q, a, i in zip(questions, answers, image_ids):
        f = facts[i]
        f["questions"].append((q, a))
        words = set(re.findall(r"[a-z]+", q))
        if a in ("yes", "no"):  # "is there not a red shape?" -> no: red is present
            negated = bool(words & {"not", "no"})
            if (a == "yes") != negated:
                for w in words:
                    if w in COLORS:
                        f["color"] = w
                    elif w in SHAPES:
                        f["shape"] = w
            continue
        f["color" if a in COLORS else "shape"] = a  # "what color is the circle?" -> red
        for w in words:  # the question may name the other attribute
            if w in SHAPES:
                f["shape"] = w
            elif w in COLORS:
                f["color"] = w
    return {i: f for i, f in facts.items() if "color" in f and "shape" in f}


def easyvqa_captions(split: str, captions_per_image: int = 2) -> list[dict]:
    """One example per caption: ``{"image_id", "image", "caption", "references"}`` (references: all phrasings)."""
    if split not in ("train", "val"):
        raise ValueError(f"easy-VQA captioning has splits 'train' and 'val', not {split!r}")
    out = []
    for i, f in sorted(scene_facts("train" if split == "train" else "test").items()):
        refs = [p.format(color=f["color"], shape=f["shape"]) for p in PHRASINGS]
        for k in range(captions_per_image):
            out.append({"image_id": i, "image": f["image"], "caption": refs[(i + k) % len(refs)], "references": refs})
    return out
