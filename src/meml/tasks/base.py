"""The task contract and its registry.

A task is data plus a judge: `load(split)` gives Examples, `verify(completion, example,
finished)` gives a Verdict, `format_instruction` tells the model how to mark its answer
(without a placeholder it could copy). Tasks register a builder under a name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from meml.core.config import TaskConfig
from meml.core.types import Example, Verdict

NUMERIC_FORMAT = 'End your reply with a sentence that starts with "The answer is" and gives the final number.'


class DataError(ValueError):
    """Bad input data, with a message naming the file, line or row and the field."""


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str], list[Example]]
    verify: Callable[[str, Example, bool], Verdict]
    format_instruction: str
    styles: tuple[str, ...] = ("prose",)  # rationale styles the task's examples carry
    skipped: dict[str, int] = field(default_factory=dict)  # split -> malformed rows skipped (task.skip_invalid)


TaskBuilder = Callable[[TaskConfig, bool], Task]  # (task config, lenient verifier) -> Task
TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def wrap(builder: TaskBuilder) -> TaskBuilder:
        TASKS[name] = builder
        return builder

    return wrap


def build_task(cfg: TaskConfig, lenient: bool = False) -> Task:
    import meml.tasks  # noqa: F401  (registers the built-in tasks)

    if cfg.name not in TASKS:
        close = difflib.get_close_matches(cfg.name, list(TASKS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(f"task.name='{cfg.name}' is not a registered task.{hint} Tasks: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.name](cfg, lenient)


def load_split(task: Task, cfg: TaskConfig, split: str, limit: int | None) -> list[Example]:
    examples = task.load(split)
    if not examples:
        raise DataError(f"task '{task.name}': split '{split}' is empty")
    return examples[:limit] if limit else examples
