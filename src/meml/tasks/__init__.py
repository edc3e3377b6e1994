"""Layer 1: tasks, their verifiers and reward functions, experts and stage-1 traces.

Tasks: built-in procedural arithmetic, the benchmark loaders (GSM8K, MathQA, StrategyQA),
users' own data ("generic") and reasoning-gym ("gym"); docs/DATA.md describes each format,
split and verifier."""

from meml.tasks import arithmetic, generic, gsm8k, gym, mathqa, strategyqa  # noqa: F401
from meml.tasks.base import TASKS, DataError, Task, build_task, load_split, register_task

__all__ = ["TASKS", "DataError", "Task", "build_task", "load_split", "register_task"]
