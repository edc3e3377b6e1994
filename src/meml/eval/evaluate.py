"""Held-out evaluation under each expert prompt.

The paper's protocol: for every question and expert, one greedy answer scored by the
task's verifier; the summary holds each expert's accuracy, the best expert, "any expert
correct" (coverage) and the majority vote of the experts' answers.

With `eval.samples = n > 0`, each (question, expert) also gets n answers sampled at
rollout.temperature / rollout.top_p, which give:
  pass@k/<expert>        unbiased pass@k for each k in eval.pass_k with k <= n
  acc/majority_sampled   majority vote over all N*n sampled answers (self-consistency)
  coverage/*             the compute-matched comparison (metrics.compute_matched_coverage):
                         N experts x k samples against each single expert x N*k samples
  budget_coverage/*      with eval.coverage_split: that split of A answers across the experts
                         against the uniform split and each single expert x A (budget_coverage)
  all_wrong/<expert>     probability that a training group of G = rollout.num_generations_
  zero_signal/<expert>   per_expert answers is all wrong / all equal (no learning signal)

One `QuestionRecord` per question holds the prompts, completions, extracted answers and
scores; `summarize` recomputes every figure from records alone, so a resumed evaluation
(records read back from JSONL) gives the same summary as an uninterrupted one.
Questions whose gold answer the verifier cannot parse (it abstains) are counted and left
out of every accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from meml.core.config import EvalConfig
from meml.core.types import Example, Expert
from meml.engines.base import Engine, SamplingParams
from meml.eval.metrics import budget_coverage, compute_matched_coverage, majority_vote, pass_at_k, zero_signal
from meml.tasks.base import Task
from meml.tasks.experts import render_prompt

log = logging.getLogger("meml")


@dataclass
class Answer:
    completion: str
    extracted: str | None
    score: float | None  # None: the verifier abstained
    finished: bool  # False: cut at max_new_tokens


@dataclass
class ExpertAnswers:
    prompt: str
    greedy: Answer
    samples: list[Answer] = field(default_factory=list)


@dataclass
class QuestionRecord:
    question_id: str
    question: str
    gold: str
    experts: dict[str, ExpertAnswers]  # expert name -> its answers, in expert order
    majority: str | None = None  # the experts' greedy majority answer
    majority_score: float | None = None
    majority_sampled: str | None = None  # majority over all sampled answers
    majority_sampled_score: float | None = None

    @staticmethod
    def from_dict(d: dict) -> QuestionRecord:
        experts = {
            name: ExpertAnswers(e["prompt"], Answer(**e["greedy"]), [Answer(**a) for a in e["samples"]])
            for name, e in d["experts"].items()
        }
        return QuestionRecord(**{**d, "experts": experts})

    @property
    def abstained(self) -> bool:
        return all(e.greedy.score is None for e in self.experts.values())


def canonical(answer: str | None) -> str | None:
    """One spelling per answer, so "1,000" and "1000.0" vote together."""
    from meml.tasks.verifiers import parse_number

    if answer is None:
        return None
    value = parse_number(answer)
    return str(value) if value is not None else answer.strip().lower()


def _vote(task, example: Example, answers: list[Answer]) -> tuple[str | None, float | None]:
    vote = majority_vote([canonical(a.extracted) for a in answers])
    if vote is None:
        return None, 0.0
    return vote, task.verify(f"The answer is {vote}", example, True).score


# ----------------------------------------------------------------------------- generation


@dataclass
class Evaluator:
    """What an evaluation needs: an engine to generate with, the experts and how their
    prompts are tokenized, the task's judge, and the sampling settings of eval.samples."""

    engine: Engine
    tokenizer: object
    experts: list[Expert]
    task: Task
    prompt: Callable[[Example, int], list[int]]  # (example, expert index) -> prompt token ids
    temperature: float = 1.0
    top_p: float = 1.0


