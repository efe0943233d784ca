"""The shipped tasks, one file each, registered by name when this package is imported (the launch scripts import
it; the library never does). Your own tasks register the same way from your own package: see
:mod:`mtcpeft.data.task` (``--task-module`` or the ``mtcpeft.tasks`` entry-point group)."""
from mtcpeft.data.task import TASKS, Task, get_task
from . import caption, qa, vqa  # noqa: F401,E402  (registration)

__all__ = ["TASKS", "Task", "get_task"]
