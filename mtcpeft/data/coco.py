"""COCO captions in its two real formats, read into ``{"image_id", "image", "caption"}`` examples.

* Official annotations (``captions_train2017.json``; Chen et al., 2015, arXiv 1504.00325): ``images`` with
  ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``caption``; images under one folder.
* Karpathy split (``dataset_coco.json``; Karpathy & Fei-Fei, 2015): ``images`` each with ``filepath``,
  ``filename``, ``split`` in train/restval/val/test, ``cocoid`` and ``sentences`` [{``raw``, ``tokens``}];
  ``restval`` is training data, as in the paper.

One example per caption, as in the paper. Problems raise :class:`DataFormatError` naming the file and the field.
"""
from __future__ import annotations

import os
from pathlib import Path

from .records import DataFormatError, load_json, need


def read_coco_captions(annotations: str | os.PathLike, image_root: str | os.PathLike) -> list[dict]:
    """Official COCO caption JSON -> one example per caption, in annotation order."""
    data = load_json(annotations)
    where = str(annotations)
    files = {}
    for i, img in enumerate(need(data, "images", where, list)):
        w = f"{where} images[{i}]"
        files[need(img, "id", w, (int, str))] = need(img, "file_name", w, str)
    out = []
    for i, ann in enumerate(need(data, "annotations", where, list)):
        image_id = need(ann, "image_id", f"{where} annotations[{i}]", (int, str))
        if image_id not in files:
            raise DataFormatError(f"{where} annotations[{i}]: image_id {image_id} is not listed in 'images'")
        caption = need(ann, "caption", f"{where} annotations[{i}]", str)
        out.append({"image_id": image_id, "image": str(Path(image_root) / files[image_id]), "caption": caption})
    return out


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy(path: str | os.PathLike, image_root: str | os.PathLike, split: str) -> list[dict]:
    """Karpathy ``dataset_coco.json`` -> examples of one split ("train" includes "restval")."""
    if split not in KARPATHY_SPLITS:
        raise DataFormatError(f"unknown Karpathy split {split!r}; use one of {sorted(KARPATHY_SPLITS)}")
    data = load_json(path)
    where = str(path)
    out = []
    for i, img in enumerate(need(data, "images", where, list)):
        w = f"{where} images[{i}]"
        if need(img, "split", w, str) not in KARPATHY_SPLITS[split]:
            continue
        file = Path(image_root) / str(img.get("filepath", "")) / need(img, "filename", w, str)
        image_id = img.get("cocoid", img.get("imgid", i))
        for j, sent in enumerate(need(img, "sentences", w, list)):
            raw = need(sent, "raw", f"{w} sentences[{j}]", str)
            out.append({"image_id": image_id, "image": str(file), "caption": raw})
    return out
