"""Inter-expert mutual learning (IML): who teaches whom, per question.

E+ is the expert with the highest mean reward on the question, E- the lowest (ties go to
the earlier expert in the configured order). The term fires only when mean(E+) > mean(E-)
and E+ has a correct answer; O+ is then E+'s shortest correct answer (or its first), and
the weak expert is trained on O+ under its own prompt (see docs/ALGORITHM.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meml.core.types import Episode


def is_correct(episode: Episode) -> bool:
    """The verifier judged it correct; without a verifier verdict, a reward of at least 1."""
    if "correct" in episode.reward_breakdown:
        return episode.reward_breakdown["correct"] == 1.0
    return episode.reward is not None and episode.reward >= 1.0


@dataclass(frozen=True)
class IMLPair:
    question_id: str
    strong: int  # E+
    weak: int  # E-
    answer: Episode  # O+, sampled under E+'s prompt


def expert_means(episodes: Sequence[Episode], num_experts: int) -> list[float | None]:
    """Mean reward of each expert on one question (None if it has no valid reward)."""
    sums, counts = [0.0] * num_experts, [0] * num_experts
    for e in episodes:
        if e.reward is not None:
            sums[e.expert] += e.reward
            counts[e.expert] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def select_pair(episodes: Sequence[Episode], num_experts: int, answer_choice: str = "shortest") -> IMLPair | None:
    """The IML pair of one question's episodes, or None when the term does not fire."""
    means = expert_means(episodes, num_experts)
    scored = [(m, i) for i, m in enumerate(means) if m is not None]
    if len(scored) < 2:
        return None
    best = max(m for m, _ in scored)
    worst = min(m for m, _ in scored)
    if best <= worst:
        return None  # all experts equal: nothing to transfer
    strong = next(i for m, i in scored if m == best)
    weak = next(i for m, i in scored if m == worst)
    correct = [e for e in episodes if e.expert == strong and is_correct(e)]
    if not correct:
        return None
    # min keeps the first on ties
    answer = min(correct, key=lambda e: len(e.completion_ids)) if answer_choice == "shortest" else correct[0]
    return IMLPair(episodes[0].question_id, strong, weak, answer)
