"""Imported first by every launch script run as a program: without the mtcpeft package installed, stop with one
``error:`` line (exit status 2, as for any user error) that says how to install it, instead of an ImportError.

The scripts reach the library only as an installed package (``pip install -e .``, which ``bash .ci/setup``
runs); this module changes no import path, it only checks.
"""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("mtcpeft") is None or importlib.util.find_spec("tasks") is None:
    print(f"error: the mtcpeft package is not installed in this Python ({sys.executable}); run `pip install -e .` "
          f"in {Path(__file__).resolve().parents[1]} (or `bash .ci/setup`, which also installs the offline assets)",
          file=sys.stderr)
    sys.exit(2)
