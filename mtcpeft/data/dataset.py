"""Turn a task's examples into a Dataset of fixed-length tensors, with images either loaded + transformed per
item (augmentation on) or taken from features the frozen encoder computed once (cached)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm


class BadImageError(ValueError):
    """An image file is missing or cannot be decoded (and ``data.on_bad_image`` is "fail")."""


@dataclass
class DataReport:
    """What preparing a split dropped or changed, printed so nothing is lost silently."""

    examples: int = 0
    kept: int = 0
    bad_images: list[str] = field(default_factory=list)
    empty_targets: int = 0
    truncated: int = 0

    def summary(self, split: str) -> str:
        return (f"{split}: {self.kept:,} of {self.examples:,} examples kept; "
                f"{len(self.bad_images)} unreadable images skipped, {self.empty_targets} empty targets skipped, "
                f"{self.truncated} truncated to the token budget")


def open_image(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def check_images(paths: list[str], on_bad: str, progress: bool = True) -> set[str]:
    """The paths that cannot be opened and decoded. ``on_bad="fail"`` raises on the first one instead."""
    bad = set()
    for p in tqdm(sorted(set(paths)), desc="checking images", disable=not progress or len(paths) < 2000):
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            if on_bad == "fail":
                raise BadImageError(
                    f"cannot read image {p}: {e}; fix or remove it, or set data.on_bad_image=skip to skip such files"
                ) from None
            bad.add(p)
    return bad


class EncodedDataset(Dataset):
    """Items: dicts of equal-length lists (input_ids, context_ids, labels, attention_mask, image_mask) stored as
    tensors, plus per-item image input from ``image_fn(index)`` ({"pixel_values"} or {"image_features"})."""

    KEYS = ("input_ids", "context_ids", "labels", "attention_mask", "image_mask")

    def __init__(self, items: list[dict], image_fn: Callable[[int], dict] | None = None,
                 context_map: torch.Tensor | None = None):
        keys = [k for k in self.KEYS if items and k in items[0]]
        self.tensors = {k: torch.tensor([it[k] for it in items], dtype=torch.bool if k == "image_mask" else torch.long)
                        for k in keys}
        if context_map is not None:  # e.g. context-agnostic: every live context -> group 0
            self.tensors["context_ids"] = context_map[self.tensors["context_ids"] + 1]
        self.image_fn = image_fn
        self.n = len(items)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.tensors.items()}
        if self.image_fn is not None:
            item.update(self.image_fn(i))
        return item
