"""The real benchmark files in ../shared/data: row counts, gold-answer parse rates and
expert-0 rationales scoring 1 under their own verifier. Skips when the data is absent."""

from __future__ import annotations

import pytest

from meml.core.config import TaskConfig
from meml.tasks.inspect import split_report
from meml.tasks.registry import build_task

pytestmark = pytest.mark.data

CASES = [
    ("gsm8k", "train", 7473, 1.0),
    ("gsm8k", "test", 1319, 1.0),
    ("strategyqa", "train", 2061, 1.0),
    ("strategyqa", "dev", 229, 1.0),
    ("mathqa", "dev", 4475, 0.995),
    ("mathqa", "test", 2985, 0.995),
]


@pytest.mark.parametrize(("name", "split", "rows", "min_parse_rate"), CASES)
def test_benchmark_split(shared_data, name, split, rows, min_parse_rate):
    task = build_task(TaskConfig(name=name, path=str(shared_data / name)))
    examples = task.load(split)
    report = split_report(task, examples)
    assert report["rows"] == rows
    assert len({e.id for e in examples}) == rows
    assert report["gold_parse_rate"] >= min_parse_rate, f"unparsed gold answers: {report['unparsed_ids']}"
    assert task.skipped[split] == 0
    for style, r in report["rationales"].items():
        assert r["verified"] == r["present"], f"{style} rationales that do not verify: {r['failed_ids']}"
    assert report["rationales"]["prose"]["present"] >= 0.99 * rows  # MathQA: a few Rationales are only "answer : c"


def test_default_split_names_work(shared_data):
    """train/test, the config's defaults, read StrategyQA's dev and MathQA's dev for training."""
    strategy = build_task(TaskConfig(name="strategyqa", path=str(shared_data / "strategyqa")))
    assert len(strategy.load("test")) == 229
    mathqa = build_task(TaskConfig(name="mathqa", path=str(shared_data / "mathqa")))
    assert len(mathqa.load("train")) == 4475 and len(mathqa.load("challenge_test")) == 604


def test_mathqa_rationales_have_no_mojibake_or_wrapping_quotes(shared_data):
    task = build_task(TaskConfig(name="mathqa", path=str(shared_data / "mathqa")))
    for e in task.load("test"):
        prose = e.rationales.get("prose", "")
        assert not prose.startswith('"') and "ã —" not in prose and "â ˆ" not in prose, e.id


def test_rationales_do_not_verify_against_another_questions_gold(shared_data):
    """A verifier that accepted anything would pass the self-check above; scored against
    the next question's gold, a GSM8K rationale verifies only when the two golds agree."""
    task = build_task(TaskConfig(name="gsm8k", path=str(shared_data / "gsm8k")))
    examples = task.load("test")
    pairs = list(zip(examples, examples[1:] + examples[:1]))
    hits = [task.verify(a.rationales["prose"], b, True).score == 1.0 for a, b in pairs]
    same_gold = [a.answer == b.answer for a, b in pairs]
    assert hits == same_gold
