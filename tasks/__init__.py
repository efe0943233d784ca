"""Tasks, one file each, registered by name in :data:`TASKS` (``get_task("caption")``)."""
from mtcpeft.data.task import TASKS, Task, get_task
from . import caption, qa, vqa  # noqa: F401,E402  (registration)

__all__ = ["TASKS", "Task", "get_task"]
