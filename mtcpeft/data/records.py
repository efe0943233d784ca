"""Reading annotation files: the error every format reader raises, a JSON loader and a field check that name the
file, the record and the field."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mtcpeft.errors import MtcpeftError


class DataFormatError(MtcpeftError, ValueError):
    """A dataset file is not in the format it claims to be; the message names the file and the field."""


def load_json(path: str | os.PathLike):
    """The parsed JSON file ``path``; a missing, unreadable or malformed file is a DataFormatError naming it."""
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


def need(obj, key: str, where: str, kind: type | tuple[type, ...] | None = None):
    """``obj[key]``, or DataFormatError naming the record ``where`` and the field: missing, or not of type
    ``kind`` (a JSON ``true`` is not a number)."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataFormatError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value
