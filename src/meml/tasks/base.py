"""The task contract.

A task is data plus a judge: `load(split)` gives Examples, `verify(completion, example,
finished)` gives a Verdict, `format_instruction` tells the model how to mark its answer
(without a placeholder it could copy). tasks/registry.py names the builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.types import Example, Verdict

NUMERIC_FORMAT = 'End your reply with a sentence that starts with "The answer is" and gives the final number.'


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str], list[Example]]
    verify: Callable[[str, Example, bool], Verdict]
    format_instruction: str
    styles: tuple[str, ...] = ("prose",)  # rationale styles the task's examples carry
    skipped: dict[str, int] = field(default_factory=dict)  # split -> malformed rows skipped (task.skip_invalid)


TaskBuilder = Callable[[TaskConfig, bool], Task]  # (task config, lenient verifier) -> Task


def load_split(task: Task, cfg: TaskConfig, split: str, limit: int | None) -> list[Example]:
    """The examples of `split` (the first `limit`). With task.validation_holdout=N, "validation"
    is the last N questions of the train split and the train split is the rest."""
    held = cfg.validation_holdout
    if held and split in ("validation", cfg.train_split):
        train = task.load(cfg.train_split)
        if len(train) <= held:
            raise DataError(
                f"task.validation_holdout={held} would leave no training question: "
                f"split '{cfg.train_split}' of task '{task.name}' has {len(train)}"
            )
        examples = train[-held:] if split == "validation" else train[:-held]
    else:
        examples = task.load(split)
    if not examples:
        raise DataError(f"task '{task.name}': split '{split}' is empty")
    return examples[:limit] if limit else examples
