"""COCO captions in its two real formats, read into ``{"image_id", "image", "caption"}`` examples.

* Official annotations (``captions_train2017.json``; Chen et al., 2015, arXiv 1504.00325): ``images`` with
  ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``caption``; images under one folder.
* Karpathy split (``dataset_coco.json``; Karpathy & Fei-Fei, 2015): ``images`` each with ``filepath``,
  ``filename``, ``split`` in train/restval/val/test, ``cocoid`` and ``sentences`` [{``raw``, ``tokens``}];
  ``restval`` is training data, as in the paper.

One example per caption, as in the paper. Problems raise :class:`DataFormatError` naming the file and the field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from mtcpeft.errors import MtcpeftError


class DataFormatError(MtcpeftError, ValueError):
    """A dataset file is not in the format it claims to be; the message names the file and the field."""


def _load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"annotation file {path} does not exist; check the data.* paths of the config")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download the file") from None
    except UnicodeDecodeError:
        raise DataFormatError(f"{path} is not valid JSON (not UTF-8 text); is it the right file?") from None
    except OSError as e:
        raise DataFormatError(f"cannot read {path}: {e.strerror}") from None


def _need(obj: dict, key: str, where: str, kind: type | tuple[type, ...] | None = None):
    """``obj[key]``, or DataFormatError naming the record and the field (missing, or not of type ``kind``)."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataFormatError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def read_coco_captions(annotations: str | os.PathLike, image_root: str | os.PathLike) -> list[dict]:
    """Official COCO caption JSON -> one example per caption, in annotation order."""
    data = _load_json(annotations)
    where = str(annotations)
    files = {}
    for i, img in enumerate(_need(data, "images", where, list)):
        w = f"{where} images[{i}]"
        files[_need(img, "id", w, (int, str))] = _need(img, "file_name", w, str)
    out = []
    for i, ann in enumerate(_need(data, "annotations", where, list)):
        image_id = _need(ann, "image_id", f"{where} annotations[{i}]", (int, str))
        if image_id not in files:
            raise DataFormatError(f"{where} annotations[{i}]: image_id {image_id} is not listed in 'images'")
        caption = _need(ann, "caption", f"{where} annotations[{i}]", str)
        out.append({"image_id": image_id, "image": str(Path(image_root) / files[image_id]), "caption": caption})
    return out


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy(path: str | os.PathLike, image_root: str | os.PathLike, split: str) -> list[dict]:
    """Karpathy ``dataset_coco.json`` -> examples of one split ("train" includes "restval")."""
    if split not in KARPATHY_SPLITS:
        raise DataFormatError(f"unknown Karpathy split {split!r}; use one of {sorted(KARPATHY_SPLITS)}")
    data = _load_json(path)
    where = str(path)
    out = []
    for i, img in enumerate(_need(data, "images", where, list)):
        w = f"{where} images[{i}]"
        if _need(img, "split", w, str) not in KARPATHY_SPLITS[split]:
            continue
        file = Path(image_root) / str(img.get("filepath", "")) / _need(img, "filename", w, str)
        image_id = img.get("cocoid", img.get("imgid", i))
        for j, sent in enumerate(_need(img, "sentences", w, list)):
            raw = _need(sent, "raw", f"{w} sentences[{j}]", str)
            out.append({"image_id": image_id, "image": str(file), "caption": raw})
    return out
