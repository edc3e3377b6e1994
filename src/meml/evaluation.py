"""Greedy held-out evaluation under each expert prompt (the paper's protocol).

For every question and expert: one greedy answer, scored by the task's verifier. The
summary holds the accuracy of each expert, of the best one, "any expert correct"
(coverage) and the majority vote of the experts' extracted answers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from meml.rollout import SamplingParams
from meml.types import Example


@dataclass
class EvalRecord:
    question_id: str
    expert: str
    completion: str
    extracted: str | None
    score: float | None
    finished: bool


def majority_vote(answers: list[str | None]) -> str | None:
    """Most common non-empty answer; ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def canonical(answer: str | None) -> str | None:
    from meml.rewards.verifiers import parse_number

    if answer is None:
        return None
    value = parse_number(answer)
    return str(value) if value is not None else answer.strip().lower()


def greedy_eval(s, examples: list[Example], max_new_tokens: int) -> tuple[dict, list[EvalRecord]]:
    """Summary metrics and one record per (question, expert)."""
    prompts = [s.prompt(ex, e) for ex in examples for e in range(len(s.experts))]
    params = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens)
    generations = s.engine.generate(prompts, params)
    records: list[EvalRecord] = []
    k = 0
    for ex in examples:
        for expert in s.experts:
            g = generations[k][0]
            k += 1
            verdict = s.task.verify(g.text, ex, g.finished)
            records.append(EvalRecord(ex.id, expert.name, g.text, verdict.extracted, verdict.score, g.finished))
    return summarize(records, [e.name for e in s.experts], {ex.id: ex for ex in examples}, s.task), records


def summarize(records: list[EvalRecord], expert_names: list[str], examples: dict[str, Example], task) -> dict:
    by_q: dict[str, list[EvalRecord]] = {}
    for r in records:
        by_q.setdefault(r.question_id, []).append(r)
    n = len(by_q)
    summary: dict[str, float] = {"questions": n}
    for name in expert_names:
        scores = [r.score or 0.0 for r in records if r.expert == name]
        summary[f"acc/{name}"] = sum(scores) / max(1, len(scores))
    summary["acc/best"] = max(summary[f"acc/{name}"] for name in expert_names)
    summary["acc/any"] = sum(any((r.score or 0) == 1 for r in rs) for rs in by_q.values()) / max(1, n)
    correct_votes = 0
    for qid, rs in by_q.items():
        vote = majority_vote([canonical(r.extracted) for r in rs])
        if vote is not None:
            correct_votes += task.verify(f"The answer is {vote}", examples[qid], True).score == 1.0
    summary["acc/majority"] = correct_votes / max(1, n)
    summary["truncated_frac"] = sum(not r.finished for r in records) / max(1, len(records))
    return summary


def records_as_dicts(records: list[EvalRecord]) -> list[dict]:
    return [asdict(r) for r in records]
