"""GSM8K, MathQA and StrategyQA loaders on small native-format fixtures (no ../shared)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.tasks.base import load_split
from meml.tasks.choices import parse_options
from meml.tasks.gsm8k import rationales as gsm8k_rationales
from meml.tasks.mathqa import clean_rationale, fix_mojibake, formula_steps
from meml.tasks.registry import build_task

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def task(name: str, path: Path | str, **kw):
    return build_task(TaskConfig(name=name, path=str(path), **kw))


def assert_rationales_verify(t, examples):
    for e in examples:
        assert t.verify(f"The answer is {e.answer}.", e, True).score == 1.0, e.id
        for style in t.styles:
            if style in e.rationales:
                assert e.rationales[style].rstrip().endswith(".")
                assert t.verify(e.rationales[style], e, True).score == 1.0, (e.id, style)


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_fixture_rows_ids_and_rationales():
    t = task("gsm8k", FIXTURES / "gsm8k")
    train, test = t.load("train"), t.load("test")
    assert len(train) == 4 and len(test) == 2  # the blank line is not a row
    assert [e.answer for e in train] == ["17", "1350", "-2", "0.75"]
    assert [e.id for e in train] == ["gsm8k-train-0", "gsm8k-train-1", "gsm8k-train-3", "gsm8k-train-4"]
    first = train[0]
    assert "<<" not in first.rationales["prose"] and first.rationales["prose"].endswith("The answer is 17.")
    assert first.rationales["equations"].splitlines()[0] == "3*4=12"
    assert_rationales_verify(t, train + test)


def test_gsm8k_rationales_drop_calculator_notes():
    r = gsm8k_rationales("She pays 2*3 = <<2*3=6>>6 dollars.", "6")
    assert r["prose"] == "She pays 2*3 = 6 dollars.\nThe answer is 6."
    assert r["equations"] == "2*3=6\nThe answer is 6."


@pytest.mark.parametrize(
    ("skip", "match"),
    [(False, r"gsm8k_bad.jsonl:2: not valid JSON")],
)
def test_gsm8k_malformed_line_names_file_and_line(skip, match):
    t = task("gsm8k", FIXTURES / "gsm8k_bad.jsonl", skip_invalid=skip)
    with pytest.raises(DataError, match=match):
        t.load("train")


def test_gsm8k_field_errors_name_the_field(tmp_path):
    cases = {
        '{"question": "q", "answer": "It is 5."}': r":1: field 'answer': no '####'",
        '{"answer": "#### 3"}': r":1: field 'question' is missing",
        '{"question": "q", "answer": "#### five"}': r":1: field 'answer': final answer 'five'",
        '["a list"]': r":1: expected an object",
    }
    for line, match in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=match):
            task("gsm8k", path).load("train")


def test_gsm8k_skip_invalid_counts_and_logs(caplog):
    t = task("gsm8k", FIXTURES / "gsm8k_bad.jsonl", skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="meml"):
        examples = t.load("train")
    assert [e.answer for e in examples] == ["4", "9"]
    assert t.skipped["train"] == 4
    assert "skipped 4 malformed" in caplog.text and "gsm8k_bad.jsonl:2" in caplog.text


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="train.jsonl: the split has no rows"):
        task("gsm8k", tmp_path).load("train")
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "none"}\n')
    t = task("gsm8k", tmp_path, skip_invalid=True)
    with pytest.raises(DataError, match=r"no rows \(1 malformed, skipped\)"):
        load_split(t, TaskConfig(name="gsm8k", path=str(tmp_path)), "test", None)


def test_missing_split_file_names_what_was_looked_for():
    with pytest.raises(DataError, match="no file for split 'dev'"):
        task("gsm8k", FIXTURES / "gsm8k").load("dev")


# ----------------------------------------------------------------------------- MathQA


def test_mathqa_fixture_questions_options_and_rationales():
    t = task("mathqa", FIXTURES / "mathqa")
    dev = t.load("dev")
    assert len(dev) == 4 and [e.answer for e in dev] == ["c", "b", "d", "e"]
    assert dev[0].id == "mathqa-dev-0"
    assert dev[0].question.endswith("Options:\na) 40\nb) 50\nc) 60\nd) 70\ne) 80")
    assert dev[1].columns["options"]["b"] == "30"  # the list-like options string
    assert dev[2].columns["options"]["d"] == "7"  # "d ) d ) 7": the repeated letter is dropped
    assert dev[1].columns["category"] == "gain"
    assert dev[1].rationales["prose"] == "15 / 100 × 200 = 30\nThe answer is (b) 30."
    assert dev[2].rationales["prose"] == "side = √ 49 = 7 m\nThe answer is (d) 7."
    assert dev[3].rationales["equations"] == "20 / 100 = 0.2\n1 - 0.2 = 0.8\n12 / 0.8 = 15\nThe answer is (e) rs . 15."
    assert_rationales_verify(t, dev + t.load("test"))


def test_mathqa_train_falls_back_to_dev_and_keeps_dev_ids():
    t = task("mathqa", FIXTURES / "mathqa")
    assert [e.id for e in t.load("train")] == [e.id for e in t.load("dev")]


def test_mathqa_errors_and_unparseable_options():
    t = task("mathqa", FIXTURES / "mathqa_bad.json")
    with pytest.raises(DataError, match=r"mathqa_bad.json row 1: field 'correct' is 'f'"):
        t.load("test")
    t = task("mathqa", FIXTURES / "mathqa_bad.json", skip_invalid=True)
    examples = t.load("test")
    assert t.skipped["test"] == 2  # bad letter, missing Problem
    kept = {e.id: e for e in examples}
    assert set(kept) == {"mathqa-test-0", "mathqa-test-3"}
    # unreadable options: the row is kept, the verifier abstains and it is counted as unparsed
    assert t.verify("The answer is (b).", kept["mathqa-test-3"], True).score is None


def test_mathqa_missing_field_names_it(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('[{"Rationale": "x", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "a"}]')
    with pytest.raises(DataError, match=r"test.json row 0: field 'Problem' is missing"):
        task("mathqa", tmp_path).load("test")


def test_parse_options_forms():
    assert parse_options("a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5") == {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}
    assert parse_options("['a ) 2 : 3', 'b ) 4 : 5', 'c ) 1', 'd ) 7 : 9', 'e ) 8 : 5']")["a"] == "2 : 3"
    assert parse_options("a ) ( 40,0 ) , b ) ( 30,0 ) , c ) 1 , d ) 2 , e ) 3")["a"] == "( 40,0 )"
    assert parse_options("1 2 3") == {}


def test_clean_rationale_and_mojibake():
    assert clean_rationale('"x = 2 ã — 3 = 6 . answer : option c"') == "x = 2 × 3 = 6"
    assert clean_rationale('"we get 6 , so the answer is b ."') == "we get 6"
    assert fix_mojibake("2 â \x81 „ 5") == "2 / 5"
    assert fix_mojibake("area = ï € r ^ 2") == "area = π r ^ 2"
    assert fix_mojibake("plain text, café") == "plain text, café"


def test_formula_steps():
    assert formula_steps(
        "subtract(divide(multiply(add(const_100, 31.1), const_100), subtract(const_100, 5)), const_100)"
    ) == ["100 + 31.1 = 131.1", "131.1 * 100 = 13110", "100 - 5 = 95", "13110 / 95 = 138", "138 - 100 = 38"]
    assert formula_steps("volume_cone(3, 4)") == ["r1 = volume_cone(3, 4)"]  # meaning unclear: not worked out
    assert formula_steps("divide(5, 0)") == ["r1 = 5 / 0"]
    assert formula_steps("multiply(const_pi, power(2, const_2))") == ["2 ^ 2 = 4", "π * 4 = 12.5664"]
    assert formula_steps("add(1, 2") == [] and formula_steps("") == []


# ----------------------------------------------------------------------------- StrategyQA


def test_strategyqa_fixture_answers_ids_and_rationales():
    t = task("strategyqa", FIXTURES / "strategyqa")
    train, dev = t.load("train"), t.load("dev")
    assert [e.id for e in train] == ["fx01", "fx02", "fx03"]
    assert [e.answer for e in train] == ["no", "yes", "no"]
    assert (
        train[0].rationales["prose"]
        == "Penguins cannot fly. Crossing the Atlantic by air requires flight.\nThe answer is no."
    )
    steps = train[0].rationales["steps"].splitlines()
    assert steps[1] == "2. Is the answer to step 1 needed to fly across the Atlantic?"
    assert train[0].columns["term"] == "Penguin"
    assert [e.id for e in t.load("test")] == [e.id for e in dev]  # no test.json: dev serves "test"
    assert_rationales_verify(t, train + dev)


def test_strategyqa_errors_and_skip():
    with pytest.raises(DataError, match=r"strategyqa_bad.json row 1: field 'answer' is 'maybe'"):
        task("strategyqa", FIXTURES / "strategyqa_bad.json").load("train")
    t = task("strategyqa", FIXTURES / "strategyqa_bad.json", skip_invalid=True)
    assert [e.id for e in t.load("train")] == ["ok1"]
    assert t.skipped["train"] == 3  # bad answer, facts not a list, repeated qid


def test_strategyqa_repeated_qid_is_an_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"qid": "a", "question": "q?", "answer": true}, {"qid": "a", "question": "r?", "answer": false}]')
    with pytest.raises(DataError, match=r"row 1: field 'id': 'a' repeats the id of .*row 0"):
        task("strategyqa", path).load("train")


def test_invalid_json_file_names_the_line(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('[\n {"qid": "a",\n  "question": }\n]')
    with pytest.raises(DataError, match=r"dev.json:3: not valid JSON"):
        task("strategyqa", tmp_path).load("dev")


def test_native_tasks_reject_options():
    for name in ("gsm8k", "mathqa", "strategyqa"):
        with pytest.raises(DataError, match="takes no options"):
            build_task(TaskConfig(name=name, path="x", options={"foo": 1}))


# ----------------------------------------------------------------------------- hub ids


def test_hub_ids_go_through_datasets(monkeypatch):
    """The hub path is exercised offline: `datasets.load_dataset` is replaced by a stub."""
    import datasets

    calls = []
    rows = {
        "openai/gsm8k": [{"question": "1+1?", "answer": "1+1=2\n#### 2"}],
        "allenai/math_qa": [
            {
                "Problem": "1+1 ?",
                "Rationale": "2",
                "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5",
                "correct": "b",
                "annotated_formula": "add(1, 1)",
                "linear_formula": "",
                "category": "general",
            }
        ],
        "ChilleD/StrategyQA": [
            {
                "qid": "h1",
                "question": "Is 2 even?",
                "answer": True,
                "facts": "2 is divisible by 2.",
                "decomposition": [],
            }
        ],
    }

    def fake_load_dataset(source, config=None, split=None):
        calls.append((source, config, split))
        return rows[source]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert build_task(TaskConfig(name="gsm8k")).load("test")[0].answer == "2"
    assert build_task(TaskConfig(name="mathqa")).load("dev")[0].id == "mathqa-dev-0"
    strategy = build_task(TaskConfig(name="strategyqa")).load("dev")[0]
    assert strategy.rationales["prose"] == "2 is divisible by 2.\nThe answer is yes."
    assert calls == [
        ("openai/gsm8k", "main", "test"),
        ("allenai/math_qa", None, "validation"),
        ("ChilleD/StrategyQA", None, "test"),
    ]


def test_a_validation_split_held_out_of_train(tmp_path):
    """GSM8K has no validation split: task.validation_holdout carves one from train's end."""
    cfg = TaskConfig(name="gsm8k", path=str(FIXTURES / "gsm8k"), validation_holdout=1)
    t = build_task(cfg)
    train, validation = load_split(t, cfg, "train", None), load_split(t, cfg, "validation", None)
    everything = t.load("train")
    assert [e.id for e in validation] == [everything[-1].id]
    assert [e.id for e in train] == [e.id for e in everything[:-1]]  # training never sees it
    with pytest.raises(DataError, match="would leave no training question"):
        load_split(
            t, TaskConfig(name="gsm8k", path=str(FIXTURES / "gsm8k"), validation_holdout=len(everything)), "train", None
        )
