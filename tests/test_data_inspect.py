"""`meml data inspect`: task inference, figures and rendered prompts, on fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from meml.cli import main
from meml.core.config import TaskConfig
from meml.tasks.inspect import guess_task, split_report
from meml.tasks.registry import build_task

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("gsm8k", "gsm8k"),
        ("gsm8k/test.jsonl", "gsm8k"),
        ("mathqa", "mathqa"),
        ("mathqa/test.json", "mathqa"),
        ("strategyqa", "strategyqa"),
        ("generic", "generic"),
        ("generic/test.csv", "generic"),
    ],
)
def test_guess_task(path, name):
    assert guess_task(FIXTURES / path) == name


def test_split_report_counts_unparsed_gold_and_rationales():
    t = build_task(TaskConfig(name="mathqa", path=str(FIXTURES / "mathqa_bad.json"), skip_invalid=True))
    report = split_report(t, t.load("test"))
    assert report["rows"] == 2 and report["gold_parsed"] == 1
    assert report["unparsed_ids"] == ["mathqa-test-3"]
    prose = report["rationales"]["prose"]
    assert (prose["present"], prose["verified"], prose["abstained"], prose["failed_ids"]) == (2, 1, 1, [])


def test_inspect_directory_prints_counts_and_prompts(capsys):
    assert main(["data", "inspect", str(FIXTURES / "gsm8k"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "task gsm8k" in out
    assert "split train: 4 rows, 0 malformed rows skipped" in out
    assert "split test: 2 rows" in out
    assert "gold answers parsed: 4/4 (100.00%)" in out
    assert "rationale 'equations': 4 present, verified 4/4" in out
    assert "--- expert 'tutor'" in out and "[system]" in out and "[user]" in out
    assert "Tom has 3 boxes" in out and 'starts with "The answer is"' in out
    assert "style 'check'" in out  # the default third expert's style is not one GSM8K has


def test_inspect_single_file_with_skips_and_overrides(capsys):
    args = ["data", "inspect", str(FIXTURES / "strategyqa_bad.json"), "task.skip_invalid=true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "task strategyqa" in out and "split strategyqa_bad: 1 rows, 3 malformed rows skipped" in out


def test_inspect_generic_with_mapping(capsys):
    args = [
        "data",
        "inspect",
        str(FIXTURES / "generic" / "train.jsonl"),
        "task.options.question=problem",
        "task.options.answer=value",
        "task.options.rationale=solution",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "task generic" in out and "rationale 'prose': 3 present, verified 3/3" in out


def test_inspect_reports_data_errors(capsys):
    assert main(["data", "inspect", str(FIXTURES / "gsm8k_bad.jsonl")]) == 2
    assert "gsm8k_bad.jsonl:2: not valid JSON" in capsys.readouterr().out


def test_inspect_task_name_with_path_override(capsys):
    assert (
        main(["data", "inspect", "mathqa", f"task.path={FIXTURES / 'mathqa'}", "-n", "0", "task.train_split=dev"]) == 0
    )
    out = capsys.readouterr().out
    assert "split dev: 4 rows" in out and "split test: 2 rows" in out and "===" not in out


def test_inspect_missing_path_is_an_error(capsys):
    assert main(["data", "inspect", "no/such/dir"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
