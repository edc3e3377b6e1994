"""The built-in task: procedural arithmetic word problems, deterministic by seed.

Each problem follows one quantity through `difficulty` operations (add, take away, add
or remove groups of items, double/triple, share into equal piles), so difficulty is the
number of reasoning steps; numbers grow with it. Every example carries the gold answer
and the same worked solution in three trace styles, one per default expert:
  prose      plain sentences, one step per sentence (the "dataset rationale", expert 0)
  equations  a chain of equations, one per line, no words
  check      a compact solution followed by a check that works backwards
Each ends with "The answer is N." so the strict numeric verifier can read it.

Splits: train, validation and test, generated independently (the split name is part of
each example's random seed), so no question is shared between them.
Options (task.options): difficulty (default 2), train_size (2000), validation_size (200),
test_size (200), seed (0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.types import Example
from meml.tasks.base import NUMERIC_FORMAT, Task
from meml.tasks.verifiers import verify_numeric

NAMES = ["Sam", "Maya", "Leo", "Ana", "Omar", "Zoe", "Ivan", "Lena", "Raj", "Emma", "Kofi", "Mia"]
ITEMS = ["marbles", "stickers", "apples", "books", "coins", "pencils", "cards", "shells", "cookies", "stamps"]
CONTAINERS = ["bags", "boxes", "packs", "jars", "trays"]
FRIENDS = ["a friend", "a cousin", "a neighbour", "the teacher", "a classmate"]
MULT_WORDS = {2: "doubles", 3: "triples"}
STYLES = ("prose", "equations", "check")
DEFAULT_OPTIONS = {"difficulty": 2, "train_size": 2000, "validation_size": 200, "test_size": 200, "seed": 0}


@dataclass(frozen=True)
class Step:
    """One operation on the running quantity: before -> after."""

    kind: str  # add | sub | add_groups | sub_groups | mul | div
    before: int
    after: int
    a: int  # the amount, group count or factor
    b: int = 0  # items per group (groups only)


def _pick_step(rng: random.Random, q: int, scale: int) -> Step:
    kinds = ["add", "add_groups", "mul"]
    if q >= 4:
        kinds.append("sub")
    if q >= 6:
        kinds.append("sub_groups")
    divisors = [k for k in (2, 3, 4, 5) if q % k == 0 and q // k >= 2]
    if divisors:
        kinds.append("div")
    kind = rng.choice(kinds)
    if kind == "add":
        a = rng.randint(2, scale)
        return Step(kind, q, q + a, a)
    if kind == "sub":
        a = rng.randint(1, q - 1)
        return Step(kind, q, q - a, a)
    if kind == "add_groups":
        k, m = rng.randint(2, 6), rng.randint(2, max(3, scale // 3))
        return Step(kind, q, q + k * m, k, m)
    if kind == "sub_groups":
        pairs = [(k, m) for k in range(2, 6) for m in range(2, 13) if k * m < q]
        k, m = rng.choice(pairs)
        return Step(kind, q, q - k * m, k, m)
    if kind == "mul":
        k = rng.choice([2, 3] if q < 60 else [2])
        return Step(kind, q, q * k, k)
    k = rng.choice(divisors)
    return Step("div", q, q // k, k)


def _sentence(step: Step, name: str, item: str, container: str, friend: str) -> str:
    if step.kind == "add":
        return f"{name} gets {step.a} more {item}."
    if step.kind == "sub":
        return f"{name} gives {step.a} {item} to {friend}."
    if step.kind == "add_groups":
        return f"{name} buys {step.a} {container} with {step.b} {item} in each."
    if step.kind == "sub_groups":
        return f"{name} sells {step.a} {container} with {step.b} {item} in each."
    if step.kind == "mul":
        return f"Then the number of {item} {name} has {MULT_WORDS[step.a]}."
    return f"{name} splits the {item} into {step.a} equal piles and keeps one pile."


def _prose(step: Step, name: str, item: str, container: str) -> str:
    if step.kind == "add":
        return f"{name} gets {step.a} more, so {name} has {step.before} + {step.a} = {step.after} {item}."
    if step.kind == "sub":
        return f"{name} gives away {step.a}, so {name} has {step.before} - {step.a} = {step.after} {item}."
    if step.kind in ("add_groups", "sub_groups"):
        total = step.a * step.b
        verb, sign = ("buys", "+") if step.kind == "add_groups" else ("sells", "-")
        return (
            f"{name} {verb} {step.a} {container} of {step.b}, which is {step.a} * {step.b} = {total} {item}, "
            f"so {name} has {step.before} {sign} {total} = {step.after} {item}."
        )
    if step.kind == "mul":
        return f"The {item} are multiplied by {step.a}, so {name} has {step.before} * {step.a} = {step.after} {item}."
    return f"One of {step.a} equal piles is {step.before} / {step.a} = {step.after} {item}."


def _equation(step: Step) -> str:
    if step.kind == "add":
        return f"{step.before} + {step.a} = {step.after}"
    if step.kind == "sub":
        return f"{step.before} - {step.a} = {step.after}"
    if step.kind in ("add_groups", "sub_groups"):
        sign = "+" if step.kind == "add_groups" else "-"
        total = step.a * step.b
        return f"{step.a} * {step.b} = {total}\n{step.before} {sign} {total} = {step.after}"
    if step.kind == "mul":
        return f"{step.before} * {step.a} = {step.after}"
    return f"{step.before} / {step.a} = {step.after}"


def _undo(step: Step) -> str:
    """The backwards check of one step: from `after` recover `before`."""
    if step.kind == "add":
        return f"{step.after} - {step.a} = {step.before}"
    if step.kind == "sub":
        return f"{step.after} + {step.a} = {step.before}"
    if step.kind == "add_groups":
        return f"{step.after} - {step.a * step.b} = {step.before}"
    if step.kind == "sub_groups":
        return f"{step.after} + {step.a * step.b} = {step.before}"
    if step.kind == "mul":
        return f"{step.after} / {step.a} = {step.before}"
    return f"{step.after} * {step.a} = {step.before}"


def make_example(index: int, split: str, difficulty: int, seed: int) -> Example:
    rng = random.Random(f"meml-arith:{seed}:{split}:{difficulty}:{index}")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    container, friend = rng.choice(CONTAINERS), rng.choice(FRIENDS)
    scale = 10 + 10 * difficulty
    start = rng.randint(3, scale)
    steps: list[Step] = []
    q = start
    for _ in range(difficulty):
        step = _pick_step(rng, q, scale)
        steps.append(step)
        q = step.after
    story = " ".join(_sentence(s, name, item, container, friend) for s in steps)
    question = f"{name} has {start} {item}. {story} How many {item} does {name} have now?"
    answer = str(q)
    ending = f"The answer is {answer}."
    prose = "\n".join([f"{name} starts with {start} {item}."] + [_prose(s, name, item, container) for s in steps])
    equations = "\n".join(_equation(s) for s in steps)
    forward = ", ".join(_equation(s).replace("\n", ", ") for s in steps)
    backward = ", ".join(_undo(s) for s in reversed(steps))
    check = f"Start: {start}. {forward}.\nCheck backwards: {backward}, which matches the start."
    rationales = {
        "prose": f"{prose}\n{ending}",
        "equations": f"{equations}\n{ending}",
        "check": f"{check}\n{ending}",
    }
    return Example(
        id=f"arith-d{difficulty}-s{seed}-{split}-{index}",
        question=question,
        answer=answer,
        rationales=rationales,
        columns={"difficulty": difficulty},
    )


def generate(split: str, size: int, difficulty: int, seed: int) -> list[Example]:
    return [make_example(i, split, difficulty, seed) for i in range(size)]


def build(cfg: TaskConfig, lenient: bool) -> Task:
    unknown = set(cfg.options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise DataError(
            f"task.options: unknown option(s) {sorted(unknown)} for arithmetic; valid: {sorted(DEFAULT_OPTIONS)}"
        )
    opts = {**DEFAULT_OPTIONS, **cfg.options}
    difficulty, seed = int(opts["difficulty"]), int(opts["seed"])
    if difficulty < 1:
        raise DataError(f"task.options.difficulty={difficulty} must be >= 1")
    sizes = {
        "train": int(opts["train_size"]),
        "validation": int(opts["validation_size"]),
        "test": int(opts["test_size"]),
    }

    def load(split: str) -> list[Example]:
        if split not in sizes:
            raise DataError(f"arithmetic has splits {sorted(sizes)}, not '{split}'")
        return generate(split, sizes[split], difficulty, seed)

    def verify(completion: str, example: Example, finished: bool = True):
        return verify_numeric(completion, example.answer, finished=finished, lenient=lenient)

    return Task("arithmetic", load, verify, NUMERIC_FORMAT, styles=STYLES)
