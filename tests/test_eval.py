"""Evaluation records and summary on scripted answers (no model): accuracy per expert,
best expert, any-expert coverage, majority vote, pass@k and the sampled diagnostics."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from meml.core.config import EvalConfig, TaskConfig
from meml.core.types import Example, Expert
from meml.engines.base import Generation
from meml.eval.evaluate import (
    Evaluator,
    QuestionRecord,
    evaluate_batch,
    records_as_dicts,
    summarize,
)
from meml.eval.metrics import pass_at_k
from meml.tasks.registry import build_task

EXPERTS = [Expert("a", "sys a"), Expert("b", "sys b"), Expert("c", "sys c")]
EXAMPLES = [
    Example("q1", "?", "7"),
    Example("q2", "?", "10"),
    Example("q3", "?", "5"),
    Example("q4", "?", "not a number"),
]
GREEDY = {  # (question, expert) -> greedy completion
    ("q1", "a"): "3 + 4 = 7. The answer is 7.",
    ("q1", "b"): "The answer is 7",
    ("q1", "c"): "The answer is 8",
    ("q2", "a"): "The answer is 3",
    ("q2", "b"): "The answer is 4",
    ("q2", "c"): "The answer is 10",
    ("q3", "a"): "The answer is 6",
    ("q3", "b"): "so the answer is 6.0",
    ("q3", "c"): "five, I think",
}
# sampled answers: expert a solves q1 in 2 of 4, expert c solves q2 in 1 of 4, nothing else
CORRECT_SAMPLES = {("q1", "a"): 2, ("q2", "c"): 1}


class ScriptedEngine:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for qid, name in prompts:  # the fake session's prompts are (question id, expert name)
            if params.temperature == 0:
                out.append([Generation([1], GREEDY.get((qid, name), "The answer is 0"), True)])
                continue
            ex = next(e for e in EXAMPLES if e.id == qid)
            right = CORRECT_SAMPLES.get((qid, name), 0)
            texts = [f"The answer is {ex.answer}"] * right + ["The answer is 999"] * (params.num_samples - right)
            out.append([Generation([1], t, True) for t in texts])
        return out


class ChatTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return " | ".join(m["content"] for m in messages)


def fake_session(pass_k=(1, 2, 4), samples_group=2):
    cfg = SimpleNamespace(
        rollout=SimpleNamespace(temperature=1.0, top_p=1.0, num_generations_per_expert=samples_group),
        eval=EvalConfig(pass_k=list(pass_k), bootstrap_resamples=200, coverage_k=1),
        seed=0,
    )
    evaluator = Evaluator(
        ScriptedEngine(),
        ChatTokenizer(),
        EXPERTS,
        build_task(TaskConfig(name="arithmetic")),
        prompt=lambda ex, e: (ex.id, EXPERTS[e].name),
        temperature=1.0,
        top_p=1.0,
    )
    evaluator.cfg = cfg  # what the tests summarise with
    return evaluator


def test_greedy_summary_matches_hand_counts():
    s = fake_session()
    records = evaluate_batch(s, EXAMPLES, max_new_tokens=16)
    summary = summarize(records, ["a", "b", "c"], s.cfg.eval, group_size=2)
    assert summary["questions"] == 3 and summary["abstained"] == 1  # q4's gold does not parse
    assert summary["acc/a"] == pytest.approx(1 / 3)  # q1
    assert summary["acc/b"] == pytest.approx(1 / 3)  # q1
    assert summary["acc/c"] == pytest.approx(1 / 3)  # q2
    assert summary["acc/best"] == pytest.approx(1 / 3) and summary["best_expert"] == "a"
    assert summary["acc/any"] == pytest.approx(2 / 3)  # q1 and q2
    # majority: q1 7 (right), q2 a three-way tie -> the first, 3 (wrong), q3 6 (wrong)
    assert summary["acc/majority"] == pytest.approx(1 / 3)
    by_id = {r.question_id: r for r in records}
    assert (by_id["q1"].majority, by_id["q2"].majority, by_id["q3"].majority) == ("7", "3", "6")
    assert by_id["q3"].experts["c"].greedy.extracted is None  # no answer marker: no vote
    assert by_id["q1"].experts["a"].prompt == "sys a | ?\n\n" + s.task.format_instruction
    assert "pass@1/a" not in summary  # greedy only


def test_sampled_summary_pass_at_k_coverage_and_zero_signal():
    s = fake_session()
    records = evaluate_batch(s, EXAMPLES[:3], max_new_tokens=16, samples=4, seed=1)
    assert [p.temperature for p in s.engine.calls] == [0.0, 1.0] and s.engine.calls[1].num_samples == 4
    summary = summarize(records, ["a", "b", "c"], s.cfg.eval, group_size=2)
    assert summary["samples"] == 4 and summary["sampled_questions"] == 3
    # expert a: q1 2 of 4 correct, others 0 -> pass@2 = (1 - C(2,2)/C(4,2)) / 3
    assert summary["pass@1/a"] == pytest.approx(0.5 / 3)
    assert summary["pass@2/a"] == pytest.approx((1 - 1 / 6) / 3)
    assert summary["pass@4/a"] == pytest.approx(1 / 3)
    assert summary["pass@2/c"] == pytest.approx(float(pass_at_k(4, 1, 2)) / 3)
    assert summary["pass@4/best"] == pytest.approx(1 / 3)
    # compute-matched with k=1: mixture q1 = 1/2 (a's one draw), q2 = 1/4 (c's one draw)
    assert summary["coverage/k"] == 1 and summary["coverage/budget"] == 3
    assert summary["coverage/mixture"] == pytest.approx((0.5 + 0.25) / 3)
    # single a with 3 of its 4 samples: q1 1 - C(2,3)/C(4,3) = 1; c on q2: 1 - C(3,3)/C(4,3) = 3/4
    assert summary["coverage/a"] == pytest.approx(1 / 3) and summary["coverage/c"] == pytest.approx(0.25)
    assert summary["coverage/best_expert"] == "a"
    assert summary["coverage/gain"] == pytest.approx(0.75 / 3 - 1 / 3)
    assert summary["coverage/gain_low"] <= summary["coverage/gain"] <= summary["coverage/gain_high"]
    # zero signal with groups of G=2: a on q1 all wrong w.p. C(2,2)/C(4,2) = 1/6, all right 1/6
    assert summary["all_wrong/a"] == pytest.approx((1 / 6 + 1 + 1) / 3)
    assert summary["zero_signal/a"] == pytest.approx((2 / 6 + 1 + 1) / 3)
    assert summary["all_wrong/b"] == 1.0 and summary["zero_signal/group_size"] == 2
    # self-consistency over 12 samples: q1 has 2 sevens against 10 wrong 999s -> wrong
    assert summary["acc/majority_sampled"] == 0.0


def test_a_coverage_split_is_scored_against_uniform_and_single_experts():
    s = fake_session()
    s.cfg.eval.coverage_split = [2, 0, 1]
    records = evaluate_batch(s, EXAMPLES[:3], max_new_tokens=16, samples=4, seed=1)
    summary = summarize(records, ["a", "b", "c"], s.cfg.eval, group_size=2)
    # a: 2 of 4 right on q1; c: 1 of 4 on q2 (as in the test above). Split [2, 0, 1]:
    # q1 1 - C(2,2)/C(4,2) = 5/6 from a; q2 1 - C(3,1)/C(4,1) = 1/4 from c; q3 0
    assert summary["budget_coverage/budget"] == 3
    assert summary["budget_coverage/split"] == pytest.approx((5 / 6 + 1 / 4) / 3)
    assert [summary[f"budget_coverage/k/{i}"] for i in range(3)] == [2, 0, 1]
    # the uniform [1, 1, 1] is the compute-matched mixture; single a x 3 covers q1 surely
    assert summary["budget_coverage/uniform"] == pytest.approx(summary["coverage/mixture"])
    assert summary["budget_coverage/single/a"] == pytest.approx(1 / 3)
    assert summary["budget_coverage/best_expert"] == "a"
    best_rival = max(summary["budget_coverage/uniform"], summary["budget_coverage/best_single"])
    assert summary["budget_coverage/gain"] == pytest.approx(summary["budget_coverage/split"] - best_rival)


def test_a_coverage_split_that_does_not_fit_is_a_config_error():
    from meml.core.errors import ConfigError
    from meml.core.load import load_config

    assert load_config(None, []).eval.coverage_split == []  # off by default
    ok = load_config(None, ["eval.samples=12", "eval.coverage_split=[6,4,2]"])
    assert ok.eval.coverage_split == [6, 4, 2]
    for bad, match in [
        (["eval.samples=12", "eval.coverage_split=[6,6]"], "gives 2 experts answers; there are 3"),
        (["eval.samples=8", "eval.coverage_split=[6,4,2]"], "needs eval.samples >= 12"),
        (["eval.samples=12", "eval.coverage_split=[0,0,0]"], "not all 0"),
        (["eval.samples=12", "eval.coverage_split=[6,-1,2]"], "not all 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(match)):
            load_config(None, bad)


def test_records_round_trip_through_json():
    s = fake_session()
    records = evaluate_batch(s, EXAMPLES, max_new_tokens=16, samples=2)
    back = [QuestionRecord.from_dict(json.loads(json.dumps(d))) for d in records_as_dicts(records)]
    assert back == records
    a = summarize(records, ["a", "b", "c"], s.cfg.eval, 2)
    b = summarize(back, ["a", "b", "c"], s.cfg.eval, 2)
    assert a == b


def test_coverage_is_skipped_without_enough_samples(caplog):
    s = fake_session()
    s.cfg.eval.coverage_k = 2  # needs 3 experts x 2 = 6 samples, there are 4
    records = evaluate_batch(s, EXAMPLES[:2], max_new_tokens=16, samples=4)
    summary = summarize(records, ["a", "b", "c"], s.cfg.eval, 2)
    assert "coverage/mixture" not in summary and "pass@4/a" in summary
    assert "compute-matched coverage skipped" in caplog.text
