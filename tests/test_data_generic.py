"""The generic loader: users' JSONL / JSON / CSV / parquet with a column mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.tasks.registry import build_task

FIXTURES = Path(__file__).parent / "fixtures" / "data" / "generic"
MAPPING = {"question": "problem", "answer": "value", "rationale": "solution", "id": "uid"}


def generic(path, skip_invalid: bool = False, **options):
    return build_task(TaskConfig(name="generic", path=str(path), options=options, skip_invalid=skip_invalid))


def test_directory_with_a_file_per_split_and_mapping():
    t = generic(FIXTURES, **MAPPING)
    train, test = t.load("train"), t.load("test")  # train.jsonl and test.csv
    assert [e.id for e in train] == ["q1", "q2", "q3"] and [e.id for e in test] == ["t1", "t2"]
    assert [e.answer for e in train] == ["42", "4.5", "999"]
    assert test[1].question == "What is 10, divided by 4?"
    assert train[0].columns == {"level": 1}  # every unmapped column goes to reward functions
    assert test[0].columns == {"level": "1"}  # CSV values are strings
    # a solution without a readable answer gets one; one that has it is kept as written
    assert train[0].rationales["prose"] == "6 * 7 = 42\nThe answer is 42."
    assert train[1].rationales["prose"] == "9 / 2 = 4.5, so the answer is 4.5."
    assert t.styles == ("prose",)
    for e in train + test:
        assert t.verify(e.rationales["prose"], e, True).score == 1.0


def test_extra_columns_and_default_ids():
    t = generic(FIXTURES / "train.jsonl", question="problem", answer="value", extra=["level"])
    examples = t.load("train")
    assert [e.id for e in examples] == ["train-train-0", "train-train-1", "train-train-2"]
    assert examples[0].columns == {"level": 1} and examples[0].rationales == {}
    assert t.styles == ()


def test_parquet_and_split_template(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for split, rows in {
        "train": [("What is 2+2?", "4")],
        "test": [("What is 3+3?", "6"), ("What is 1+0?", "1")],
    }.items():
        table = pa.table({"q": [r[0] for r in rows], "a": [r[1] for r in rows]})
        pq.write_table(table, tmp_path / f"math_{split}.parquet")
    t = generic(tmp_path / "math_{split}.parquet", question="q", answer="a")
    assert len(t.load("train")) == 1 and [e.answer for e in t.load("test")] == ["6", "1"]
    assert t.load("test")[1].id == "math-test-1"


def test_files_option_names_each_split(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "1+1?", "answer": 2}\n')
    t = generic(tmp_path, files={"train": "a.jsonl"})
    assert t.load("train")[0].answer == "2"


def test_multiple_choice_columns():
    t = generic(FIXTURES / "choices.json", verifier="choice", choices="choices", answer="label")
    examples = t.load("test")
    assert examples[0].columns["options"] == {"a": "Venus", "b": "Mercury", "c": "Mars"}
    assert examples[0].question.endswith("Options:\na) Venus\nb) Mercury\nc) Mars")
    assert examples[1].columns["options"] == {"a": "4", "b": "6", "c": "7"}
    assert t.verify("The answer is (b).", examples[0], True).score == 1.0
    assert t.verify("The answer is Mercury.", examples[0], True).score == 1.0
    assert t.verify("The answer is 7", examples[1], True).score == 1.0
    assert "letter of the correct option" in t.format_instruction


def test_yes_no_csv():
    t = generic(FIXTURES / "yesno.csv", verifier="yes_no")
    examples = t.load("test")
    assert [e.answer for e in examples] == ["no", "True"]
    assert t.verify("The answer is yes.", examples[1], True).score == 1.0
    assert t.verify("The answer is no.", examples[0], True).score == 1.0


def test_bad_rows_name_file_row_and_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nWhat?,3\n,4\nWhy?,\n")
    with pytest.raises(DataError, match=r"d.csv:3: field 'question' is missing"):
        generic(path).load("train")
    t = generic(path, skip_invalid=True)
    assert len(t.load("train")) == 1 and t.skipped["train"] == 2


def test_unknown_mapping_column_is_a_field_error(tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'problem_text' is missing"):
        generic(FIXTURES / "train.jsonl", question="problem_text").load("train")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"verfier": "numeric"}, "unknown option"),
        ({"verifier": "regex"}, "not one of"),
        ({"verifier": "choice"}, "needs the column"),
    ],
)
def test_option_errors(options, match):
    with pytest.raises(DataError, match=match):
        generic(FIXTURES, **options)


def test_path_errors(tmp_path):
    with pytest.raises(DataError, match="needs a file"):
        build_task(TaskConfig(name="generic"))
    with pytest.raises(DataError, match="does not exist"):
        generic(tmp_path / "missing.jsonl").load("train")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file format"):
        generic(tmp_path / "x.txt").load("train")
