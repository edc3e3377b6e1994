"""Tasks: built-in procedural arithmetic and dataset loaders. Importing registers them."""

from meml.data import arithmetic, gsm8k  # noqa: F401
from meml.data.base import TASKS, DataError, Task, build_task, load_split, register_task

__all__ = ["TASKS", "DataError", "Task", "build_task", "load_split", "register_task"]
