"""Shared by the launch scripts: user mistakes end in one clear line (``error: ...``), not a traceback."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from mtcpeft.errors import MtcpeftError

T = TypeVar("T")


def run_cli(main: Callable[[], T]) -> T:
    """Run ``main``; a user error (:class:`~mtcpeft.errors.MtcpeftError`) prints ``error: <message>`` to stderr and
    exits with status 2. Any other exception is a bug and keeps its traceback."""
    try:
        return main()
    except MtcpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
