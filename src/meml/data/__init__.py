"""Tasks: built-in procedural arithmetic, the benchmark loaders (GSM8K, MathQA,
StrategyQA), users' own data ("generic") and reasoning-gym ("gym"). Importing registers
them; docs/DATA.md describes each format, split and verifier."""

from meml.data import arithmetic, generic, gsm8k, gym, mathqa, strategyqa  # noqa: F401
from meml.data.base import TASKS, DataError, Task, build_task, load_split, register_task

__all__ = ["TASKS", "DataError", "Task", "build_task", "load_split", "register_task"]
