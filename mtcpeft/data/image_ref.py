"""Images that are not files: a row of a Hugging Face ``datasets`` table whose image column holds encoded bytes.

An example's ``"image"`` is a string everywhere (file path, feature-cache key, report line). :class:`RowImage` keeps
that: it *is* a string (``"<dataset>[<split>][<row>]"``, readable in reports and stable across runs, so the
feature cache of a resumed run still matches) that also knows how to read its bytes. Nothing is read or decoded
until :meth:`RowImage.load` is called: by the image check at start-up (as for files) and by the image loader.
"""
from __future__ import annotations

import io

from PIL import Image


class RowImage(str):
    """The image in row ``row`` of column ``column`` of a ``datasets.Dataset`` (a ``datasets.Image`` column, read
    undecoded, or a binary column). Equal to, and hashed as, its key string."""

    def __new__(cls, key: str, dataset, column: str, row: int):
        self = super().__new__(cls, key)
        self.dataset, self.column, self.row = dataset, column, row
        return self

    def __reduce__(self):  # DataLoader workers: the dataset pickles by its memory-mapped files
        return RowImage, (str(self), self.dataset, self.column, self.row)

    def raw(self) -> bytes:
        value = self.dataset[self.row][self.column]
        if isinstance(value, dict):  # a datasets.Image cell read undecoded: {"bytes", "path"}
            if value.get("bytes") is None:
                if value.get("path") is None:
                    raise FileNotFoundError(f"{self}: the image cell is empty")
                with open(value["path"], "rb") as f:
                    return f.read()
            value = value["bytes"]
        if value is None:
            raise FileNotFoundError(f"{self}: the image cell is empty")
        return bytes(value)

    def open(self) -> Image.Image:
        """The image, opened lazily like a file (``Image.open``): the caller loads or converts it."""
        return Image.open(io.BytesIO(self.raw()))

    def load(self) -> Image.Image:
        """The decoded RGB image."""
        with self.open() as im:
            return im.convert("RGB")


def open_any(image) -> Image.Image:
    """``Image.open`` of a file path or of a :class:`RowImage`."""
    return image.open() if isinstance(image, RowImage) else Image.open(image)
