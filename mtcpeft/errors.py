"""One base class for every mistake a user can make: its message names the problem and the fix.

The launch scripts catch :class:`MtcpeftError` alone (``mtcpeft.cli.run_cli``) and print it as one
``error: ...`` line with exit status 2; anything else is a bug and keeps its traceback. Each subclass also derives
from the builtin error a caller would expect (``ValueError``, ``KeyError``, ``OSError``), so ``except ValueError``
keeps working.
"""
from __future__ import annotations


class MtcpeftError(Exception):
    """A user error whose message says what is wrong and what to do instead."""
