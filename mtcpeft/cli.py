"""Shared by the launch scripts: user mistakes end in one clear line (``error: ...``), not a traceback."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from .config import ConfigError
from .contexts import ContextIdsError
from .data.coco import DataFormatError
from .data.dataset import BadImageError
from .inject import TargetError
from .io import UnsafeWriteError
from .model import AdaptorStateError
from .models.lm import LMNotFoundError
from .models.vision import FeatureCacheMismatch, VisionWeightsError
from .plugin import PluginError
from .registry import UnknownNameError
from tasks.base import PromptTooLongError

# errors whose message already names the problem and the fix
USER_ERRORS = (ConfigError, ContextIdsError, DataFormatError, BadImageError, TargetError, AdaptorStateError,
               LMNotFoundError, VisionWeightsError, FeatureCacheMismatch, PluginError, UnknownNameError)
USER_ERRORS += (UnsafeWriteError,)  # output folders that would be lost or cannot be written, non-finite tensors
USER_ERRORS += (PromptTooLongError,)  # a prompt generate.py cannot fit (empty splits: a DataFormatError)

T = TypeVar("T")


def run_cli(main: Callable[[], T]) -> T:
    """Run ``main``; a user error prints ``error: <message>`` to stderr and exits with status 2."""
    try:
        return main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
