"""The tasks by name (`task.name`): the built-in ones in one table; users add their own with
`@register_task("name")` on a builder `(TaskConfig, lenient) -> Task`."""

from __future__ import annotations

from meml.core.config import TaskConfig
from meml.core.registry import Registry
from meml.tasks import arithmetic, generic, gsm8k, gym, mathqa, strategyqa
from meml.tasks.base import Task, TaskBuilder

TASKS: Registry[TaskBuilder] = Registry(
    "task.name",
    {
        "arithmetic": arithmetic.build,  # built in: procedural word problems
        "gsm8k": gsm8k.build,
        "mathqa": mathqa.build,
        "strategyqa": strategyqa.build,
        "generic": generic.build,  # users' own JSONL / CSV / parquet / datasets
        "gym": gym.build,  # reasoning-gym
    },
)
register_task = TASKS.register


def build_task(cfg: TaskConfig, lenient: bool = False) -> Task:
    return TASKS.get(cfg.name)(cfg, lenient)
