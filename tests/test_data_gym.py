"""reasoning-gym as a task source (skips when the optional package is not installed)."""

from __future__ import annotations

import pytest

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.tasks.gym import gym_answer
from meml.tasks.registry import build_task


@pytest.mark.parametrize(
    ("completion", "answer", "how"),
    [
        ("Add them. The answer is -4.", "-4", "marker"),
        ("Answer: [1, 2, 3]", "[1, 2, 3]", "marker"),
        ("<answer>7</answer>", "7", "answer_tag"),
        ("The answer is 3. Hmm, \\boxed{5}", "5", "boxed"),
        ("thinking... 7", None, "no_marker"),
    ],
)
def test_gym_answer_extraction(completion, answer, how):
    assert gym_answer(completion) == (answer, how)


def test_gym_lenient_takes_the_last_line():
    assert gym_answer("work\n42.", lenient=True) == ("42", "last_line")


def test_gym_needs_a_dataset_name():
    with pytest.raises(DataError, match="task.options.dataset"):
        build_task(TaskConfig(name="gym"))


def test_gym_task_generates_and_scores():
    pytest.importorskip("reasoning_gym")
    cfg = TaskConfig(
        name="gym", options={"dataset": "chain_sum", "size": 5, "seed": 3, "config": {"min_terms": 2, "max_terms": 3}}
    )
    t = build_task(cfg)
    train, test = t.load("train"), t.load("test")
    assert len(train) == 5 and len(test) == 5
    assert [e.id for e in train] == [f"gym-chain_sum-train-{i}" for i in range(5)]
    assert [e.question for e in train] == [e.question for e in build_task(cfg).load("train")]  # same seed, same data
    assert [e.question for e in train] != [e.question for e in test]
    e = train[0]
    assert t.verify(f"The answer is {e.answer}.", e, True).score == 1.0
    assert t.verify(f"The answer is {int(e.answer) + 1}.", e, True).score == 0.0
    assert t.verify(f"The answer is {e.answer}.", e, False).score == 0.0
    assert t.verify(e.answer, e, True).score == 0.0  # strict: no marker
    assert t.styles == ()


def test_gym_bad_dataset_name_is_a_data_error():
    pytest.importorskip("reasoning_gym")
    t = build_task(TaskConfig(name="gym", options={"dataset": "no_such_dataset", "size": 2}))
    with pytest.raises(DataError, match="could not build 'no_such_dataset'"):
        t.load("train")


def test_gym_without_the_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(DataError, match="pip install reasoning-gym"):
        build_task(TaskConfig(name="gym", options={"dataset": "chain_sum"}))