def evaluate_batch(
    ev: Evaluator, examples: list[Example], max_new_tokens: int, samples: int = 0, seed: int = 0
) -> list[QuestionRecord]:
    """Greedy (and, with samples > 0, sampled) answers of every expert to `examples`."""
    num_experts = len(ev.experts)
    prompts = [ev.prompt(ex, e) for ex in examples for e in range(num_experts)]
    greedy = ev.engine.generate(prompts, SamplingParams(1, 0.0, 1.0, max_new_tokens))
    sampled = [[] for _ in prompts]
    if samples:
        sampled = ev.engine.generate(prompts, SamplingParams(samples, ev.temperature, ev.top_p, max_new_tokens, seed))

    def score(g, ex) -> Answer:
        verdict = ev.task.verify(g.text, ex, g.finished)
        return Answer(g.text, verdict.extracted, verdict.score, g.finished)

    records = []
    for q, ex in enumerate(examples):
        experts = {}
        for e, expert in enumerate(ev.experts):
            i = q * num_experts + e
            text = render_prompt(ev.tokenizer, expert, ex, ev.task.format_instruction)
            experts[expert.name] = ExpertAnswers(text, score(greedy[i][0], ex), [score(g, ex) for g in sampled[i]])
        rec = QuestionRecord(ex.id, ex.question, ex.answer, experts)
        if not rec.abstained:
            rec.majority, rec.majority_score = _vote(ev.task, ex, [x.greedy for x in experts.values()])
            if samples:
                rec.majority_sampled, rec.majority_sampled_score = _vote(
                    ev.task, ex, [a for x in experts.values() for a in x.samples]
                )
        records.append(rec)
    return records


def batches(examples: list[Example], questions_per_batch: int) -> list[list[Example]]:
    return [examples[i : i + questions_per_batch] for i in range(0, len(examples), questions_per_batch)]


def batch_seed(seed: int, batch_index: int) -> int:
    """Sampling seed of one batch: fixed by its position, so a resumed run samples alike."""
    return seed * 1_000_003 + 7919 * (batch_index + 1)


def evaluate_examples(
    ev: Evaluator, examples: list[Example], cfg: EvalConfig, group_size: int, seed: int
) -> tuple[dict, list[QuestionRecord]]:
    """Summary and one record per question, in memory (the trainer's evaluation): greedy
    accuracy per expert, and with cfg.samples > 0 the sampled figures; group_size is G of
    the zero-signal estimates."""
    records = []
    for b, chunk in enumerate(batches(examples, cfg.questions_per_batch)):
        records.extend(evaluate_batch(ev, chunk, cfg.max_new_tokens, cfg.samples, batch_seed(seed, b)))
    return summarize(records, [e.name for e in ev.experts], cfg, group_size), records


def records_as_dicts(records: list[QuestionRecord]) -> list[dict]:
    return [asdict(r) for r in records]


# ----------------------------------------------------------------------------- summary


def summarize(records: list[QuestionRecord], expert_names: list[str], cfg: EvalConfig, group_size: int) -> dict:
    """Every figure of the evaluation, from records alone."""
    scored = [r for r in records if not r.abstained]
    n = len(scored)
    summary: dict = {"questions": n, "abstained": len(records) - n}
    for name in expert_names:
        scores = [r.experts[name].greedy.score for r in scored if r.experts[name].greedy.score is not None]
        summary[f"acc/{name}"] = sum(scores) / max(1, len(scores))
    best = max(expert_names, key=lambda name: summary[f"acc/{name}"])  # first on a tie
    summary["acc/best"] = summary[f"acc/{best}"]
    summary["best_expert"] = best
    summary["acc/any"] = sum(any(e.greedy.score == 1 for e in r.experts.values()) for r in scored) / max(1, n)
    summary["acc/majority"] = sum(r.majority_score or 0.0 for r in scored) / max(1, n)
    answers = [e.greedy for r in records for e in r.experts.values()]
    summary["truncated_frac"] = sum(not a.finished for a in answers) / max(1, len(answers))
    summary["completion_len_chars"] = sum(len(a.completion) for a in answers) / max(1, len(answers))
    samples = len(scored[0].experts[expert_names[0]].samples) if scored else 0
    if samples:
        summary.update(sampled_summary(scored, expert_names, samples, cfg, group_size))
    return summary


