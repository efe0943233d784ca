"""Hugging Face ``datasets`` as a data source (``data.source=hf``): where a split comes from and which columns
hold what.

``data.hf_path`` is one of
* a hub id (``HuggingFaceM4/VQAv2``; ``data.hf_name`` picks its config),
* a folder written by ``save_to_disk`` (a ``DatasetDict``, or one ``Dataset`` that is the split "train"),
* a data folder ``load_dataset`` reads as it is: an ``imagefolder`` with ``metadata.jsonl``, or parquet /
  JSON-lines / CSV files (split names from the file names: ``train.parquet``, ``validation.parquet``, ...),
* one parquet / JSON(-lines) / CSV file or a glob of them (the split "train").

The split is ``data.hf_train_split`` or ``data.hf_val_split``. A task names the example fields it reads and, per
field, the columns of the common hub schemas that may hold it (:data:`TASK_COLUMNS`); ``data.hf_columns``
(``{field: column}``) overrides them. Images: a ``datasets.Image`` column, a column of file paths (relative ones
are relative to a local ``hf_path``'s folder) or of bytes. A file stays a path; encoded bytes become a
:class:`~.image_ref.RowImage` that is read when the image is checked or loaded, never at reading time.
"""
from __future__ import annotations

import glob
import itertools
import os
from pathlib import Path

from mtcpeft.errors import MtcpeftError

from .image_ref import RowImage
from .records import DataFormatError

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class MissingColumnError(DataFormatError):
    """A field's column is not in the dataset; the message lists the columns it has."""


class DatasetUnreachableError(MtcpeftError, ConnectionError):
    """A hub dataset cannot be reached (offline, or no network) and is not in the local cache."""


class MissingSplitError(DataFormatError):
    """The configured split is not in the dataset; the message lists the splits it has."""


def _is_saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _splits_error(where: str, split: str, splits, key: str) -> MissingSplitError:
    return MissingSplitError(f"{where} has no split {split!r}; its splits: {', '.join(sorted(splits))}; set "
                             f"data.{key} to one of them")


def load_split(path: str, name: str | None, split: str, key: str = "hf_train_split", streaming: bool = False):
    """The ``datasets.Dataset`` of ``split`` at ``path`` (see the module docstring); ``key`` is the config key that
    chose the split, named in the error when the split does not exist. ``streaming``: a ``datasets.IterableDataset``
    that reads rows as they are iterated (a saved folder: its Arrow files in up to 64 shards)."""
    import datasets

    local = Path(path)
    if local.is_dir() and _is_saved(local):
        try:
            saved = datasets.load_from_disk(str(local))
        except (FileNotFoundError, ValueError) as e:
            raise DataFormatError(f"data.hf_path={path} cannot be read by datasets.load_from_disk ({e})") from None
        saved = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        if split not in saved:
            raise _splits_error(f"data.hf_path={path}", split, saved, key)
        ds = saved[split]
        return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64))) if streaming else ds
    files = local.is_file() or _is_glob(path)
    if files:
        suffix = "".join(Path(path).suffixes[-1:]).lower()
        if suffix not in BUILDERS:
            what = suffix or "a file without an extension"
            raise DataFormatError(f"data.hf_path={path}: cannot tell the format of {what}; use files ending in "
                                  f"{', '.join(BUILDERS)}")
        if not glob.glob(path):
            raise DataFormatError(f"data.hf_path={path} matches no file; check the pattern")
        args, kwargs = (BUILDERS[suffix],), {"data_files": path}
    else:  # a data folder (imagefolder, parquet files ...) or a hub id
        args, kwargs = (path, name), {}
    try:
        return datasets.load_dataset(*args, split=split, streaming=streaming, **kwargs)
    except ValueError as e:
        if "Unknown split" not in str(e) and "Bad split" not in str(e):  # the message without / with streaming
            raise DataFormatError(f"data.hf_path={path}: {e}") from None
        splits = datasets.get_dataset_split_names(*args, **kwargs)
        raise _splits_error(f"data.hf_path={path}", split, splits, key) from None
    except ConnectionError as e:
        raise DatasetUnreachableError(f"data.hf_path={path}: cannot reach the Hugging Face hub ({e}); load it once "
                                      "online (datasets caches it; HF_DATASETS_OFFLINE=1 then reads the cache) or point "
                                      "data.hf_path at a local copy") from None
    except FileNotFoundError as e:
        raise DataFormatError(f"data.hf_path={path} is neither a local file or folder nor a dataset the hub (or "
                              f"its offline cache) has: {e}") from None


def columns(ds, wanted: dict[str, tuple[str, ...]], required: tuple[str, ...], mapping: dict | None) -> dict:
    """``{field: column}`` for the fields of ``wanted`` found in ``ds``: the column ``mapping`` names, else the
    first candidate present. A required field without a column, or a mapped column that does not exist, is a
    :class:`MissingColumnError` listing the dataset's columns."""
    have = list(ds.column_names)
    mapping = dict(mapping or {})
    out = {}
    for field in dict.fromkeys([*wanted, *mapping]):
        if field in mapping:
            if mapping[field] not in have:
                raise MissingColumnError(f"data.hf_columns maps {field!r} to column {mapping[field]!r}, which the "
                                         f"dataset does not have; its columns: {', '.join(have)}")
            out[field] = mapping[field]
            continue
        found = next((c for c in wanted[field] if c in have), None)
        if found is not None:
            out[field] = found
        elif field in required:
            raise MissingColumnError(f"no column for {field!r} (looked for {', '.join(wanted[field])}); the dataset's "
                                     f"columns: {', '.join(have)}; name it with data.hf_columns={{{field}: COLUMN}}")
    return out


def image_refs(ds, column: str, key: str, base: str | None) -> list[str]:
    """One image reference per row of ``column``: a file path (a path column, or a ``datasets.Image`` cell that
    points at a file) or a :class:`RowImage` ``"<key>[<row>]"`` for encoded bytes. Only paths and null flags are
    read here (from the Arrow table, nothing decoded)."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        root = Path(base) if base else None
        return [str(root / p) if root and not os.path.isabs(p) else p for p in ds[column]]
    if isinstance(feature, datasets.Image):
        table = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        cells = table.data.column(column)
        paths = [p for chunk in cells.chunks for p in chunk.field("path").to_pylist()]
        no_bytes = [n for chunk in cells.chunks for n in chunk.field("bytes").is_null().to_pylist()]
    elif isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        table = ds.select_columns([column])
        paths, no_bytes = [None] * len(ds), [False] * len(ds)
    else:
        raise DataFormatError(f"column {column!r} holds {feature}, not images; use a datasets.Image column, file "
                              "paths or bytes, or map the image with data.hf_columns={image: COLUMN}")
    return [p if nb and p else RowImage(f"{key}[{row}]", table, column, row)
            for row, (p, nb) in enumerate(zip(paths, no_bytes))]


def local_base(path: str) -> str | None:
    """The folder relative image paths of a local ``hf_path`` start from (None for a hub id)."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.is_file():
        return str(p.parent)
    if _is_glob(path):  # the folder above the first pattern part: data/*/x.parquet -> data
        return str(Path(*itertools.takewhile(lambda part: not _is_glob(part), p.parts[:-1])))
    return None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")
