"""Shared by the launch scripts: one exit path, and the option that imports a user's task modules.

Every script ends in ``run_cli(main)``: a user mistake (:class:`~mtcpeft.errors.MtcpeftError`) prints one line
``error: ...`` and exits with status 2 (as argparse does for a bad command line); Ctrl-C exits with 130 and no
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

from mtcpeft.data.task import ENTRY_POINT_GROUP, import_task_modules, task_names
from mtcpeft.errors import MtcpeftError

T = TypeVar("T")


def run_cli(main: Callable[[], T]) -> T:
    """Run ``main``; a user error (:class:`~mtcpeft.errors.MtcpeftError`) prints ``error: <message>`` to stderr and
    exits with status 2, Ctrl-C exits with status 130. Any other exception is a bug and keeps its traceback."""
    try:
        return main()
    except MtcpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def add_task_module_option(ap: argparse.ArgumentParser) -> None:
    """``--task-module MODULE`` (repeatable): modules imported before any task is named, so tasks they register
    with :func:`mtcpeft.data.task.register_task` can be named like the shipped ones."""
    ap.add_argument("--task-module", action="append", default=[], metavar="MODULE", dest="task_modules",
                    help="import MODULE first (e.g. mypkg.mytask): the tasks it registers can then be named; "
                         f"repeat. Installed packages may declare tasks in the entry-point group {ENTRY_POINT_GROUP} "
                         "instead")


def load_task_modules(args: argparse.Namespace) -> None:
    """Import the ``--task-module`` modules of parsed arguments (see :func:`add_task_module_option`)."""
    import_task_modules(args.task_modules)


def task_help() -> str:
    """``registered task: caption, qa, vqa`` (plus the installed entry points): the help of a --task option."""
    return f"registered task: {', '.join(task_names())} (or one of a --task-module)"