def sample_counts(
    records: list[QuestionRecord], expert_names: list[str], samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scored and correct samples per (question, expert), (Q', E) each, over the questions
    where every one of the `samples` answers of every expert was scored."""

    def counts(answers: list[Answer]) -> tuple[int, int]:
        valid = [a.score for a in answers if a.score is not None]
        return len(valid), sum(v == 1 for v in valid)

    pairs = np.array([[counts(r.experts[name].samples) for name in expert_names] for r in records])  # (Q, E, 2)
    if not len(pairs):
        return np.zeros((0, len(expert_names)), dtype=int), np.zeros((0, len(expert_names)), dtype=int)
    full = (pairs[:, :, 0] == samples).all(1)  # questions where every sample was scored
    return pairs[full, :, 0], pairs[full, :, 1]


def sampled_summary(
    records: list[QuestionRecord], expert_names: list[str], samples: int, cfg: EvalConfig, group_size: int
) -> dict:
    """pass@k, sampled majority, compute-matched coverage and zero-signal groups."""
    n, c = sample_counts(records, expert_names, samples)
    out: dict = {"samples": samples, "sampled_questions": len(n)}
    for k in sorted(k for k in cfg.pass_k if 1 <= k <= samples):
        per_expert = pass_at_k(n, c, k).mean(0) if len(n) else np.zeros(len(expert_names))
        out.update({f"pass@{k}/{name}": float(v) for name, v in zip(expert_names, per_expert)})
        out[f"pass@{k}/best"] = float(per_expert.max())
    out["acc/majority_sampled"] = sum(r.majority_sampled_score or 0.0 for r in records) / max(1, len(records))
    group = min(group_size, samples)
    all_wrong, all_equal = zero_signal(n, c, group)  # (Q', E)
    out["zero_signal/group_size"] = group
    out["all_wrong_frac"] = float(all_wrong.mean()) if len(n) else 0.0
    out["zero_signal_frac"] = float(all_equal.mean()) if len(n) else 0.0
    for e, name in enumerate(expert_names):
        out[f"all_wrong/{name}"] = float(all_wrong[:, e].mean()) if len(n) else 0.0
        out[f"zero_signal/{name}"] = float(all_equal[:, e].mean()) if len(n) else 0.0
    k = cfg.coverage_k or samples // len(expert_names)
    if cfg.coverage and len(expert_names) > 1:
        if k < 1 or k * len(expert_names) > samples:
            log.warning(
                "compute-matched coverage skipped: %d experts x k=%d needs eval.samples >= %d (have %d)",
                len(expert_names),
                max(k, 1),
                max(k, 1) * len(expert_names),
                samples,
            )
        else:
            result = compute_matched_coverage(n, c, expert_names, k, cfg.bootstrap_resamples, seed=0)
            out.update(result.as_summary())
            out["coverage/best_expert"] = result.best
    if cfg.coverage_split:
        if len(cfg.coverage_split) != len(expert_names):
            raise ValueError(
                f"eval.coverage_split={list(cfg.coverage_split)} gives {len(cfg.coverage_split)} experts answers; "
                f"this evaluation has {len(expert_names)} ({', '.join(expert_names)})"
            )
        split = budget_coverage(n, c, expert_names, cfg.coverage_split, cfg.bootstrap_resamples, seed=0)
        out.update(split.as_summary())
        out["budget_coverage/best_expert"] = split.best
    return out


def diversity_verdict(summary: dict) -> str | None:
    """One line answering "do my experts diversify?" from the compute-matched coverage."""
    if "coverage/mixture" not in summary:
        return None
    k, budget = summary["coverage/k"], summary["coverage/budget"]
    low, high = summary["coverage/gain_low"], summary["coverage/gain_high"]
    verdict = "yes" if low > 0 else "no" if high < 0 else "not distinguishable from no gain"
    return (
        f"experts diversify? {verdict}: P(>=1 correct) with {budget // k} experts x {k} samples = "
        f"{summary['coverage/mixture']:.3f} vs best single expert ({summary['coverage/best_expert']}) x {budget} = "
        f"{summary['coverage/best']:.3f}; gain {summary['coverage/gain']:+.3f} [{low:+.3f}, {high:+.3f}] "
        f"(95% paired bootstrap over {summary['sampled_questions']} questions)"
    )
