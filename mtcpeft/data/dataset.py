"""Turn a task's examples into a Dataset of fixed-length tensors, with images either loaded + transformed per
item (augmentation on) or taken from features the frozen encoder computed once (cached)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mtcpeft.errors import MtcpeftError
from .image_ref import open_any
from .records import DataFormatError


class BadImageError(MtcpeftError, ValueError):
    """An image file is missing or cannot be decoded (and ``data.on_bad_image`` is "fail")."""


class EmptySplitError(DataFormatError):
    """A split has no usable example left; the message names the split, the files and what was dropped."""


@dataclass
class DataReport:
    """What preparing a split dropped or changed, printed so nothing is lost silently."""

    examples: int = 0
    kept: int = 0
    bad_images: list[str] = field(default_factory=list)
    bad_image_example: str = ""  # the first unreadable image and why: "a.jpg: missing"
    empty_targets: int = 0
    too_long: int = 0  # prompts that do not fit data.seq_len even after trimming
    truncated: int = 0
    reader: str = ""  # what the format reader dropped (SQuAD answers off their offset, unannotated questions ...)

    def summary(self, split: str) -> str:
        e_g = f" (e.g. {self.bad_image_example})" if self.bad_images and self.bad_image_example else ""
        text = (f"{split}: {self.kept:,} of {self.examples:,} examples kept; {len(self.bad_images)} unreadable images "
                f"skipped{e_g}, {self.empty_targets} empty targets skipped, ")
        text += f"{self.too_long} prompts too long for data.seq_len skipped, " if self.too_long else ""
        text += f"{self.truncated} truncated to the token budget"
        return text + (f"; reading the data: {self.reader}" if self.reader else "")

    def why_empty(self) -> str:
        """Why no example was kept, from the counts: ``"4 examples read; 4 unreadable images skipped (e.g. ...)"``."""
        if not self.examples:
            return f"reading the data: {self.reader}" if self.reader else "the data hold no examples"
        drops = []
        if self.bad_images:
            drops.append(f"{len(self.bad_images)} unreadable images skipped (e.g. {self.bad_image_example})")
        if self.empty_targets:
            drops.append(f"{self.empty_targets} empty targets skipped")
        if self.too_long:
            drops.append(f"{self.too_long} prompts too long for data.seq_len skipped")
        return f"{self.examples:,} examples read; " + ", ".join(drops)


def open_image(path: str) -> Image.Image:
    """The RGB image of a file path or of a :class:`~.image_ref.RowImage` (a row of a ``datasets`` table)."""
    with open_any(path) as im:
        return im.convert("RGB")


def _decode(path: str) -> None:
    """Open and decode ``path`` (``Image.verify`` does not decode: a JPEG cut short in its data passes it)."""
    with open_any(path) as im:
        im.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale (every byte is still read); other formats: no-op
        im.load()


def check_images(paths: list[str], on_bad: str, progress: bool = True, reasons: dict | None = None) -> set[str]:
    """The paths that cannot be opened and decoded (``reasons``, if given, gets path -> why). ``on_bad="fail"``
    raises on the first one instead."""
    bad = set()
    for p in tqdm(sorted(set(paths)), desc="checking images", disable=not progress or len(paths) < 2000):
        try:
            _decode(p)
        except FileNotFoundError:
            why = "missing"
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            why = " ".join(str(e).split()) or type(e).__name__  # UnidentifiedImageError, truncated data ...
        else:
            continue
        if on_bad == "fail":
            raise BadImageError(f"cannot read image {p} ({why}); fix or remove it, or set data.on_bad_image=skip to "
                                "skip such files")
        bad.add(p)
        if reasons is not None:
            reasons[p] = why
    return bad


class EncodedDataset(Dataset):
    """Items: dicts of equal-length lists (input_ids, context_ids, labels, attention_mask, image_mask) stored as
    tensors, plus per-item image input from ``image_fn(index)`` ({"pixel_values"} or {"image_features"})."""

    KEYS = ("input_ids", "context_ids", "labels", "attention_mask", "image_mask")

    def __init__(self, items: list[dict], image_fn: Callable[[int], dict] | None = None,
                 context_map: torch.Tensor | None = None, examples: list[dict] | None = None):
        keys = [k for k in self.KEYS if items and k in items[0]]
        self.tensors = {k: torch.tensor([it[k] for it in items], dtype=torch.bool if k == "image_mask" else torch.long)
                        for k in keys}
        if context_map is not None:  # e.g. context-agnostic: every live context -> group 0
            self.tensors["context_ids"] = context_map[self.tensors["context_ids"] + 1]
        self.image_fn = image_fn
        self.examples = examples  # the example dicts the items were encoded from (for generation and scoring)
        self.n = len(items)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.tensors.items()}
        if self.image_fn is not None:
            item.update(self.image_fn(i))
        return item
