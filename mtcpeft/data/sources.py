"""Data sources by ``data.source``: each reader turns a split ("train" / "val") of a data config into
``(examples, note)`` — the example dicts of the format readers (:mod:`.coco`, :mod:`.squad`, :mod:`.vqa2`,
:mod:`.easyvqa`, :mod:`.easyvqa_tasks`, Hugging Face ``datasets`` through :mod:`.hf` / :mod:`.hf_tasks`) and what the reader dropped, in one line ("" when nothing).

A task declares the sources it reads as ``{name: reader}`` (:attr:`mtcpeft.data.task.Task.sources`); a user's task
may list these readers or its own with the same signature. A missing or wrong path stops with the config key to set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mtcpeft.config import ConfigError

from .coco import read_coco_captions, read_karpathy
from .easyvqa import easyvqa_captions
from .easyvqa_tasks import easyvqa_qa, easyvqa_vqa
from .hf import load_split, local_base
from .hf_tasks import hf_captions, hf_qa, hf_rows, hf_vqa
from .squad import read_squad
from .vqa2 import read_vqa2

Reader = Callable[[str, object], "tuple[list[dict], str]"]  # (split, data config) -> (examples, note)


def need(value, key: str, exists: bool = False) -> str:
    """A required data path, or an error naming the config key to set (``exists``: the path must exist)."""
    if not value:
        raise ConfigError(f"{key} is not set; pass it in the config or as an override, e.g. {key}=/path/to/file")
    if exists and not Path(value).exists():
        raise ConfigError(f"{key}={value} does not exist; check the path (relative paths start where you run)")
    return value


def need_dir(value, key: str) -> str:
    """A required image folder, or an error naming the config key."""
    if not Path(need(value, key)).is_dir():
        raise ConfigError(f"{key}={value} is not a folder; point it at the folder that holds the images")
    return value


def split_key(data, split: str, key: str, fallback: bool = False) -> str:
    """The data config key of ``split``: ``key`` for training, ``val_<key>`` otherwise (``fallback``: ``key``
    again when ``val_<key>`` is not set, as for one image folder holding both splits)."""
    if split == "train" or (fallback and not getattr(data, f"val_{key}", None)):
        return key
    return f"val_{key}"


def _path(data, key: str) -> str:
    return need(getattr(data, key), f"data.{key}", exists=True)


def _folder(data, key: str) -> str:
    return need_dir(getattr(data, key), f"data.{key}")


def _dropped(report, split: str) -> str:
    return report.summary(split).partition(": ")[2]


# ------------------------------------------------------------------------------------------------ captions
def easyvqa_caption_source(split: str, data) -> tuple[list[dict], str]:
    return easyvqa_captions(split), ""


def coco_caption_source(split: str, data) -> tuple[list[dict], str]:
    """COCO's official caption JSON (``data.annotations`` / ``data.val_annotations``) over ``data.images``
    (``data.val_images`` for validation when set)."""
    return read_coco_captions(_path(data, split_key(data, split, "annotations")),
                              _folder(data, split_key(data, split, "images", fallback=True))), ""


def karpathy_source(split: str, data) -> tuple[list[dict], str]:
    """The Karpathy split file (``data.karpathy_json``) over ``data.images``."""
    return read_karpathy(_path(data, "karpathy_json"), _folder(data, "images"), split), ""


# ------------------------------------------------------------------------------------------ question answering
def easyvqa_qa_source(split: str, data) -> tuple[list[dict], str]:
    return easyvqa_qa(split), ""


def squad_source(split: str, data) -> tuple[list[dict], str]:
    """SQuAD JSON (``data.annotations`` / ``data.val_annotations``); unanswerable questions are left out of
    training when ``data.drop_impossible``."""
    keep_impossible = not (split == "train" and data.drop_impossible)
    examples, report = read_squad(_path(data, split_key(data, split, "annotations")), keep_impossible=keep_impossible)
    return examples, _dropped(report, split)


def easyvqa_vqa_source(split: str, data) -> tuple[list[dict], str]:
    return easyvqa_vqa(split), ""


def vqa2_source(split: str, data) -> tuple[list[dict], str]:
    """VQA v2 questions + annotations (``data.questions`` / ``data.annotations``, ``val_`` for validation; without
    annotations the questions have no answers) over ``data.images`` (``data.val_images`` when set)."""
    q, a = split_key(data, split, "questions"), split_key(data, split, "annotations")
    anns = getattr(data, a) and _path(data, a)
    examples, report = read_vqa2(_path(data, q), anns, _folder(data, split_key(data, split, "images", fallback=True)),
                                 data.image_pattern)
    return examples, _dropped(report, split) + ("" if anns else f"; data.{a} is not set: questions without answers")


# ------------------------------------------------------------------------------------- Hugging Face datasets
def _hf_split(data, split: str):
    """(the ``datasets.Dataset`` of ``split``, the key naming its rows in image references, the folder relative
    image paths start from)."""
    key = "hf_train_split" if split == "train" else "hf_val_split"
    path, name = need(data.hf_path, "data.hf_path"), getattr(data, key)
    if getattr(data, "streaming", False) and split != "train":  # a streaming run validates on the split's head
        from .streaming import head

        ds = head(data, split, data.val_limit)
    else:
        ds = load_split(path, data.hf_name, name, key)
    return ds, f"{path}{':' + data.hf_name if data.hf_name else ''}[{name}]", local_base(path)


def hf_caption_source(split: str, data) -> tuple[list[dict], str]:
    """Captions from a ``datasets`` split (``data.hf_*``): an image column and a caption or list-of-captions
    column, one example per caption."""
    ds, key, base = _hf_split(data, split)
    return hf_captions(ds, data.hf_columns, key, base), ""


def hf_qa_source(split: str, data) -> tuple[list[dict], str]:
    """SQuAD-schema rows from a ``datasets`` split; unanswerable questions as for ``squad``."""
    ds, key, _ = _hf_split(data, split)
    examples, report = hf_qa(ds, data.hf_columns, key, keep_impossible=not (split == "train" and data.drop_impossible))
    return examples, _dropped(report, split)


def hf_vqa_source(split: str, data) -> tuple[list[dict], str]:
    """VQA rows (image, question, answers / multiple_choice_answer) from a ``datasets`` split."""
    ds, key, base = _hf_split(data, split)
    return hf_vqa(ds, data.hf_columns, key, base), ""


def hf_rows_source(split: str, data) -> tuple[list[dict], str]:
    """Any task: one example per row of a ``datasets`` split, keyed by column (``data.hf_columns`` renames)."""
    ds, key, base = _hf_split(data, split)
    return hf_rows(ds, data.hf_columns, key, base), ""
